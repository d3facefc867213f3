#include "engine/step_plan.h"

#include <algorithm>
#include <limits>
#include <map>
#include <optional>

#include "offload/device_cache.h"
#include "runtime/base/check.h"
#include "runtime/base/json_writer.h"
#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view OpKindName(OpKind kind) {
  switch (kind) {
    case OpKind::kPlanUpload:
      return "plan_upload";
    case OpKind::kStage:
      return "stage";
    case OpKind::kFetch:
      return "fetch";
    case OpKind::kEvict:
      return "evict";
    case OpKind::kForward:
      return "forward";
    case OpKind::kBackward:
      return "backward";
    case OpKind::kGradientCopy:
      return "gradient_copy";
    case OpKind::kAccumulate:
      return "accumulate";
    case OpKind::kStateRead:
      return "state_read";
    case OpKind::kUpdate:
      return "update";
    case OpKind::kStateWrite:
      return "state_write";
    case OpKind::kPublish:
      return "publish";
  }
  return "?";
}

std::string_view PlanResourceName(PlanResource resource) {
  switch (resource) {
    case PlanResource::kH2d:
      return "h2d";
    case PlanResource::kD2h:
      return "d2h";
    case PlanResource::kCompute:
      return "compute";
    case PlanResource::kCpuOptimizer:
      return "cpu_optimizer";
    case PlanResource::kNvmeRead:
      return "nvme_read";
    case PlanResource::kNvmeWrite:
      return "nvme_write";
    case PlanResource::kNone:
      return "none";
  }
  return "?";
}

// Note [Plan shapes]: the builder adds every op through Add(), which gives no-overlap and
// naive (the chained strategies) their shape in one place: the step's device-side work runs
// in stages (an upload; an access's stages and fetches; a forward; a backward with its
// gradient copies, which it orders on the device), and each stage waits, on the host, for the
// one before it. A layer's update that starts in the backward (immediate updates) is a stage
// too, so nothing overlaps the optimizer: the backward of the layer below waits for it.
// Updates that wait for the whole step (the global norm) run at its end, and the step's end
// waits for them (StepPlan::step_waits_for_updates). Naive's and zero-offload's difference
// (every expert in every access) is in Groups(); zero-offload is otherwise ecss's shape,
// except that its step waits for its updates. Nothing else in the builder, and nothing in the
// executor, asks which strategy runs.
namespace {
bool DeviceSide(OpKind kind) {
  return kind != OpKind::kStateRead && kind != OpKind::kUpdate && kind != OpKind::kStateWrite &&
         kind != OpKind::kPublish;
}
}  // namespace

class StepPlan::Builder {
 public:
  explicit Builder(StepPlan& plan)
      : plan_(plan), c_(plan.cursor_), policy_(plan.policy_), model_(plan.model_) {}

  // `joins`: the op belongs to the stage of the op before it (a layer's gradient copies join
  // its backward: ordered after it on the device, not by the host), and the next op waits for
  // the whole stage.
  uint32_t Add(PlanOp op, bool joins = false) {
    op.id = static_cast<uint32_t>(plan_.ops_.size());
    // A layer's update that starts during the backward (immediate updates) is a stage of the
    // chain too: the device's next op waits for it, so nothing overlaps the optimizer.
    const bool immediate_update =
        op.kind == OpKind::kUpdate && !policy_.deferred_updates && !policy_.delayed_update;
    const bool chained =
        StepPlan::Chained(policy_.strategy) && op.step_offset == 0 &&
        ((DeviceSide(op.kind) && op.resource != PlanResource::kNone) || immediate_update);
    if (chained && !joins && !c_.chain_tail.empty()) {
      op.deps.insert(op.deps.end(), c_.chain_tail.begin(), c_.chain_tail.end());
      op.host_waits = true;
    }
    std::sort(op.deps.begin(), op.deps.end());
    op.deps.erase(std::unique(op.deps.begin(), op.deps.end()), op.deps.end());
    plan_.ops_.push_back(std::move(op));
    const uint32_t id = plan_.ops_.back().id;
    if (chained && joins) {
      c_.chain_tail.push_back(id);
    } else if (chained && c_.stage_open) {
      c_.stage_ops.push_back(id);
    } else if (chained) {
      c_.chain_tail = {id};
    }
    return id;
  }

  // A stage of the chain: its ops wait for the stage before, not for each other, and the op
  // after it waits for all of them (an access's fetches are issued together, then its compute
  // waits for every one).
  void OpenStage() {
    c_.stage_open = true;
    c_.stage_ops.clear();
  }
  void CloseStage() {
    c_.stage_open = false;
    if (!c_.stage_ops.empty()) c_.chain_tail = c_.stage_ops;
  }

  // The ops carried in from earlier steps that this step's edges name; with the delayed
  // update, also the publication and the update of step t-1's gradients that start the step.
  void AddCarried(uint64_t held_experts) {
    if (policy_.evaluation) {  // its fetches wait for the experts' last updates, nothing else
      PlanOp last;
      last.kind = OpKind::kUpdate;
      last.resource = PlanResource::kCpuOptimizer;
      last.step_offset = -1;
      c_.step_gate = c_.fetch_gate = Add(last);
      return;
    }
    PlanOp t2;
    t2.kind = OpKind::kUpdate;
    t2.resource = PlanResource::kCpuOptimizer;
    t2.step_offset = -2;
    const uint32_t before_last = Add(t2);
    if (!policy_.delayed_update) {
      // ecss: the step's device work overlaps step t-1's updates, not step t-2's; a fetch of
      // an expert waits for that expert's update of step t-1.
      PlanOp t1 = t2;
      t1.step_offset = -1;
      c_.step_gate = before_last;
      c_.fetch_gate = Add(t1);
      return;
    }
    // DPU: step t-2's updates finished and their weights are published (fetches read those);
    // step t-1's held gradients start updating and overlap the whole step.
    PlanOp publish;
    publish.kind = OpKind::kPublish;
    publish.deps = {before_last};
    c_.step_gate = c_.fetch_gate = Add(publish);
    PlanOp held;
    held.kind = OpKind::kUpdate;
    held.resource = PlanResource::kCpuOptimizer;
    held.step_offset = -1;
    held.bytes = held_experts * model_.params * UpdateBytesPerParam();
    held.deps = {c_.step_gate};
    c_.held_update = Add(held);
  }

  void AddUpload(uint32_t micro_batch, int32_t layer, uint64_t bytes) {
    if (bytes == 0) return;
    PlanOp op;
    op.kind = OpKind::kPlanUpload;
    op.resource = PlanResource::kH2d;
    op.micro_batch = static_cast<int32_t>(micro_batch);
    op.layer = layer;
    op.bytes = bytes;
    op.deps = {c_.step_gate};
    c_.upload[micro_batch] = Add(op);
  }

  // `plan_bytes` > 0: the layer's own routing plan is uploaded first (learned gates).
  Status AddForward(uint32_t micro_batch, uint32_t layer, const LayerRoute& route,
                    uint64_t plan_bytes = 0) {
    ECSS_RETURN_IF_ERROR(Check(micro_batch, layer, route));
    if (c_.groups.count({micro_batch, layer}) != 0) {
      return InvalidArgumentError(StrCat("step plan: micro-batch ", micro_batch, " layer ", layer,
                                         " has its forward already"));
    }
    LayerRoute groups = Groups(layer, route);
    if (groups.experts.size() > policy_.cache_slots) {
      return ResourceExhaustedError(
          StrCat("micro-batch ", micro_batch, " layer ", layer, " activates ",
                 groups.experts.size(), " experts but the device cache holds ", policy_.cache_slots,
                 " (", HumanBytes(groups.experts.size() * model_.params * model_.weight_bytes),
                 " of expert weights needed)"));
    }
    AddUpload(micro_batch, static_cast<int32_t>(layer), plan_bytes);
    ECSS_RETURN_IF_ERROR(AddCompute(OpKind::kForward, micro_batch, layer, groups));
    c_.groups[{micro_batch, layer}] = std::move(groups);
    return Status::Ok();
  }

  Status AddBackward(uint32_t micro_batch, uint32_t layer) {
    if (policy_.evaluation) {
      return InvalidArgumentError("step plan: an evaluation step has no backward");
    }
    auto found = c_.groups.find({micro_batch, layer});
    if (found == c_.groups.end()) {
      return InvalidArgumentError(StrCat("step plan: backward of micro-batch ", micro_batch,
                                         " layer ", layer, " before its forward"));
    }
    const LayerRoute groups = found->second;
    // It writes its experts' gradients into the device region the last backward's went to,
    // once their copies to the host ended (the executor's dw_free_ event); those copies may
    // wait in turn for a staging half's addition (below), so several micro-batches' backwards
    // keep pace with the host's additions.
    std::vector<uint32_t> region_free;
    if (c_.last_gradient_copy >= 0) {
      region_free.push_back(static_cast<uint32_t>(c_.last_gradient_copy));
    }
    ECSS_RETURN_IF_ERROR(AddCompute(OpKind::kBackward, micro_batch, layer, groups, region_free));
    PlanOp copy;
    copy.kind = OpKind::kGradientCopy;
    copy.resource = PlanResource::kD2h;
    copy.micro_batch = static_cast<int32_t>(micro_batch);
    copy.layer = static_cast<int32_t>(layer);
    copy.experts = groups.experts;
    copy.bytes = groups.experts.size() * model_.params * model_.gradient_bytes;
    copy.deps = {static_cast<uint32_t>(c_.last_compute)};
    auto previous = c_.gradient.find(layer);
    if (previous != c_.gradient.end()) {
      copy.deps.push_back(previous->second);
    } else if (c_.held_update >= 0) {
      // The delayed update: the held update of step t-1 reads these gradient buffers.
      copy.deps.push_back(static_cast<uint32_t>(c_.held_update));
    }
    std::vector<uint32_t> added;  // experts with gradients of an earlier micro-batch
    for (uint32_t e : groups.experts) {
      if (!c_.touched[layer].insert(e).second) added.push_back(e);
    }
    if (!added.empty() && c_.additions.size() >= 2) {
      // Its gradients go to the pinned staging half the addition two before it read (two
      // halves in turn): once that addition ended.
      copy.deps.push_back(c_.additions[c_.additions.size() - 2]);
    }
    uint32_t done = Add(copy, /*joins=*/true);
    c_.last_gradient_copy = done;
    if (!added.empty()) {  // a later micro-batch's gradients, added on the host in order
      PlanOp add;
      add.kind = OpKind::kAccumulate;
      add.micro_batch = copy.micro_batch;
      add.layer = copy.layer;
      add.bytes = added.size() * model_.params * model_.gradient_bytes;
      add.experts = std::move(added);
      add.deps = {done};
      done = Add(add);
      c_.additions.push_back(done);
    }
    c_.gradient[layer] = done;
    if (micro_batch + 1 == plan_.micro_batches_ && !policy_.delayed_update &&
        !policy_.deferred_updates) {
      AddUpdate(layer, {done});
    }
    return Status::Ok();
  }

  // The updates that wait for every gradient of the step (the global norm), at its end.
  void Finish() {
    if (policy_.evaluation || policy_.delayed_update || !policy_.deferred_updates || c_.finished) {
      return;
    }
    c_.finished = true;
    std::vector<uint32_t> all;
    for (const auto& [layer, op] : c_.gradient) all.push_back(op);
    for (const auto& [layer, op] : c_.gradient) AddUpdate(layer, all);
  }

  // The grouped FFN's groups of a route: its experts, or (naive, zero-offload) every expert of
  // the layer.
  LayerRoute Groups(uint32_t layer, const LayerRoute& route) const {
    if (!StepPlan::EveryExpert(policy_.strategy)) return route;
    LayerRoute all;
    size_t a = 0;
    for (uint32_t e = 0; e < model_.experts_per_layer[layer]; ++e) {
      const bool routed = a < route.experts.size() && route.experts[a] == e;
      all.experts.push_back(e);
      all.rows.push_back(routed ? route.rows[a++] : 0);
    }
    return all;
  }

  Status Check(uint32_t micro_batch, uint32_t layer, const LayerRoute& route) const {
    const auto where = [&] {
      return StrCat("step plan: micro-batch ", micro_batch, " layer ", layer);
    };
    if (micro_batch >= plan_.micro_batches_ || layer >= model_.layers()) {
      return InvalidArgumentError(StrCat(where(), ": out of range (", plan_.micro_batches_,
                                         " micro-batches, ", model_.layers(), " layers)"));
    }
    if (route.rows.size() != route.experts.size()) {
      return InvalidArgumentError(StrCat(where(), ": ", route.experts.size(), " experts but ",
                                         route.rows.size(), " row counts"));
    }
    for (size_t i = 0; i < route.experts.size(); ++i) {
      if (route.experts[i] >= model_.experts_per_layer[layer] ||
          (i > 0 && route.experts[i] <= route.experts[i - 1])) {
        return InvalidArgumentError(StrCat(where(), ": experts must be ascending and below ",
                                           model_.experts_per_layer[layer], " (expert ",
                                           route.experts[i], " at index ", i, ")"));
      }
    }
    return Status::Ok();
  }

  // `key`, resident, used at `position`: now the most recently used.
  void Use(ExpertId key, uint64_t position) {
    const uint64_t stamp = c_.stamps++;
    c_.recency[key] = stamp;
    if (c_.eviction.policy != nullptr)
      c_.eviction.policy->OnAccess(key, policy_.learned_gate ? stamp : position);
  }

 private:
  uint64_t UpdateBytesPerParam() const {
    // Reads the gradient, the master and the moments; writes the master and the moments,
    // and the compute copy when it is not the master itself.
    return model_.gradient_bytes + 2ull * model_.state_arrays * 4 +
           (model_.weight_bytes == 2 ? 2 : 0);
  }

  void AddUpdate(uint32_t layer, std::vector<uint32_t> deps) {
    const std::set<uint32_t>& touched = c_.touched[layer];
    if (touched.empty()) return;
    const std::vector<uint32_t> experts(touched.begin(), touched.end());
    const uint64_t elements = experts.size() * model_.params;
    // One of the layer's update ops, over its touched experts.
    auto layer_op = [&](OpKind kind, PlanResource resource, uint64_t bytes_per_param) {
      PlanOp op;
      op.kind = kind;
      op.resource = resource;
      op.layer = static_cast<int32_t>(layer);
      op.experts = experts;
      op.bytes = elements * bytes_per_param;
      return op;
    };
    if (policy_.states_on_nvme) {
      PlanOp read = layer_op(OpKind::kStateRead, PlanResource::kNvmeRead, model_.state_arrays * 4);
      read.deps = deps;
      deps = {Add(read)};
    }
    PlanOp update = layer_op(OpKind::kUpdate, PlanResource::kCpuOptimizer, UpdateBytesPerParam());
    update.deps = std::move(deps);
    const uint32_t id = Add(update);
    if (policy_.states_on_nvme) {
      PlanOp write = layer_op(OpKind::kStateWrite, PlanResource::kNvmeWrite,
                              model_.state_arrays * 4 + (policy_.weights_on_nvme ? 2 : 0));
      write.deps = {id};
      Add(write);
    }
  }

  // `deps`: what it waits for beyond its weights, its micro-batch's upload and stream order.
  Status AddCompute(OpKind kind, uint32_t micro_batch, uint32_t layer, const LayerRoute& groups,
                    std::vector<uint32_t> deps = {}) {
    OpenStage();
    for (uint32_t e : groups.experts) deps.push_back(Access(layer, e, groups.experts));
    CloseStage();
    auto upload = c_.upload.find(micro_batch);
    if (upload != c_.upload.end()) deps.push_back(upload->second);
    if (c_.last_compute >= 0) deps.push_back(static_cast<uint32_t>(c_.last_compute));
    PlanOp op;
    op.kind = kind;
    op.resource = PlanResource::kCompute;
    op.micro_batch = static_cast<int32_t>(micro_batch);
    op.layer = static_cast<int32_t>(layer);
    op.experts = groups.experts;
    op.rows = groups.rows;
    uint64_t rows = 0;
    for (uint32_t r : groups.rows) rows += r;
    // Forward: two GEMMs, a multiply-add per row and parameter. Backward recomputes the
    // forward and computes dX and dW: three times that.
    op.flops = 2.0 * static_cast<double>(rows) * static_cast<double>(model_.params) *
               (kind == OpKind::kForward ? 1 : 3);
    op.deps = std::move(deps);
    c_.last_compute = Add(op);
    for (uint32_t e : groups.experts)
      c_.last_use[{layer, e}] = static_cast<uint32_t>(c_.last_compute);
    return Status::Ok();
  }

  // One access of (layer, expert) by a compute op whose groups are `group`: the op it waits
  // for (its fetch in this step, else what every fetch waits for), fetching and evicting as
  // the device cache would.
  uint32_t Access(uint32_t layer, uint32_t expert, const std::vector<uint32_t>& group) {
    const uint64_t position = c_.positions++;
    const ExpertId key{layer, expert};
    if (c_.recency.count(key) != 0) {  // a hit: now the most recently used
      Use(key, position);
      auto fetched = c_.last_fetch.find(key);
      return fetched != c_.last_fetch.end() ? fetched->second : c_.fetch_gate;
    }
    std::vector<uint32_t> deps = {c_.fetch_gate};
    if (c_.recency.size() >= policy_.cache_slots) {
      const ExpertId gone = Victim(layer, group, position);
      PlanOp evict;
      evict.kind = OpKind::kEvict;
      evict.layer = static_cast<int32_t>(gone.layer);
      evict.experts = {gone.expert};
      evict.position = position;
      auto used = c_.last_use.find(gone);
      if (used != c_.last_use.end()) evict.deps = {used->second};
      deps.push_back(Add(evict));  // the slot is written once its last reader is done
      c_.last_fetch.erase(gone);
      c_.recency.erase(gone);
      c_.eviction.policy->OnEvict(gone);
    }
    // An expert's compute weights moving for this access: NVMe -> pinned, host -> device.
    auto weights_move = [&](OpKind kind, PlanResource resource) {
      PlanOp op;
      op.kind = kind;
      op.resource = resource;
      op.layer = static_cast<int32_t>(layer);
      op.experts = {expert};
      op.position = position;
      op.bytes = model_.params * model_.weight_bytes;
      return op;
    };
    if (policy_.weights_on_nvme) {
      PlanOp stage = weights_move(OpKind::kStage, PlanResource::kNvmeRead);
      stage.deps = {c_.fetch_gate};
      deps.push_back(Add(stage));
      deps.erase(deps.begin());  // the stage waits for the gate; the fetch for the stage
    }
    PlanOp fetch = weights_move(OpKind::kFetch, PlanResource::kH2d);
    fetch.deps = std::move(deps);
    const uint32_t id = Add(fetch);
    c_.last_fetch[key] = id;
    Use(key, position);
    return id;
  }

  // The resident expert to evict for an access at `position`, among those outside the
  // accessing group (whose leases are held), as the device cache decides: its Belady policy
  // with the step's sequence known (RRE), else the least recently used. A layer's group never
  // exceeds the slots (AddForward), so one is always outside it.
  ExpertId Victim(uint32_t layer, const std::vector<uint32_t>& group, uint64_t position) {
    auto evictable = [&](ExpertId r) {
      return r.layer != layer || !std::binary_search(group.begin(), group.end(), r.expert);
    };
    const std::optional<ExpertId> victim = c_.eviction.policy->ChooseVictim(position, evictable);
    ECSS_CHECK(victim.has_value()) << "step plan: every resident expert is in the access's group";
    return *victim;
  }

  StepPlan& plan_;
  Cursor& c_;
  const PlanPolicy& policy_;
  const PlanModel& model_;
};

// ---- StepPlan -------------------------------------------------------------------------------

std::vector<const PlanOp*> StepPlan::Find(OpKind kind, int32_t micro_batch, int32_t layer) const {
  std::vector<const PlanOp*> found;
  for (const PlanOp& op : ops_) {
    if (op.kind == kind && (micro_batch < 0 || op.micro_batch == micro_batch) &&
        (layer < 0 || op.layer == layer)) {
      found.push_back(&op);
    }
  }
  return found;
}

const PlanOp* StepPlan::Compute(OpKind kind, uint32_t micro_batch, uint32_t layer) const {
  const std::vector<const PlanOp*> found =
      Find(kind, static_cast<int32_t>(micro_batch), static_cast<int32_t>(layer));
  return found.empty() ? nullptr : found.front();
}

std::vector<ExpertId> StepPlan::AccessSequence() const {
  std::vector<ExpertId> sequence;
  for (const PlanOp& op : ops_) {
    if (op.kind != OpKind::kForward && op.kind != OpKind::kBackward) continue;
    for (uint32_t e : op.experts) sequence.push_back({static_cast<uint32_t>(op.layer), e});
  }
  return sequence;
}

std::vector<ExpertId> StepPlan::ResidentAfter() const {
  std::vector<std::pair<uint64_t, ExpertId>> by_use;
  for (const auto& [key, stamp] : cursor_.recency) by_use.emplace_back(stamp, key);
  std::sort(by_use.begin(), by_use.end());
  std::vector<ExpertId> resident;
  resident.reserve(by_use.size());
  for (const auto& [stamp, key] : by_use) resident.push_back(key);
  return resident;
}

uint32_t StepPlan::Width(uint32_t layer, const LayerRoute& route) const {
  if (layer >= model_.layers()) return 0;
  return static_cast<uint32_t>(
      Builder(const_cast<StepPlan&>(*this)).Groups(layer, route).experts.size());
}

uint64_t StepPlan::Bytes(OpKind kind) const {
  uint64_t bytes = 0;
  for (const PlanOp& op : ops_) bytes += op.kind == kind && op.step_offset == 0 ? op.bytes : 0;
  return bytes;
}

size_t StepPlan::Count(OpKind kind) const {
  size_t count = 0;
  for (const PlanOp& op : ops_) count += op.kind == kind && op.step_offset == 0 ? 1 : 0;
  return count;
}

StepPlan::Cursor::Eviction::Eviction(const Eviction& other)
    : policy(other.policy != nullptr ? other.policy->Clone() : nullptr) {}

StepPlan::Cursor::Eviction& StepPlan::Cursor::Eviction::operator=(const Eviction& other) {
  if (this != &other) policy = other.policy != nullptr ? other.policy->Clone() : nullptr;
  return *this;
}

Status StepPlan::Appendable() const {
  if (policy_.learned_gate) return Status::Ok();
  return FailedPreconditionError(
      "step plan: an RRE plan is built whole; only learned gates append layers");
}

Status StepPlan::AppendForward(uint32_t micro_batch, uint32_t layer, const LayerRoute& route,
                               uint64_t plan_bytes) {
  ECSS_RETURN_IF_ERROR(Appendable());
  return Builder(*this).AddForward(micro_batch, layer, route, plan_bytes);
}

Status StepPlan::AppendBackward(uint32_t micro_batch, uint32_t layer) {
  ECSS_RETURN_IF_ERROR(Appendable());
  return Builder(*this).AddBackward(micro_batch, layer);
}

void StepPlan::Finish() { Builder(*this).Finish(); }

void StepPlan::WriteJson(JsonWriter& json) const {
  json.BeginObject();
  if (seconds_ >= 0) json.Field("seconds", seconds_);
  json.Key("ops").BeginArray();
  for (const PlanOp& op : ops_) {
    json.BeginObject();
    json.Field("id", uint64_t{op.id});
    json.Field("kind", OpKindName(op.kind));
    json.Field("resource", PlanResourceName(op.resource));
    if (op.micro_batch >= 0) json.Field("micro_batch", int64_t{op.micro_batch});
    if (op.layer >= 0) json.Field("layer", int64_t{op.layer});
    if (op.step_offset != 0) json.Field("step_offset", int64_t{op.step_offset});
    if (!op.experts.empty()) {
      json.Key("experts").BeginArray();
      for (uint32_t e : op.experts) json.Uint(e);
      json.EndArray();
    }
    if (op.bytes > 0) json.Field("bytes", op.bytes);
    if (op.flops > 0) json.Field("flops", op.flops);
    json.Key("deps").BeginArray();
    for (uint32_t d : op.deps) json.Uint(d);
    json.EndArray();
    if (op.host_waits) json.Field("host_waits", true);
    if (op.issued_s >= 0) json.Field("issued_s", op.issued_s);
    if (op.start_s >= 0) json.Field("start_s", op.start_s);
    if (op.end_s >= 0) json.Field("end_s", op.end_s);
    json.EndObject();
  }
  json.EndArray().EndObject();
}

StatusOr<StepPlan> BuildStepPlan(const StepPlanInputs& in) {
  const PlanModel& m = in.model;
  if (m.layers() == 0 || m.params == 0 || in.policy.cache_slots == 0 || in.micro_batches.empty()) {
    return InvalidArgumentError(
        "step plan: layers, parameters per expert, cache slots and a micro-batch are required");
  }
  StepPlan plan;
  plan.model_ = m;
  plan.policy_ = in.policy;
  plan.micro_batches_ = static_cast<uint32_t>(in.micro_batches.size());
  if (in.policy.learned_gate) plan.cursor_.eviction.policy = MakeLruPolicy();
  StepPlan::Builder builder(plan);
  for (const ExpertId& key : in.resident) builder.Use(key, 0);
  builder.AddCarried(in.held_experts);
  if (in.policy.learned_gate) return plan;  // routed layer by layer: AppendForward
  for (uint32_t b = 0; b < in.micro_batches.size(); ++b) {
    if (in.micro_batches[b].layers.size() != m.layers()) {
      return InvalidArgumentError(StrCat("step plan: micro-batch ", b, " routes ",
                                         in.micro_batches[b].layers.size(), " layers of ",
                                         m.layers()));
    }
  }
  // RRE: the whole access sequence is known (per micro-batch, forward 0..L-1, then backward
  // L-1..0 unless evaluating), so the cache evicts by next use (Belady).
  for (uint32_t b = 0; b < in.micro_batches.size(); ++b) {
    for (uint32_t l = 0; l < m.layers(); ++l) {
      ECSS_RETURN_IF_ERROR(builder.Check(b, l, in.micro_batches[b].layers[l]));
    }
  }
  std::vector<ExpertId> sequence;
  for (const MicroBatchRoute& mb : in.micro_batches) {
    const uint32_t passes = in.policy.evaluation ? 1 : 2;
    for (uint32_t i = 0; i < passes * m.layers(); ++i) {
      const uint32_t l = i < m.layers() ? i : 2 * m.layers() - 1 - i;
      for (uint32_t e : builder.Groups(l, mb.layers[l]).experts) {
        sequence.push_back(ExpertId{l, e});
      }
    }
  }
  std::shared_ptr<EvictionPolicy>& belady = plan.cursor_.eviction.policy;
  belady = MakeBeladyPolicy(sequence);
  for (const auto& [key, stamp] : plan.cursor_.recency) belady->OnResident(key);
  for (uint32_t b = 0; b < in.micro_batches.size(); ++b) {
    builder.AddUpload(b, -1, in.micro_batches[b].plan_bytes);
  }
  for (uint32_t b = 0; b < in.micro_batches.size(); ++b) {
    const MicroBatchRoute& mb = in.micro_batches[b];
    for (uint32_t l = 0; l < m.layers(); ++l) {
      ECSS_RETURN_IF_ERROR(builder.AddForward(b, l, mb.layers[l]));
    }
    if (in.policy.evaluation) continue;
    for (uint32_t l = m.layers(); l-- > 0;) ECSS_RETURN_IF_ERROR(builder.AddBackward(b, l));
  }
  builder.Finish();
  plan.cursor_.eviction.policy.reset();  // whole: nothing is accessed again
  return plan;
}

}  // namespace ecss
