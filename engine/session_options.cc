#include "engine/session_options.h"

#include "runtime/base/str_cat.h"

namespace ecss {

std::vector<uint32_t> SessionOptions::ExpertsPerLayer() const {
  uint32_t experts = 0;
  for (const DomainSpec& d : model.domains) experts += d.experts;
  return std::vector<uint32_t>(model.layers, experts);
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
  for (const DomainSpec& d : m.domains) {
    if (d.experts == 0) {
      return InvalidArgumentError(StrCat("model spec: domain '", d.name, "' has 0 experts"));
    }
  }
  if (max_tokens_per_micro_batch == 0 || max_micro_batches == 0) {
    return InvalidArgumentError(
        "session: max_tokens_per_micro_batch and max_micro_batches must be > 0");
  }
  const uint32_t layer_experts = ExpertsPerLayer()[0];
  if (routing == Routing::kLearnedGate && (gate_k == 0 || gate_k > layer_experts)) {
    return InvalidArgumentError(StrCat("session: gate_k ", gate_k, " must be in [1, ",
                                       layer_experts, "] (the experts of a layer)"));
  }
  const uint64_t rows =
      uint64_t{max_tokens_per_micro_batch} * (routing == Routing::kLearnedGate ? gate_k : 1);
  if (rows > UINT32_MAX) {
    return InvalidArgumentError("session: max_tokens_per_micro_batch x gate_k is too large");
  }
  const bool states_on_nvme = states == StatesPlacement::kNvme;
  if (weights == WeightsPlacement::kNvme && (!states_on_nvme || delayed_update)) {
    return InvalidArgumentError(
        "session: weights on NVMe need the states on NVMe too (the update streams them and "
        "writes the new weights), and do not combine with delayed_update");
  }
  if (states_on_nvme && m.dtype != DType::kBF16) {
    return InvalidArgumentError(
        "session: states on NVMe need the bf16 dtype (the pinned compute weights are the "
        "optimizer's bf16 copy)");
  }
  if (states_on_nvme && nvme_dirs.empty()) {
    return InvalidArgumentError("session: states on NVMe need at least one directory (nvme_dirs)");
  }
  if (states_on_nvme && optimizer.groups.size() != 1) {
    return InvalidArgumentError(
        StrCat("session: states on NVMe take one optimizer parameter "
               "group (optimizer.groups has ",
               optimizer.groups.size(), ")"));
  }
  if (resume_states && !states_on_nvme) {
    return InvalidArgumentError("session: resume_states needs states on NVMe");
  }
  return Status::Ok();
}

}  // namespace ecss
