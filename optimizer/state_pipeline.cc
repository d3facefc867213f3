#include "optimizer/state_pipeline.h"

#include <tbb/task_arena.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <thread>
#include <unordered_set>

#include "optimizer/parallel_update.h"
#include "runtime/base/checksum.h"
#include "runtime/base/str_cat.h"

namespace ecss {

// ---- InMemoryStateTier ------------------------------------------------------------------

uint32_t InMemoryStateTier::AddExpert(std::vector<float> master) {
  std::lock_guard<std::mutex> lock(mutex_);
  Entry entry;
  const size_t n = master.size();
  entry.master = std::move(master);
  entry.state0.assign(n, 0.0f);
  if (StateArrays(kind_) == 2) entry.state1.assign(n, 0.0f);
  experts_.push_back(std::move(entry));
  return static_cast<uint32_t>(experts_.size() - 1);
}

StatusOr<size_t> InMemoryStateTier::ExpertSize(uint32_t expert) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (expert >= experts_.size()) {
    return NotFoundError(
        StrCat("state tier has no expert ", expert, " (", experts_.size(), " stored)"));
  }
  return experts_[expert].master.size();
}

Status InMemoryStateTier::Load(uint32_t expert, const StateSlot& slot, uint64_t* update_count) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (expert >= experts_.size()) return NotFoundError(StrCat("state tier has no expert ", expert));
  const Entry& e = experts_[expert];
  if (slot.size != e.master.size())
    return InvalidArgumentError(StrCat("expert ", expert, ": slot size mismatch"));
  std::memcpy(slot.master, e.master.data(), slot.size * 4);
  std::memcpy(slot.state0, e.state0.data(), slot.size * 4);
  if (!e.state1.empty()) std::memcpy(slot.state1, e.state1.data(), slot.size * 4);
  *update_count = e.updates;
  ++loads_;
  return Status::Ok();
}

Status InMemoryStateTier::Store(uint32_t expert, const StateSlot& slot, uint64_t update_count) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (expert >= experts_.size()) return NotFoundError(StrCat("state tier has no expert ", expert));
  Entry& e = experts_[expert];
  if (slot.size != e.master.size())
    return InvalidArgumentError(StrCat("expert ", expert, ": slot size mismatch"));
  std::memcpy(e.master.data(), slot.master, slot.size * 4);
  std::memcpy(e.state0.data(), slot.state0, slot.size * 4);
  if (!e.state1.empty()) std::memcpy(e.state1.data(), slot.state1, slot.size * 4);
  e.updates = update_count;
  ++stores_;
  return Status::Ok();
}

std::vector<float> InMemoryStateTier::master(uint32_t expert) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return experts_.at(expert).master;
}

std::vector<float> InMemoryStateTier::state(uint32_t expert, int index) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return index == 0 ? experts_.at(expert).state0 : experts_.at(expert).state1;
}

uint64_t InMemoryStateTier::update_count(uint32_t expert) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return experts_.at(expert).updates;
}

uint64_t InMemoryStateTier::loads() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return loads_;
}

uint64_t InMemoryStateTier::stores() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stores_;
}

// ---- The pipeline -----------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;

// A blocking FIFO between pipeline stages.
template <typename T>
class Channel {
 public:
  void Push(T value) {
    std::lock_guard<std::mutex> lock(mutex_);
    items_.push_back(std::move(value));
    cv_.notify_one();
  }
  T Pop() {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return !items_.empty(); });
    T value = std::move(items_.front());
    items_.pop_front();
    return value;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<T> items_;
};

// One expert travelling through the stages. index < 0 marks the end of the work.
struct Token {
  int64_t index = -1;  // -1: the end of the work
  StreamedGradient grad;
  int slot = -1;
  uint64_t update_count = 0;
  bool update = false;      // false: loaded nothing usable, or skipped: do not store
  SlotChecksums checksums;  // for a tier that TakesChecksums (StateSlot::checksums)
  Status status;
};

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A stage's threads: `count` of them run body(busy), each adding its busy seconds to a `busy`
// of its own.
class StageThreads {
 public:
  template <typename Body>
  StageThreads(int count, const Body& body) : busy_(count, 0.0) {
    threads_.reserve(count);
    for (int i = 0; i < count; ++i) threads_.emplace_back([this, &body, i] { body(busy_[i]); });
  }
  size_t size() const { return threads_.size(); }
  // Waits for every thread; their busy seconds summed.
  double Join() {
    for (std::thread& thread : threads_) thread.join();
    double seconds = 0;
    for (double busy : busy_) seconds += busy;
    return seconds;
  }

 private:
  std::vector<double> busy_;
  std::vector<std::thread> threads_;
};

// What every update of a run shares.
struct UpdateArgs {
  const HyperParams& hyper;
  float grad_scale;
  float clip_coefficient;
};

Status RepeatedExpertError(uint32_t expert) {
  return InvalidArgumentError(StrCat("expert ", expert,
                                     " is in the run twice (its second load would read its state "
                                     "before the first update's store)"));
}

// The load stage's work: a run's gradients in order, then what hooks.more appends, each
// handed out with a slot. A loader takes the slot first and then the gradient, both under one
// lock, so that slots go to the work in its order: the earliest expert not yet updated never
// waits for a slot that a later one holds. Thread-safe.
class LoadQueue {
 public:
  using More = std::function<bool(std::vector<StreamedGradient>*)>;
  // InvalidArgument when `work` has an expert twice.
  static StatusOr<std::unique_ptr<LoadQueue>> Create(const std::vector<StreamedGradient>& work,
                                                     const More& more, int loaders) {
    auto queue = std::unique_ptr<LoadQueue>(new LoadQueue(work, more, loaders));
    for (const StreamedGradient& g : work) {
      if (!queue->in_run_.insert(g.expert).second) return RepeatedExpertError(g.expert);
    }
    return queue;
  }

  // The next gradient (token's index and grad; its status when refused) and a free slot for
  // it; false at the end of the work (hooks.more has none).
  bool Next(Channel<int>& free_slots, Token* token) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (exhausted_) return false;
    const int slot = free_slots.Pop();
    if (at_ == batch_.size()) {  // the end of the work so far: more, when the caller has it
      std::vector<StreamedGradient> more;
      if (!more_ || !more_(&more) || more.empty()) {
        exhausted_ = true;
        free_slots.Push(slot);
        return false;
      }
      batch_ = std::move(more);
      at_ = 0;
    }
    token->index = next_index_++;
    token->grad = batch_[at_++];
    token->slot = slot;
    if (token->index >= static_cast<int64_t>(work_size_) &&
        !in_run_.insert(token->grad.expert).second) {
      token->status = RepeatedExpertError(token->grad.expert);
    }
    return true;
  }

  // A loader leaves; true for the last one.
  bool Leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    return --loaders_left_ == 0;
  }

 private:
  LoadQueue(const std::vector<StreamedGradient>& work, const More& more, int loaders)
      : work_size_(work.size()), more_(more), batch_(work), loaders_left_(loaders) {}

  const size_t work_size_;
  const More& more_;
  std::mutex mutex_;
  std::vector<StreamedGradient> batch_;  // GUARDED_BY(mutex_), as every member below
  size_t at_ = 0;
  int64_t next_index_ = 0;
  bool exhausted_ = false;
  int loaders_left_;
  std::unordered_set<uint32_t> in_run_;  // every expert handed out, and the work's
};

// Whether a slot holds what its tier's Load recorded (SlotChecksums), checked chunk by chunk
// over the calling arena (a null array's checksum is 0 on both sides).
bool HoldsWhatWasLoaded(const StateSlot& slot, size_t chunk_elements,
                        const SlotChecksums& expected) {
  const ParamChecksums read = optimizer_internal::ParallelChecksums(
      {slot.master, nullptr, DType::kF32, slot.state0, slot.state1, nullptr, slot.size},
      chunk_elements);
  return read.master == expected.loaded_master &&
         StatesChecksum(slot, read) == expected.loaded_states;
}

}  // namespace

struct StateStreamingUpdater::Impl {
  Impl(const StreamingOptions& o, SimdIsa simd, StateTier* t)
      : options(o), isa(simd), tier(t), arena(o.threads, /*reserved_for_masters=*/0) {}

  // Fills the token's slot from the tier (unless the token failed already); its seconds.
  double Load(Token& token);
  // The token's update in its slot, unless its load failed or its gradient is not finite.
  void Update(const UpdateArgs& args, Token& token, StreamingReport* report);

  StreamingOptions options;
  SimdIsa isa;
  StateTier* tier;
  tbb::task_arena arena;
  std::vector<StateSlot> slots;  // carved from the caller's workspace
};

namespace {

// Each array starts on a 4 KiB boundary and has room for a whole number of 4 KiB blocks, so
// that O_DIRECT tiers can read into and write from the slot directly.
constexpr size_t kBlockBytes = 4096;
size_t Blocks(size_t bytes) { return (bytes + kBlockBytes - 1) / kBlockBytes; }
size_t ArrayStrideFloats(const StreamingOptions& options) {
  return Blocks(options.max_expert_elements * sizeof(float)) * kBlockBytes / sizeof(float);
}
size_t ComputeCopyBytes(const StreamingOptions& options) {
  return options.stage_compute_copy ? Blocks(options.max_expert_elements * 2) * kBlockBytes : 0;
}
// The moments one after another in one block (state1 = state0 + max_expert_elements), as
// stores keep them.
size_t MomentsBytes(const StreamingOptions& options) {
  return Blocks(options.max_expert_elements * sizeof(float) * StateArrays(options.kind)) *
         kBlockBytes;
}
uint64_t SlotBytes(const StreamingOptions& options) {
  return ArrayStrideFloats(options) * 4 + MomentsBytes(options) + ComputeCopyBytes(options);
}

Status ValidateStreamingOptions(const StreamingOptions& options) {
  ECSS_RETURN_IF_ERROR(ValidateHyperParams(options.kind, options.params));
  if (options.threads < 1 || options.buffers < 2 || options.loads_in_flight < 1 ||
      options.loads_in_flight > options.buffers || options.stores_in_flight < 1 ||
      options.stores_in_flight > options.buffers || options.chunk_elements < 1024 ||
      options.max_expert_elements == 0) {
    return InvalidArgumentError(StrCat(
        "streaming options need threads >= 1 (", options.threads, "), buffers >= 2 (",
        options.buffers, "), 1 <= loads_in_flight <= buffers (", options.loads_in_flight,
        "), 1 <= stores_in_flight <= buffers (", options.stores_in_flight,
        "), chunk_elements >= 1024 (", options.chunk_elements, ") and max_expert_elements > 0"));
  }
  const SimdIsa isa = options.isa.value_or(DetectSimdIsa());
  if (!SimdIsaSupported(isa))
    return InvalidArgumentError(StrCat("this CPU cannot run ", SimdIsaName(isa)));
  return Status::Ok();
}

}  // namespace

StatusOr<uint64_t> StateStreamingUpdater::WorkspaceBytes(const StreamingOptions& options) {
  ECSS_RETURN_IF_ERROR(ValidateStreamingOptions(options));
  return static_cast<uint64_t>(options.buffers) * SlotBytes(options);
}

StatusOr<std::unique_ptr<StateStreamingUpdater>> StateStreamingUpdater::Create(
    const StreamingOptions& options, StateTier* tier, void* workspace, uint64_t workspace_bytes) {
  ECSS_ASSIGN_OR_RETURN(const uint64_t needed, WorkspaceBytes(options));
  if (tier == nullptr) return InvalidArgumentError("state streaming: a state tier is required");
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % kBlockBytes != 0 ||
      workspace_bytes < needed) {
    return InvalidArgumentError(StrCat("state streaming: the workspace must be ", needed,
                                       " bytes, 4 KiB aligned (got ", workspace_bytes, " bytes at ",
                                       workspace, ")"));
  }
  auto impl = std::make_unique<Impl>(options, options.isa.value_or(DetectSimdIsa()), tier);
  const size_t stride = ArrayStrideFloats(options);
  for (int b = 0; b < options.buffers; ++b) {
    char* base = static_cast<char*>(workspace) + b * SlotBytes(options);
    float* master = reinterpret_cast<float*>(base);
    float* state0 = master + stride;
    float* state1 = StateArrays(options.kind) == 2 ? state0 + options.max_expert_elements : nullptr;
    auto* compute = options.stage_compute_copy
                        ? reinterpret_cast<BFloat16*>(base + stride * 4 + MomentsBytes(options))
                        : nullptr;
    impl->slots.push_back(StateSlot{master, state0, state1, compute, 0});
  }
  return std::unique_ptr<StateStreamingUpdater>(new StateStreamingUpdater(std::move(impl)));
}

StateStreamingUpdater::StateStreamingUpdater(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StateStreamingUpdater::~StateStreamingUpdater() = default;

// Whether the slots can take `g`'s expert and its gradient is one the kernels read.
Status CheckGradient(StateTier& tier, const StreamingOptions& options, const StreamedGradient& g) {
  ECSS_ASSIGN_OR_RETURN(size_t size, tier.ExpertSize(g.expert));
  if (size > options.max_expert_elements) {
    return InvalidArgumentError(StrCat("expert ", g.expert, " has ", size,
                                       " elements; the slots hold ", options.max_expert_elements));
  }
  if (g.grad == nullptr || g.dtype == DType::kF16) {
    return InvalidArgumentError(
        StrCat("expert ", g.expert, ": gradient must be non-null f32 or bf16"));
  }
  return Status::Ok();
}

uint32_t StatesChecksum(const StateSlot& slot, const ParamChecksums& checksums) {
  if (slot.state1 == nullptr) return checksums.state0;
  return Crc32cCombine(checksums.state0, checksums.state1, slot.size * 4);
}

double StateStreamingUpdater::Impl::Load(Token& token) {
  const Clock::time_point t0 = Clock::now();
  if (token.status.ok()) token.status = CheckGradient(*tier, options, token.grad);
  if (token.status.ok()) {
    StateSlot& slot = slots[token.slot];
    slot.size = *tier->ExpertSize(token.grad.expert);
    StateSlot with = slot;
    if (tier->TakesChecksums()) with.checksums = &token.checksums;
    token.status = tier->Load(token.grad.expert, with, &token.update_count);
  }
  token.update = token.status.ok();
  return Since(t0);
}

void StateStreamingUpdater::Impl::Update(const UpdateArgs& args, Token& token,
                                         StreamingReport* report) {
  const StreamedGradient& g = token.grad;
  if (!token.update) {
    token.status = token.status.Annotate(StrCat("loading expert ", g.expert));
    return;
  }
  const Clock::time_point t0 = Clock::now();
  const StateSlot& slot = slots[token.slot];
  const bool checksums = tier->TakesChecksums();
  bool intact = true;  // what was read, checked before anything uses it
  if (checksums) {
    arena.execute(
        [&] { intact = HoldsWhatWasLoaded(slot, options.chunk_elements, token.checksums); });
  }
  if (!intact) {
    // Read again, checked by the tier: its error names where the damage is; or, when the bytes
    // on storage are right (the first read went wrong on its way), the expert goes on.
    token.status = tier->Load(g.expert, slot, &token.update_count);  // slot.checksums: null
    if (!token.status.ok()) {
      token.update = false;
      token.status = token.status.Annotate(StrCat("loading expert ", g.expert));
      report->update_seconds += Since(t0);
      return;
    }
  }
  double sum = 0;
  arena.execute(
      [&] { sum = optimizer_internal::ParallelSumOfSquares(isa, g.grad, g.dtype, slot.size); });
  if (!std::isfinite(sum)) {
    token.update = false;
    ++report->skipped_nonfinite;
  } else {
    token.update_count += 1;
    const UpdateScalars scalars = MakeUpdateScalars(options.kind, args.hyper, token.update_count,
                                                    args.grad_scale, args.clip_coefficient);
    BFloat16* compute = g.compute_copy != nullptr ? g.compute_copy : slot.compute;
    const ParamArrays arrays{slot.master, g.grad,  g.dtype,  slot.state0,
                             slot.state1, compute, slot.size};
    arena.execute([&] {
      optimizer_internal::ParallelUpdate(isa, scalars, arrays, options.chunk_elements,
                                         checksums ? &token.checksums.written : nullptr);
    });
    if (checksums && compute != slot.compute) {  // the copy went to the caller
      token.checksums.written.compute_copy =
          slot.compute == nullptr ? 0 : Crc32c(slot.compute, slot.size * sizeof(BFloat16));
    }
    ++report->updated;
  }
  report->update_seconds += Since(t0);
}

StatusOr<StreamingReport> StateStreamingUpdater::Run(const std::vector<StreamedGradient>& work,
                                                     float grad_scale, float clip_coefficient,
                                                     const HyperParams* params,
                                                     const StreamingHooks& hooks) {
  if (!(grad_scale > 0) || !std::isfinite(grad_scale) || !(clip_coefficient > 0)) {
    return InvalidArgumentError("grad_scale and clip_coefficient must be finite and > 0");
  }
  Impl& impl = *impl_;
  const HyperParams& hyper = params != nullptr ? *params : impl.options.params;
  if (params != nullptr) ECSS_RETURN_IF_ERROR(ValidateHyperParams(impl.options.kind, *params));
  for (const StreamedGradient& g : work) {
    ECSS_RETURN_IF_ERROR(CheckGradient(*impl.tier, impl.options, g));
  }
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<LoadQueue> queue,
                        LoadQueue::Create(work, hooks.more, impl.options.loads_in_flight));
  StreamingReport report;
  const Clock::time_point start = Clock::now();
  Channel<int> free_slots;
  Channel<Token> loaded;
  Channel<Token> updated;
  for (int s = 0; s < static_cast<int>(impl.slots.size()); ++s) free_slots.Push(s);
  // The failure of the earliest expert in the work's order (stores may end out of it); every
  // token passes the store stage last.
  std::mutex error_mutex;
  Status first_error;           // GUARDED_BY(error_mutex)
  int64_t first_error_at = -1;  // GUARDED_BY(error_mutex): its token's index

  // The load stage: loads_in_flight threads, each taking the next gradient with a slot,
  // loading it and handing it on.
  const auto load = [&](double& busy) {
    Token token;
    while (queue->Next(free_slots, &token)) {
      busy += impl.Load(token);
      loaded.Push(std::move(token));
      token = Token{};
    }
    if (queue->Leave()) loaded.Push(Token{});  // after every loader's last token
  };
  StageThreads loaders(impl.options.loads_in_flight, load);
  // The store stage: stores_in_flight threads, each storing the next updated expert.
  const auto store = [&](double& busy) {
    while (true) {
      Token token = updated.Pop();
      if (token.index < 0) return;
      if (token.update) {
        const Clock::time_point t0 = Clock::now();
        StateSlot slot = impl.slots[token.slot];
        if (impl.tier->TakesChecksums()) slot.checksums = &token.checksums;
        token.status = impl.tier->Store(token.grad.expert, slot, token.update_count)
                           .Annotate(StrCat("storing expert ", token.grad.expert));
        busy += Since(t0);
      }
      free_slots.Push(token.slot);
      if (hooks.done) hooks.done(token.grad.expert);
      if (token.status.ok()) continue;
      std::lock_guard<std::mutex> lock(error_mutex);
      if (first_error_at < 0 || token.index < first_error_at) {
        first_error = std::move(token.status);
        first_error_at = token.index;
      }
    }
  };
  StageThreads storers(impl.options.stores_in_flight, store);

  // The calling thread drives the update stage in the arena, in the work's order.
  const UpdateArgs args{hyper, grad_scale, clip_coefficient};
  std::map<int64_t, Token> early;  // loads that arrived before an earlier one
  int64_t expected = 0;
  while (true) {
    Token token = loaded.Pop();
    if (token.index < 0) break;  // every load arrived, and went on in order
    early.emplace(token.index, std::move(token));
    while (!early.empty() && early.begin()->first == expected) {
      impl.Update(args, early.begin()->second, &report);
      updated.Push(std::move(early.begin()->second));
      early.erase(early.begin());
      ++expected;
    }
  }
  for (size_t s = 0; s < storers.size(); ++s) updated.Push(Token{});  // an end for each
  report.load_seconds = loaders.Join();
  report.store_seconds = storers.Join();
  report.wall_seconds = Since(start);
  if (!first_error.ok()) return first_error;
  return report;
}

}  // namespace ecss
