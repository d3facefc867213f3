#include "engine/session.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <thread>

#include <gtest/gtest.h>

#include "offload/io/io_engines.h"
#include "router/gates.h"
#include "router/rre_router.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/engine/reference_trainer.h"

namespace ecss {
namespace {

using namespace engine_test;  // NOLINT(google-build-using-namespace): the shared harness

Weights InitialWeights(const RunConfig& c) {
  RunConfig none = c;
  none.steps = 0;
  return TrainSession(none);
}

// The smallest device budget a session of `o` accepts (its cache then holds just what one
// layer's active experts need).
uint64_t TightestDeviceBudget(SessionOptions o) {
  // Where the states and weights live does not change the device's share.
  o.placement.master = o.placement.moments = Tier::kHost;
  o.placement.weights = Tier::kPinned;
  o.placement.nvme_dirs.clear();
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  uint64_t low = 1, high = 8 << 20;  // refused, accepted
  while (high - low > 256) {
    o.budgets.device_bytes = (low + high) / 2;
    (Session::Create(**sim, o).ok() ? high : low) = o.budgets.device_bytes;
  }
  return high;
}

void ExpectBitIdentical(const Weights& a, const Weights& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t l = 0; l < a.size(); ++l) {
    ASSERT_EQ(a[l].size(), b[l].size());
    for (size_t e = 0; e < a[l].size(); ++e) {
      ASSERT_EQ(0, std::memcmp(a[l][e].data(), b[l][e].data(), a[l][e].size() * 4))
          << "layer " << l << " expert " << e;
    }
  }
}

// A run against its resident reference (where the states or weights live does not change the
// math, so the reference keeps everything in memory).
void ExpectMatchesReference(const RunConfig& c, const Weights& trained) {
  RunConfig reference = c;
  reference.nvme_dir.clear();
  reference.nvme_weights = false;
  ExpectBitIdentical(trained, TrainReference(reference, InitialWeights(reference)));
}

// With 4 micro-batches the later ones' gradients take turns in the two staging halves, each
// reused in the step once its additions ended.
TEST(SessionTest, EveryStrategyMatchesTheResidentReferenceBitForBit) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (Strategy strategy :
         {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive, Strategy::kZeroOffload}) {
      for (int micro_batches : {1, 2, 4}) {
        SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " " << StrategyName(strategy)
                                          << " micro-batches " << micro_batches);
        RunConfig c;
        c.dtype = dtype;
        c.strategy = strategy;
        c.micro_batches = micro_batches;
        const Weights initial = InitialWeights(c);
        const Weights trained = TrainSession(c);
        ExpectBitIdentical(trained, TrainReference(c, initial));
        // Something was trained.
        bool changed = false;
        for (size_t l = 0; l < initial.size(); ++l) {
          for (size_t e = 0; e < initial[l].size(); ++e) changed |= initial[l][e] != trained[l][e];
        }
        EXPECT_TRUE(changed);
      }
    }
  }
}

// Master weights and moments on NVMe, streamed through pinned staging by the optimizer's
// pipeline: the same bits as the resident reference, and the files hold them.
TEST(SessionTest, StatesOnNvmeMatchTheResidentReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNaive}) {
    RunConfig c;
    c.dtype = DType::kBF16;
    c.strategy = strategy;
    c.micro_batches = 2;
    c.nvme_dir = dir_template;
    std::vector<StepStats> stats;
    ExpertStore::IoBytes total;
    const Weights trained =
        TrainSession(c, &stats, [&](Session& session) { total = session.nvme_io(); });
    ExpectMatchesReference(c, trained);
    // Every update reads and writes master, m and v: 24 bytes per parameter. naive's EndStep
    // waits for the step's updates, so its count is exact per step; ecss's updates run on into
    // the next step, so a step's count is whatever finished during it.
    // What the engines moved is that, plus per state of an updated expert at most two 4 KiB
    // headers read at its load and one written at its store (two read too, the first time),
    // and the arrays' padding to 4 KiB.
    uint64_t bytes = 0, updated = 0, read = 0, written = 0, experts = 0;
    for (const StepStats& step : stats) {
      bytes += step.nvme_bytes;
      updated += step.updated_params;
      read += step.nvme_read_bytes;
      written += step.nvme_written_bytes;
      experts += step.updated_experts;
      if (strategy == Strategy::kNaive) {
        EXPECT_EQ(step.nvme_bytes, step.updated_params * 24);
        EXPECT_GT(step.nvme_bytes, 0u);
        const uint64_t overhead = step.updated_experts * 2 * (16384 + 4096);
        EXPECT_GE(step.nvme_read_bytes, step.updated_params * 12);
        EXPECT_LE(step.nvme_read_bytes, step.updated_params * 12 + overhead);
        EXPECT_GE(step.nvme_written_bytes, step.updated_params * 12);
        EXPECT_LE(step.nvme_written_bytes, step.updated_params * 12 + overhead);
      }
    }
    EXPECT_LE(bytes, updated * 24);
    EXPECT_GE(read + written, updated * 24) << "the engines moved at least the states";
    // The session's totals hold every step's counts and what ran on after the last one (ecss:
    // its updates; the store's flush). A new store's first writes are fresh.
    EXPECT_GE(total.read, read);
    EXPECT_GE(total.written, written);
    EXPECT_GT(total.fresh_written, 0u);
    EXPECT_LE(total.fresh_written, total.written);
  }
  std::filesystem::remove_all(dir_template);
}

// The state files' blocks in `dir` (bytes the disk holds for them).
uint64_t StateFileBlocks(const std::string& dir) {
  uint64_t bytes = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    struct stat st {};
    if (entry.path().extension() == ".bin" && ::stat(entry.path().c_str(), &st) == 0) {
      bytes += uint64_t{512} * st.st_blocks;
    }
  }
  return bytes;
}

// Lazy initialisation: a new session on NVMe writes no state, its unwritten experts read as
// the same initial weights as in memory (bit for bit), and reading them writes nothing.
// placement.write_initial_states writes them at creation instead, into both shadow slots, and
// trains the same, with every store of the steps an overwrite (no fresh bytes).
TEST(SessionTest, ANewSessionOnNvmeWritesNoStateAndReadsTheInitialWeights) {
  char dir[] = "/tmp/ecss_lazy_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  for (int variant = 0; variant < 3; ++variant) {
    RunConfig c;
    c.dtype = DType::kBF16;
    c.nvme_dir = StrCat(dir, "/", variant);
    c.nvme_weights = variant > 0;
    c.write_initial_states = variant == 2;
    std::filesystem::create_directory(c.nvme_dir);
    RunConfig memory = c;
    memory.nvme_dir.clear();
    memory.nvme_weights = false;
    ExpectBitIdentical(InitialWeights(c), InitialWeights(memory));
    if (c.write_initial_states) {
      // 14 experts' master, moments and weights, both slots each (a header block and the data).
      EXPECT_GE(StateFileBlocks(c.nvme_dir), 2 * 14u * (3 * 4096 + 3 * 2048)) << c.nvme_dir;
      std::filesystem::remove_all(c.nvme_dir);
      std::filesystem::create_directory(c.nvme_dir);
      std::vector<StepStats> stats;
      ExpectMatchesReference(c, TrainSession(c, &stats));
      uint64_t written = 0;
      for (const StepStats& step : stats) {
        written += step.nvme_written_bytes;
        EXPECT_EQ(step.nvme_fresh_written_bytes, 0u) << "step " << step.step;
      }
      EXPECT_GT(written, 0u);
    } else {
      // Each file's 4 KiB header only (3 states, split in 2 files or fewer here).
      EXPECT_LE(StateFileBlocks(c.nvme_dir), 3u * 2 * 4096) << c.nvme_dir;
    }
  }
  std::filesystem::remove_all(dir);
}

// With the tightest limits a session has fewer gradient accumulators than experts (two steps'
// worth of a step's experts): slots are reused as updates finish, on every strategy that
// overlaps, with the delayed update and with states on NVMe, and the weights stay exact.
TEST(SessionTest, FewerGradientAccumulatorsThanExpertsMatchTheResidentReference) {
  char dir[] = "/tmp/ecss_slots_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  // A micro-batch of the test's batches activates 5 of a layer's 7 experts: a step that waits
  // for its updates needs 2 layers x 5 slots, one whose updates overlap the next step
  // (ecss, the delayed update) twice that, which is every expert; slots run short only there.
  for (int variant = 0; variant < 3; ++variant) {
    RunConfig c;
    c.dtype = DType::kBF16;
    c.steps = 6;
    c.max_active_experts = 5;
    c.strategy = Strategy::kNoOverlap;
    c.delayed = variant == 1;
    if (variant == 2) {
      c.nvme_dir = StrCat(dir, "/nvme");
      std::filesystem::create_directory(c.nvme_dir);
    }
    SessionOptions o = OptionsFor(c);
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    auto sim = SimBackend::Create(so);
    auto plan = Session::PlanMemoryOn(**sim, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->gradient_slots, c.delayed ? 14u : 10u);
    ExpectMatchesReference(c, TrainSession(c));
  }
  std::filesystem::remove_all(dir);
}

// bf16 gradients (DeepSpeed's 16-bit gradients): the same bits as a reference that rounds
// each micro-batch's gradient and each sum the same way, on every strategy and with states on
// NVMe, and half the gradient bytes of fp32.
TEST(SessionTest, Bf16GradientsMatchAReferenceThatRoundsTheSameWay) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (Strategy strategy : {Strategy::kEcss, Strategy::kZeroOffload, Strategy::kNoOverlap}) {
    for (bool nvme : {false, true}) {
      if (nvme && strategy == Strategy::kNoOverlap) continue;
      SCOPED_TRACE(::testing::Message() << StrategyName(strategy) << (nvme ? " nvme" : ""));
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.gradient_dtype = DType::kBF16;
      if (nvme) c.nvme_dir = dir_template;
      std::vector<StepStats> bf16;
      const Weights trained = TrainSession(c, &bf16);
      ExpectMatchesReference(c, trained);
      RunConfig f32 = c;
      f32.gradient_dtype = DType::kF32;
      std::vector<StepStats> full;
      const Weights f32_trained = TrainSession(f32, &full);
      ASSERT_EQ(bf16.size(), full.size());
      for (size_t i = 0; i < bf16.size(); ++i) {
        EXPECT_EQ(bf16[i].gradient_bytes * 2, full[i].gradient_bytes);
        EXPECT_GT(bf16[i].gradient_bytes, 0u);
      }
      // The rounding is real: fp32 gradients train other weights.
      EXPECT_NE(trained, f32_trained);
    }
  }
  std::filesystem::remove_all(dir_template);
  RunConfig bad;
  SessionOptions o = OptionsFor(bad);
  o.gradient_dtype = DType::kF16;
  Status refused = o.Validate();
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("gradient_dtype"), std::string_view::npos) << refused;
}

// A session closed after its Synchronize and a new one resuming from its state files train on
// exactly as one session would have.
TEST(SessionTest, ResumingFromStateFilesContinuesBitForBit) {
  for (bool nvme_weights : {false, true}) {
    char dir_template[] = "/tmp/ecss_resume_XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    RunConfig straight;
    straight.nvme_weights = nvme_weights;
    straight.dtype = DType::kBF16;
    straight.steps = 4;
    straight.nvme_dir = std::string(dir_template) + "/straight";
    std::filesystem::create_directory(straight.nvme_dir);
    const Weights want = TrainSession(straight);

    RunConfig first = straight;
    first.nvme_dir = std::string(dir_template) + "/split";
    std::filesystem::create_directory(first.nvme_dir);
    first.steps = 2;
    const Weights halfway = TrainSession(first);
    RunConfig second = first;
    second.first_step = 2;
    second.resume = true;
    // Reopened before training: every expert as it was written.
    RunConfig reopened = second;
    reopened.steps = 0;
    ExpectBitIdentical(TrainSession(reopened), halfway);
    ExpectBitIdentical(TrainSession(second), want);

    // Files of another model are refused, and left as they were.
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    auto sim = SimBackend::Create(so);
    SessionOptions other = OptionsFor(second);
    other.model.d_ff = 40;
    auto refused = Session::Create(**sim, other);
    EXPECT_FALSE(refused.ok());
    EXPECT_NE(refused.status().message().find("another model"), std::string::npos)
        << refused.status();
    ExpectBitIdentical(TrainSession(reopened), want);
    std::filesystem::remove_all(dir_template);
  }
}

// N steps, a checkpoint, a new session resumed from it in another directory (with the
// compute weights placed elsewhere too), M steps: the same bits as N + M steps straight, for
// every strategy; the loop's state comes back; a second checkpoint is incremental.
TEST(SessionTest, ACheckpointResumesBitForBitOnEveryStrategy) {
  char dir[] = "/tmp/ecss_checkpoint_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string root = StrCat(dir, "/checkpoints");
  std::filesystem::create_directory(root);
  // Master and moments on NVMe (every strategy), and in host memory (updated in place, their
  // versions the optimizer's update counts), bf16 and f32 (whose master is the compute copy).
  struct Case {
    Strategy strategy;
    bool nvme;
    DType dtype;
  };
  const Case cases[] = {
      {Strategy::kEcss, true, DType::kBF16},  {Strategy::kNoOverlap, true, DType::kBF16},
      {Strategy::kNaive, true, DType::kBF16}, {Strategy::kZeroOffload, true, DType::kBF16},
      {Strategy::kEcss, false, DType::kBF16}, {Strategy::kZeroOffload, false, DType::kBF16},
      {Strategy::kEcss, false, DType::kF32},
  };
  for (const Case& k : cases) {
    const std::string name =
        StrCat(StrategyName(k.strategy), k.nvme ? "-nvme-" : "-host-", DTypeName(k.dtype));
    RunConfig straight;
    straight.strategy = k.strategy;
    straight.dtype = k.dtype;
    straight.micro_batches = 2;
    straight.steps = 4;
    if (k.nvme) {
      straight.nvme_dir = StrCat(dir, "/straight");
      std::filesystem::create_directories(straight.nvme_dir);
    }
    const Weights want = TrainSession(straight);

    RunConfig first = straight;
    first.steps = 2;
    if (k.nvme) {
      first.nvme_dir = StrCat(dir, "/first-", name);
      std::filesystem::create_directories(first.nvme_dir);
    }
    TrainSession(first, nullptr, [&](Session& s) {
      auto saved = s.SaveCheckpoint(root, name, {{"loop.position", "2"}});
      ASSERT_TRUE(saved.ok()) << name << ": " << saved.status();
      EXPECT_TRUE(saved->full);
      EXPECT_GT(saved->experts_copied, 0u) << name << ": the updated experts are saved";
      auto again = s.SaveCheckpoint(root, name + "-again", {});
      ASSERT_TRUE(again.ok()) << again.status();
      EXPECT_FALSE(again->full);
      EXPECT_EQ(again->experts_copied, 0u) << name << ": nothing changed since";
    });
    RunConfig second = first;
    second.first_step = 2;
    if (k.nvme) {
      second.nvme_dir = StrCat(dir, "/second-", name);
      second.nvme_weights = k.strategy == Strategy::kEcss;  // compute weights move to NVMe
      std::filesystem::create_directories(second.nvme_dir);
    }
    second.resume_from = StrCat(root, "/", name, "/");
    std::string position;
    const Weights resumed = TrainSession(second, nullptr, [&](Session& s) {
      ASSERT_EQ(s.loop_state().size(), 1u);
      position = s.loop_state()[0].bytes;
    });
    EXPECT_EQ(position, "2");
    ExpectBitIdentical(resumed, want);
    if (name != "ecss-nvme-bf16") continue;
    // States on NVMe resumed into host memory, with another thread count and the tightest
    // device budget (the cache streams): the same bits.
    RunConfig elsewhere = second;
    elsewhere.nvme_dir.clear();
    elsewhere.nvme_weights = false;
    elsewhere.optimizer_threads = 2;
    elsewhere.device_budget = TightestDeviceBudget(OptionsFor(elsewhere));
    ExpectBitIdentical(TrainSession(elsewhere), want);
  }
  // What SaveCheckpoint and resume_from refuse.
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  RunConfig host;
  host.dtype = DType::kBF16;
  // The moments of one optimizer are not resumed by another (Adam's two moments would load).
  RunConfig other_kind = host;
  other_kind.resume_from = StrCat(root, "/ecss-host-bf16");
  SessionOptions adam = OptionsFor(other_kind);
  adam.optimizer.kind = OptimizerKind::kAdam;
  Status kind = Session::Create(**sim, adam).status();
  EXPECT_EQ(kind.code(), StatusCode::kFailedPrecondition) << kind;
  EXPECT_NE(kind.message().find("adamw"), std::string::npos) << kind;
  {
    auto session = std::move(Session::Create(**sim, OptionsFor(host))).value();
    EXPECT_EQ(session->SaveCheckpoint(root, "reserved", {{"ecss.mine", "x"}}).status().code(),
              StatusCode::kInvalidArgument);
  }
  RunConfig missing = host;
  missing.nvme_dir = StrCat(dir, "/missing");
  std::filesystem::create_directories(missing.nvme_dir);
  missing.resume_from = StrCat(root, "/nothing");
  Status unknown = Session::Create(**sim, OptionsFor(missing)).status();
  EXPECT_EQ(unknown.code(), StatusCode::kNotFound) << unknown;
  EXPECT_NE(unknown.message().find("ecss"), std::string::npos) << "lists what exists: " << unknown;
  EXPECT_FALSE(std::filesystem::exists(missing.nvme_dir + "/ecss-store.manifest"))
      << "the store it made is removed";
  // Another model's checkpoint: refused, and the store it made removed, so the fix (the
  // right checkpoint) works at once.
  missing.resume_from = StrCat(root, "/ecss-nvme-bf16");
  SessionOptions other_model = OptionsFor(missing);
  other_model.model.seed += 1;
  Status foreign = Session::Create(**sim, other_model).status();
  EXPECT_EQ(foreign.code(), StatusCode::kFailedPrecondition) << foreign;
  EXPECT_FALSE(std::filesystem::exists(missing.nvme_dir + "/ecss-store.manifest"));
  // Models the store's layout cannot tell apart (a GeLU expert has 2 d_model d_ff parameters
  // either way round; a renamed domain has as many experts): the model the checkpoint records
  // names the field.
  SessionOptions swapped = OptionsFor(missing);
  std::swap(swapped.model.d_model, swapped.model.d_ff);
  SessionOptions renamed = OptionsFor(missing);
  renamed.model.domains[0].name += "-renamed";
  for (const auto& [options, field] :
       {std::pair{swapped, "d_model"}, std::pair{renamed, "domains"}}) {
    Status refused = Session::Create(**sim, options).status();
    EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
    EXPECT_NE(refused.message().find(field), std::string::npos) << refused;
    EXPECT_FALSE(std::filesystem::exists(missing.nvme_dir + "/ecss-store.manifest"));
  }
  EXPECT_TRUE(Session::Create(**sim, OptionsFor(missing)).ok());
  std::filesystem::remove_all(dir);
}

// The delayed update holds each step's gradients for the next BeginStep's update: a
// checkpoint between two steps saves them (and the loss scale they carry, the session's step
// count and the hyper-parameters in force), so that neither the run that saved nor a run
// resumed from the save strays from the straight run by a bit; resume needs the same
// delayed update and gradient dtype.
TEST(SessionTest, ACheckpointKeepsTheDelayedUpdatesHeldGradientsAndHyperParameters) {
  char dir[] = "/tmp/ecss_delayed_checkpoint_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string root = StrCat(dir, "/checkpoints");
  std::filesystem::create_directory(root);
  for (const bool nvme : {false, true}) {
    const std::string name = nvme ? "nvme" : "host";
    RunConfig straight;
    straight.dtype = DType::kBF16;
    straight.delayed = true;
    straight.micro_batches = 2;
    straight.steps = 5;
    // The last learning rate set before the save is in force after it (the options say 1e-3).
    straight.lr_schedule = {1e-2f, 4e-3f, 4e-3f, 4e-3f, 4e-3f};
    straight.loss_scales = {1, 4, 2, 8, 1};
    auto dir_of = [&](const std::string& run) {
      if (!nvme) return std::string();
      const std::string d = StrCat(dir, "/", run, "-", name);
      std::filesystem::create_directories(d);
      return d;
    };
    straight.nvme_dir = dir_of("straight");
    std::vector<StepStats> straight_stats;
    const Weights want = TrainSession(straight, &straight_stats);

    RunConfig saving = straight;
    saving.nvme_dir = dir_of("saving");
    saving.after_step = [&](Session& s, int index) {
      if (index != 1) return;
      auto saved = s.SaveCheckpoint(root, name, {});
      ASSERT_TRUE(saved.ok()) << name << ": " << saved.status();
    };
    ExpectBitIdentical(TrainSession(saving), want);  // the save changes nothing

    auto reader = CheckpointReader::Open(root, name);
    ASSERT_TRUE(reader.ok()) << reader.status();
    const CheckpointBlob* held = FindBlob((*reader)->blobs(), "ecss.held_gradients");
    ASSERT_NE(held, nullptr) << name << ": step 2's gradients are held at the save";
    EXPECT_GT(held->bytes.size(), 0u);

    RunConfig resumed = straight;
    resumed.first_step = 2;
    resumed.steps = 3;
    resumed.lr_schedule.clear();  // the checkpoint's learning rate, not the options'
    resumed.nvme_dir = dir_of("resumed");
    resumed.resume_from = StrCat(root, "/", name);
    std::vector<StepStats> resumed_stats;
    ExpectBitIdentical(TrainSession(resumed, &resumed_stats), want);
    ASSERT_EQ(resumed_stats.size(), 3u);
    EXPECT_EQ(resumed_stats[0].step, straight_stats[2].step) << "the step count goes on";
    EXPECT_EQ(resumed_stats[0].updated_experts, straight_stats[2].updated_experts)
        << "the held update runs at the first BeginStep";

    // The held gradients need the delayed update, and accumulators of their dtype.
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    auto sim = SimBackend::Create(so);
    RunConfig other = resumed;
    other.nvme_dir = dir_of("refused");
    SessionOptions not_delayed = OptionsFor(other);
    not_delayed.delayed_update = false;
    Status refused = Session::Create(**sim, not_delayed).status();
    EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
    EXPECT_NE(refused.message().find("delayed_update"), std::string::npos) << refused;
    SessionOptions bf16_gradients = OptionsFor(other);
    bf16_gradients.gradient_dtype = DType::kBF16;
    refused = Session::Create(**sim, bf16_gradients).status();
    EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
    EXPECT_NE(refused.message().find("bf16"), std::string::npos) << refused;
    // Too few accumulators for them: refused before anything is restored.
    SessionOptions few = OptionsFor(other);
    few.limits.max_active_experts_per_layer = 1;
    few.limits.max_tokens_per_micro_batch = 1;
    refused = Session::Create(**sim, few).status();
    EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused;
    EXPECT_NE(refused.message().find("held gradients"), std::string::npos) << refused;
    EXPECT_TRUE(Session::Create(**sim, OptionsFor(other)).ok())
        << "each refusal came before anything was made";
  }
  std::filesystem::remove_all(dir);
}

// A file engine whose opening of a checkpoint's experts.bin waits for the test's go (so the
// save copies nothing before the test has trained on), and then fails every request when
// asked (a save that fails in the background).
class HeldCheckpointEngine : public FaultInjectionIoEngine {
 public:
  HeldCheckpointEngine(std::unique_ptr<IoEngine> inner, std::shared_future<bool> go)
      : FaultInjectionIoEngine(std::move(inner), FaultOptions{}), go_(std::move(go)) {}
  StatusOr<IoFileId> Open(const std::string& path, OpenMode mode) override {
    if (!path.ends_with("/experts.bin")) return FaultInjectionIoEngine::Open(path, mode);
    // A test that stopped before its go fails instead of hanging at the session's end.
    if (go_.wait_for(std::chrono::seconds(120)) != std::future_status::ready) {
      return DeadlineExceededError("the test never let the save go on");
    }
    if (go_.get()) {
      FaultOptions fail;
      fail.fail_one_in = 1;
      set_options(fail);
    }
    return FaultInjectionIoEngine::Open(path, mode);
  }

 private:
  std::shared_future<bool> go_;
};

// A save started after step t copies its experts while step t+1 trains (their updates change
// host states in place, or write NVMe states' other shadow slot) and is durable before step
// t+2 begins; it holds step t's experts exactly: a session resumed from it trains on bit for
// bit, and the run that saved does not stray. Evaluation steps in between, and with the
// delayed update a Synchronize (which starts the next update: it waits for the save first),
// change nothing of that. A save that fails in the background says so at WaitForCheckpoint
// and changes nothing of the training. One save at a time.
TEST(SessionTest, ASaveOverlappingTheNextStepHoldsTheStepItFollowed) {
  char dir[] = "/tmp/ecss_overlapped_save_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string root = StrCat(dir, "/checkpoints");
  std::filesystem::create_directory(root);
  for (const bool nvme : {false, true}) {
    for (const bool delayed : {false, true}) {
      const std::string name = StrCat(nvme ? "nvme" : "host", delayed ? "-delayed" : "");
      SCOPED_TRACE(name);
      auto dir_of = [&](const std::string& run) {
        if (!nvme) return std::string();
        const std::string d = StrCat(dir, "/", run, "-", name);
        std::filesystem::create_directories(d);
        return d;
      };
      RunConfig straight;
      straight.dtype = DType::kBF16;
      straight.delayed = delayed;
      straight.micro_batches = 2;
      straight.steps = 5;
      straight.loss_scales = {1, 4, 2, 8, 1};
      straight.nvme_dir = dir_of("straight");
      const Weights want = TrainSession(straight);
      // With the delayed update the saving run synchronizes after step index 2 (its held
      // update then runs early: other weights than the straight run's).
      RunConfig synced = straight;
      synced.nvme_dir = dir_of("synced");
      synced.after_step = [&](Session& s, int index) {
        if (index == 2) {
          ASSERT_TRUE(s.Synchronize().ok());
        }
      };
      const Weights want_saving = delayed ? TrainSession(synced) : want;

      for (const bool fail : {false, true}) {
        std::promise<bool> go;
        std::shared_future<bool> released = go.get_future().share();
        RunConfig saving = straight;
        saving.evaluate = true;
        saving.nvme_dir = dir_of(fail ? "failing" : "saving");
        saving.io_engines = [released]() -> StatusOr<std::unique_ptr<IoEngine>> {
          ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> inner, CreateFileIoEngine({}));
          return std::unique_ptr<IoEngine>(
              std::make_unique<HeldCheckpointEngine>(std::move(inner), released));
        };
        const std::string saved_as = StrCat(name, fail ? "-failed" : "");
        saving.after_step = [&](Session& s, int index) {
          if (index == 1) {
            ASSERT_TRUE(s.StartCheckpoint(root, saved_as).ok());
            Status again = s.StartCheckpoint(root, "again");
            EXPECT_EQ(again.code(), StatusCode::kFailedPrecondition) << again;
            again = s.SaveCheckpoint(root, "again").status();
            EXPECT_EQ(again.code(), StatusCode::kFailedPrecondition) << again;
          }
          if (index == 2) {
            go.set_value(fail);  // step index 2 trained before the save read
            if (delayed) {
              ASSERT_TRUE(s.Synchronize().ok());
            }
          }
          // Not waited for: the session's end finishes it.
          if (index == 4 && !fail) {
            ASSERT_TRUE(s.StartCheckpoint(root, name + "-at-end").ok());
          }
          if (index != 3) return;
          StatusOr<CheckpointStats> saved = s.WaitForCheckpoint();
          if (fail) {
            EXPECT_EQ(saved.status().code(), StatusCode::kUnavailable) << saved.status();
            EXPECT_NE(saved.status().message().find("experts.bin"), std::string::npos)
                << saved.status();
            EXPECT_FALSE(std::filesystem::exists(StrCat(root, "/", saved_as)));
            return;
          }
          ASSERT_TRUE(saved.ok()) << saved.status();
          EXPECT_GT(saved->experts_copied, 0u);
          // Host states changed in place by step index 2's updates were copied first; NVMe
          // states were read from the shadow slot their update did not write.
          if (nvme) {
            EXPECT_EQ(saved->experts_preserved, 0u);
          } else {
            EXPECT_GT(saved->experts_preserved, 0u);
          }
          EXPECT_EQ(s.WaitForCheckpoint().status().code(), StatusCode::kFailedPrecondition);
        };
        ExpectBitIdentical(TrainSession(saving), want_saving);  // the save changes nothing
      }
      EXPECT_TRUE(CheckpointReader::Open(root, name + "-at-end").ok());

      RunConfig resumed = straight;
      resumed.first_step = 2;
      resumed.steps = 3;
      resumed.nvme_dir = dir_of("resumed");
      resumed.resume_from = StrCat(root, "/", name);
      ExpectBitIdentical(TrainSession(resumed), want);
    }
  }
  std::filesystem::remove_all(dir);
}

// The state files of builds before the expert store are refused by name, not read as
// something else and not overwritten.
TEST(SessionTest, ResumingFromStateFilesOfAnEarlierFormatIsRefused) {
  char dir[] = "/tmp/ecss_legacy_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string legacy = StrCat(dir, "/ecss-states-0.bin");
  {
    std::ofstream out(legacy, std::ios::binary);
    const char magic[8] = {'E', 'C', 'S', 'S', 'S', 'T', '0', '1'};
    const uint32_t version = 2;
    out.write(magic, sizeof(magic));
    out.write(reinterpret_cast<const char*>(&version), sizeof(version));
    out << std::string(4084, '\0');
  }
  RunConfig c;
  c.dtype = DType::kBF16;
  c.nvme_dir = dir;
  c.resume = true;
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  Status refused = Session::Create(**sim, OptionsFor(c)).status();
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused;
  EXPECT_NE(refused.message().find("state-file format version 2"), std::string::npos) << refused;
  EXPECT_EQ(std::filesystem::file_size(legacy), 4096u);
  EXPECT_FALSE(std::filesystem::exists(StrCat(dir, "/ecss-store.manifest")));
  std::filesystem::remove_all(dir);
}

// Compute weights on NVMe too: every fetch reads them NVMe -> pinned staging -> device, each
// update writes them back; still the resident reference's bits, within the budgets.
TEST(SessionTest, WeightsOnNvmeStreamThroughPinnedStagingAndMatchTheReference) {
  char dir_template[] = "/tmp/ecss_weights_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  int run = 0;
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    for (uint32_t blocks : {1u, 0u}) {
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.nvme_weights = true;
      c.staging_blocks = blocks;
      c.nvme_dir = StrCat(dir_template, "/", run++);
      std::filesystem::create_directory(c.nvme_dir);
      std::vector<StepStats> stats;
      const Weights trained = TrainSession(c, &stats);
      ExpectMatchesReference(c, trained);
      EXPECT_TRUE(std::filesystem::exists(c.nvme_dir + "/ecss-store.manifest"));
      // Per update: master, m, v read and written and the bf16 weights written (26 bytes per
      // parameter); per miss: the expert's weights read (2 bytes per parameter). naive's
      // EndStep waits for its updates, so its count is exact.
      const uint64_t params = 16 * 24 * 2;
      for (const StepStats& step : stats) {
        EXPECT_GT(step.cache_misses, 0u);
        if (strategy == Strategy::kNaive) {
          EXPECT_EQ(step.nvme_bytes, step.updated_params * 26 + step.cache_misses * params * 2);
        }
      }
    }
  }
  // A directory that holds a weight store is not overwritten by a new session; weights on
  // NVMe need the states there too.
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  RunConfig again;
  again.dtype = DType::kBF16;
  again.nvme_weights = true;
  again.nvme_dir = StrCat(dir_template, "/0");
  Status exists = Session::Create(**sim, OptionsFor(again)).status();
  EXPECT_EQ(exists.code(), StatusCode::kAlreadyExists) << exists;
  SessionOptions host_states = OptionsFor(again);
  host_states.placement.master = host_states.placement.moments = Tier::kHost;
  EXPECT_EQ(Session::Create(**sim, host_states).status().code(), StatusCode::kInvalidArgument);
  SessionOptions delayed = OptionsFor(again);
  delayed.placement.nvme_dirs = {StrCat(dir_template, "/unused")};
  delayed.delayed_update = true;
  Status no_front = Session::Create(**sim, delayed).status();
  EXPECT_EQ(no_front.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(no_front.message().find("delayed_update"), std::string::npos) << no_front;
  std::filesystem::remove_all(dir_template);
}

// A new session never truncates an earlier run's store unless told to (placement.overwrite),
// and never one another owner has open; overwritten, it starts from the initial values.
TEST(SessionTest, AnEarlierRunsStoreIsReplacedOnlyWhenAsked) {
  char dir[] = "/tmp/ecss_overwrite_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  RunConfig c;
  c.dtype = DType::kBF16;
  c.nvme_dir = dir;
  c.steps = 2;
  const std::string checkpoints = StrCat(dir, "/checkpoints");
  std::filesystem::create_directory(checkpoints);
  const Weights trained = TrainSession(c, nullptr, [&](Session& s) {
    ASSERT_TRUE(s.SaveCheckpoint(checkpoints, "adamw", {}).ok());
  });
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  auto masters_of = [](Session& s) {
    Weights w(2);
    for (uint32_t l = 0; l < 2; ++l) {
      for (uint32_t e = 0; e < s.experts_in_layer(l); ++e) {
        w[l].push_back(*s.MasterWeights(LayerIndex{l}, e));
      }
    }
    return w;
  };
  Status refused = Session::Create(**sim, OptionsFor(c)).status();
  EXPECT_EQ(refused.code(), StatusCode::kAlreadyExists) << refused;
  EXPECT_NE(refused.message().find("placement.overwrite"), std::string::npos) << refused;
  SessionOptions overwrite = OptionsFor(c);
  overwrite.placement.overwrite = true;
  {
    RunConfig reopened = c;
    reopened.resume = true;
    auto holder = Session::Create(**sim, OptionsFor(reopened));
    ASSERT_TRUE(holder.ok()) << holder.status();
    Status held = Session::Create(**sim, overwrite).status();
    EXPECT_EQ(held.code(), StatusCode::kFailedPrecondition) << held;
    EXPECT_NE(held.message().find(std::to_string(getpid())), std::string::npos) << held;
    ExpectBitIdentical(masters_of(**holder), trained);  // the open store is untouched
  }
  SessionOptions both = overwrite;
  both.placement.resume = true;
  EXPECT_EQ(Session::Create(**sim, both).status().code(), StatusCode::kInvalidArgument);
  // A resume_from that fails its checks (none there; another optimizer's moments) removes
  // nothing, and neither does a budget refused.
  SessionOptions from_nothing = overwrite;
  from_nothing.placement.resume_from = StrCat(dir, "/no-checkpoints/none");
  EXPECT_EQ(Session::Create(**sim, from_nothing).status().code(), StatusCode::kNotFound);
  SessionOptions from_adam = overwrite;
  from_adam.placement.resume_from = StrCat(checkpoints, "/adamw");
  from_adam.optimizer.kind = OptimizerKind::kAdam;
  EXPECT_EQ(Session::Create(**sim, from_adam).status().code(), StatusCode::kFailedPrecondition);
  SessionOptions short_pinned = overwrite;
  short_pinned.budgets.pinned_bytes = 4096;
  EXPECT_EQ(Session::Create(**sim, short_pinned).status().code(), StatusCode::kResourceExhausted);
  {
    RunConfig reopened = c;
    reopened.resume = true;
    auto kept = Session::Create(**sim, OptionsFor(reopened));
    ASSERT_TRUE(kept.ok()) << kept.status();
    ExpectBitIdentical(masters_of(**kept), trained);
  }
  {
    auto fresh = Session::Create(**sim, overwrite);
    ASSERT_TRUE(fresh.ok()) << fresh.status();
    ExpectBitIdentical(masters_of(**fresh), InitialWeights(c));
  }
  std::filesystem::remove_all(dir);
}

// Global-norm clipping: updates wait for the step's norm (EndStep), still the same bits,
// with the states in host memory or on NVMe.
TEST(SessionTest, ClippingMatchesTheResidentReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (bool nvme : {false, true}) {
    for (Strategy strategy : {Strategy::kEcss, Strategy::kNaive}) {
      RunConfig c;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.max_grad_norm = 0.01f;  // small enough to clip every step
      if (nvme) {
        c.dtype = DType::kBF16;
        c.nvme_dir = dir_template;
      }
      std::vector<StepStats> stats;
      const Weights trained = TrainSession(c, &stats);
      ExpectMatchesReference(c, trained);
      EXPECT_LT(stats.back().optimizer.clip_coefficient, 1.0f) << "nvme " << nvme;
      EXPECT_GT(stats.back().optimizer.global_norm, 0.01);
    }
  }
  std::filesystem::remove_all(dir_template);
}

// Learned gates route reactively (each layer's experts fetched once its gate ran, LRU),
// and training still matches the resident reference bit for bit.
TEST(SessionTest, LearnedGatesRouteReactivelyAndMatchTheResidentReference) {
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      RunConfig c;
      c.gated = true;
      c.strategy = strategy;
      c.dtype = dtype;
      c.micro_batches = 2;
      std::vector<StepStats> stats;
      const Weights trained = TrainSession(c, &stats);
      ExpectMatchesReference(c, trained);
      ASSERT_EQ(stats.size(), 3u);
      EXPECT_EQ(stats[0].tokens, 2u * kBatch * kSeq);
      EXPECT_GT(stats.back().cache_misses, 0u);
      EXPECT_GT(stats.back().updated_experts, 0u);
    }
  }
}

TEST(SessionTest, LearnedGateChoicesAreCheckedAndTheirOutputsCombineToTheLayerOutput) {
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  RunConfig c;
  c.gated = true;
  auto session = Session::Create(**sim, OptionsFor(c));
  ASSERT_TRUE(session.ok()) << session.status();
  Session& s = **session;
  Backend& b = **sim;
  const uint32_t tokens = kBatch * kSeq;
  MicroBatch counts{nullptr, kBatch, kSeq, nullptr};  // a gate needs only the token count
  ASSERT_TRUE(s.BeginStep({counts}).ok());
  std::vector<float> x(tokens * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.05f * static_cast<float>(i % 23) - 0.5f;
  auto xd = b.device_memory().Allocate(x.size() * 4, MemoryTag::kActivations);
  auto yd = b.device_memory().Allocate(x.size() * 4, MemoryTag::kActivations);
  auto choices = b.device_memory().Allocate(x.size() * 4 * kGateK, MemoryTag::kActivations);
  ASSERT_TRUE(xd.ok() && yd.ok() && choices.ok());
  ASSERT_TRUE(
      b.CopyAsync(s.compute_stream(), xd->data(), x.data(), x.size() * 4, CopyKind::kHostToDevice)
          .ok());
  GateOutput gate = RunGate(x, 0);
  const GateChoices good{gate.experts.data(), gate.weights.data(), kGateK};
  // Bad choices are refused naming what was wrong, and the layer can still run.
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data()).code(),
            StatusCode::kFailedPrecondition);
  GateChoices wrong_k = good;
  wrong_k.k = 1;
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data(), wrong_k).code(),
            StatusCode::kInvalidArgument);
  std::vector<uint32_t> experts = gate.experts;
  experts[5] = kExpertsPerLayer;
  Status out_of_layer = s.Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data(),
                                  {experts.data(), good.weights, 2});
  EXPECT_EQ(out_of_layer.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(out_of_layer.message().find("layer 0"), std::string_view::npos) << out_of_layer;
  experts = gate.experts;
  experts[1] = experts[0];
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data(),
                      {experts.data(), good.weights, 2})
                .code(),
            StatusCode::kInvalidArgument);
  std::vector<float> weights = gate.weights;
  weights[3] = std::nanf("");
  Status nan = s.Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data(),
                         {good.experts, weights.data(), 2});
  EXPECT_EQ(nan.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(nan.message().find("token 1 choice 1"), std::string_view::npos) << nan;
  ASSERT_TRUE(
      s.Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data(), good, choices->data())
          .ok());
  std::vector<float> y(x.size()), per_choice(x.size() * kGateK);
  ASSERT_TRUE(
      b.CopyAsync(s.compute_stream(), y.data(), yd->data(), y.size() * 4, CopyKind::kDeviceToHost)
          .ok());
  ASSERT_TRUE(b.CopyAsync(s.compute_stream(), per_choice.data(), choices->data(),
                          per_choice.size() * 4, CopyKind::kDeviceToHost)
                  .ok());
  ASSERT_TRUE(b.SynchronizeStream(s.compute_stream()).ok());
  // y[t] = sum over choices of weight * that choice's output.
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t d = 0; d < 16; ++d) {
      float want = 0;
      for (uint32_t j = 0; j < kGateK; ++j) {
        want += gate.weights[t * kGateK + j] * per_choice[(t * kGateK + j) * 16 + d];
      }
      ASSERT_NEAR(y[t * 16 + d], want, 1e-5f * (1 + std::fabs(want))) << t << " " << d;
    }
  }
  EXPECT_NE(y, std::vector<float>(y.size(), 0.0f));
  // The rest of the step runs as usual.
  const GateOutput gate1 = RunGate(x, 1);
  ASSERT_TRUE(s.Forward(MicroBatchIndex{0}, LayerIndex{1}, xd->data(), yd->data(),
                        {gate1.experts.data(), gate1.weights.data(), 2})
                  .ok());
  for (uint32_t l = 2; l-- > 0;)
    ASSERT_TRUE(s.Backward(MicroBatchIndex{0}, LayerIndex{l}, xd->data(), yd->data()).ok());
  auto stats = s.EndStep();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->tokens, tokens);
  EXPECT_TRUE(s.Synchronize().ok());
  // An RRE session refuses gate choices; a bad gate_k is refused at creation.
  RunConfig rre;
  auto plain = Session::Create(**sim, OptionsFor(rre));
  ASSERT_TRUE(plain.ok());
  ASSERT_TRUE((*plain)->BeginStep({MakeSteps(1, 1)[0][0].view()}).ok());
  EXPECT_EQ(
      (*plain)->Forward(MicroBatchIndex{0}, LayerIndex{0}, xd->data(), yd->data(), good).code(),
      StatusCode::kFailedPrecondition);
  SessionOptions bad_k = OptionsFor(c);
  bad_k.gate_k = 8;
  EXPECT_EQ(Session::Create(**sim, bad_k).status().code(), StatusCode::kInvalidArgument);
}

// The one-step delayed update changes the math, exactly as documented: bit-identical to a
// resident trainer that computes each step with the weights from before the previous step's
// update, and different from the undelayed run.
TEST(SessionTest, DelayedUpdateMatchesADelayedResidentReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    for (int variant = 0; variant < 4; ++variant) {
      RunConfig c;
      c.delayed = true;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.steps = 4;
      c.dtype = variant == 1 ? DType::kF32 : DType::kBF16;
      c.max_grad_norm = variant == 2 ? 0.01f : 0.0f;
      if (variant == 3) c.nvme_dir = dir_template;
      std::vector<StepStats> stats;
      const Weights trained = TrainSession(c, &stats);
      ExpectMatchesReference(c, trained);
      // Step 1 starts no update (nothing is held yet); later steps start the one before's.
      ASSERT_EQ(stats.size(), 4u);
      EXPECT_EQ(stats[0].updated_experts, 0u);
      EXPECT_GT(stats[1].updated_experts, 0u);
      if (variant == 2) {
        EXPECT_LT(stats[2].optimizer.clip_coefficient, 1.0f);
      }
      if (strategy == Strategy::kEcss && variant == 0) {
        RunConfig undelayed = c;
        undelayed.delayed = false;
        const Weights plain = TrainSession(undelayed);
        EXPECT_NE(0, std::memcmp(plain[0][0].data(), trained[0][0].data(), plain[0][0].size() * 4))
            << "the delayed update changes the math";
      }
    }
  }
  std::filesystem::remove_all(dir_template);
}

TEST(SessionTest, BudgetsAndThreadCountsDoNotChangeTheWeights) {
  RunConfig roomy;
  roomy.micro_batches = 2;
  roomy.steps = 4;
  const Weights want = TrainSession(roomy);
  RunConfig tight = roomy;
  // The smallest budget the session accepts: find it by asking.
  uint64_t budget = 64 << 10;
  for (;; budget += 16 << 10) {
    SimOptions so;
    so.device_memory_bytes = 16 << 20;
    auto sim = SimBackend::Create(so);
    SessionOptions o = OptionsFor(tight);
    o.budgets.device_bytes = budget;
    auto created = Session::Create(**sim, o);
    if (created.ok()) break;
    ASSERT_EQ(created.status().code(), StatusCode::kResourceExhausted) << created.status();
  }
  tight.device_budget = budget;
  tight.optimizer_threads = 2;
  std::vector<StepStats> stats;
  ExpectBitIdentical(TrainSession(tight, &stats), want);
  // The tight budget really streamed: experts were fetched more than once.
  uint64_t misses = 0;
  for (const StepStats& s : stats) misses += s.cache_misses;
  EXPECT_GT(misses, 0u);
  EXPECT_GT(stats.back().updated_experts, 0u);
}

TEST(SessionTest, StatisticsAddUp) {
  RunConfig c;
  c.steps = 3;
  std::vector<StepStats> stats;
  TrainSession(c, &stats);
  ASSERT_EQ(stats.size(), 3u);
  for (const StepStats& s : stats) {
    EXPECT_EQ(s.tokens, kBatch * kSeq);
    EXPECT_GT(s.tokens_per_s, 0);
    EXPECT_EQ(s.expert_fetch_bytes, s.cache_misses * (16 * 24 * 2) * 4);  // f32 weights
    EXPECT_GT(s.cache_hits + s.cache_misses, 0u);
    EXPECT_GE(s.h2d_bytes, s.expert_fetch_bytes);
    EXPECT_GE(s.d2h_bytes, s.gradient_bytes);
    EXPECT_EQ(s.updated_params, uint64_t{s.updated_experts} * (16 * 24 * 2));
    // BeginStep's routing and planning took time, within the step's.
    EXPECT_GT(s.begin_seconds, 0);
    EXPECT_LE(s.begin_seconds, s.seconds);
    // The sim keeps its engines' intervals: every resource is listed, each busy no longer
    // than the step and exposed no longer than busy, and the bottleneck bounds the step.
    ASSERT_EQ(s.metrics.resources.size(), 4u);
    double busiest = 0;
    for (const ResourceUse& use : s.metrics.resources) {
      EXPECT_GE(use.busy_seconds, 0) << use.name;
      EXPECT_LE(use.busy_seconds, s.seconds + 1e-9) << use.name;
      EXPECT_LE(use.exposed_seconds, use.busy_seconds + 1e-12) << use.name;
      busiest = std::max(busiest, use.busy_seconds);
    }
    EXPECT_GT(busiest, 0);
    EXPECT_NEAR(s.metrics.bound_ratio, s.seconds / busiest, 1e-9);
    EXPECT_GE(s.metrics.bound_ratio, 1.0 - 1e-9);
    EXPECT_DOUBLE_EQ(s.metrics.seconds, s.seconds);
  }
  // naive moves every expert and updates every expert.
  RunConfig n = c;
  n.strategy = Strategy::kNaive;
  std::vector<StepStats> naive;
  TrainSession(n, &naive);
  EXPECT_EQ(naive.back().updated_experts, 2u * 7u);
  EXPECT_GT(naive.back().gradient_bytes, stats.back().gradient_bytes);
}

// The session's kernels take their modelled time on the session's device profile (as the
// bench's copy engines take its link bandwidth): the same steps on an A100 profile keep the
// compute engine busy longer than on an H100 one.
TEST(SessionTest, TimedKernelsTakeTheSessionsDeviceProfile) {
  RunConfig c;
  c.device = "sim-timed";
  c.steps = 2;
  std::map<std::string, double> compute;
  for (const char* profile : {"h100-sxm", "a100-sxm"}) {
    c.profile = profile;
    std::vector<StepStats> stats;
    TrainSession(c, &stats);
    for (const StepStats& s : stats) compute[profile] += s.compute_busy_seconds;
  }
  EXPECT_GT(compute["h100-sxm"], 0);
  EXPECT_GT(compute["a100-sxm"], compute["h100-sxm"]);
}

TEST(SessionTest, BadInputIsRefusedAndTheSessionStaysUsable) {
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  RunConfig c;
  SessionOptions o = OptionsFor(c);
  auto session = Session::Create(**sim, o);
  ASSERT_TRUE(session.ok());
  Session& s = **session;
  std::vector<Batch> step = MakeSteps(1, 1)[0];
  Batch bad_token = step[0];
  bad_token.tokens[3] = kVocab + 5;
  EXPECT_EQ(s.BeginStep({bad_token.view()}).code(), StatusCode::kInvalidArgument);
  Batch bad_domain = step[0];
  bad_domain.domains[1] = 9;
  EXPECT_EQ(s.BeginStep({bad_domain.view()}).code(), StatusCode::kNotFound);
  EXPECT_EQ(s.EndStep().status().code(), StatusCode::kFailedPrecondition);  // no step
  ASSERT_TRUE(s.BeginStep({step[0].view()}).ok());
  EXPECT_EQ(s.BeginStep({step[0].view()}).code(), StatusCode::kFailedPrecondition);
  auto x = (*sim)->device_memory().Allocate(kBatch * kSeq * 16 * 4, MemoryTag::kActivations);
  auto y = (*sim)->device_memory().Allocate(kBatch * kSeq * 16 * 4, MemoryTag::kActivations);
  ASSERT_TRUE(x.ok() && y.ok());
  ASSERT_TRUE((*sim)->MemsetAsync(s.compute_stream(), x->data(), 0, x->size()).ok());
  std::vector<float> host(kBatch * kSeq * 16);
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, host.data(), y->data()).code(),
            StatusCode::kOutOfRange);  // host memory
  auto small = (*sim)->device_memory().Allocate(64, MemoryTag::kActivations);
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, small->data(), y->data()).code(),
            StatusCode::kOutOfRange);  // shape
  EXPECT_EQ(s.Backward(MicroBatchIndex{0}, LayerIndex{0}, x->data(), y->data()).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{7}, x->data(), y->data()).code(),
            StatusCode::kInvalidArgument);
  for (uint32_t l = 0; l < 2; ++l)
    ASSERT_TRUE(s.Forward(MicroBatchIndex{0}, LayerIndex{l}, x->data(), y->data()).ok());
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, x->data(), y->data()).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.EndStep().status().code(), StatusCode::kFailedPrecondition);  // backward missing
  for (uint32_t l = 2; l-- > 0;)
    ASSERT_TRUE(s.Backward(MicroBatchIndex{0}, LayerIndex{l}, x->data(), y->data()).ok());
  auto stats = s.EndStep();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(s.EndStep().status().code(), StatusCode::kFailedPrecondition);  // ended twice
  // Still usable.
  ASSERT_TRUE(s.BeginStep({step[0].view()}).ok());
  for (uint32_t l = 0; l < 2; ++l)
    ASSERT_TRUE(s.Forward(MicroBatchIndex{0}, LayerIndex{l}, x->data(), y->data()).ok());
  for (uint32_t l = 2; l-- > 0;)
    ASSERT_TRUE(s.Backward(MicroBatchIndex{0}, LayerIndex{l}, x->data(), y->data()).ok());
  EXPECT_TRUE(s.EndStep().ok());
  EXPECT_TRUE(s.Synchronize().ok());
}

TEST(SessionTest, TooSmallABudgetIsRefusedWithTheNumberNeeded) {
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  RunConfig c;
  SessionOptions o = OptionsFor(c);
  o.budgets.device_bytes = 20 << 10;
  auto session = Session::Create(**sim, o);
  ASSERT_EQ(session.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(session.status().message().find("need at least"), std::string::npos)
      << session.status();
  o.model.vocab = 0;
  EXPECT_EQ(Session::Create(**sim, o).status().code(), StatusCode::kInvalidArgument);
  // Host memory for master and moments: 14 experts x 768 params x (f32 AdamW: m and v) x 4 B.
  SessionOptions host = OptionsFor(c);
  host.budgets.host_bytes = 14 * 768 * 2 * 4 - 1;
  Status short_host = Session::Create(**sim, host).status();
  EXPECT_EQ(short_host.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(short_host.message().find("86016 bytes"), std::string::npos) << short_host;
  host.budgets.host_bytes += 1;
  EXPECT_TRUE(Session::Create(**sim, host).ok());
  // States on NVMe: a missing directory, and a dtype the placement cannot serve.
  SessionOptions nvme = OptionsFor(c);
  nvme.model.dtype = DType::kBF16;
  nvme.placement.master = nvme.placement.moments = Tier::kNvme;
  nvme.placement.nvme_dirs = {"/nonexistent/ecss"};
  EXPECT_EQ(Session::Create(**sim, nvme).status().code(), StatusCode::kNotFound);
  nvme.placement.nvme_dirs = {};
  EXPECT_EQ(Session::Create(**sim, nvme).status().code(), StatusCode::kInvalidArgument);
  nvme.placement.nvme_dirs = {"/tmp"};
  nvme.model.dtype = DType::kF32;
  EXPECT_EQ(Session::Create(**sim, nvme).status().code(), StatusCode::kInvalidArgument);
}

// The placement table of session_options.h: the accepted rows pass, every refused one names
// the field and the tier.
TEST(SessionTest, EveryRefusedPlacementNamesItsField) {
  RunConfig c;
  c.dtype = DType::kBF16;
  const SessionOptions base = OptionsFor(c);
  auto with = [&](Tier weights, Tier master, Tier moments, Tier gradients) {
    SessionOptions o = base;
    o.placement.weights = weights;
    o.placement.master = master;
    o.placement.moments = moments;
    o.placement.gradients = gradients;
    o.placement.nvme_dirs = {"/tmp"};
    return o.Validate();
  };
  EXPECT_TRUE(with(Tier::kPinned, Tier::kHost, Tier::kHost, Tier::kPinned).ok());
  EXPECT_TRUE(with(Tier::kPinned, Tier::kNvme, Tier::kNvme, Tier::kPinned).ok());
  EXPECT_TRUE(with(Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kPinned).ok());
  const struct {
    Tier weights, master, moments, gradients;
    const char* named;
  } refused[] = {
      {Tier::kDevice, Tier::kHost, Tier::kHost, Tier::kPinned, "placement.weights = device"},
      {Tier::kHost, Tier::kHost, Tier::kHost, Tier::kPinned, "placement.weights = host"},
      {Tier::kNvme, Tier::kHost, Tier::kHost, Tier::kPinned, "placement.weights = nvme"},
      {Tier::kPinned, Tier::kPinned, Tier::kPinned, Tier::kPinned, "placement.master = pinned"},
      {Tier::kPinned, Tier::kDevice, Tier::kDevice, Tier::kPinned, "placement.master = device"},
      {Tier::kPinned, Tier::kHost, Tier::kNvme, Tier::kPinned, "placement.moments = nvme"},
      {Tier::kPinned, Tier::kNvme, Tier::kHost, Tier::kPinned, "placement.moments = host"},
      {Tier::kPinned, Tier::kHost, Tier::kHost, Tier::kHost, "placement.gradients = host"},
      {Tier::kPinned, Tier::kHost, Tier::kHost, Tier::kDevice, "placement.gradients = device"},
  };
  for (const auto& r : refused) {
    const Status status = with(r.weights, r.master, r.moments, r.gradients);
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << r.named;
    EXPECT_NE(status.message().find(r.named), std::string_view::npos) << status;
  }
  // What NVMe needs: bf16, directories, no delayed update with NVMe weights; resume needs it.
  SessionOptions f32 = base;
  f32.model.dtype = DType::kF32;
  f32.placement.master = f32.placement.moments = Tier::kNvme;
  f32.placement.nvme_dirs = {"/tmp"};
  EXPECT_NE(f32.Validate().message().find("bf16"), std::string_view::npos);
  SessionOptions no_dirs = base;
  no_dirs.placement.master = no_dirs.placement.moments = Tier::kNvme;
  EXPECT_NE(no_dirs.Validate().message().find("placement.nvme_dirs"), std::string_view::npos);
  SessionOptions delayed = base;
  delayed.delayed_update = true;
  delayed.placement.weights = delayed.placement.master = delayed.placement.moments = Tier::kNvme;
  delayed.placement.nvme_dirs = {"/tmp"};
  EXPECT_NE(delayed.Validate().message().find("delayed_update"), std::string_view::npos);
  SessionOptions resume = base;
  resume.placement.resume = true;
  EXPECT_NE(resume.Validate().message().find("placement.resume"), std::string_view::npos);
  SessionOptions limits = base;
  limits.limits.max_micro_batches = 0;
  EXPECT_NE(limits.Validate().message().find("limits.max_micro_batches"), std::string_view::npos);
  // Sizes whose products would wrap (an expert of 2^63 parameters planned as a few bytes).
  SessionOptions wide = base;
  wide.model.d_model = wide.model.d_ff = uint32_t{1} << 31;
  EXPECT_NE(wide.Validate().message().find("d_model"), std::string_view::npos);
  SessionOptions deep = base;
  deep.model.layers = UINT32_MAX;
  EXPECT_EQ(deep.Validate().code(), StatusCode::kInvalidArgument);
  SessionOptions huge = base;  // each size within its bound, their product not
  huge.model.d_model = huge.model.d_ff = uint32_t{1} << 20;
  huge.model.layers = 64;
  huge.model.domains = {{"all", 65536}};
  EXPECT_NE(huge.Validate().message().find("2^64 bytes"), std::string_view::npos);
  SessionOptions many = base;
  many.model.layers = 65536;
  many.model.domains = {{"a", 65536}, {"b", 65536}};
  EXPECT_NE(many.Validate().message().find("2^32 experts"), std::string_view::npos);
  SessionOptions big_group = base;
  big_group.model.domains[0].experts = 70000;  // the RRE tables hold 16-bit local ids
  EXPECT_NE(big_group.Validate().message().find("70000 experts"), std::string_view::npos);
}

// PlanMemoryOn is Create's plan without the allocations, and DeviceBudgetFor sizes a budget
// for a given number of cache slots: a session created with it has exactly those slots.
TEST(SessionTest, APlannedBudgetGivesTheSlotsAskedFor) {
  SimOptions so;
  so.device_memory_bytes = 16 << 20;
  auto sim = SimBackend::Create(so);
  SessionOptions o = OptionsFor(RunConfig{});
  o.budgets.device_bytes = uint64_t{1} << 50;  // beyond the device: planning does not allocate
  StatusOr<MemoryPlan> roomy = Session::PlanMemoryOn(**sim, o);
  ASSERT_TRUE(roomy.ok()) << roomy.status();
  EXPECT_EQ(roomy->cache_slots, 14u);  // every expert
  EXPECT_EQ(Session::Create(**sim, o).status().code(), StatusCode::kInvalidArgument);
  for (uint32_t slots : {7u, 9u, 14u}) {
    o.budgets.device_bytes = roomy->DeviceBudgetFor(slots);
    StatusOr<MemoryPlan> planned = Session::PlanMemoryOn(**sim, o);
    ASSERT_TRUE(planned.ok()) << planned.status();
    EXPECT_EQ(planned->cache_slots, slots);
    EXPECT_EQ(planned->Total(MemoryTier::kDevice), o.budgets.device_bytes);
    auto session = Session::Create(**sim, o);
    ASSERT_TRUE(session.ok()) << session.status();
    EXPECT_EQ((*session)->cache_slots(), slots);
    EXPECT_EQ((*session)->memory_plan().Summary(), planned->Summary());
  }
  // One slot fewer than a layer's experts: refused, naming the bytes needed.
  o.budgets.device_bytes = roomy->DeviceBudgetFor(6);
  StatusOr<MemoryPlan> short_plan = Session::PlanMemoryOn(**sim, o);
  EXPECT_EQ(short_plan.status().code(), StatusCode::kResourceExhausted);
  o.model.vocab = 0;
  EXPECT_EQ(Session::PlanMemoryOn(**sim, o).status().code(), StatusCode::kInvalidArgument);
}

// ---- Regressions: found trying the API as an adversarial user would -------------------------

// A session on the simulated device with two device activation buffers, stepped call by call.
struct Driven {
  std::unique_ptr<SimBackend> sim;
  std::unique_ptr<Session> session;
  Buffer x, y;

  static Driven Create(const SessionOptions& o, uint64_t device_bytes = 16 << 20) {
    Driven d;
    SimOptions so;
    so.device_memory_bytes = device_bytes;
    d.sim = std::move(SimBackend::Create(so)).value();
    auto session = Session::Create(*d.sim, o);
    EXPECT_TRUE(session.ok()) << session.status();
    if (session.ok()) d.session = std::move(session).value();
    const uint64_t bytes = uint64_t{kBatch} * kSeq * o.model.d_model * DTypeSize(o.model.dtype);
    d.x = std::move(d.sim->device_memory().Allocate(bytes, MemoryTag::kActivations)).value();
    d.y = std::move(d.sim->device_memory().Allocate(bytes, MemoryTag::kActivations)).value();
    EXPECT_TRUE(d.sim->MemsetAsync(d.session->compute_stream(), d.x.data(), 0, bytes).ok());
    return d;
  }
  // One step with the layers in `forward_order` (backward in reverse); the first failure.
  Status Step(const std::vector<Batch>& step, std::vector<uint32_t> forward_order = {0, 1}) {
    std::vector<MicroBatch> views;
    for (const Batch& b : step) views.push_back(b.view());
    ECSS_RETURN_IF_ERROR(session->BeginStep(views));
    for (uint32_t mb = 0; mb < step.size(); ++mb) {
      for (uint32_t l : forward_order) {
        ECSS_RETURN_IF_ERROR(
            session->Forward(MicroBatchIndex{mb}, LayerIndex{l}, x.data(), y.data()));
      }
    }
    for (uint32_t mb = 0; mb < step.size(); ++mb) {
      for (auto l = forward_order.rbegin(); l != forward_order.rend(); ++l) {
        ECSS_RETURN_IF_ERROR(
            session->Backward(MicroBatchIndex{mb}, LayerIndex{*l}, x.data(), y.data()));
      }
    }
    return session->EndStep().status();
  }
};

// A refused BeginStep (a bad loss scale; a bad token in micro-batch 1 after micro-batch 0 was
// routed) enqueues nothing, so it frees nothing that a queued copy still reads or writes:
// device memory allocated right after keeps what was written into it.
TEST(SessionTest, ARefusedBeginStepLeavesNoCopyInFlight) {
  Driven d = Driven::Create(OptionsFor(RunConfig{}));
  const std::vector<Batch> step = MakeSteps(1, 2)[0];
  Batch bad_token = step[1];
  bad_token.tokens[5] = kVocab + 1;
  const Stream compute = d.session->compute_stream();
  for (int attempt = 0; attempt < 2; ++attempt) {
    // Hold the compute stream, so that a copy enqueued by the refused call is still queued.
    ASSERT_TRUE(d.sim
                    ->LaunchHostFunction(compute, "hold",
                                         [] {
                                           std::this_thread::sleep_for(
                                               std::chrono::milliseconds(100));
                                           return Status::Ok();
                                         })
                    .ok());
    const Status refused = attempt == 0 ? d.session->BeginStep({step[0].view()}, std::nanf(""))
                                        : d.session->BeginStep({step[0].view(), bad_token.view()});
    ASSERT_FALSE(refused.ok());
    // Every free byte of device memory, filled with a pattern on another stream.
    auto other = CreateOwnedStream(*d.sim, "fill");
    std::vector<Buffer> filled;
    for (;;) {
      StatusOr<Buffer> b = d.sim->device_memory().Allocate(4096, MemoryTag::kOther);
      if (!b.ok()) break;
      ASSERT_TRUE(d.sim->MemsetAsync(other->get(), b->data(), 0x5A, 4096).ok());
      filled.push_back(std::move(b).value());
    }
    ASSERT_FALSE(filled.empty());
    ASSERT_TRUE(d.sim->SynchronizeStream(other->get()).ok());
    ASSERT_TRUE(d.sim->SynchronizeStream(compute).ok());
    std::vector<uint8_t> host(4096);
    for (const Buffer& b : filled) {
      ASSERT_TRUE(
          d.sim->CopyAsync(other->get(), host.data(), b.data(), 4096, CopyKind::kDeviceToHost)
              .ok());
      ASSERT_TRUE(d.sim->SynchronizeStream(other->get()).ok());
      ASSERT_EQ(std::count(host.begin(), host.end(), 0x5A), 4096) << "a stale plan copy landed";
    }
  }
  EXPECT_TRUE(d.Step(step).ok());  // and the session steps on
}

// Immediate per-layer updates (skip_step_on_nonfinite off, what the bench and the example
// use): still the resident reference's bits, with the states in host memory or on NVMe.
TEST(SessionTest, ImmediateUpdatesMatchTheResidentReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (bool nvme : {false, true}) {
    for (Strategy strategy :
         {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive, Strategy::kZeroOffload}) {
      SCOPED_TRACE(::testing::Message() << StrategyName(strategy) << (nvme ? " nvme" : " host"));
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.immediate = true;
      if (nvme) c.nvme_dir = dir_template;
      ExpectMatchesReference(c, TrainSession(c));
    }
  }
  std::filesystem::remove_all(dir_template);
}

// skip_step_on_nonfinite means the same wherever the states live: a NaN anywhere in a step's
// gradients skips the step for every expert, and the report says so (skipped, a non-finite
// norm); the steps around it train as the reference does.
TEST(SessionTest, ANonFiniteGradientSkipsTheStepOnEveryPlacement) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (bool nvme : {false, true}) {
    for (Strategy strategy : {Strategy::kEcss, Strategy::kNaive}) {
      SCOPED_TRACE(::testing::Message() << StrategyName(strategy) << (nvme ? " nvme" : " host"));
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.poison_step = 1;
      if (nvme) c.nvme_dir = dir_template;
      std::vector<StepStats> stats;
      const Weights trained = TrainSession(c, &stats);
      ASSERT_EQ(stats.size(), 3u);
      for (int step : {0, 2}) {
        EXPECT_FALSE(stats[step].optimizer.skipped) << step;
        EXPECT_TRUE(std::isfinite(stats[step].optimizer.global_norm)) << step;
        EXPECT_GT(stats[step].optimizer.global_norm, 0) << step;
      }
      EXPECT_TRUE(stats[1].optimizer.skipped);
      EXPECT_FALSE(std::isfinite(stats[1].optimizer.global_norm));
      ExpectMatchesReference(c, trained);
    }
  }
  std::filesystem::remove_all(dir_template);
}

// An update that fails in the background (every read of the state files fails with EIO) is
// returned once, by the first BeginStep, EndStep or Synchronize after it, naming the step and
// the expert; the experts keep their states, and the session trains on.
TEST(SessionTest, AnUpdateFailureIsReportedOnceAndTheSessionStaysUsable) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    for (bool immediate : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << StrategyName(strategy) << (immediate ? " immediate" : " deferred"));
      std::vector<FaultInjectionIoEngine*> engines;  // the session's, in creation order
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.immediate = immediate;
      c.nvme_dir = StrCat(dir_template, "/", StrategyName(strategy), immediate);
      std::filesystem::create_directory(c.nvme_dir);
      c.io_engines = [&engines]() -> StatusOr<std::unique_ptr<IoEngine>> {
        IoEngineOptions io;
        io.queue_depth = 8;
        ECSS_ASSIGN_OR_RETURN(std::unique_ptr<IoEngine> inner, CreateFileIoEngine(io));
        auto engine = std::make_unique<FaultInjectionIoEngine>(std::move(inner), FaultOptions{});
        engines.push_back(engine.get());
        return std::unique_ptr<IoEngine>(std::move(engine));
      };
      Driven d = Driven::Create(OptionsFor(c));
      // The store's master and moments files, each two writing and two reading engines.
      ASSERT_EQ(engines.size(), 8u);
      const std::vector<FaultInjectionIoEngine*> master_reads = {engines[2], engines[3]};
      const auto steps = MakeSteps(4, 1);
      ASSERT_TRUE(d.Step(steps[0]).ok());
      ASSERT_TRUE(d.session->Synchronize().ok());
      const std::vector<float> before = *d.session->MasterWeights(LayerIndex{0}, 0);
      FaultOptions fail_reads;
      fail_reads.fail_one_in = 1;
      for (FaultInjectionIoEngine* reads : master_reads) reads->set_options(fail_reads);
      // Step 2's updates fail; the error comes from its EndStep or, at the latest, Synchronize
      // (with immediate updates each layer's batch fails on its own: each is reported once).
      const Status step2 = d.Step(steps[1]);
      const Status synced = d.session->Synchronize();
      ASSERT_FALSE(step2.ok() && synced.ok());
      for (const Status& failure : {step2, synced}) {
        if (failure.ok()) continue;
        EXPECT_EQ(failure.sys_errno(), EIO) << failure;
        EXPECT_NE(failure.message().find("step 2"), std::string_view::npos) << failure;
        EXPECT_NE(failure.message().find(" expert "), std::string_view::npos) << failure;
        EXPECT_NE(failure.message().find("master"), std::string_view::npos) << failure;
      }
      if (strategy != Strategy::kEcss) {
        EXPECT_FALSE(step2.ok()) << "EndStep waits for updates";
      }
      for (FaultInjectionIoEngine* reads : master_reads) reads->set_options(FaultOptions{});
      // Reported once; nothing was half-applied; the session trains on.
      EXPECT_TRUE(d.session->Synchronize().ok());
      EXPECT_EQ(*d.session->MasterWeights(LayerIndex{0}, 0), before);
      EXPECT_TRUE(d.Step(steps[2]).ok());
      EXPECT_TRUE(d.Step(steps[3]).ok());
      EXPECT_TRUE(d.session->Synchronize().ok());
    }
  }
  std::filesystem::remove_all(dir_template);
}

// Any order of Forward calls works within the tightest budget: leases taken ahead for later
// positions yield to the call that needs the room (they used to fail it with a lease error
// that told the user to release leases they never held).
TEST(SessionTest, OutOfOrderCallsWorkWithTheTightestCache) {
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap}) {
    SCOPED_TRACE(StrategyName(strategy));
    RunConfig c;
    c.strategy = strategy;
    SessionOptions o = OptionsFor(c);
    o.budgets.device_bytes = TightestDeviceBudget(o);
    Driven d = Driven::Create(o);
    const auto steps = MakeSteps(3, 2);
    for (const auto& step : steps) {
      const Status stepped = d.Step(step, {1, 0});
      EXPECT_TRUE(stepped.ok()) << stepped;
    }
    EXPECT_TRUE(d.session->Synchronize().ok());
  }
}

// Weights on NVMe with one or two staging blocks and the tightest device budget: every fetch
// goes NVMe -> pinned -> device under both limits, and the bits are the reference's. (The
// stager's yield itself is pinned down by StagedPrefetcherTest.BlocksStagedAheadYield...)
TEST(SessionTest, WeightsOnNvmeWithOneStagingBlockAndTheTightestCacheMatchTheReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (uint32_t blocks : {1u, 2u}) {
    for (Strategy strategy : {Strategy::kEcss, Strategy::kNaive}) {
      SCOPED_TRACE(::testing::Message() << StrategyName(strategy) << " blocks " << blocks);
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.nvme_dir = dir_template;
      c.nvme_weights = true;
      c.staging_blocks = blocks;
      c.device_budget = TightestDeviceBudget(OptionsFor(c));
      ExpectMatchesReference(c, TrainSession(c));
      std::filesystem::remove_all(dir_template);
      std::filesystem::create_directory(dir_template);
    }
  }
  std::filesystem::remove_all(dir_template);
}

// What the executed plan of every step must show: the plan's fetches are the cache's misses
// and its bytes the step's (`exact`: not for ecss with a full cache, whose leases taken ahead
// pin slots the plan does not model); every other device op ran;
// each update ran after the gradients it waits for, the updates carried in from the step
// before ran (after the first step), and the step ended after the updates it waits for; each
// fetch of staged weights was issued after their stage; and every op the host waits for was
// issued after what it waits for had ended.
void ExpectPlanWasWhatRan(Session& s, const std::vector<StepStats>& stats, bool exact) {
  for (const StepStats& st : stats) {
    auto plan = s.ExecutedPlan(st.step);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const std::vector<PlanOp>& ops = plan->ops();
    if (exact) {
      EXPECT_EQ(plan->Count(OpKind::kFetch), st.cache_misses) << "step " << st.step;
      EXPECT_EQ(plan->Bytes(OpKind::kFetch), st.expert_fetch_bytes) << "step " << st.step;
    }
    EXPECT_EQ(plan->Bytes(OpKind::kGradientCopy), st.gradient_bytes) << "step " << st.step;
    for (const PlanOp& op : ops) {
      const bool device = op.resource == PlanResource::kH2d || op.resource == PlanResource::kD2h ||
                          op.resource == PlanResource::kCompute;
      if ((device && (exact || op.kind != OpKind::kFetch)) ||
          (op.kind == OpKind::kUpdate && op.step_offset == 0)) {
        ASSERT_GE(op.end_s, 0) << OpKindName(op.kind) << " " << op.id << " never ran";
        EXPECT_LE(op.start_s, op.end_s) << op.id;
      }
      if (op.kind == OpKind::kUpdate && op.step_offset == 0) {
        for (uint32_t dep : op.deps) EXPECT_LE(ops[dep].end_s, op.start_s) << "update " << op.id;
      }
      if (op.kind == OpKind::kUpdate && op.step_offset == -1 && &st != &stats.front()) {
        EXPECT_GE(op.end_s, 0) << "step " << st.step << ": the updates carried in ran";
      }
      if (op.kind == OpKind::kUpdate && op.step_offset == 0 && plan->step_waits_for_updates()) {
        EXPECT_LE(op.end_s, plan->seconds()) << "the step ends after the updates it waits for";
      }
      if (op.kind == OpKind::kFetch && op.end_s >= 0) {
        for (uint32_t dep : op.deps) {
          if (ops[dep].kind != OpKind::kStage) continue;
          ASSERT_GE(ops[dep].end_s, 0) << "fetch " << op.id << " copied weights never staged";
          EXPECT_LE(ops[dep].end_s, op.issued_s) << "fetch " << op.id << " before its stage";
        }
      }
      if (!op.host_waits || op.issued_s < 0) continue;
      std::vector<uint32_t> deps = op.deps;  // what ran on no stream stands for its deps
      while (!deps.empty()) {
        const PlanOp& dep = ops[deps.back()];
        deps.pop_back();
        if (dep.step_offset != 0) continue;
        if (dep.end_s < 0) {
          deps.insert(deps.end(), dep.deps.begin(), dep.deps.end());
          continue;
        }
        EXPECT_GE(op.issued_s, dep.end_s)
            << OpKindName(op.kind) << " " << op.id << " was issued before " << OpKindName(dep.kind)
            << " " << dep.id << " ended";
      }
    }
  }
}

// The session runs the step's plan, and its executed plan says what ran: for every strategy,
// with a roomy and the tightest cache, one and two micro-batches, the delayed update, states
// and weights on NVMe, learned gates, and evaluations between the steps.
TEST(SessionTest, TheExecutedPlanIsWhatRan) {
  char dir[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    for (int variant = 0; variant < 7; ++variant) {
      for (bool tight : {false, true}) {
        SCOPED_TRACE(::testing::Message() << StrategyName(strategy) << " variant " << variant
                                          << (tight ? " tight" : " roomy"));
        RunConfig c;
        c.dtype = DType::kBF16;
        c.strategy = strategy;
        c.micro_batches = variant == 0 ? 1 : 2;
        c.delayed = variant == 2;
        c.gated = variant == 5;
        c.evaluate = variant == 6;  // an evaluation before each step: steps with no updates
        if (variant == 3 || variant == 4) c.nvme_dir = dir;
        c.nvme_weights = variant == 4;
        c.staging_blocks = variant == 4 ? 2 : 0;
        if (tight) c.device_budget = TightestDeviceBudget(OptionsFor(c));
        std::vector<StepStats> stats;
        const bool exact = !tight || strategy != Strategy::kEcss;
        TrainSession(c, &stats, [&](Session& s) { ExpectPlanWasWhatRan(s, stats, exact); });
        std::filesystem::remove_all(dir);
        std::filesystem::create_directory(dir);
      }
    }
  }
  std::filesystem::remove_all(dir);
  // Without record_op_times the plans are kept, with no times.
  RunConfig quiet;
  SessionOptions o = OptionsFor(quiet);
  o.record_op_times = false;
  Driven d = Driven::Create(o);
  ASSERT_TRUE(d.Step(MakeSteps(1, 1)[0]).ok());
  auto plan = d.session->ExecutedPlan(1);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_GT(plan->Count(OpKind::kForward), 0u);
  for (const PlanOp& op : plan->ops()) EXPECT_LT(op.end_s, 0) << op.id;
  EXPECT_EQ(d.session->ExecutedPlan(99).status().code(), StatusCode::kNotFound);
}

// A learning-rate schedule (SetHyperParams between steps) trains exactly as the reference
// optimizer following the same schedule, wherever the states live, with the delayed update
// too; hyper-parameters are refused inside a step and when invalid.
TEST(SessionTest, AScheduleOfHyperParametersMatchesTheReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (bool nvme : {false, true}) {
    for (bool delayed : {false, true}) {
      SCOPED_TRACE(::testing::Message() << (nvme ? "nvme" : "host") << (delayed ? " delayed" : ""));
      RunConfig c;
      c.dtype = DType::kBF16;
      c.steps = 4;
      c.delayed = delayed;
      c.lr_schedule = {0.05f, 0.02f, 0.1f, 0.01f};
      if (nvme) c.nvme_dir = dir_template;
      const Weights scheduled = TrainSession(c);
      ExpectMatchesReference(c, scheduled);
      RunConfig constant = c;
      constant.lr_schedule.clear();
      EXPECT_NE(scheduled, TrainSession(constant)) << "the schedule changed nothing";
    }
  }
  std::filesystem::remove_all(dir_template);
  Driven d = Driven::Create(OptionsFor(RunConfig{}));
  HyperParams bad;
  bad.lr = -1;
  EXPECT_EQ(d.session->SetHyperParams(bad).code(), StatusCode::kInvalidArgument);
  const std::vector<Batch> step = MakeSteps(1, 1)[0];
  ASSERT_TRUE(d.session->BeginStep({step[0].view()}).ok());
  EXPECT_EQ(d.session->SetHyperParams(HyperParams{}).code(), StatusCode::kFailedPrecondition);
}

// An evaluation step runs Forward only: its outputs are the training forward's bit for bit,
// and it changes nothing (the weights still match the reference), for every strategy, RRE and
// learned gates, and the delayed update; Backward in it is refused.
TEST(SessionTest, AnEvaluationStepComputesTheForwardAndChangesNothing) {
  for (Strategy strategy : {Strategy::kEcss, Strategy::kNoOverlap, Strategy::kNaive}) {
    for (int variant = 0; variant < 3; ++variant) {
      SCOPED_TRACE(::testing::Message() << StrategyName(strategy) << " variant " << variant);
      RunConfig c;
      c.dtype = DType::kBF16;
      c.strategy = strategy;
      c.micro_batches = 2;
      c.evaluate = true;
      c.gated = variant == 1;
      c.delayed = variant == 2;
      ExpectMatchesReference(c, TrainSession(c));
    }
  }
  Driven d = Driven::Create(OptionsFor(RunConfig{}));
  const std::vector<Batch> step = MakeSteps(1, 1)[0];
  // Inside an open training step an evaluation is refused, and the step goes on as a training
  // step (its Backward and EndStep work).
  ASSERT_TRUE(d.session->BeginStep({step[0].view()}).ok());
  EXPECT_EQ(d.session->BeginEvaluation({step[0].view()}).code(), StatusCode::kFailedPrecondition);
  for (uint32_t l = 0; l < 2; ++l)
    ASSERT_TRUE(d.session->Forward(MicroBatchIndex{0}, LayerIndex{l}, d.x.data(), d.y.data()).ok());
  for (uint32_t l = 2; l-- > 0;) {
    ASSERT_TRUE(
        d.session->Backward(MicroBatchIndex{0}, LayerIndex{l}, d.x.data(), d.y.data()).ok());
  }
  ASSERT_TRUE(d.session->EndStep().ok());
  ASSERT_TRUE(d.session->BeginEvaluation({step[0].view()}).ok());
  ASSERT_TRUE(d.session->Forward(MicroBatchIndex{0}, LayerIndex{0}, d.x.data(), d.y.data()).ok());
  EXPECT_EQ(d.session->Backward(MicroBatchIndex{0}, LayerIndex{0}, d.x.data(), d.y.data()).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(d.session->EndStep().status().code(), StatusCode::kFailedPrecondition)
      << "layer 1 has not run forward";
  ASSERT_TRUE(d.session->Forward(MicroBatchIndex{0}, LayerIndex{1}, d.x.data(), d.y.data()).ok());
  auto ended = d.session->EndStep();
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_EQ(ended->updated_experts, 0u);
  EXPECT_TRUE(d.Step(step).ok()) << "training goes on";
}

// Each update unscales its gradients by its own step's loss scale, also when it runs after
// the next BeginStep changed the scale (ecss overlaps them): bit for bit the reference's, with
// states in host memory and on NVMe, immediate and deferred updates, and the delayed update.
TEST(SessionTest, ChangingLossScalesMatchTheReference) {
  char dir_template[] = "/tmp/ecss_session_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  for (int variant = 0; variant < 4; ++variant) {
    SCOPED_TRACE(::testing::Message() << "variant " << variant);
    RunConfig c;
    c.dtype = DType::kBF16;
    c.steps = 5;
    c.micro_batches = 2;
    c.loss_scales = {1024.0f, 256.0f, 4096.0f, 8.0f, 65536.0f};
    c.immediate = variant == 1 || variant == 3;
    c.delayed = variant == 2;
    if (variant == 3) c.nvme_dir = dir_template;
    ExpectMatchesReference(c, TrainSession(c));
  }
  std::filesystem::remove_all(dir_template);
}

// Typed views are checked against the layer before anything is read (a wrong dtype, shape or
// device is InvalidArgument naming what was given and what was expected), and a step driven
// with them trains exactly as one driven with pointers.
TEST(SessionTest, TypedActivationsAreCheckedAndTrainAsPointersDo) {
  RunConfig c;  // f32
  Driven typed = Driven::Create(OptionsFor(c));
  Driven untyped = Driven::Create(OptionsFor(c));
  const std::vector<Batch> step = MakeSteps(1, 1)[0];
  Session& s = *typed.session;
  const Device device = typed.sim->device();
  const int64_t tokens = kBatch * kSeq;
  // The same non-zero activations in both (gradients then move the weights).
  std::vector<float> pattern(tokens * 16);
  for (size_t i = 0; i < pattern.size(); ++i)
    pattern[i] = 0.01f * static_cast<float>(i % 37) - 0.2f;
  for (Driven* d : {&typed, &untyped}) {
    const Stream stream = d->session->compute_stream();
    ASSERT_TRUE(d->sim
                    ->CopyAsync(stream, d->x.data(), pattern.data(), pattern.size() * 4,
                                CopyKind::kHostToDevice)
                    .ok());
    ASSERT_TRUE(d->sim->SynchronizeStream(stream).ok());
  }
  std::vector<std::vector<float>> before;
  for (uint32_t e = 0; e < s.experts_in_layer(0); ++e)
    before.push_back(*s.MasterWeights(LayerIndex{0}, e));
  const TensorView x{typed.x.data(), DType::kF32, Shape{tokens, 16}, device};
  const TensorView y{typed.y.data(), DType::kF32, Shape{tokens, 16}, device};
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, x, y).code(),
            StatusCode::kFailedPrecondition)
      << "outside a step";
  ASSERT_TRUE(s.BeginStep({step[0].view()}).ok());
  const TensorView bf16{typed.x.data(), DType::kBF16, Shape{tokens, 16}, device};
  const Status wrong_dtype = s.Forward(MicroBatchIndex{0}, LayerIndex{0}, bf16, y);
  EXPECT_EQ(wrong_dtype.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_dtype.message().find("bf16[16, 16]"), std::string_view::npos) << wrong_dtype;
  EXPECT_NE(wrong_dtype.message().find("f32[16, 16]"), std::string_view::npos) << wrong_dtype;
  const TensorView short_x{typed.x.data(), DType::kF32, Shape{tokens - 1, 16}, device};
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, short_x, y).code(),
            StatusCode::kInvalidArgument);
  std::vector<float> host(tokens * 16);
  const TensorView on_host{host.data(), DType::kF32, Shape{tokens, 16}, Device{}};
  EXPECT_EQ(s.Forward(MicroBatchIndex{0}, LayerIndex{0}, on_host, y).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Forward(MicroBatchIndex{1}, LayerIndex{0}, x, y).code(), StatusCode::kInvalidArgument)
      << "micro-batch 1";
  // Nothing ran: the step goes on, typed, and trains as the pointer-driven one does.
  for (uint32_t l = 0; l < 2; ++l)
    ASSERT_TRUE(s.Forward(MicroBatchIndex{0}, LayerIndex{l}, x, y).ok());
  for (uint32_t l = 2; l-- > 0;)
    ASSERT_TRUE(s.Backward(MicroBatchIndex{0}, LayerIndex{l}, x, y).ok());
  ASSERT_TRUE(s.EndStep().ok());
  ASSERT_TRUE(untyped.Step(step).ok());
  ASSERT_TRUE(s.Synchronize().ok());
  ASSERT_TRUE(untyped.session->Synchronize().ok());
  bool moved = false;
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t e = 0; e < s.experts_in_layer(l); ++e) {
      EXPECT_EQ(*s.MasterWeights(LayerIndex{l}, e),
                *untyped.session->MasterWeights(LayerIndex{l}, e))
          << l << " " << e;
    }
  }
  for (uint32_t e = 0; e < s.experts_in_layer(0); ++e)
    moved |= *s.MasterWeights(LayerIndex{0}, e) != before[e];
  EXPECT_TRUE(moved) << "the step trained something";
}

}  // namespace
}  // namespace ecss
