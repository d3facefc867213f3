#include "engine/session_options.h"

#include <set>

#include "runtime/base/str_cat.h"

namespace ecss {

uint32_t ModelSpec::experts_per_layer() const {
  uint32_t experts = 0;
  for (const DomainSpec& d : domains) experts += d.experts;
  return experts;
}

std::vector<uint32_t> SessionOptions::ExpertsPerLayer() const {
  return std::vector<uint32_t>(model.layers, model.experts_per_layer());
}

uint32_t ModelSpec::InitialKey(uint32_t expert) const {
  uint32_t first = 0;
  for (const DomainSpec& d : domains) {
    if (expert - first < d.experts) return d.source_first_expert.value_or(first) + (expert - first);
    first += d.experts;
  }
  return expert;
}

Status SessionOptions::Validate() const {
  const ModelSpec& m = model;
  if (m.layers == 0 || m.d_model == 0 || m.d_ff == 0 || m.vocab == 0 || m.domains.empty()) {
    return InvalidArgumentError(
        "model spec: layers, d_model, d_ff, vocab and at least one domain are required");
  }
  if (m.dtype != DType::kF32 && m.dtype != DType::kBF16) {
    return InvalidArgumentError(
        StrCat("model spec: dtype ", DTypeName(m.dtype), " is not supported (f32 or bf16)"));
  }
  // Bounds far above any model trained (PanGu-Sigma: d_model 5120, d_ff 20480, 40 domains), so
  // that every size derived from them (an expert's parameters and bytes, a layer's experts, the
  // RRE tables' 16-bit local ids) is exact in its type instead of wrapping.
  constexpr uint32_t kMaxWidth = uint32_t{1} << 20, kMaxLayers = uint32_t{1} << 16;
  constexpr uint32_t kMaxGroup = uint32_t{1} << 16, kMaxDomains = uint32_t{1} << 12;
  if (m.d_model > kMaxWidth || m.d_ff > kMaxWidth || m.layers > kMaxLayers ||
      m.domains.size() > kMaxDomains) {
    return InvalidArgumentError(StrCat("model spec: layers ", m.layers, ", d_model ", m.d_model,
                                       ", d_ff ", m.d_ff, ", ", m.domains.size(),
                                       " domains: at most ", kMaxLayers, " layers, ", kMaxWidth,
                                       " for d_model and d_ff, ", kMaxDomains, " domains"));
  }
  if (m.initial_layers > m.layers) {
    return InvalidArgumentError(StrCat("model spec: initial_layers ", m.initial_layers,
                                       " beyond its ", m.layers, " layers"));
  }
  uint64_t layer_total = 0;
  std::set<std::string_view> names;
  std::set<uint32_t> ids;
  for (const DomainSpec& d : m.domains) {
    // Names are the keys of a domain in checkpoints (one line each) and in ecss-extract.
    if (d.name.empty() || d.name.find_first_of("\n\r") != std::string::npos) {
      return InvalidArgumentError(
          StrCat("model spec: domain name '", d.name, "' is empty or holds a line break"));
    }
    if (!names.insert(d.name).second) {
      return InvalidArgumentError(StrCat("model spec: two domains are named '", d.name, "'"));
    }
    // Ascending, so that a router's domains (sorted by id) are in the spec's order.
    const uint32_t id = m.DomainId(ids.size());
    if (!ids.empty() && id <= *ids.rbegin()) {
      return InvalidArgumentError(StrCat("model spec: domain '", d.name, "' has id ", id,
                                         ": ids must ascend in the domains' order (an unset id "
                                         "is the domain's index)"));
    }
    ids.insert(id);
    if (d.source_first_expert && uint64_t{*d.source_first_expert} + d.experts > UINT32_MAX) {
      return InvalidArgumentError(StrCat("model spec: domain '", d.name, "' source_first_expert ",
                                         *d.source_first_expert, " + its experts exceed 32 bits"));
    }
    if (d.experts == 0 || d.experts > kMaxGroup) {
      return InvalidArgumentError(StrCat("model spec: domain '", d.name, "' has ", d.experts,
                                         " experts (1 .. ", kMaxGroup, ")"));
    }
    layer_total += d.experts;
  }
  // ... and together: experts are numbered in 32 bits, and every state of every expert (at
  // most 16 bytes a parameter: bf16 weights, fp32 master and two moments) must count in 64.
  const uint64_t experts = layer_total * m.layers;
  uint64_t state_bytes = 0;
  if (experts > UINT32_MAX ||
      __builtin_mul_overflow(m.expert_params(), experts * 16, &state_bytes)) {
    return InvalidArgumentError(StrCat("model spec: ", experts, " experts of ", m.expert_params(),
                                       " parameters: more than 2^32 experts or 2^64 bytes"));
  }
  if (limits.max_tokens_per_micro_batch == 0 || limits.max_micro_batches == 0) {
    return InvalidArgumentError(
        "session: limits.max_tokens_per_micro_batch and limits.max_micro_batches must be > 0");
  }
  if (uint64_t{limits.max_micro_batches} * m.layers > UINT32_MAX) {
    return InvalidArgumentError("session: limits.max_micro_batches x layers is too large");
  }
  const uint32_t layer_experts = ExpertsPerLayer()[0];
  if (routing == Routing::kLearnedGate && (gate_k == 0 || gate_k > layer_experts)) {
    return InvalidArgumentError(StrCat("session: gate_k ", gate_k, " must be in [1, ",
                                       layer_experts, "] (the experts of a layer)"));
  }
  const uint64_t rows =
      uint64_t{limits.max_tokens_per_micro_batch} * (routing == Routing::kLearnedGate ? gate_k : 1);
  if (rows > UINT32_MAX) {
    return InvalidArgumentError("session: limits.max_tokens_per_micro_batch x gate_k is too large");
  }
  if (gradient_dtype != DType::kF32 && gradient_dtype != DType::kBF16) {
    return InvalidArgumentError(StrCat("session: gradient_dtype ", DTypeName(gradient_dtype),
                                       " is not supported (f32 or bf16)"));
  }
  return ValidatePlacement();
}

// The placement table in session_options.h, rule by rule.
Status SessionOptions::ValidatePlacement() const {
  const Placement& p = placement;
  const auto refuse = [](std::string_view field, Tier tier, std::string_view why) {
    return InvalidArgumentError(
        StrCat("session: placement.", field, " = ", TierName(tier), ": ", why));
  };
  if (p.gradients != Tier::kPinned) {
    return refuse("gradients", p.gradients,
                  "gradients accumulate in pinned memory (the device copies them there)");
  }
  if (p.weights != Tier::kPinned && p.weights != Tier::kNvme) {
    return refuse("weights", p.weights,
                  "pinned or nvme (the device holds the expert cache; fetches copy from pinned "
                  "memory)");
  }
  if (p.master != Tier::kHost && p.master != Tier::kNvme) {
    return refuse("master", p.master, "host or nvme");
  }
  if (p.moments != p.master) {
    return refuse(
        "moments", p.moments,
        StrCat("with the master (", TierName(p.master), "): the optimizer streams them together"));
  }
  const bool states_on_nvme = p.states_on_nvme();
  if (p.weights_on_nvme() && !states_on_nvme) {
    return refuse("weights", p.weights,
                  "needs the master and moments on NVMe too (the update streams them and "
                  "writes the new weights)");
  }
  if (p.weights_on_nvme() && delayed_update) {
    return refuse("weights", p.weights, "does not combine with delayed_update");
  }
  if (states_on_nvme && model.dtype != DType::kBF16) {
    return refuse("master", p.master,
                  "needs the bf16 dtype (the pinned compute weights are the optimizer's bf16 "
                  "copy; f32 models update their weights in place)");
  }
  if (states_on_nvme && p.nvme_dirs.empty()) {
    return refuse("master", p.master, "needs at least one directory (placement.nvme_dirs)");
  }
  if (states_on_nvme && optimizer.groups.size() != 1) {
    return refuse("master", p.master,
                  StrCat("takes one optimizer parameter group (optimizer.groups has ",
                         optimizer.groups.size(), ")"));
  }
  if (p.resume && !states_on_nvme) {
    return InvalidArgumentError("session: placement.resume needs the master and moments on NVMe");
  }
  if (p.overwrite && p.resume) {
    return InvalidArgumentError(
        "session: placement.overwrite replaces the store placement.resume would train on from");
  }
  if (!p.resume_from.empty() && (p.resume || p.write_initial_states)) {
    return InvalidArgumentError(
        StrCat("session: placement.resume_from makes a new store from the "
               "checkpoint; not with ",
               p.resume ? "resume" : "write_initial_states"));
  }
  return Status::Ok();
}

}  // namespace ecss
