#include "tools/extract/extract.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>

#include "engine/checkpoint_record.h"
#include "engine/expert_updater.h"
#include "engine/plan_inputs.h"
#include "engine/session.h"
#include "offload/checkpoint.h"
#include "offload/state_file.h"
#include "optimizer/optimizer_config.h"
#include "runtime/base/dtype.h"
#include "runtime/base/file_util.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tools/extract/safetensors.h"

namespace ecss {

namespace {

constexpr char kFormat[] = "ecss-extract 1";
// In a root of this tool's checkpoint outputs (CheckpointBuilder).
constexpr char kOutputsMarker[] = ".ecss-extract-outputs";
constexpr char kOutputsHeader[] = "checkpoints of ecss-extract\n";  // then a name a line

// The checkpoints this tool wrote under `root`, as its outputs' marker lists them (none
// without one, or with another first line).
std::set<std::string> OutputsOf(const std::string& root) {
  std::set<std::string> names;
  StatusOr<std::string> marker = ReadFileToString(StrCat(root, "/", kOutputsMarker));
  if (!marker.ok() || marker->rfind(kOutputsHeader, 0) != 0) return names;
  std::string_view rest{*marker};
  rest.remove_prefix(std::strlen(kOutputsHeader));
  while (!rest.empty()) {
    const size_t end = std::min(rest.find('\n'), rest.size());
    if (end > 0) names.insert(std::string(rest.substr(0, end)));
    rest.remove_prefix(std::min(end + 1, rest.size()));
  }
  return names;
}

// What is extracted, and how the numbers map.
struct Plan {
  ModelSpec full, sub;
  std::string optimizer;       // the checkpoint's kind; empty when it does not say
  std::vector<uint32_t> kept;  // the domains' indices in full.domains, in that order
  std::vector<uint32_t> old_first, new_first;  // per kept domain: its group's first expert
  // A full model's expert in the sub-model (none for one of a domain left out), and back.
  std::optional<ExpertId> SubOf(ExpertId full_id) const {
    for (size_t k = 0; k < kept.size(); ++k) {
      if (full_id.expert >= old_first[k] &&
          full_id.expert - old_first[k] < full.domains[kept[k]].experts) {
        return ExpertId{full_id.layer, new_first[k] + (full_id.expert - old_first[k])};
      }
    }
    return std::nullopt;
  }
  ExpertId FullOf(ExpertId sub_id) const {
    size_t k = 0;
    while (k + 1 < kept.size() && sub_id.expert >= new_first[k + 1]) ++k;
    return {sub_id.layer, old_first[k] + (sub_id.expert - new_first[k])};
  }
  size_t master_state = 0;  // of the checkpoint's saved states
  std::optional<size_t> moments_state;
  std::vector<std::string> moment_names;  // with_optimizer_state: one per moment array
  // The sub-model's experts written without an update (a group grown from a dense FFN's
  // weights): their values are not their initial ones. Ascending.
  std::vector<ExpertId> written_without_update;
};

// The metadata's "written_without_update": "LAYER.EXPERT" of each such expert, ascending,
// separated by spaces (absent when there is none).
constexpr char kWrittenWithoutUpdate[] = "written_without_update";

std::string FormatExpertList(const std::vector<ExpertId>& ids) {
  std::string text;
  for (const ExpertId& id : ids) text += StrCat(text.empty() ? "" : " ", id.layer, ".", id.expert);
  return text;
}

std::vector<std::string> MomentNames(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdamW:
    case OptimizerKind::kAdam:
      return {"exp_avg", "exp_avg_sq"};
    case OptimizerKind::kLion:
      return {"exp_avg"};
    case OptimizerKind::kAdagrad:
      return {"sum"};
    case OptimizerKind::kSgdMomentum:
      return {"momentum_buffer"};
  }
  return {};
}

// The optimizer kind whose moments the checkpoint holds ("" when it does not say).
std::string OptimizerOf(const CheckpointReader& reader) {
  const CheckpointBlob* blob = FindBlob(reader.blobs(), kOptimizerBlob);
  return blob != nullptr ? blob->bytes : "";
}

// `blobs` with the session's records rewritten for a model whose experts are `renumber`ed
// (the new id, or none for an expert left out): the delayed update's held experts that stay,
// with their gradients, in their order. DataLoss for a damaged record.
StatusOr<std::vector<CheckpointBlob>> RenumberSessionRecords(
    const std::vector<CheckpointBlob>& blobs, const ModelSpec& model,
    const std::function<std::optional<ExpertId>(ExpertId)>& renumber) {
  ECSS_ASSIGN_OR_RETURN(std::optional<SessionState> state, SessionStateOf(blobs, model));
  if (!state) return blobs;
  SessionRecord& record = state->record;
  const uint64_t bytes = HeldGradientBytes(record, model);
  std::vector<ExpertId> held;
  std::string kept;
  for (size_t i = 0; i < record.held.size(); ++i) {
    const std::optional<ExpertId> id = renumber(record.held[i]);
    if (!id) continue;
    held.push_back(*id);
    kept.append(state->held_gradients, i * bytes, bytes);
  }
  record.held = std::move(held);
  std::vector<CheckpointBlob> out;
  for (const CheckpointBlob& blob : blobs) {
    if (blob.name != kSessionBlob && blob.name != kHeldGradientsBlob) out.push_back(blob);
  }
  out.push_back({std::string(kSessionBlob), FormatSessionRecord(record)});
  if (!kept.empty()) out.push_back({std::string(kHeldGradientsBlob), std::move(kept)});
  return out;
}

// One expert's blocks of `states` of `layout`: 4 KiB-aligned, zeroed padding included (nothing
// of the heap's is ever stored).
class ZeroedBlocks {
 public:
  static StatusOr<ZeroedBlocks> Make(const ExpertStoreLayout& layout,
                                     const std::vector<ExpertState>& states) {
    ZeroedBlocks made;
    for (ExpertState state : states) {
      const uint64_t bytes = StateBlockBytes(ExpertStore::StateBytes(layout, state));
      made.blocks_.emplace_back(std::aligned_alloc(4096, bytes), &std::free);
      if (made.blocks_.back() == nullptr) return ResourceExhaustedError("no memory for one expert");
      std::memset(made.blocks_.back().get(), 0, bytes);
      made.pointers_.push_back(made.blocks_.back().get());
    }
    return made;
  }
  void* block(size_t state) const { return blocks_[state].get(); }
  const void* const* pointers() const { return pointers_.data(); }

 private:
  ZeroedBlocks() = default;
  std::vector<std::unique_ptr<void, decltype(&std::free)>> blocks_;
  std::vector<const void*> pointers_;
};

// Tensor `t`'s data from safetensors file `in` (its header `header`) into `dst`: false when the
// file ends first.
bool ReadTensorData(std::ifstream& in, const SafetensorsHeader& header, const SafetensorsTensor& t,
                    void* dst) {
  in.seekg(static_cast<std::streamoff>(header.data_start + t.begin));
  return static_cast<bool>(
      in.read(static_cast<char*>(dst), static_cast<std::streamsize>(t.end - t.begin)));
}

// The checkpoint's model record (CheckpointModel), which must agree with its experts' layout,
// or ids and sizes would be read as something else (DataLoss).
StatusOr<ModelSpec> ModelOf(const CheckpointReader& reader) {
  ECSS_ASSIGN_OR_RETURN(ModelSpec m, CheckpointModel(reader));
  const std::vector<uint32_t> layer(m.layers, m.experts_per_layer());
  const ExpertStoreLayout& layout = reader.layout();
  if (layout.experts_per_layer != layer || layout.params_per_expert != m.expert_params() ||
      layout.weights_dtype != m.dtype) {
    return DataLossError(StrCat("checkpoint '", reader.where(),
                                "': its model record does not match its experts' layout"));
  }
  return m;
}

StatusOr<Plan> MakePlan(const ExtractOptions& options, const CheckpointReader& reader) {
  Plan plan;
  plan.optimizer = OptimizerOf(reader);
  ECSS_ASSIGN_OR_RETURN(plan.full, ModelOf(reader));
  const ModelSpec& m = plan.full;
  const ExpertStoreLayout& layout = reader.layout();
  // Experts never written are drawn here as the session drew them: only if the checkpoint's
  // initial values are the ones DrawInitialMaster draws.
  if (reader.initial_id() != InitialValuesId(m)) {
    return FailedPreconditionError(StrCat("checkpoint '", reader.where(), "': initial values '",
                                          reader.initial_id(), "', this build draws '",
                                          InitialValuesId(m), "'"));
  }
  if (options.domains.empty()) return InvalidArgumentError("no domain to extract");
  std::set<uint32_t> chosen;
  for (const std::string& name : options.domains) {
    auto found = std::find_if(m.domains.begin(), m.domains.end(),
                              [&](const DomainSpec& d) { return d.name == name; });
    if (found == m.domains.end()) {
      std::string known;
      for (const DomainSpec& d : m.domains) known += StrCat(known.empty() ? "" : ", ", d.name);
      return NotFoundError(
          StrCat("no domain '", name, "' in checkpoint '", reader.where(), "'; it has: ", known));
    }
    if (!chosen.insert(static_cast<uint32_t>(found - m.domains.begin())).second) {
      return InvalidArgumentError(StrCat("domain '", name, "' is named twice"));
    }
  }
  plan.sub = m;
  plan.sub.domains.clear();
  uint32_t old_first = 0, new_first = 0;
  for (uint32_t d = 0; d < m.domains.size(); ++d) {
    if (chosen.count(d) != 0) {
      plan.kept.push_back(d);
      plan.old_first.push_back(old_first);
      plan.new_first.push_back(new_first);
      DomainSpec kept = m.domains[d];
      kept.id = m.DomainId(d);  // routes and sample ids as in the full model
      kept.source_first_expert = m.InitialKey(old_first);  // unwritten experts as there
      plan.sub.domains.push_back(std::move(kept));
      new_first += m.domains[d].experts;
    }
    old_first += m.domains[d].experts;
  }
  const std::vector<ExpertState>& states = reader.states();
  auto index_of = [&](ExpertState state) -> std::optional<size_t> {
    auto it = std::find(states.begin(), states.end(), state);
    if (it == states.end()) return std::nullopt;
    return static_cast<size_t>(it - states.begin());
  };
  // A bf16 model's checkpoint holds the fp32 master; an f32 model's weights are the master.
  std::optional<size_t> master = index_of(ExpertState::kMaster);
  if (!master && m.dtype == DType::kF32) master = index_of(ExpertState::kWeights);
  if (!master) {
    return FailedPreconditionError(
        StrCat("checkpoint '", reader.where(), "' holds no master weights"));
  }
  plan.master_state = *master;
  if (ExpertStore::StateBytes(layout, states[*master]) != m.expert_params() * 4) {
    return DataLossError(StrCat("checkpoint '", reader.where(), "': master weights of ",
                                ExpertStore::StateBytes(layout, states[*master]), " bytes"));
  }
  plan.moments_state = index_of(ExpertState::kMoments);
  if (options.with_optimizer_state) {
    StatusOr<OptimizerKind> kind = ParseOptimizerKind(plan.optimizer);
    if (!kind.ok() || !plan.moments_state) {
      return FailedPreconditionError(
          StrCat("checkpoint '", reader.where(), "' does not record its optimizer's states"));
    }
    plan.moment_names = MomentNames(*kind);
    if (plan.moment_names.size() > reader.layout().moments) {
      return DataLossError(StrCat("checkpoint '", reader.where(), "': ", plan.optimizer,
                                  " moments, ", reader.layout().moments, " arrays saved"));
    }
  }
  for (uint32_t l = 0; l < m.layers; ++l) {
    for (size_t k = 0; k < plan.kept.size(); ++k) {
      for (uint32_t e = 0; e < m.domains[plan.kept[k]].experts; ++e) {
        const uint32_t flat = reader.index().Flat({l, plan.old_first[k] + e});
        if (reader.written(flat) && reader.version(flat) == 0) {
          plan.written_without_update.push_back({l, plan.new_first[k] + e});
        }
      }
    }
  }
  return plan;
}

// Each tensor of the file in order, with its bytes when `reader` is given (else data is null:
// the declarations alone). `visit(tensor, data)`.
template <typename Visit>
Status Walk(const Plan& plan, CheckpointReader* reader, const ExtractOptions& options,
            Visit visit) {
  const ModelSpec& m = plan.full;
  const uint64_t params = m.expert_params();
  const uint64_t in_elements = uint64_t{m.d_model} * m.d_in();
  const std::vector<uint64_t> in_shape = {m.d_model, m.d_in()};
  const std::vector<uint64_t> out_shape = {m.d_ff, m.d_model};
  const uint32_t per_layer = plan.sub.experts_per_layer();
  const uint64_t total = uint64_t{per_layer} * m.layers;
  std::vector<float> master(reader != nullptr ? params : 0);
  std::vector<float> moments(reader != nullptr ? params * plan.moment_names.size() : 0);
  std::unique_ptr<RreRouter> router;
  if (reader != nullptr) {
    ECSS_ASSIGN_OR_RETURN(RreRouter made, RouterOf(m));
    router = std::make_unique<RreRouter>(std::move(made));
  }
  uint64_t done = 0;
  for (uint32_t l = 0; l < m.layers; ++l) {
    std::vector<int64_t> updates;
    for (size_t k = 0; k < plan.kept.size(); ++k) {
      for (uint32_t e = 0; e < m.domains[plan.kept[k]].experts; ++e) {
        const std::string name = StrCat("layers.", l, ".experts.", plan.new_first[k] + e);
        uint64_t version = 0;
        if (reader != nullptr) {
          const uint32_t flat = reader->index().Flat({l, plan.old_first[k] + e});
          version = reader->version(flat);
          if (!reader->written(flat)) {
            DrawInitialMaster(m, l, plan.old_first[k] + e, master.data());
            std::fill(moments.begin(), moments.end(), 0.0f);
          } else {
            ECSS_RETURN_IF_ERROR(reader->Read(flat));
            std::memcpy(master.data(), reader->blocks()[plan.master_state], params * 4);
            if (!moments.empty()) {
              std::memcpy(moments.data(), reader->blocks()[*plan.moments_state],
                          moments.size() * 4);
            }
          }
        }
        if (version > static_cast<uint64_t>(INT64_MAX)) {
          return OutOfRangeError(StrCat("layer ", l, " expert ", plan.old_first[k] + e, ": ",
                                        version, " updates do not fit the file's I64 counts"));
        }
        updates.push_back(static_cast<int64_t>(version));
        auto at = [&](const std::vector<float>& v, uint64_t offset) -> const void* {
          return reader != nullptr ? v.data() + offset : nullptr;
        };
        ECSS_RETURN_IF_ERROR(visit({name + ".w_in", "F32", in_shape}, at(master, 0)));
        ECSS_RETURN_IF_ERROR(visit({name + ".w_out", "F32", out_shape}, at(master, in_elements)));
        for (size_t a = 0; a < plan.moment_names.size(); ++a) {
          const std::string& state = plan.moment_names[a];
          ECSS_RETURN_IF_ERROR(
              visit({StrCat(name, ".w_in.", state), "F32", in_shape}, at(moments, a * params)));
          ECSS_RETURN_IF_ERROR(visit({StrCat(name, ".w_out.", state), "F32", out_shape},
                                     at(moments, a * params + in_elements)));
        }
        if (reader != nullptr && options.progress) options.progress(++done, total);
      }
    }
    if (options.with_optimizer_state) {
      ECSS_RETURN_IF_ERROR(visit({StrCat("layers.", l, ".updates"), "I64", {per_layer}},
                                 reader != nullptr ? updates.data() : nullptr));
    }
    std::vector<int32_t> routing;
    if (reader != nullptr) {
      routing.resize(plan.kept.size() * uint64_t{m.vocab});
      for (size_t k = 0; k < plan.kept.size(); ++k) {
        ECSS_ASSIGN_OR_RETURN(const size_t index,
                              router->domains().IndexOf(m.DomainId(plan.kept[k])));
        const uint16_t* table = router->LocalTable(l, index);
        for (uint32_t t = 0; t < m.vocab; ++t) {
          routing[k * m.vocab + t] = static_cast<int32_t>(plan.new_first[k] + table[t]);
        }
      }
    }
    ECSS_RETURN_IF_ERROR(
        visit({StrCat("layers.", l, ".routing"), "I32", {plan.kept.size(), m.vocab}},
              reader != nullptr ? routing.data() : nullptr));
  }
  return Status::Ok();
}

// The metadata's "domains": the routing tables' rows' names, one a line.
std::string DomainNames(const ModelSpec& model) {
  std::string names;
  for (const DomainSpec& d : model.domains) names += StrCat(names.empty() ? "" : "\n", d.name);
  return names;
}

std::map<std::string, std::string> Metadata(const Plan& plan, const ExtractOptions& options) {
  std::map<std::string, std::string> metadata = {{"format", kFormat},
                                                 {"model", FormatModelRecord(plan.sub)},
                                                 {"domains", DomainNames(plan.sub)},
                                                 {"source_checkpoint", options.checkpoint},
                                                 {"optimizer", plan.optimizer}};
  if (!plan.written_without_update.empty()) {
    metadata[kWrittenWithoutUpdate] = FormatExpertList(plan.written_without_update);
  }
  return metadata;
}

// The file at `path` read back: every tensor the walk yields is in the header with its dtype
// and shape, and its bytes in the file are the walk's; and, apart from the walk, every routing
// row sends each token to the renumbered expert the full model's router names.
Status Verify(const Plan& plan, CheckpointReader& reader, const ExtractOptions& options,
              const std::string& path) {
  ECSS_ASSIGN_OR_RETURN(SafetensorsHeader header, ReadSafetensorsHeader(path));
  std::map<std::string, const SafetensorsTensor*> by_name;
  for (const SafetensorsTensor& t : header.tensors) by_name[t.name] = &t;
  if (header.metadata != Metadata(plan, options)) {
    return DataLossError(StrCat("verify: '", path, "' metadata differs"));
  }
  ECSS_ASSIGN_OR_RETURN(const RreRouter router, RouterOf(plan.full));
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes;
  size_t seen = 0;
  uint32_t routing_layer = 0;
  auto check = [&](const SafetensorsTensor& want, const void* data) -> Status {
    auto it = by_name.find(want.name);
    if (it == by_name.end() || it->second->dtype != want.dtype || it->second->shape != want.shape) {
      return DataLossError(
          StrCat("verify: tensor '", want.name, "' missing or misdeclared in '", path, "'"));
    }
    ++seen;
    ECSS_ASSIGN_OR_RETURN(const uint64_t size, SafetensorsTensorBytes(want));
    bytes.resize(size);
    in.seekg(static_cast<std::streamoff>(header.data_start + it->second->begin));
    if (!in.read(bytes.data(), static_cast<std::streamsize>(bytes.size())) ||
        std::memcmp(bytes.data(), data, bytes.size()) != 0) {
      return DataLossError(StrCat("verify: tensor '", want.name, "' in '", path, "' differs"));
    }
    // The walk yields each layer's routing table after its experts, in layer order.
    if (want.name != StrCat("layers.", routing_layer, ".routing")) return Status::Ok();
    const uint32_t layer = routing_layer++;
    std::vector<int32_t> rows(bytes.size() / 4);
    std::memcpy(rows.data(), bytes.data(), bytes.size());
    for (size_t k = 0; k < plan.kept.size(); ++k) {
      for (uint32_t t = 0; t < plan.full.vocab; ++t) {
        ECSS_ASSIGN_OR_RETURN(const uint32_t full,
                              router.Route(layer, plan.full.DomainId(plan.kept[k]), t));
        if (static_cast<uint32_t>(rows[k * plan.full.vocab + t]) !=
            full - plan.old_first[k] + plan.new_first[k]) {
          return DataLossError(StrCat("verify: layer ", layer, " domain '",
                                      plan.sub.domains[k].name, "' token ", t,
                                      " is routed elsewhere than in the full model"));
        }
      }
    }
    return Status::Ok();
  };
  ECSS_RETURN_IF_ERROR(Walk(plan, &reader, options, check));
  if (routing_layer != plan.full.layers) {
    return InternalError(
        StrCat("verify: checked ", routing_layer, " layers' routes of ", plan.full.layers));
  }
  if (seen != header.tensors.size()) {
    return DataLossError(StrCat("verify: '", path, "' holds ", header.tensors.size(), " tensors, ",
                                seen, " expected"));
  }
  return Status::Ok();
}

// ---- --format ecss: a checkpoint of the sub-model, and its check by evaluation ----------

// Evaluation-step outputs of every sparse layer for fixed held-out inputs of the domains of
// `inputs_of` (the same inputs whichever model runs them): one micro-batch per domain, one
// sample of every token id of the vocabulary in a shuffled order, so every expert a domain's
// tokens can reach in any layer computes; each layer's y for its own x.
StatusOr<std::vector<std::vector<char>>> EvaluationOutputs(const ModelSpec& model,
                                                           const ModelSpec& inputs_of,
                                                           const std::string& checkpoint,
                                                           OptimizerKind kind) {
  const uint32_t domains = static_cast<uint32_t>(inputs_of.domains.size());
  SessionOptions options;
  options.model = model;
  options.optimizer.kind = kind;
  options.limits.max_tokens_per_micro_batch = model.vocab;
  options.limits.max_micro_batches = domains;
  options.placement.resume_from = checkpoint;
  {
    // A checkpoint with the delayed update's held gradients resumes only into a session with
    // it; an evaluation computes with the published weights and leaves them held.
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                          CheckpointReader::OpenPath(checkpoint));
    ECSS_ASSIGN_OR_RETURN(const std::optional<SessionState> state,
                          SessionStateOf(reader->blobs(), model));
    if (state) {
      options.delayed_update = !state->record.held.empty();
      options.gradient_dtype = state->record.gradient_dtype;
    }
  }
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> planner, SimBackend::Create({}));
  options.budgets.device_bytes = uint64_t{1} << 50;
  ECSS_ASSIGN_OR_RETURN(const MemoryPlan plan, Session::PlanMemoryOn(*planner, options));
  options.budgets.device_bytes = plan.DeviceBudgetFor(plan.cache_slots);
  SimOptions sim;
  sim.device_memory_bytes = options.budgets.device_bytes + 4 * plan.activation_bytes + (8 << 20);
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> backend, SimBackend::Create(sim));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Session> session, Session::Create(*backend, options));
  // Held-out inputs from a stream of their own: a shuffled vocabulary per domain, and
  // activations in [-1, 1).
  CounterRng rng(0x5eedu, 0);
  std::vector<std::vector<uint32_t>> token_ids(domains);
  std::vector<uint32_t> domain_ids(domains);
  std::vector<MicroBatch> batches;
  for (uint32_t d = 0; d < domains; ++d) {
    token_ids[d].resize(model.vocab);
    for (uint32_t t = 0; t < model.vocab; ++t) token_ids[d][t] = t;
    for (uint32_t t = model.vocab - 1; t > 0; --t) {
      std::swap(token_ids[d][t], token_ids[d][rng.Uniform(t + 1)]);
    }
    domain_ids[d] = inputs_of.DomainId(d);
    batches.push_back({token_ids[d].data(), 1, model.vocab, &domain_ids[d]});
  }
  std::vector<float> x(uint64_t{model.vocab} * model.d_model);
  const uint64_t bytes = x.size() * DTypeSize(model.dtype);
  std::vector<char> host(bytes);
  ECSS_ASSIGN_OR_RETURN(Buffer in,
                        backend->device_memory().Allocate(bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(Buffer out,
                        backend->device_memory().Allocate(bytes, MemoryTag::kActivations));
  const Stream stream = session->compute_stream();
  ECSS_RETURN_IF_ERROR(session->BeginEvaluation(batches));
  std::vector<std::vector<char>> outputs;
  for (uint32_t d = 0; d < domains; ++d) {
    for (uint32_t l = 0; l < model.layers; ++l) {
      for (float& v : x) v = rng.UniformFloat() * 2 - 1;
      if (model.dtype == DType::kBF16) {
        ConvertF32ToBf16(x.data(), reinterpret_cast<BFloat16*>(host.data()), x.size());
      } else {
        std::memcpy(host.data(), x.data(), bytes);
      }
      ECSS_RETURN_IF_ERROR(
          backend->CopyAsync(stream, in.data(), host.data(), bytes, CopyKind::kHostToDevice));
      ECSS_RETURN_IF_ERROR(
          session->Forward(MicroBatchIndex(d), LayerIndex(l), in.data(), out.data()));
      outputs.emplace_back(bytes);
      ECSS_RETURN_IF_ERROR(backend->CopyAsync(stream, outputs.back().data(), out.data(), bytes,
                                              CopyKind::kDeviceToHost));
      ECSS_RETURN_IF_ERROR(backend->SynchronizeStream(stream));  // before `host` changes
    }
  }
  ECSS_RETURN_IF_ERROR(session->EndStep().status());
  return outputs;
}

// Every expert of checkpoint `out` holds, at the same version, what `from(expert)` of the
// source holds (blocks compared byte for byte): weights, moments and update counts. An expert
// `from` gives none for is left to the caller.
Status CompareExperts(CheckpointReader& source, const std::string& out,
                      const std::function<std::optional<uint32_t>(ExpertId)>& from) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> written, CheckpointReader::OpenPath(out));
  std::vector<std::vector<char>> want;
  for (uint32_t flat = 0; flat < written->index().size(); ++flat) {
    const ExpertId id = written->index().Id(flat);
    const std::optional<uint32_t> of = from(id);
    if (!of.has_value()) continue;  // none in `source`: the caller checks it
    const uint32_t source_flat = *of;
    const uint64_t version = written->version(flat);
    if (version != source.version(source_flat) ||
        written->written(flat) != source.written(source_flat)) {
      return DataLossError(StrCat(
          "verify: layer ", id.layer, " expert ", id.expert, " of '", out, "' is at version ",
          version, written->written(flat) ? "" : " (unwritten)", ", its source at ",
          source.version(source_flat), source.written(source_flat) ? "" : " (unwritten)"));
    }
    if (!written->written(flat)) continue;
    ECSS_RETURN_IF_ERROR(source.Read(source_flat));
    want.clear();
    for (size_t s = 0; s < source.states().size(); ++s) {
      const uint64_t bytes = ExpertStore::StateBytes(source.layout(), source.states()[s]);
      const char* block = static_cast<const char*>(source.blocks()[s]);
      want.emplace_back(block, block + bytes);
    }
    ECSS_RETURN_IF_ERROR(written->Read(flat));
    for (size_t s = 0; s < want.size(); ++s) {
      if (std::memcmp(written->blocks()[s], want[s].data(), want[s].size()) != 0) {
        return DataLossError(StrCat("verify: layer ", id.layer, " expert ", id.expert, " ",
                                    ExpertStateName(source.states()[s]), " of '", out,
                                    "' differs from its source's"));
      }
    }
  }
  return Status::Ok();
}

// The full and the extracted model through the session's evaluation step on the same held-out
// inputs of the kept domains: every sparse layer's outputs bit-identical.
Status VerifyByEvaluation(const Plan& plan, CheckpointReader& reader,
                          const ExtractOptions& options) {
  ECSS_RETURN_IF_ERROR(CompareExperts(
      reader, options.out, [&](ExpertId id) { return reader.index().Flat(plan.FullOf(id)); }));
  ECSS_ASSIGN_OR_RETURN(const OptimizerKind kind, ParseOptimizerKind(plan.optimizer));
  ECSS_ASSIGN_OR_RETURN(const auto full,
                        EvaluationOutputs(plan.full, plan.sub, options.checkpoint, kind));
  ECSS_ASSIGN_OR_RETURN(const auto sub, EvaluationOutputs(plan.sub, plan.sub, options.out, kind));
  if (full != sub) {
    return DataLossError(StrCat("verify: the outputs of '", options.out, "' differ from those of '",
                                options.checkpoint, "' on the same inputs"));
  }
  return Status::Ok();
}

// Where an output may go: never inside a checkpoint's directory (one holding a manifest, at
// any depth above it), nor inside a directory of the root of the checkpoint `source` read, if
// any (a deleted checkpoint's data newer ones still read): writing there could replace data
// checkpoints refer to.
Status CheckOutputPlace(const std::string& out, const std::string& source) {
  std::error_code error;
  const std::filesystem::path path = std::filesystem::weakly_canonical(out, error);
  if (error) return ErrnoError(error.value(), StrCat("resolving '", out, "'"));
  for (std::filesystem::path p = path.parent_path(); p != p.parent_path(); p = p.parent_path()) {
    if (std::filesystem::exists(p / "checkpoint.manifest", error)) {
      return InvalidArgumentError(
          StrCat("'", out, "' is inside checkpoint '", p.string(), "': write it elsewhere"));
    }
  }
  if (source.empty()) return Status::Ok();
  const std::filesystem::path source_root =
      std::filesystem::weakly_canonical(std::filesystem::path(source).parent_path(), error);
  if (IsWithin(out, source) ||
      (IsWithin(out, source_root.string()) && path.parent_path() != source_root)) {
    return InvalidArgumentError(
        StrCat("'", out, "' is inside the checkpoints of '", source, "': write it elsewhere"));
  }
  return Status::Ok();
}

// A new checkpoint ROOT/NAME of `model`, written expert by expert through a scratch expert
// store beside it (ROOT/.NAME.extract-PID: master and moments on NVMe for a bf16 model, so a
// model larger than memory goes through; an f32 model's weights are its master, in memory),
// which SaveCheckpoint then copies. Experts not written stay unwritten: they read as their
// initial values (the model's InitialKey). Removes the scratch store when destroyed; the
// checkpoint exists once Finish returns (a save cut short is collected by the next save), and
// Verify removes it when its check fails. Nothing else there is ever removed.
class CheckpointBuilder {
 public:
  // `states` of `layout` (its experts per layer are the model's), as `source` (the checkpoint
  // read, if any: ROOT/NAME) holds them. `source` must live under another root: a checkpoint
  // written beside a run's would become the run's newest (LatestCheckpoint), and replacing one
  // there could take data the run's checkpoints refer to.
  static StatusOr<std::unique_ptr<CheckpointBuilder>> Create(const std::string& out, bool overwrite,
                                                             const ModelSpec& model,
                                                             const ExpertStoreLayout& layout,
                                                             const std::vector<ExpertState>& states,
                                                             const std::string& source) {
    const std::pair<std::string, std::string> path = SplitCheckpointPath(out);
    auto builder = std::unique_ptr<CheckpointBuilder>(
        new CheckpointBuilder(path.first.empty() ? "." : path.first, path.second, model, states));
    CheckpointBuilder& b = *builder;
    ECSS_RETURN_IF_ERROR(CheckOutputPlace(out, source));
    std::error_code error;
    std::filesystem::create_directories(b.root_, error);
    if (error) return ErrnoError(error.value(), StrCat("creating '", b.root_, "'"));
    const std::filesystem::path source_root = std::filesystem::path(source).parent_path();
    if (!source.empty() &&
        std::filesystem::equivalent(b.root_, source_root.empty() ? "." : source_root, error)) {
      return InvalidArgumentError(StrCat("'", out, "' is in the root of checkpoint '", source,
                                         "': write it under another directory (it would be that "
                                         "run's newest checkpoint)"));
    }
    // A root of this tool's outputs only (Finish lists them in the marker): never a training
    // run's, whose newest checkpoint this would become, even one a session saved beside ours.
    const std::set<std::string> ours = OutputsOf(b.root_);
    for (auto it = std::filesystem::directory_iterator(b.root_, error);
         !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
      if (std::filesystem::exists(it->path() / "checkpoint.manifest", error) &&
          ours.count(it->path().filename().string()) == 0) {
        return InvalidArgumentError(
            StrCat("'", b.root_, "' holds checkpoint '", it->path().filename().string(),
                   "', which ecss-extract did not write (a training run's?): write under "
                   "another directory"));
      }
    }
    // One writer of a name at a time: a second one would take the first's scratch store for a
    // dead run's.
    ECSS_ASSIGN_OR_RETURN(b.name_lock_,
                          FileLock::Acquire(StrCat(b.root_, "/.", b.name_, ".extract.lock"),
                                            StrCat("ecss-extract writing '", out, "'")));
    const std::string target = StrCat(b.root_, "/", b.name_);
    if (std::filesystem::exists(target, error)) {
      // Only a checkpoint, and nothing else there, is ever replaced.
      for (auto it = std::filesystem::directory_iterator(target, error);
           !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
        const std::string f = it->path().filename().string();
        if (f != "checkpoint.manifest" && f != "experts.bin" && f != "blobs.bin") {
          return AlreadyExistsError(
              StrCat("'", out, "' exists and holds more than a checkpoint ('", f, "')"));
        }
      }
      if (std::filesystem::exists(StrCat(target, "/checkpoint.manifest"), error)) {
        if (!overwrite) {
          return AlreadyExistsError(StrCat("'", out, "' exists (--force replaces it)"));
        }
        b.replace_ = true;  // deleted by Finish, once every expert was read and checked
      } else if (!std::filesystem::exists(StrCat(target, "/experts.bin"), error)) {
        return AlreadyExistsError(StrCat("'", out, "' exists and is not a checkpoint"));
      }
      // Else a save cut short (a killed run's data without its manifest): the save collects it.
    }
    RemoveUnlockedLeftovers(b.root_, StrCat(".", b.name_, ".extract-"), "ecss-store.lock");
    ExpertStoreOptions o;
    const uint32_t per_layer = model.experts_per_layer();
    o.layout = layout;
    o.layout.experts_per_layer.assign(model.layers, per_layer);
    const Tier tier = model.dtype == DType::kBF16 ? Tier::kNvme : Tier::kHost;
    o.placement = {Tier::kNone, Tier::kNone, Tier::kNone, Tier::kNone};
    for (ExpertState state : states) o.placement[static_cast<size_t>(state)] = tier;
    o.durable_memory_states = false;
    b.scratch_ = StrCat(b.root_, "/.", b.name_, ".extract-", ::getpid());
    if (tier == Tier::kNvme) {
      std::filesystem::create_directory(b.scratch_, error);
      if (error) return ErrnoError(error.value(), StrCat("creating '", b.scratch_, "'"));
      o.dirs = {b.scratch_};
    }
    o.initial = [model](ExpertState state, ExpertId id, void* dst, uint64_t bytes) {
      if (state == ExpertState::kMoments || state == ExpertState::kGradient) {
        std::memset(dst, 0, bytes);
      } else {
        DrawInitialMaster(model, id.layer, id.expert, static_cast<float*>(dst));
      }
    };
    o.initial_id = InitialValuesId(model);
    ECSS_ASSIGN_OR_RETURN(b.backend_, SimBackend::Create({}));
    ECSS_ASSIGN_OR_RETURN(b.store_, ExpertStore::Create(*b.backend_, o));
    return builder;
  }
  ~CheckpointBuilder() {
    if (store_ != nullptr) store_->Close().IgnoreError();
    store_.reset();
    std::error_code error;
    if (!scratch_.empty()) std::filesystem::remove_all(scratch_, error);
  }
  CheckpointBuilder(const CheckpointBuilder&) = delete;
  CheckpointBuilder& operator=(const CheckpointBuilder&) = delete;

  // Expert `id`'s states (the constructor's, in order; 4 KiB-aligned blocks) at `version`.
  Status Write(ExpertId id, const void* const* blocks, uint64_t version) {
    return store_->WriteStates(id, states_, blocks, version);
  }
  // Each pair's first expert holds what its second one holds (ExpertStore::Share): the
  // checkpoint stores the two once when the states live on NVMe (a bf16 model's).
  Status Share(const std::vector<std::pair<ExpertId, ExpertId>>& pairs) {
    return store_->Share(pairs);
  }
  // Saves the checkpoint with `blobs` (the model record replaced by this model's); its bytes.
  StatusOr<uint64_t> Finish(const std::vector<CheckpointBlob>& blobs) {
    CheckpointOptions save;
    for (const CheckpointBlob& blob : blobs) {
      if (blob.name != kModelBlob) save.blobs.push_back(blob);
    }
    save.blobs.push_back({std::string(kModelBlob), FormatModelRecord(model_)});
    save.states = states_;
    save.full = true;
    std::set<std::string> ours = OutputsOf(root_);
    ours.insert(name_);
    std::string marker = kOutputsHeader;
    for (const std::string& name : ours) marker += StrCat(name, "\n");
    ECSS_RETURN_IF_ERROR(WriteFileAtomically(StrCat(root_, "/", kOutputsMarker), marker));
    if (replace_) {
      Status deleted = DeleteCheckpoint(root_, name_);
      if (!deleted.ok() && deleted.code() != StatusCode::kNotFound) return deleted;
    }
    ECSS_ASSIGN_OR_RETURN(const CheckpointStats stats, SaveCheckpoint(*store_, root_, name_, save));
    finished_ = true;
    return stats.bytes_written;
  }
  // The saved checkpoint `check`ed (--verify): removed when the check fails, else
  // report->verified.
  Status Verify(const std::function<Status()>& check, ExtractReport* report) {
    Status verified = check();
    if (!verified.ok()) {
      if (finished_) DeleteCheckpoint(root_, name_).IgnoreError();
      return verified;
    }
    report->verified = true;
    return Status::Ok();
  }

 private:
  CheckpointBuilder(std::string root, std::string name, ModelSpec model,
                    std::vector<ExpertState> states)
      : root_(std::move(root)),
        name_(std::move(name)),
        model_(std::move(model)),
        states_(std::move(states)) {}

  const std::string root_, name_;
  const ModelSpec model_;
  const std::vector<ExpertState> states_;
  std::unique_ptr<FileLock> name_lock_;  // ROOT/.NAME.extract.lock, while this writes NAME
  std::string scratch_;
  std::unique_ptr<SimBackend> backend_;  // the store's (it allocates nothing on it)
  std::unique_ptr<ExpertStore> store_;
  bool replace_ = false;  // an existing checkpoint of that name goes (overwrite)
  bool finished_ = false;
};

}  // namespace

StatusOr<ExtractReport> ExtractToSafetensors(const ExtractOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::OpenPath(options.checkpoint));
  ECSS_RETURN_IF_ERROR(CheckOutputPlace(options.out, reader->where()));

  ECSS_ASSIGN_OR_RETURN(const Plan plan, MakePlan(options, *reader));
  std::vector<SafetensorsTensor> tensors;
  ECSS_RETURN_IF_ERROR(Walk(plan, nullptr, options, [&](const SafetensorsTensor& t, const void*) {
    tensors.push_back(t);
    return Status::Ok();
  }));
  ExtractReport report;
  report.model = plan.sub;
  report.tensors = tensors.size();
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer,
                        SafetensorsWriter::Create(options.out, std::move(tensors),
                                                  Metadata(plan, options), options.overwrite));
  ECSS_RETURN_IF_ERROR(
      Walk(plan, reader.get(), options, [&](const SafetensorsTensor& t, const void* data) {
        ECSS_ASSIGN_OR_RETURN(const uint64_t bytes, SafetensorsTensorBytes(t));
        return writer->Append(data, bytes);
      }));
  // Verified before it takes its name: a file that fails replaces nothing.
  ECSS_RETURN_IF_ERROR(writer->Finish([&](const std::string& partial) {
    return options.verify ? Verify(plan, *reader, options, partial) : Status::Ok();
  }));
  report.verified = options.verify;
  report.file_bytes = writer->file_bytes();
  for (uint32_t l = 0; l < plan.full.layers; ++l) {
    for (size_t k = 0; k < plan.kept.size(); ++k) {
      for (uint32_t e = 0; e < plan.full.domains[plan.kept[k]].experts; ++e) {
        ++report.experts;
        report.initial += !reader->written(reader->index().Flat({l, plan.old_first[k] + e}));
      }
    }
  }
  return report;
}

StatusOr<ExtractReport> ExtractToCheckpoint(const ExtractOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::OpenPath(options.checkpoint));
  ECSS_ASSIGN_OR_RETURN(const Plan plan, MakePlan(options, *reader));
  ECSS_ASSIGN_OR_RETURN(
      std::unique_ptr<CheckpointBuilder> builder,
      CheckpointBuilder::Create(options.out, options.overwrite, plan.sub, reader->layout(),
                                reader->states(), reader->where()));
  ExtractReport report;
  report.model = plan.sub;
  const uint32_t per_layer = plan.sub.experts_per_layer();
  const uint64_t total = uint64_t{per_layer} * plan.full.layers;
  for (uint32_t l = 0; l < plan.full.layers; ++l) {
    for (size_t k = 0; k < plan.kept.size(); ++k) {
      for (uint32_t e = 0; e < plan.full.domains[plan.kept[k]].experts; ++e) {
        const uint32_t flat = reader->index().Flat({l, plan.old_first[k] + e});
        const uint64_t version = reader->version(flat);
        ++report.experts;
        if (!reader->written(flat)) {
          ++report.initial;  // stays unwritten: the sub-model draws what the full model did
        } else {
          ECSS_RETURN_IF_ERROR(reader->Read(flat));
          ECSS_RETURN_IF_ERROR(
              builder->Write({l, plan.new_first[k] + e}, reader->blocks(), version));
        }
        if (options.progress) options.progress(report.experts, total);
      }
    }
  }
  // The kept experts' held gradients, renumbered as the experts are.
  ECSS_ASSIGN_OR_RETURN(const std::vector<CheckpointBlob> blobs,
                        RenumberSessionRecords(reader->blobs(), plan.full,
                                               [&plan](ExpertId id) { return plan.SubOf(id); }));
  ECSS_ASSIGN_OR_RETURN(report.file_bytes, builder->Finish(blobs));
  if (options.verify) {
    ECSS_RETURN_IF_ERROR(
        builder->Verify([&] { return VerifyByEvaluation(plan, *reader, options); }, &report));
  }
  return report;
}

namespace {

// A dense FFN's weights per sparse layer, from a safetensors file (AddDomainOptions::dense_ffn).
class DenseFfn {
 public:
  // Every layer's tensors present, F32 of their shapes (DataLoss naming the one that is not).
  static StatusOr<std::unique_ptr<DenseFfn>> Open(const std::string& path, const ModelSpec& m) {
    ECSS_ASSIGN_OR_RETURN(SafetensorsHeader header, ReadSafetensorsHeader(path));
    auto ffn = std::unique_ptr<DenseFfn>(new DenseFfn(path, std::move(header)));
    if (!ffn->in_) return ErrnoError(errno, "opening '", path, "'");
    for (uint32_t l = 0; l < m.layers; ++l) {
      const std::pair<std::string, std::vector<uint64_t>> wanted[] = {
          {StrCat("layers.", l, ".w_in"), {m.d_model, m.d_in()}},
          {StrCat("layers.", l, ".w_out"), {m.d_ff, m.d_model}}};
      for (const auto& want : wanted) {
        auto it = std::find_if(ffn->header_.tensors.begin(), ffn->header_.tensors.end(),
                               [&](const SafetensorsTensor& t) { return t.name == want.first; });
        const std::string shape = StrCat("F32 [", want.second[0], ", ", want.second[1], "]");
        if (it == ffn->header_.tensors.end()) {
          return DataLossError(
              StrCat("dense FFN '", path, "': no tensor '", want.first, "' (", shape, ")"));
        }
        if (it->dtype != "F32" || it->shape != want.second) {
          std::string dims;
          for (uint64_t d : it->shape) dims += StrCat(dims.empty() ? "" : ", ", d);
          return DataLossError(StrCat("dense FFN '", path, "': tensor '", want.first, "' is ",
                                      it->dtype, " [", dims, "], not ", shape,
                                      " as the model implies"));
        }
        ffn->tensors_.push_back(&*it);
      }
    }
    return ffn;
  }
  // Layer `layer`'s FFN as an expert's fp32 master weights (w_in, then w_out), each value
  // finite (DataLoss naming the tensor otherwise).
  Status Read(uint32_t layer, float* master) {
    auto* at = reinterpret_cast<char*>(master);
    for (const SafetensorsTensor* t : {tensors_[2 * layer], tensors_[2 * layer + 1]}) {
      const uint64_t bytes = t->end - t->begin;
      if (!ReadTensorData(in_, header_, *t, at)) {
        return DataLossError(StrCat("dense FFN '", path_, "': tensor '", t->name, "' cut short"));
      }
      const auto* values = reinterpret_cast<const float*>(at);
      if (!std::all_of(values, values + bytes / 4, [](float v) { return std::isfinite(v); })) {
        return DataLossError(StrCat("dense FFN '", path_, "': tensor '", t->name,
                                    "' holds a value that is not finite"));
      }
      at += bytes;
    }
    return Status::Ok();
  }

 private:
  DenseFfn(std::string path, SafetensorsHeader header)
      : path_(std::move(path)), header_(std::move(header)), in_(path_, std::ios::binary) {}
  const std::string path_;
  const SafetensorsHeader header_;
  std::ifstream in_;
  std::vector<const SafetensorsTensor*> tensors_;  // per layer: w_in, w_out
};

// The group AddDomain grew from a dense FFN (experts `first` on, of checkpoint options.out),
// read back: each expert written with no update, its master weights its layer's FFN as the
// file holds it, every other state zeros.
Status CompareDenseGroup(const AddDomainOptions& options, uint32_t first,
                         const std::vector<ExpertState>& states, ExpertState master) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> written,
                        CheckpointReader::OpenPath(options.out));
  ECSS_ASSIGN_OR_RETURN(const ModelSpec model, CheckpointModel(*written));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<DenseFfn> ffn, DenseFfn::Open(options.dense_ffn, model));
  std::vector<float> want(model.expert_params());
  for (uint32_t l = 0; l < model.layers; ++l) {
    ECSS_RETURN_IF_ERROR(ffn->Read(l, want.data()));
    for (uint32_t e = first; e < first + options.experts; ++e) {
      const uint32_t flat = written->index().Flat({l, e});
      const std::string what =
          StrCat("verify: layer ", l, " expert ", e, " of '", options.out, "'");
      if (!written->written(flat) || written->version(flat) != 0) {
        return DataLossError(StrCat(what, " is not written at version 0"));
      }
      ECSS_RETURN_IF_ERROR(written->Read(flat));
      for (size_t s = 0; s < states.size(); ++s) {
        const uint64_t bytes = ExpertStore::StateBytes(written->layout(), states[s]);
        const auto* got = static_cast<const char*>(written->blocks()[s]);
        const bool same = states[s] == master
                              ? std::memcmp(got, want.data(), bytes) == 0
                              : std::all_of(got, got + bytes, [](char c) { return c == 0; });
        if (!same) {
          return DataLossError(StrCat(what, " ", ExpertStateName(states[s]), " is not ",
                                      states[s] == master ? "the dense FFN's" : "zeros"));
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<ExtractReport> AddDomain(const AddDomainOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::OpenPath(options.checkpoint));
  ECSS_ASSIGN_OR_RETURN(const ModelSpec full, ModelOf(*reader));
  const bool dense = !options.dense_ffn.empty();
  if (dense == !options.copy_of.empty()) {
    return InvalidArgumentError(
        "a new domain starts as a copy of a domain or from a dense FFN: name one of the two");
  }
  if (dense != (options.experts > 0)) {
    return InvalidArgumentError(
        "a group grown from a dense FFN needs its number of experts (at least 1); a copy has "
        "its source's");
  }
  // The source group, and where every group starts; the new group goes after all of them, so
  // no expert of the model moves and no domain's tables change (they are keyed on its id).
  std::optional<size_t> source;
  uint32_t source_first = 0, first = 0, next_id = 0;
  if (options.name.find(',') != std::string::npos) {
    return InvalidArgumentError(StrCat("domain name '", options.name,
                                       "' has a comma: ecss-extract --domains could not name it"));
  }
  for (size_t d = 0; d < full.domains.size(); ++d) {
    if (full.domains[d].name == options.name) {
      return AlreadyExistsError(StrCat("checkpoint '", options.checkpoint, "' has a domain '",
                                       options.name, "' already"));
    }
    if (!dense && full.domains[d].name == options.copy_of) {
      source = d;
      source_first = first;
    }
    first += full.domains[d].experts;
    next_id = std::max(next_id, full.DomainId(d) + 1);
  }
  if (!dense && !source) {
    std::string known;
    for (const DomainSpec& d : full.domains) known += StrCat(known.empty() ? "" : ", ", d.name);
    return NotFoundError(StrCat("no domain '", options.copy_of, "' to copy in checkpoint '",
                                options.checkpoint, "'; it has: ", known));
  }
  ModelSpec grown = full;
  DomainSpec added{options.name, dense ? options.experts : full.domains[*source].experts};
  added.id = next_id;
  // A copy's experts the source never updated stay unwritten here too, drawn as the source's
  // were.
  if (!dense) added.source_first_expert = full.InitialKey(source_first);
  grown.domains.push_back(added);
  ECSS_RETURN_IF_ERROR(ValidateModel(grown));
  std::unique_ptr<DenseFfn> ffn;
  if (dense) {
    ECSS_ASSIGN_OR_RETURN(ffn, DenseFfn::Open(options.dense_ffn, full));
  }
  // A dense group's expert: its layer's FFN as the master weights, every other state zeros.
  const std::vector<ExpertState>& states = reader->states();
  const auto master =
      std::find(states.begin(), states.end(),
                full.dtype == DType::kF32 ? ExpertState::kWeights : ExpertState::kMaster);
  if (dense && master == states.end()) {
    return FailedPreconditionError(
        StrCat("checkpoint '", options.checkpoint, "' holds no master weights"));
  }
  std::optional<ZeroedBlocks> fresh;
  float* fresh_master = nullptr;
  if (dense) {
    ECSS_ASSIGN_OR_RETURN(fresh, ZeroedBlocks::Make(reader->layout(), states));
    fresh_master = static_cast<float*>(fresh->block(master - states.begin()));
  }
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointBuilder> builder,
                        CheckpointBuilder::Create(options.out, options.overwrite, grown,
                                                  reader->layout(), states, reader->where()));
  ExtractReport report;
  report.model = grown;
  // A dense group's experts of a layer are one value: the first is written (no update yet),
  // the others share its storage until their first update (stored once with NVMe states).
  std::vector<std::pair<ExpertId, ExpertId>> shared;
  for (uint32_t l = 0; l < full.layers; ++l) {
    if (dense) ECSS_RETURN_IF_ERROR(ffn->Read(l, fresh_master));
    for (uint32_t e = 0; e < first + added.experts; ++e) {
      ++report.experts;
      if (dense && e == first) {
        ECSS_RETURN_IF_ERROR(builder->Write({l, e}, fresh->pointers(), 0));
        continue;
      }
      if (dense && e > first) {
        shared.emplace_back(ExpertId{l, e}, ExpertId{l, first});
        continue;
      }
      // Every expert as it is, then the source group's again as the new group's.
      const uint32_t from = e < first ? e : source_first + (e - first);
      const uint32_t flat = reader->index().Flat({l, from});
      if (!reader->written(flat)) {
        ++report.initial;
        continue;
      }
      ECSS_RETURN_IF_ERROR(reader->Read(flat));
      ECSS_RETURN_IF_ERROR(builder->Write({l, e}, reader->blocks(), reader->version(flat)));
    }
  }
  if (!shared.empty()) ECSS_RETURN_IF_ERROR(builder->Share(shared));
  ECSS_ASSIGN_OR_RETURN(report.file_bytes, builder->Finish(reader->blobs()));
  // Every expert as its source (an old one, the copied group's, or the FFN), and every old
  // domain computing as before on the same inputs.
  auto check = [&]() -> Status {
    ECSS_RETURN_IF_ERROR(
        CompareExperts(*reader, options.out, [&](ExpertId id) -> std::optional<uint32_t> {
          if (id.expert >= first && dense) return std::nullopt;
          return reader->index().Flat(
              {id.layer, id.expert < first ? id.expert : source_first + (id.expert - first)});
        }));
    if (dense) ECSS_RETURN_IF_ERROR(CompareDenseGroup(options, first, states, *master));
    ECSS_ASSIGN_OR_RETURN(const OptimizerKind kind, ParseOptimizerKind(OptimizerOf(*reader)));
    ECSS_ASSIGN_OR_RETURN(const auto before,
                          EvaluationOutputs(full, full, options.checkpoint, kind));
    ECSS_ASSIGN_OR_RETURN(const auto after, EvaluationOutputs(grown, full, options.out, kind));
    if (before != after) {
      return DataLossError(StrCat("verify: the old domains' outputs of '", options.out,
                                  "' differ from those of '", options.checkpoint, "'"));
    }
    return Status::Ok();
  };
  if (options.verify) ECSS_RETURN_IF_ERROR(builder->Verify(check, &report));
  return report;
}

// ---- Import ----------------------------------------------------------------------------------

namespace {

// A file ecss-extract wrote with the optimizer's state, checked against what its model
// implies, read expert by expert.
class ImportedFile {
 public:
  static StatusOr<std::unique_ptr<ImportedFile>> Open(const std::string& path) {
    ECSS_ASSIGN_OR_RETURN(SafetensorsHeader header, ReadSafetensorsHeader(path));
    auto file = std::unique_ptr<ImportedFile>(new ImportedFile(path, std::move(header)));
    if (!file->in_) return ErrnoError(errno, "opening '", path, "'");
    ECSS_RETURN_IF_ERROR(file->Check());
    return file;
  }
  const Plan& plan() const { return plan_; }
  const ModelSpec& model() const { return plan_.sub; }
  OptimizerKind kind() const { return kind_; }

  // Every expert, layer by layer (each layer's routing table checked against the model's
  // router first): expert(id, version, master, moments), with the expert's fp32 master
  // weights (w_in then w_out) and its moment arrays one after another.
  Status ForEachExpert(
      const std::function<Status(ExpertId, uint64_t, const float*, const float*)>& expert) {
    const ModelSpec& m = model();
    const uint64_t params = m.expert_params();
    const uint64_t in_elements = uint64_t{m.d_model} * m.d_in();
    const uint32_t per_layer = m.experts_per_layer();
    std::vector<float> master(params), moments(params * plan_.moment_names.size());
    ECSS_ASSIGN_OR_RETURN(const RreRouter router, RouterOf(m));
    for (uint32_t l = 0; l < m.layers; ++l) {
      std::vector<int64_t> updates(per_layer);
      ECSS_RETURN_IF_ERROR(Read(StrCat("layers.", l, ".updates"), updates.data()));
      std::vector<int32_t> routing(m.domains.size() * uint64_t{m.vocab});
      ECSS_RETURN_IF_ERROR(Read(StrCat("layers.", l, ".routing"), routing.data()));
      for (uint32_t d = 0; d < m.domains.size(); ++d) {
        ECSS_ASSIGN_OR_RETURN(const size_t index, router.domains().IndexOf(m.DomainId(d)));
        const uint16_t* table = router.LocalTable(l, index);
        for (uint32_t t = 0; t < m.vocab; ++t) {
          if (routing[d * uint64_t{m.vocab} + t] !=
              static_cast<int32_t>(plan_.new_first[d] + table[t])) {
            return DataLossError(StrCat("'", path_, "': layers.", l, ".routing row ", d, " (",
                                        m.domains[d].name, ") sends token ", t,
                                        " elsewhere than the model's router"));
          }
        }
      }
      for (uint32_t e = 0; e < per_layer; ++e) {
        const std::string name = StrCat("layers.", l, ".experts.", e);
        ECSS_RETURN_IF_ERROR(Read(name + ".w_in", master.data()));
        ECSS_RETURN_IF_ERROR(Read(name + ".w_out", master.data() + in_elements));
        for (size_t a = 0; a < plan_.moment_names.size(); ++a) {
          const std::string& state = plan_.moment_names[a];
          ECSS_RETURN_IF_ERROR(Read(StrCat(name, ".w_in.", state), moments.data() + a * params));
          ECSS_RETURN_IF_ERROR(
              Read(StrCat(name, ".w_out.", state), moments.data() + a * params + in_elements));
        }
        // Values no training produces: a damaged or hand-made file.
        auto check = [&](const float* values, uint64_t count, const std::string& tensor,
                         bool non_negative) -> Status {
          for (uint64_t i = 0; i < count; ++i) {
            if (!std::isfinite(values[i]) || (non_negative && values[i] < 0)) {
              return DataLossError(
                  StrCat("'", path_, "': tensor '", tensor, "' holds ", values[i], " at ", i));
            }
          }
          return Status::Ok();
        };
        ECSS_RETURN_IF_ERROR(check(master.data(), in_elements, name + ".w_in", false));
        ECSS_RETURN_IF_ERROR(
            check(master.data() + in_elements, params - in_elements, name + ".w_out", false));
        for (size_t a = 0; a < plan_.moment_names.size(); ++a) {
          const std::string& state = plan_.moment_names[a];
          const bool squares = state == "exp_avg_sq" || state == "sum";  // sums of squares
          const float* moment = moments.data() + a * params;
          ECSS_RETURN_IF_ERROR(check(moment, in_elements, StrCat(name, ".w_in.", state), squares));
          ECSS_RETURN_IF_ERROR(check(moment + in_elements, params - in_elements,
                                     StrCat(name, ".w_out.", state), squares));
        }
        if (updates[e] < 0) {
          return DataLossError(StrCat("'", path_, "': layers.", l, ".updates gives expert ", e, " ",
                                      updates[e], " updates"));
        }
        ECSS_RETURN_IF_ERROR(
            expert({l, e}, static_cast<uint64_t>(updates[e]), master.data(), moments.data()));
      }
    }
    return Status::Ok();
  }

 private:
  ImportedFile(std::string path, SafetensorsHeader header)
      : path_(std::move(path)), header_(std::move(header)), in_(path_, std::ios::binary) {}

  // The metadata says what the file is; its tensors must be exactly those its model implies.
  Status Check() {
    auto meta = [&](const char* key) {
      auto it = header_.metadata.find(key);
      return it == header_.metadata.end() ? std::string() : it->second;
    };
    if (meta("format") != kFormat) {
      return FailedPreconditionError(StrCat("'", path_, "' is not a file of ", kFormat,
                                            " (its metadata's format is '", meta("format"), "')"));
    }
    StatusOr<ModelSpec> model = ParseModelRecord(meta("model"));
    if (!model.ok()) return model.status().Annotate(StrCat("'", path_, "' metadata"));
    StatusOr<OptimizerKind> kind = ParseOptimizerKind(meta("optimizer"));
    if (!kind.ok()) {
      return FailedPreconditionError(StrCat("'", path_, "' does not name its optimizer ('",
                                            meta("optimizer"), "'): its moments mean nothing"));
    }
    if (meta("domains") != DomainNames(*model)) {
      return DataLossError(StrCat("'", path_, "': the metadata's domains ('", meta("domains"),
                                  "') are not its model's"));
    }
    kind_ = *kind;
    if (header_.metadata.count(kWrittenWithoutUpdate) != 0) {
      const std::string& listed = header_.metadata.at(kWrittenWithoutUpdate);
      std::istringstream tokens(listed);
      std::string token;
      while (tokens >> token) {
        uint64_t layer = 0, expert = 0;
        const std::string_view view = token;
        const size_t dot = view.find('.');
        if (dot == std::string_view::npos || !ParseUint(view.substr(0, dot), UINT32_MAX, &layer) ||
            !ParseUint(view.substr(dot + 1), UINT32_MAX, &expert) || layer >= model->layers ||
            expert >= model->experts_per_layer()) {
          return DataLossError(StrCat("'", path_, "': the metadata's ", kWrittenWithoutUpdate,
                                      " names '", token, "', no expert of its model"));
        }
        const ExpertId id{static_cast<uint32_t>(layer), static_cast<uint32_t>(expert)};
        if (!plan_.written_without_update.empty() && !(plan_.written_without_update.back() < id)) {
          return DataLossError(StrCat("'", path_, "': the metadata's ", kWrittenWithoutUpdate,
                                      " is not ascending at '", token, "'"));
        }
        plan_.written_without_update.push_back(id);
      }
      if (plan_.written_without_update.empty() ||
          FormatExpertList(plan_.written_without_update) != listed) {
        return DataLossError(
            StrCat("'", path_, "': the metadata's ", kWrittenWithoutUpdate, " is malformed"));
      }
    }
    plan_.full = plan_.sub = *model;
    plan_.optimizer = meta("optimizer");
    plan_.moment_names = MomentNames(kind_);
    uint32_t first = 0;
    for (uint32_t d = 0; d < model->domains.size(); ++d) {
      plan_.kept.push_back(d);
      plan_.old_first.push_back(first);
      plan_.new_first.push_back(first);
      first += model->domains[d].experts;
    }
    for (const SafetensorsTensor& t : header_.tensors) by_name_[t.name] = &t;
    if (by_name_.count("layers.0.updates") == 0) {
      return FailedPreconditionError(
          StrCat("'", path_,
                 "' holds no optimizer state (written without --with-optimizer-state): without "
                 "the moments and update counts the model cannot train on exactly"));
    }
    ExtractOptions with_state;
    with_state.with_optimizer_state = true;
    size_t expected = 0;
    ECSS_RETURN_IF_ERROR(
        Walk(plan_, nullptr, with_state, [&](const SafetensorsTensor& want, const void*) {
          ++expected;
          auto it = by_name_.find(want.name);
          if (it == by_name_.end()) {
            return DataLossError(StrCat("'", path_, "' has no tensor '", want.name, "'"));
          }
          if (it->second->dtype != want.dtype || it->second->shape != want.shape) {
            return DataLossError(StrCat("'", path_, "': tensor '", want.name, "' is ",
                                        it->second->dtype, " of another shape, not ", want.dtype,
                                        " as its model implies"));
          }
          return Status::Ok();
        }));
    if (header_.tensors.size() != expected) {
      return DataLossError(StrCat("'", path_, "' holds ", header_.tensors.size(),
                                  " tensors; its model implies ", expected));
    }
    return Status::Ok();
  }

  Status Read(const std::string& name, void* dst) {
    if (!ReadTensorData(in_, header_, *by_name_.at(name), dst)) {
      return DataLossError(StrCat("'", path_, "': tensor '", name, "' cut short"));
    }
    return Status::Ok();
  }

  const std::string path_;
  const SafetensorsHeader header_;
  std::ifstream in_;
  std::map<std::string, const SafetensorsTensor*> by_name_;
  Plan plan_;
  OptimizerKind kind_ = OptimizerKind::kAdamW;
};

}  // namespace

// Every expert of the checkpoint `options.out` as the file has it: version, master weights
// and moments.
Status VerifyImport(const ImportOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> written,
                        CheckpointReader::OpenPath(options.out));
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ImportedFile> file, ImportedFile::Open(options.file));
  const uint64_t master_bytes = file->model().expert_params() * 4;
  const uint64_t moment_bytes = master_bytes * file->plan().moment_names.size();
  return file->ForEachExpert(
      [&](ExpertId id, uint64_t version, const float* master, const float* moments) -> Status {
        const uint32_t flat = written->index().Flat(id);
        const std::vector<ExpertId>& listed = file->plan().written_without_update;
        // Written unless never updated and not named by the metadata (then the import checked
        // it holds its initial values).
        bool same = written->version(flat) == version &&
                    written->written(flat) ==
                        (version != 0 || std::binary_search(listed.begin(), listed.end(), id));
        if (same && written->written(flat)) {
          ECSS_RETURN_IF_ERROR(written->Read(flat));
          same = std::memcmp(written->blocks()[0], master, master_bytes) == 0 &&
                 std::memcmp(written->blocks()[1], moments, moment_bytes) == 0;
        }
        if (!same) {
          return DataLossError(StrCat("verify: layer ", id.layer, " expert ", id.expert, " of '",
                                      options.out, "' differs from '", options.file, "'"));
        }
        return Status::Ok();
      });
}

StatusOr<ExtractReport> ImportSafetensors(const ImportOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<ImportedFile> file, ImportedFile::Open(options.file));
  const ModelSpec& m = file->model();
  // The states and layout a session with its states in host memory saves.
  SessionOptions session;
  session.model = m;
  session.optimizer.kind = file->kind();
  const ExpertStoreLayout layout = StoreOptionsFor(session, m.expert_params()).layout;
  const std::vector<ExpertState> states = {
      m.dtype == DType::kF32 ? ExpertState::kWeights : ExpertState::kMaster, ExpertState::kMoments};
  ECSS_ASSIGN_OR_RETURN(
      std::unique_ptr<CheckpointBuilder> builder,
      CheckpointBuilder::Create(options.out, options.overwrite, m, layout, states, ""));
  const uint64_t params = m.expert_params();
  const uint64_t master_bytes = params * 4;
  const uint64_t moment_bytes = params * 4 * file->plan().moment_names.size();
  ECSS_ASSIGN_OR_RETURN(const ZeroedBlocks blocks, ZeroedBlocks::Make(layout, states));
  std::vector<float> initial(params);
  ExtractReport report;
  report.model = m;
  const uint64_t total = uint64_t{m.experts_per_layer()} * m.layers;
  ECSS_RETURN_IF_ERROR(file->ForEachExpert([&](ExpertId id, uint64_t version, const float* master,
                                               const float* moments) -> Status {
    ++report.experts;
    if (options.progress) options.progress(report.experts, total);
    const std::vector<ExpertId>& listed = file->plan().written_without_update;
    const bool without_update = std::binary_search(listed.begin(), listed.end(), id);
    if (without_update && version != 0) {
      return DataLossError(StrCat("'", options.file, "': layer ", id.layer, " expert ", id.expert,
                                  " has ", version, " updates but the metadata's ",
                                  kWrittenWithoutUpdate, " names it"));
    }
    if (version == 0 && !without_update) {
      // Never updated: it stays unwritten, which reads as its initial values, so it must
      // hold exactly those.
      ++report.initial;
      DrawInitialMaster(m, id.layer, id.expert, initial.data());
      const bool zero_moments = std::all_of(moments, moments + moment_bytes / 4,
                                            [](float v) { return FloatBits(v) == 0; });
      if (std::memcmp(initial.data(), master, master_bytes) != 0 || !zero_moments) {
        return DataLossError(StrCat("'", options.file, "': layer ", id.layer, " expert ", id.expert,
                                    " has no update but weights or moments other than its "
                                    "initial values"));
      }
      return Status::Ok();
    }
    std::memcpy(blocks.block(0), master, master_bytes);
    std::memcpy(blocks.block(1), moments, moment_bytes);
    return builder->Write(id, blocks.pointers(), version);
  }));
  ECSS_ASSIGN_OR_RETURN(report.file_bytes,
                        builder->Finish({{std::string(kOptimizerBlob),
                                          std::string(OptimizerKindName(file->kind()))}}));
  if (options.verify) {
    ECSS_RETURN_IF_ERROR(builder->Verify([&] { return VerifyImport(options); }, &report));
  }
  return report;
}

// ---- Pseudo-to-Real ----------------------------------------------------------------------------

StatusOr<ExtractReport> RepeatLayers(const RepeatLayersOptions& options) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::OpenPath(options.checkpoint));
  ECSS_ASSIGN_OR_RETURN(const ModelSpec shallow, ModelOf(*reader));
  if (options.times < 2) {
    return InvalidArgumentError(StrCat("--repeat-layers ", options.times, ": at least 2"));
  }
  // Layer l of the deep model draws as shallow layer l % L would, which draws as layer
  // l % L % s when the shallow model repeats its own first s: the same as l % s iff s divides L.
  const uint32_t layers = shallow.layers;
  if (shallow.initial_layers != 0 && layers % shallow.initial_layers != 0) {
    return InvalidArgumentError(StrCat("checkpoint '", options.checkpoint, "': its ", layers,
                                       " layers repeat its first ", shallow.initial_layers,
                                       " unevenly: it cannot be repeated again"));
  }
  if (uint64_t{layers} * options.times > UINT32_MAX) {
    return InvalidArgumentError(StrCat("--repeat-layers ", options.times, ": too many layers"));
  }
  ModelSpec deep = shallow;
  deep.layers = layers * options.times;
  deep.initial_layers = shallow.initial_layers != 0 ? shallow.initial_layers : layers;
  ECSS_RETURN_IF_ERROR(ValidateModel(deep));
  ECSS_ASSIGN_OR_RETURN(
      std::unique_ptr<CheckpointBuilder> builder,
      CheckpointBuilder::Create(options.out, options.overwrite, deep, reader->layout(),
                                reader->states(), reader->where()));
  ExtractReport report;
  report.model = deep;
  // The shallow model's experts as they are; every deeper copy shares its source's storage.
  std::vector<std::pair<ExpertId, ExpertId>> shared;
  for (uint32_t flat = 0; flat < reader->index().size(); ++flat) {
    const ExpertId id = reader->index().Id(flat);
    const uint64_t version = reader->version(flat);
    report.experts += options.times;
    if (!reader->written(flat)) {
      report.initial += options.times;  // unwritten: each copy draws as its shallow layer
      continue;
    }
    ECSS_RETURN_IF_ERROR(reader->Read(flat));
    ECSS_RETURN_IF_ERROR(builder->Write(id, reader->blocks(), version));
    for (uint32_t k = 1; k < options.times; ++k) {
      shared.emplace_back(ExpertId{id.layer + k * layers, id.expert}, id);
    }
  }
  ECSS_RETURN_IF_ERROR(builder->Share(shared));
  // The loop's blobs and the session's records as they are: held gradients stay with the
  // shallow layers' experts, whose ids do not change.
  ECSS_ASSIGN_OR_RETURN(report.file_bytes, builder->Finish(reader->blobs()));
  if (options.verify) {
    auto source = [&](ExpertId id) { return reader->index().Flat({id.layer % layers, id.expert}); };
    ECSS_RETURN_IF_ERROR(
        builder->Verify([&] { return CompareExperts(*reader, options.out, source); }, &report));
  }
  return report;
}

}  // namespace ecss
