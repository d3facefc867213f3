#include "engine/expert_table.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "engine/checkpoint_record.h"
#include "runtime/base/logging.h"
#include "runtime/base/str_cat.h"

namespace ecss {

ExpertTable::ExpertTable(Backend& backend, const SessionOptions& options, const MemoryPlan& memory)
    : backend_(backend),
      options_(options),
      params_(memory.params),
      expert_bytes_(memory.expert_bytes),
      index_(options.ExpertsPerLayer()) {}

ExpertTable::~ExpertTable() {
  if (updater_ != nullptr) updater_->Synchronize().IgnoreError();  // reported by the session
}

StatusOr<std::unique_ptr<ExpertTable>> ExpertTable::Create(Backend& backend,
                                                           const SessionOptions& options,
                                                           const MemoryPlan& memory) {
  std::unique_ptr<ExpertTable> table(new ExpertTable(backend, options, memory));
  Status made = table->CreateAll(memory);
  if (made.ok()) return table;
  // A store made for resume_from (restored in part, or not at all) goes with the failure: a
  // retry then starts over, never from a store that only looks like the checkpoint.
  const bool remove = table->store_ != nullptr && !options.placement.resume_from.empty();
  table.reset();
  if (remove) {
    Status removed = ExpertStore::Remove(StoreOptionsFor(options, memory.params));
    if (!removed.ok()) ECSS_LOG(Error) << "removing the store resume_from made: " << removed;
  }
  return made;
}

// As the memory plan sizes it: the expert store (with its own pinned and host pools), the
// session's pinned pool, the updater and the gradient accumulators.
Status ExpertTable::CreateAll(const MemoryPlan& memory) {
  const uint64_t store_pinned = memory.StoreTotal(MemoryTier::kPinned);
  ECSS_RETURN_IF_ERROR(CreateStore(store_pinned, memory.gradient_slots));
  PinnedPoolOptions pool_options;
  pool_options.name = "session pinned";
  pool_options.capacity_bytes =
      (options_.budgets.pinned_bytes == 0 ? memory.Total(MemoryTier::kPinned)
                                          : options_.budgets.pinned_bytes) -
      store_pinned;
  pool_options.lock_pages = options_.budgets.lock_pinned;
  ECSS_ASSIGN_OR_RETURN(pinned_, backend_.CreatePinnedPool(pool_options));
  if (options_.placement.weights_on_nvme()) {
    ECSS_ASSIGN_OR_RETURN(stager_, WeightStager::Create(*store_, memory.weight_staging_blocks));
  }
  if (options_.placement.states_on_nvme()) {
    NvmeUpdaterOptions nvme = NvmeOptionsFor(options_, params_);
    nvme.store = store_.get();
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<NvmeUpdater> streaming,
                          NvmeUpdater::Create(nvme, pinned_.get()));
    ECSS_RETURN_IF_ERROR(InitExperts(nullptr, streaming.get(), memory.gradient_slots));
    if (options_.placement.write_initial_states && !resuming()) {
      ECSS_RETURN_IF_ERROR(streaming->WriteInitialStates());
    }
    updater_ = std::move(streaming);
    return Status::Ok();
  }
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<HostUpdater> host, HostUpdater::Create(options_.optimizer));
  ECSS_RETURN_IF_ERROR(InitExperts(host.get(), nullptr, memory.gradient_slots));
  host_ = host.get();
  updater_ = std::move(host);
  return Status::Ok();
}

// The expert store (StoreOptionsFor): in placement.nvme_dirs with states on NVMe (created, or
// opened with placement.resume), else in memory only; `pinned_bytes` of pinned memory, the host
// budget. With resume_from, the checkpoint restored into it once its records fit the session
// (with its held gradients in `gradient_slots` accumulators).
Status ExpertTable::CreateStore(uint64_t pinned_bytes, uint32_t gradient_slots) {
  ExpertStoreOptions o = StoreOptionsFor(options_, params_);
  o.initial = [this](ExpertState state, ExpertId id, void* dst, uint64_t bytes) {
    Initial(state, id, dst, bytes);
  };
  o.initial_id = InitialValuesId(options_.model);
  o.pinned_budget_bytes = pinned_bytes;
  o.host_budget_bytes = options_.budgets.host_bytes;
  // resume_from: the checkpoint's records are checked before anything is made or removed (a
  // checkpoint that does not exist, or of another model or optimizer, changes nothing).
  const auto [root, name] = SplitCheckpointPath(options_.placement.resume_from);
  if (!options_.placement.resume_from.empty()) {
    StatusOr<std::unique_ptr<CheckpointReader>> reader =
        CheckpointReader::Open(root, name, options_.placement.io_engines);
    if (!reader.ok()) return reader.status().Annotate("placement.resume_from");
    const std::string where =
        StrCat("placement.resume_from '", options_.placement.resume_from, "'");
    StatusOr<std::optional<SessionState>> state = CheckSessionRecords((*reader)->blobs(), options_);
    if (!state.ok()) return state.status().Annotate(where);
    resumed_ = std::move(*state);
    // The held gradients' accumulators (the session restores them): every slot is free now.
    if (resumed_ && resumed_->record.held.size() > gradient_slots) {
      return ResourceExhaustedError(
          StrCat(where, ": ", resumed_->record.held.size(), " held gradients, ", gradient_slots,
                 " gradient accumulators (limits.max_active_experts_per_layer sizes them)"));
    }
  }
  o.replace_existing = options_.placement.overwrite;
  auto made =
      options_.placement.resume ? ExpertStore::Open(backend_, o) : ExpertStore::Create(backend_, o);
  if (made.status().code() == StatusCode::kAlreadyExists) {
    return made.status().Annotate(
        options_.placement.resume_from.empty()
            ? "to train on from it, set placement.resume; to replace it, placement.overwrite"
            : "resume_from restores into a new store: remove it, or set placement.overwrite");
  }
  ECSS_ASSIGN_OR_RETURN(store_, std::move(made));
  if (options_.placement.resume_from.empty()) return Status::Ok();
  // On failure Create removes the store.
  StatusOr<std::vector<CheckpointBlob>> restored =
      RestoreCheckpoint(root, name, *store_, options_.placement.io_engines);
  if (!restored.ok()) return restored.status().Annotate("placement.resume_from");
  for (CheckpointBlob& blob : *restored) {  // the session's own were read above
    if (blob.name.rfind(kSessionBlobPrefix, 0) != 0) loop_state_.push_back(std::move(blob));
  }
  return Status::Ok();
}

// What the store holds for `id` before its first write (`bytes` of it): the drawn master
// weights, the compute weights their copy in the model's dtype (so every placement starts
// alike), zero moments. Thread-safe (the store calls it from its readers' threads).
void ExpertTable::Initial(ExpertState state, ExpertId id, void* dst, uint64_t bytes) const {
  switch (state) {
    case ExpertState::kMaster:
      DrawInitialMaster(options_.model, id.layer, id.expert, static_cast<float*>(dst));
      return;
    case ExpertState::kWeights:
      if (options_.model.dtype == DType::kF32) {
        DrawInitialMaster(options_.model, id.layer, id.expert, static_cast<float*>(dst));
      } else {
        thread_local std::vector<float> master;  // the readers' threads are few and long-lived
        master.resize(params_);
        DrawInitialMaster(options_.model, id.layer, id.expert, master.data());
        ConvertF32ToBf16(master.data(), static_cast<BFloat16*>(dst), params_);
      }
      return;
    case ExpertState::kMoments:
    case ExpertState::kGradient:
      std::memset(dst, 0, bytes);
      return;
  }
}

// The store starts every expert at its initial value (Initial): memory states at creation,
// NVMe states as they are first read. Here each expert gets its gradient and is registered
// with the updater.
Status ExpertTable::InitExperts(HostUpdater* host, NvmeUpdater* nvme, uint32_t gradient_slots) {
  const ModelSpec& m = options_.model;
  const uint32_t moment_arrays = store_->layout().moments;
  const bool weights_on_nvme = options_.placement.weights_on_nvme();
  ECSS_ASSIGN_OR_RETURN(
      gradients_,
      GradientPool::Create(*pinned_, gradient_slots, params_ * DTypeSize(options_.gradient_dtype),
                           index_.size()));
  entries_.resize(m.layers);
  for (uint32_t l = 0; l < m.layers; ++l) {
    entries_[l].resize(index_.experts_in_layer(l));
    for (uint32_t e = 0; e < entries_[l].size(); ++e) {
      Entry& x = entries_[l][e];
      const ExpertId id{l, e};
      x.id = index_.Flat(id);
      if (!weights_on_nvme) {
        ECSS_ASSIGN_OR_RETURN(x.weights, store_->Resident(ExpertState::kWeights, id));
      }
      auto* compute_copy = static_cast<BFloat16*>(x.weights);  // null: in the store
      if (nvme != nullptr && !resuming()) {
        ECSS_RETURN_IF_ERROR(nvme->Attach(x.id, compute_copy));
        continue;
      }
      if (nvme != nullptr) {
        Status resumed = nvme->Resume(x.id, compute_copy);
        if (!resumed.ok()) {
          return resumed.Annotate(StrCat("resuming expert (", l, ", ", e, ") from ",
                                         options_.placement.nvme_dirs[0],
                                         " (files of another model?)"));
        }
        continue;
      }
      // f32: the compute weights are the master weights (the device copies what the
      // optimizer updates).
      ECSS_ASSIGN_OR_RETURN(
          void* master,
          store_->Resident(m.dtype == DType::kF32 ? ExpertState::kWeights : ExpertState::kMaster,
                           id));
      ECSS_ASSIGN_OR_RETURN(void* moments, store_->Resident(ExpertState::kMoments, id));
      ExpertArrays arrays;
      arrays.master = static_cast<float*>(master);
      arrays.state0 = static_cast<float*>(moments);
      arrays.state1 = moment_arrays == 2 ? arrays.state0 + params_ : nullptr;
      arrays.size = params_;
      if (m.dtype == DType::kBF16) arrays.compute_copy = compute_copy;
      if (resuming()) {  // restored from a checkpoint: the update count and compute weights
        ECSS_ASSIGN_OR_RETURN(arrays.updates, store_->Version(CheckpointStates()[0], id));
        if (m.dtype == DType::kBF16) ConvertF32ToBf16(arrays.master, compute_copy, params_);
      }
      ECSS_ASSIGN_OR_RETURN(const uint32_t registered, host->Register(arrays));
      if (registered != x.id) return InternalError("host updater ids out of order");
    }
  }
  if (options_.delayed_update) {  // the first published weights: the initial ones
    for (std::vector<Entry>& layer : entries_) {
      for (Entry& x : layer) {
        ECSS_ASSIGN_OR_RETURN(x.front, pinned_->Allocate(expert_bytes_, MemoryTag::kExpertWeights));
        std::memcpy(x.front.data(), x.weights, expert_bytes_);
      }
    }
  }
  return Status::Ok();
}

// placement.write_initial_states: every expert's NVMe states, as they read unwritten, written
// as version 0 into both of its shadow slots, so that creation allocates the whole store (a
// full disk is found now) and every later store overwrites, as a store does once each
// expert was updated twice: a new file's holes cost the file system allocation as they are
// first written (ext4 on the development machine's disk: 1.06-1.52 GB/s against 1.62-1.92
// overwriting, bench/README.md).
std::vector<ExpertState> ExpertTable::CheckpointStates() const {
  return {options_.model.dtype == DType::kF32 ? ExpertState::kWeights : ExpertState::kMaster,
          ExpertState::kMoments};
}

void ExpertTable::set_before_host_update(std::function<void(ExpertId)> hook) {
  if (host_ == nullptr) return;
  if (!hook) {
    host_->set_before_update({});
    return;
  }
  host_->set_before_update(
      [this, hook = std::move(hook)](uint32_t flat) { hook(index_.Id(flat)); });
}

Status ExpertTable::RecordHostVersions() {
  if (host_ == nullptr) return Status::Ok();
  for (uint32_t flat = 0; flat < index_.size(); ++flat) {
    const uint64_t version = host_->version(flat);
    for (ExpertState state : CheckpointStates()) {
      ECSS_RETURN_IF_ERROR(store_->SetResidentVersion(state, index_.Id(flat), version));
    }
  }
  return Status::Ok();
}

uint32_t ExpertTable::experts_in_layer(uint32_t layer) const {
  return layer < entries_.size() ? static_cast<uint32_t>(entries_[layer].size()) : 0;
}

const void* ExpertTable::FetchSource(ExpertId id) const {
  const Entry& x = at(id);
  return options_.delayed_update ? x.front.data() : x.weights;
}

void ExpertTable::Publish(ExpertId id) {
  Entry& x = at(id);
  std::memcpy(x.front.data(), x.weights, expert_bytes_);
}

void ExpertTable::ClearTouched(uint64_t step) {
  for (uint32_t l = 0; l < entries_.size(); ++l) {
    for (uint32_t e = 0; e < entries_[l].size(); ++e) {
      if (!entries_[l][e].touched) continue;
      entries_[l][e].touched = false;
      ReleaseGradient({l, e}, step);
    }
  }
}

StatusOr<void*> ExpertTable::TakeGradient(ExpertId id, uint64_t step) {
  StatusOr<void*> slot = gradients_->Take(at(id).id, step, *updater_);
  if (!slot.ok()) {
    return slot.status().Annotate(StrCat("gradient of layer ", id.layer, " expert ", id.expert));
  }
  return slot;
}

uint64_t ExpertTable::nvme_bytes() const {
  return updater_->nvme_bytes() + (stager_ != nullptr ? stager_->bytes_read() : 0);
}

uint64_t ExpertTable::pinned_peak_bytes() const {
  uint64_t peak = pinned_->stats().peak_used_bytes;
  if (store_->pinned_memory() != nullptr) peak += store_->pinned_memory()->stats().peak_used_bytes;
  return peak;
}

uint64_t ExpertTable::host_peak_bytes() const {
  return store_->host_memory() != nullptr ? store_->host_memory()->stats().peak_used_bytes : 0;
}

}  // namespace ecss
