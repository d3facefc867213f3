// ecss-extract: a domain's sub-model cut out of a session's checkpoint, bit for bit, read back
// by an independent reader (tests/tools/read_safetensors.py, standard library only).
#include "tools/extract/extract.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/checkpoint_record.h"
#include "engine/plan_inputs.h"
#include "runtime/base/dtype.h"
#include "runtime/base/file_util.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tests/engine/reference_trainer.h"
#include "tools/extract/safetensors.h"

namespace ecss {
namespace {

using engine_test::RunConfig;
using engine_test::SmallModel;
using engine_test::TrainSession;

// The independent reader's view of `path`: name -> {dtype, shape, bits}.
nlohmann::json ReadWithPython(const std::string& path) {
  const std::string command =
      StrCat("'", ECSS_TEST_PYTHON3, "' '", ECSS_TEST_SAFETENSORS_READER, "' '", path, "'");
  std::FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return nullptr;
  std::string output;
  char buffer[65536];
  for (size_t n; (n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0;) output.append(buffer, n);
  const int status = pclose(pipe);
  EXPECT_EQ(status, 0) << command;
  return nlohmann::json::parse(output, nullptr, false);
}

class ExtractTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(mkdtemp(dir_), nullptr);
    root_ = StrCat(dir_, "/checkpoints");
    std::filesystem::create_directory(root_);
    // One step of a bf16 model (domains c: 2 experts, python: 3, docs: 2; 2 layers) in host
    // memory: some experts updated, some never (they stay their initial values).
    RunConfig c;
    c.dtype = DType::kBF16;
    c.steps = 1;
    TrainSession(c, nullptr, [&](Session& s) {
      ASSERT_TRUE(s.SaveCheckpoint(root_, "step2", {}).ok());
      for (uint32_t l = 0; l < 2; ++l) {
        for (uint32_t e = 0; e < 7; ++e) {
          masters_[{l, e}] = std::move(s.MasterWeights(LayerIndex(l), e)).value();
        }
      }
    });
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  ExtractOptions Options(std::vector<std::string> domains) const {
    ExtractOptions o;
    o.checkpoint = StrCat(root_, "/step2");
    o.domains = std::move(domains);
    o.out = StrCat(dir_, "/out.safetensors");
    return o;
  }
  // Surgery on the trained checkpoint: a domain "rust" into grown/rust, verified.
  AddDomainOptions AddRust() const {
    AddDomainOptions o;
    o.checkpoint = StrCat(root_, "/step2");
    o.name = "rust";
    o.out = StrCat(dir_, "/grown/rust");
    o.verify = true;
    return o;
  }

  // A session of `model` resumed from `checkpoint` (the trained model's limits and budgets):
  // expert e of every layer holds the master weights expert source(e) of the trained model
  // had; then `then` runs on it.
  void ExpectMasters(const ModelSpec& model, const std::string& checkpoint,
                     const std::function<uint32_t(uint32_t)>& source,
                     const std::function<void(Session&, Backend&)>& then = {}) {
    RunConfig c;
    c.dtype = DType::kBF16;
    SessionOptions options = engine_test::OptionsFor(c);
    options.model = model;
    options.placement.resume_from = checkpoint;
    auto sim = SimBackend::Create({});
    ASSERT_TRUE(sim.ok());
    auto session = Session::Create(**sim, options);
    ASSERT_TRUE(session.ok()) << session.status();
    for (uint32_t l = 0; l < model.layers; ++l) {
      for (uint32_t e = 0; e < (*session)->experts_in_layer(l); ++e) {
        auto master = (*session)->MasterWeights(LayerIndex(l), e);
        ASSERT_TRUE(master.ok()) << master.status();
        EXPECT_EQ(*master, masters_.at({l, source(e)})) << "layer " << l << " expert " << e;
      }
    }
    if (then) then(**session, **sim);
  }

  char dir_[32] = "/tmp/ecss_extract_XXXXXX";
  std::string root_;
  std::map<std::pair<uint32_t, uint32_t>, std::vector<float>> masters_;  // (layer, expert)
};

// docs and c kept (named in any order: the file keeps the model's order, c then docs);
// python absent. Weights, moments, update counts and routes as the full model has them.
TEST_F(ExtractTest, TheKeptDomainsExpertsAndRoutesAreTheFullModels) {
  ExtractOptions o = Options({"docs", "c"});
  o.with_optimizer_state = true;
  o.verify = true;
  std::vector<uint64_t> progress;  // extracting, then verifying: 1..8 each
  o.progress = [&](uint64_t done, uint64_t of) {
    EXPECT_EQ(of, 8u);
    progress.push_back(done);
  };
  auto report = ExtractToSafetensors(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  ASSERT_EQ(report->model.domains.size(), 2u);
  EXPECT_EQ(report->model.domains[0].name, "c");
  EXPECT_EQ(report->model.domains[1].name, "docs");
  EXPECT_EQ(report->experts, 8u);  // 4 a layer
  EXPECT_EQ(progress, (std::vector<uint64_t>{1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_GT(report->initial, 0u);
  EXPECT_LT(report->initial, 8u);

  // Sizes as the spec predicts: per expert its master and AdamW's two moments, per layer the
  // update counts and a [2, vocab] routing table; 6 tensors an expert and 2 a layer.
  const ModelSpec m = SmallModel(DType::kBF16);
  const uint64_t data = 8 * m.expert_params() * 4 * 3 + 2 * (4 * 8 + 2 * m.vocab * 4);
  auto header = ReadSafetensorsHeader(o.out);
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(std::filesystem::file_size(o.out), header->data_start + data);
  EXPECT_EQ(report->file_bytes, header->data_start + data);
  EXPECT_EQ(header->tensors.size(), 8u * 6 + 2 * 2);
  EXPECT_EQ(header->metadata.at("domains"), "c\ndocs");

  // Read by the independent reader: every expert's weights are the full model's expert's,
  // renumbered (c's 0-1 stay, docs' 5-6 become 2-3); python's experts are absent.
  const nlohmann::json file = ReadWithPython(o.out);
  ASSERT_TRUE(file.is_object());
  auto router = RouterOf(m);
  ASSERT_TRUE(router.ok());
  const uint64_t in_elements = uint64_t{m.d_model} * m.d_in();
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t j = 0; j < 4; ++j) {
      const uint32_t full = j < 2 ? j : j + 3;
      const std::vector<float>& master = masters_.at({l, full});
      const std::string name = StrCat("layers.", l, ".experts.", j);
      const auto w_in = file.at(name + ".w_in").at("bits").get<std::vector<uint32_t>>();
      const auto w_out = file.at(name + ".w_out").at("bits").get<std::vector<uint32_t>>();
      ASSERT_EQ(w_in.size(), in_elements);
      ASSERT_EQ(w_in.size() + w_out.size(), master.size());
      for (uint64_t i = 0; i < master.size(); ++i) {
        const uint32_t bits = i < in_elements ? w_in[i] : w_out[i - in_elements];
        ASSERT_EQ(bits, FloatBits(master[i])) << name << " element " << i;
      }
      EXPECT_EQ(file.at(name + ".w_in.exp_avg").at("shape"),
                nlohmann::json::array({m.d_model, m.d_in()}));
    }
    EXPECT_FALSE(file.contains(StrCat("layers.", l, ".experts.4.w_in")));
    const auto routing = file.at(StrCat("layers.", l, ".routing")).at("bits");
    ASSERT_EQ(routing.size(), 2u * m.vocab);
    for (uint32_t row = 0; row < 2; ++row) {
      const uint32_t domain = row == 0 ? 0 : 2;
      for (uint32_t t = 0; t < m.vocab; ++t) {
        const uint32_t full = router->Route(l, domain, t).value();
        EXPECT_EQ(routing[row * m.vocab + t].get<uint32_t>(), full < 2 ? full : full - 3)
            << "layer " << l << " domain " << domain << " token " << t;
      }
    }
    // Update counts: 0 for an expert never updated, else the one step trained.
    for (uint64_t updates : file.at(StrCat("layers.", l, ".updates")).at("bits")) {
      EXPECT_LE(updates, 1u);
    }
  }
}

// --format ecss: a checkpoint of the sub-model that a session loads. --verify runs both models'
// evaluation step on the same held-out inputs (bit-identical outputs in every layer); the
// sub-model keeps the full model's domain ids, so its tokens route as they did; its experts
// are the full model's (never-updated ones included, drawn under their old numbers); and it
// trains on.
TEST_F(ExtractTest, TheSubModelCheckpointLoadsAndComputesAsTheFullModel) {
  ExtractOptions o = Options({"docs", "python"});
  o.out = StrCat(dir_, "/sub/docs-python");
  o.verify = true;
  auto report = ExtractToCheckpoint(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_EQ(report->experts, 10u);  // (3 + 2) a layer
  EXPECT_GT(report->initial, 0u);
  const ModelSpec& sub = report->model;
  ASSERT_EQ(sub.domains.size(), 2u);
  EXPECT_EQ(sub.domains[0].name, "python");
  EXPECT_EQ(sub.DomainId(0), 1u);
  EXPECT_EQ(sub.DomainId(1), 2u);
  EXPECT_EQ(sub.InitialKey(0), 2u);  // python's first expert was expert 2
  EXPECT_EQ(sub.InitialKey(3), 5u);  // docs' first, expert 5

  ExpectMasters(
      sub, o.out, [](uint32_t e) { return e + 2; },
      [](Session& session, Backend&) {
        // Its samples are named by the full model's domain ids (python 1, docs 2).
        const std::vector<uint32_t> tokens(engine_test::kBatch * engine_test::kSeq, 7);
        const std::vector<uint32_t> domains = {1, 2};
        EXPECT_TRUE(session
                        .BeginEvaluation({MicroBatch{tokens.data(), engine_test::kBatch,
                                                     engine_test::kSeq, domains.data()}})
                        .ok());
      });
  RunConfig c;
  c.dtype = DType::kBF16;
  SessionOptions options = engine_test::OptionsFor(c);
  options.placement.resume_from = o.out;
  auto sim = SimBackend::Create({});
  ASSERT_TRUE(sim.ok());
  // Another model's options do not load it: the record names the domains.
  options.model = SmallModel(DType::kBF16);
  Status other = Session::Create(**sim, options).status();
  EXPECT_EQ(other.code(), StatusCode::kFailedPrecondition) << other;

  // A checkpoint there is replaced only when asked; a sub-model of the sub-model works too.
  EXPECT_EQ(ExtractToCheckpoint(o).status().code(), StatusCode::kAlreadyExists);
  ExtractOptions again = o;
  again.checkpoint = o.out;
  again.domains = {"docs"};
  again.out = StrCat(dir_, "/sub-of-sub/docs");
  auto docs = ExtractToCheckpoint(again);
  ASSERT_TRUE(docs.ok()) << docs.status();
  EXPECT_EQ(docs->model.InitialKey(0), 5u);
  EXPECT_TRUE(docs->verified);
}

// A checkpoint of the delayed update holds the last step's gradients for the next update: a
// sub-model keeps those of its experts, renumbered as they are, and resumes with them.
TEST_F(ExtractTest, TheDelayedUpdatesHeldGradientsGoWithTheirExperts) {
  RunConfig c;
  c.dtype = DType::kBF16;
  c.steps = 2;
  c.delayed = true;
  c.after_step = [&](Session& s, int index) {
    if (index == 1) {
      ASSERT_TRUE(s.SaveCheckpoint(root_, "delayed", {}).ok());
    }
  };
  TrainSession(c);
  ExtractOptions o = Options({"python", "docs"});
  o.checkpoint = StrCat(root_, "/delayed");
  o.out = StrCat(dir_, "/sub/delayed");
  o.verify = true;  // its evaluation sessions resume with the delayed update
  auto report = ExtractToCheckpoint(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);

  auto held_of = [](const std::string& checkpoint) {
    const auto [root, name] = SplitCheckpointPath(checkpoint);
    auto reader = CheckpointReader::Open(root, name);
    EXPECT_TRUE(reader.ok()) << reader.status();
    const CheckpointBlob* session = FindBlob((*reader)->blobs(), "ecss.session");
    const CheckpointBlob* gradients = FindBlob((*reader)->blobs(), "ecss.held_gradients");
    EXPECT_NE(session, nullptr);
    auto record = ParseSessionRecord(session->bytes);
    EXPECT_TRUE(record.ok()) << record.status();
    return std::pair{record->held, gradients == nullptr ? std::string() : gradients->bytes};
  };
  const auto [full_held, full_gradients] = held_of(o.checkpoint);
  const auto [sub_held, sub_gradients] = held_of(o.out);
  const uint64_t bytes = report->model.expert_params() * 4;
  std::vector<ExpertId> want;
  std::string want_gradients;
  for (size_t i = 0; i < full_held.size(); ++i) {
    if (full_held[i].expert < 2) continue;  // c's experts (0, 1) are left out
    want.push_back(ExpertId{full_held[i].layer, full_held[i].expert - 2});
    want_gradients += full_gradients.substr(i * bytes, bytes);
  }
  ASSERT_FALSE(want.empty()) << "the test needs held experts of the kept domains";
  ASSERT_LT(want.size(), full_held.size()) << "and of the one left out";
  EXPECT_TRUE(sub_held == want);
  EXPECT_TRUE(sub_gradients == want_gradients);

  SessionOptions options = engine_test::OptionsFor(c);
  options.model = report->model;
  options.placement.resume_from = o.out;
  auto sim = SimBackend::Create({});
  ASSERT_TRUE(sim.ok());
  EXPECT_TRUE(Session::Create(**sim, options).ok());
}

// A file written with the optimizer's state imports back as a checkpoint equal, expert for
// expert and byte for byte, to the sub-model checkpoint ecss-extract writes directly; a
// session resumes it. A damaged or foreign file is refused naming what is wrong, and leaves
// no checkpoint.
TEST_F(ExtractTest, AFileWithItsOptimizerStateImportsBackExactly) {
  ExtractOptions o = Options({"c", "docs"});
  o.with_optimizer_state = true;
  ASSERT_TRUE(ExtractToSafetensors(o).ok());
  ExtractOptions direct = o;
  direct.out = StrCat(dir_, "/direct/sub");
  ASSERT_TRUE(ExtractToCheckpoint(direct).ok());

  ImportOptions import;
  import.file = o.out;
  import.out = StrCat(dir_, "/imported/sub");
  import.verify = true;
  auto report = ImportSafetensors(import);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_EQ(report->experts, 8u);
  EXPECT_GT(report->initial, 0u);
  auto model = CheckpointModel(import.out);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(FormatModelRecord(*model), FormatModelRecord(report->model));
  {
    auto want = CheckpointReader::Open(StrCat(dir_, "/direct"), "sub");
    auto got = CheckpointReader::Open(StrCat(dir_, "/imported"), "sub");
    ASSERT_TRUE(want.ok() && got.ok());
    ASSERT_EQ((*got)->index().size(), (*want)->index().size());
    EXPECT_TRUE((*got)->states() == (*want)->states());
    EXPECT_EQ(FindBlob((*got)->blobs(), "ecss.optimizer")->bytes, "adamw");
    for (uint32_t flat = 0; flat < (*want)->index().size(); ++flat) {
      ASSERT_EQ((*got)->version(flat), (*want)->version(flat)) << "expert " << flat;
      if ((*want)->version(flat) == 0) continue;
      ASSERT_TRUE((*want)->Read(flat).ok() && (*got)->Read(flat).ok());
      for (size_t k = 0; k < (*want)->states().size(); ++k) {
        const uint64_t bytes = ExpertStore::StateBytes((*want)->layout(), (*want)->states()[k]);
        EXPECT_EQ(std::memcmp((*got)->blocks()[k], (*want)->blocks()[k], bytes), 0)
            << "expert " << flat << " state " << k;
      }
    }
  }
  ExpectMasters(report->model, import.out, [](uint32_t e) { return e < 2 ? e : e + 3; });
  EXPECT_EQ(ImportSafetensors(import).status().code(), StatusCode::kAlreadyExists);
  {  // Once a session saved its own checkpoint beside it, the root is a training run's.
    RunConfig c;
    c.dtype = DType::kBF16;
    c.steps = 1;
    TrainSession(c, nullptr, [&](Session& s) {
      ASSERT_TRUE(s.SaveCheckpoint(StrCat(dir_, "/imported"), "trained", {}).ok());
    });
    ImportOptions beside = import;
    beside.out = StrCat(dir_, "/imported/again");
    Status refused = ImportSafetensors(beside).status();
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << refused;
    EXPECT_NE(refused.message().find("'trained'"), std::string::npos) << refused;
  }

  // Refused, leaving no checkpoint.
  auto refused = [&](const std::string& file, StatusCode code, const std::string& names) {
    ImportOptions bad = import;
    bad.file = file;
    bad.out = StrCat(dir_, "/refused/sub");
    Status status = ImportSafetensors(bad).status();
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_NE(status.message().find(names), std::string::npos) << status;
    EXPECT_FALSE(std::filesystem::exists(bad.out + "/checkpoint.manifest"));
  };
  ExtractOptions weights_only = Options({"python"});
  weights_only.out = StrCat(dir_, "/weights-only.safetensors");
  ASSERT_TRUE(ExtractToSafetensors(weights_only).ok());
  refused(weights_only.out, StatusCode::kFailedPrecondition, "optimizer state");
  auto header = ReadSafetensorsHeader(o.out);
  ASSERT_TRUE(header.ok());
  // A copy of the file with `bytes` written at byte `at` of a tensor's data.
  auto damaged = [&](const std::string& tensor, const std::string& copy, uint64_t at = 1,
                     const std::string& bytes = "\xda") {
    std::filesystem::copy_file(o.out, copy);
    for (const SafetensorsTensor& t : header->tensors) {
      if (t.name != tensor) continue;
      std::fstream f(copy, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(header->data_start + t.begin + at));
      f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    return copy;
  };
  // An expert never updated and one that was (as the checkpoint says): each damaged.
  auto reader = CheckpointReader::Open(StrCat(dir_, "/direct"), "sub");
  ASSERT_TRUE(reader.ok());
  std::optional<ExpertId> initial, updated;
  for (uint32_t flat = 0; flat < (*reader)->index().size(); ++flat) {
    ((*reader)->version(flat) == 0 ? initial : updated) = (*reader)->index().Id(flat);
  }
  ASSERT_TRUE(initial && updated);
  refused(damaged(StrCat("layers.", initial->layer, ".experts.", initial->expert, ".w_in"),
                  StrCat(dir_, "/initial")),
          StatusCode::kDataLoss, StrCat("layer ", initial->layer, " expert ", initial->expert));
  refused(damaged("layers.1.routing", StrCat(dir_, "/routing")), StatusCode::kDataLoss,
          "layers.1.routing");
  refused(damaged("layers.0.updates", StrCat(dir_, "/updates"), 7), StatusCode::kDataLoss,
          "layers.0.updates");  // a negative count
  // Values no training produces: a NaN weight, a negative second moment.
  const std::string updated_name =
      StrCat("layers.", updated->layer, ".experts.", updated->expert, ".w_out");
  refused(damaged(updated_name, StrCat(dir_, "/nan"), 0, std::string(4, '\xff')),
          StatusCode::kDataLoss, updated_name);
  refused(damaged(updated_name + ".exp_avg_sq", StrCat(dir_, "/negative"), 3, "\xbf"),
          StatusCode::kDataLoss, updated_name + ".exp_avg_sq");
  {  // The metadata's domains swapped (the same length, so the header stays well formed).
    std::ifstream in(o.out, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t at = bytes.find("c\\ndocs");
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at, 7, "docs\\nc");
    std::ofstream(StrCat(dir_, "/swapped"), std::ios::binary) << bytes;
  }
  refused(StrCat(dir_, "/swapped"), StatusCode::kDataLoss, "domains");
  std::filesystem::copy_file(o.out, StrCat(dir_, "/short"));
  std::filesystem::resize_file(StrCat(dir_, "/short"), std::filesystem::file_size(o.out) - 1);
  refused(StrCat(dir_, "/short"), StatusCode::kDataLoss, "short");
  {
    auto writer =
        SafetensorsWriter::Create(StrCat(dir_, "/foreign"), {}, {{"format", "other"}}, false);
    ASSERT_TRUE(writer.ok());
    ASSERT_TRUE((*writer)->Finish().ok());
  }
  refused(StrCat(dir_, "/foreign"), StatusCode::kFailedPrecondition, "format is 'other'");
  // A weight of an updated expert changed: the file is consistent, and imports as it says
  // (verify compares with the file); the bytes are the user's.
  ImportOptions edited = import;
  edited.file = damaged(StrCat("layers.", updated->layer, ".experts.", updated->expert, ".w_in"),
                        StrCat(dir_, "/edited"));
  edited.out = StrCat(dir_, "/edited-import/sub");
  EXPECT_TRUE(ImportSafetensors(edited).ok());

  // A killed run's leftovers, its save's data without a manifest and its scratch store, are
  // taken by the next run writing that name; a live writer of the name is refused.
  ImportOptions again = import;
  again.out = StrCat(dir_, "/cut/sub");
  std::filesystem::create_directories(again.out);
  std::ofstream(again.out + "/experts.bin") << "cut short";
  const std::string scratch = StrCat(dir_, "/cut/.sub.extract-999999");
  std::filesystem::create_directories(scratch);
  auto resumed = ImportSafetensors(again);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_FALSE(std::filesystem::exists(scratch));
  {
    auto writer = FileLock::Acquire(StrCat(dir_, "/cut/.sub.extract.lock"), "another writer");
    ASSERT_TRUE(writer.ok());
    again.overwrite = true;
    Status busy = ImportSafetensors(again).status();
    EXPECT_EQ(busy.code(), StatusCode::kFailedPrecondition) << busy;
    EXPECT_NE(busy.message().find(std::to_string(getpid())), std::string::npos) << busy;
  }
}

// Surgery, M6's Pseudo-to-Real: the 2-layer model grown to 4 layers, layer l starting as layer
// l % 2. The deep checkpoint stores no expert twice; a session resumes it (states on NVMe,
// where the copies share their sources' storage) with every expert its source's; after one
// step, an expert updated in one layer has left its copies in the other layers as they were.
TEST_F(ExtractTest, ADeepModelGrownFromAShallowOneDelinksAtTheFirstUpdate) {
  RepeatLayersOptions o;
  o.checkpoint = StrCat(root_, "/step2");
  o.times = 2;
  o.out = StrCat(dir_, "/deep/d");
  o.verify = true;
  auto report = RepeatLayers(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  EXPECT_EQ(report->model.layers, 4u);
  EXPECT_EQ(report->model.initial_layers, 2u);
  EXPECT_EQ(report->experts, 28u);
  EXPECT_EQ(std::filesystem::file_size(StrCat(dir_, "/deep/d/experts.bin")),
            std::filesystem::file_size(StrCat(root_, "/step2/experts.bin")))
      << "the copies are stored once, with their sources";
  EXPECT_EQ(
      RepeatLayers({o.checkpoint, 1, StrCat(dir_, "/deep/one"), false, false}).status().code(),
      StatusCode::kInvalidArgument);

  RunConfig c;
  c.dtype = DType::kBF16;
  c.nvme_dir = StrCat(dir_, "/deep-store");
  std::filesystem::create_directories(c.nvme_dir);
  SessionOptions options = engine_test::OptionsFor(c);
  options.model = report->model;
  options.placement.resume_from = o.out;
  auto sim = SimBackend::Create({});
  ASSERT_TRUE(sim.ok());
  auto made = Session::Create(**sim, options);
  ASSERT_TRUE(made.ok()) << made.status();
  Session& session = **made;
  auto masters = [&] {
    std::map<std::pair<uint32_t, uint32_t>, std::vector<float>> all;
    for (uint32_t l = 0; l < 4; ++l) {
      for (uint32_t e = 0; e < 7; ++e) all[{l, e}] = *session.MasterWeights(LayerIndex(l), e);
    }
    return all;
  };
  const auto before = masters();
  for (const auto& [id, master] : before) {
    EXPECT_EQ(master, masters_.at({id.first % 2, id.second})) << id.first << " " << id.second;
  }
  // One training step of one python token that layers 0 and 2 send to different experts.
  auto router = RouterOf(report->model);
  ASSERT_TRUE(router.ok());
  std::vector<uint32_t> token = {0};
  while (token[0] < report->model.vocab &&
         *router->Route(0, 1, token[0]) == *router->Route(2, 1, token[0])) {
    ++token[0];
  }
  ASSERT_LT(token[0], report->model.vocab);
  const std::vector<uint32_t> python = {1};
  const MicroBatch batch{token.data(), 1, 1, python.data()};
  Backend& b = **sim;
  const uint64_t elements = 16;
  const std::vector<BFloat16> ones(elements, FloatToBf16(0.25f));
  auto in = b.device_memory().Allocate(elements * 2, MemoryTag::kActivations);
  auto out = b.device_memory().Allocate(elements * 2, MemoryTag::kActivations);
  ASSERT_TRUE(in.ok() && out.ok());
  ASSERT_TRUE(b.CopyAsync(session.compute_stream(), in->data(), ones.data(), elements * 2,
                          CopyKind::kHostToDevice)
                  .ok());
  ASSERT_TRUE(session.BeginStep({batch}).ok());
  for (uint32_t l = 0; l < 4; ++l) {
    ASSERT_TRUE(session.Forward(MicroBatchIndex(0), LayerIndex(l), in->data(), out->data()).ok());
  }
  for (uint32_t l = 4; l-- > 0;) {
    ASSERT_TRUE(session.Backward(MicroBatchIndex(0), LayerIndex(l), in->data(), out->data()).ok());
  }
  auto stats = session.EndStep();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_GT(stats->updated_experts, 0u);
  ASSERT_TRUE(session.Synchronize().ok());
  const auto after = masters();
  // Pairs of copies (l, e) and (l + 2, e) where one was updated and the other was not: the
  // updated one moved, the other is still the shallow model's.
  int delinked = 0;
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t e = 0; e < 7; ++e) {
      const bool low = after.at({l, e}) != before.at({l, e});
      const bool high = after.at({l + 2, e}) != before.at({l + 2, e});
      if (low == high) continue;
      ++delinked;
      const uint32_t unchanged = low ? l + 2 : l;
      EXPECT_EQ(after.at({unchanged, e}), masters_.at({l, e}))
          << "layer " << unchanged << " expert " << e << " moved with its copy";
    }
  }
  EXPECT_GT(delinked, 0) << "the step updated some expert in one layer of a pair only";
  // The session's own checkpoint stores the copies still shared once too.
  std::filesystem::create_directories(StrCat(dir_, "/deep-run"));
  auto saved = session.SaveCheckpoint(StrCat(dir_, "/deep-run"), "after", {});
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_GT(saved->experts_shared, 0u);
  EXPECT_LT(saved->experts_shared, 14u) << "the delinked ones are their own";
  // In host memory there is no storage to share: each copy is its own from the start, and the
  // session saves and trains as any other.
  RunConfig host_states = c;
  host_states.nvme_dir.clear();
  SessionOptions host = engine_test::OptionsFor(host_states);
  host.model = report->model;
  host.placement.resume_from = o.out;
  auto in_memory = Session::Create(**sim, host);
  ASSERT_TRUE(in_memory.ok()) << in_memory.status();
  for (uint32_t l = 0; l < 4; ++l) {
    EXPECT_EQ(*(*in_memory)->MasterWeights(LayerIndex(l), 3), masters_.at({l % 2, 3}));
  }
  auto host_saved = (*in_memory)->SaveCheckpoint(StrCat(dir_, "/deep-run"), "host", {});
  ASSERT_TRUE(host_saved.ok()) << host_saved.status();
  EXPECT_EQ(host_saved->experts_shared, 0u);
}

// Surgery: a domain added as a copy of another. Every old domain computes bit for bit as
// before (verified by the evaluation step), the new group holds the source group's experts,
// and the grown model extracts again.
TEST_F(ExtractTest, AnAddedDomainCopiesItsSourceAndLeavesTheOthersAsTheyWere) {
  AddDomainOptions o = AddRust();
  o.copy_of = "python";
  auto report = AddDomain(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  const ModelSpec& grown = report->model;
  ASSERT_EQ(grown.domains.size(), 4u);
  EXPECT_EQ(grown.domains[3].name, "rust");
  EXPECT_EQ(grown.domains[3].experts, 3u);
  EXPECT_EQ(grown.DomainId(3), 3u);
  EXPECT_EQ(grown.InitialKey(7), 2u);  // drawn as python's first expert

  ExpectMasters(grown, o.out, [](uint32_t e) { return e < 7 ? e : e - 5; });
  // The grown model is a model like any other: its new domain extracts, verified.
  ExtractOptions rust = Options({"rust"});
  rust.checkpoint = o.out;
  rust.out = StrCat(dir_, "/rust-only/rust");
  rust.verify = true;
  auto extracted = ExtractToCheckpoint(rust);
  ASSERT_TRUE(extracted.ok()) << extracted.status();
  EXPECT_EQ(extracted->model.DomainId(0), 3u);

  // Refused: a name the model has, a source it has not, an existing output.
  AddDomainOptions bad = o;
  bad.name = "docs";
  EXPECT_EQ(AddDomain(bad).status().code(), StatusCode::kAlreadyExists);
  bad = o;
  bad.copy_of = "go";
  Status unknown = AddDomain(bad).status();
  EXPECT_EQ(unknown.code(), StatusCode::kNotFound) << unknown;
  EXPECT_NE(unknown.message().find("c, python, docs"), std::string::npos) << unknown;
  EXPECT_EQ(AddDomain(o).status().code(), StatusCode::kAlreadyExists);
  EXPECT_TRUE(std::filesystem::exists(o.out + "/checkpoint.manifest")) << "left as it was";
}

// Surgery: a domain grown from a dense FFN (as PanGu-Sigma grew from PanGu-alpha). Every new
// expert starts as its layer's FFN with no update yet, so its first update is its optimizer's
// first step (AdamW's bias correction of step 1 moves each weight by the learning rate, where
// a second step's would move it by about 0.74 of it); the old domains compute as before; the
// grown model extracts to safetensors and imports back with the new experts as they were.
TEST_F(ExtractTest, ADomainGrownFromADenseFfnStartsAtItsOptimizersFirstStep) {
  auto full = CheckpointModel(StrCat(root_, "/step2"));
  ASSERT_TRUE(full.ok()) << full.status();
  const ModelSpec& m = *full;
  const std::string dense = StrCat(dir_, "/dense.safetensors");
  std::vector<std::vector<float>> ffn(m.layers);  // per layer: w_in, then w_out
  {
    std::vector<SafetensorsTensor> tensors;
    CounterRng rng(7, 0);
    for (uint32_t l = 0; l < m.layers; ++l) {
      tensors.push_back({StrCat("layers.", l, ".w_in"), "F32", {m.d_model, m.d_in()}});
      tensors.push_back({StrCat("layers.", l, ".w_out"), "F32", {m.d_ff, m.d_model}});
      ffn[l].resize(m.expert_params());
      for (float& v : ffn[l]) v = (rng.UniformFloat() * 2 - 1) * 0.3f;
    }
    tensors.push_back({"embedding", "F32", {2}});  // other tensors of the model: ignored
    auto writer = SafetensorsWriter::Create(dense, tensors, {}, false);
    ASSERT_TRUE(writer.ok()) << writer.status();
    for (uint32_t l = 0; l < m.layers; ++l) {
      ASSERT_TRUE((*writer)->Append(ffn[l].data(), ffn[l].size() * 4).ok());
    }
    const float embedding[2] = {1, 2};
    ASSERT_TRUE((*writer)->Append(embedding, sizeof embedding).ok());
    ASSERT_TRUE((*writer)->Finish().ok());
  }
  AddDomainOptions o = AddRust();
  o.dense_ffn = dense;
  o.experts = 2;
  auto report = AddDomain(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->verified);
  const ModelSpec& grown = report->model;
  ASSERT_EQ(grown.domains.size(), 4u);
  EXPECT_EQ(grown.domains[3].experts, 2u);
  EXPECT_EQ(grown.DomainId(3), 3u);
  auto reader = CheckpointReader::Open(StrCat(dir_, "/grown"), "rust");
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (uint32_t l = 0; l < m.layers; ++l) {
    for (uint32_t e = 7; e < 9; ++e) {
      const uint32_t flat = (*reader)->index().Flat({l, e});
      EXPECT_TRUE((*reader)->written(flat));
      EXPECT_EQ((*reader)->version(flat), 0u);
      masters_[{l, e}] = ffn[l];
    }
  }
  ExpectMasters(
      grown, o.out, [](uint32_t e) { return e; },
      [&](Session& s, Backend& b) {
        HyperParams params;
        params.lr = 1e-3f;
        params.weight_decay = 0;
        ASSERT_TRUE(s.SetHyperParams(params).ok());
        // One step of rust tokens.
        std::vector<uint32_t> tokens = {1, 2, 3, 4};
        const std::vector<uint32_t> rust = {3};
        const MicroBatch batch{tokens.data(), 1, 4, rust.data()};
        const uint64_t elements = 4 * uint64_t{m.d_model};
        std::vector<BFloat16> x(elements);
        CounterRng rng(11, 0);
        for (BFloat16& v : x) v = FloatToBf16(rng.UniformFloat() * 2 - 1);
        auto in = b.device_memory().Allocate(elements * 2, MemoryTag::kActivations);
        auto out = b.device_memory().Allocate(elements * 2, MemoryTag::kActivations);
        ASSERT_TRUE(in.ok() && out.ok());
        ASSERT_TRUE(b.CopyAsync(s.compute_stream(), in->data(), x.data(), elements * 2,
                                CopyKind::kHostToDevice)
                        .ok());
        ASSERT_TRUE(s.BeginStep({batch}).ok());
        for (uint32_t l = 0; l < m.layers; ++l) {
          ASSERT_TRUE(s.Forward(MicroBatchIndex(0), LayerIndex(l), in->data(), out->data()).ok());
        }
        for (uint32_t l = m.layers; l-- > 0;) {
          ASSERT_TRUE(s.Backward(MicroBatchIndex(0), LayerIndex(l), in->data(), out->data()).ok());
        }
        ASSERT_TRUE(s.EndStep().ok());
        ASSERT_TRUE(s.Synchronize().ok());
        uint64_t moved = 0, by_lr = 0;
        for (uint32_t l = 0; l < m.layers; ++l) {
          for (uint32_t e = 7; e < 9; ++e) {
            const std::vector<float> after = *s.MasterWeights(LayerIndex(l), e);
            for (size_t i = 0; i < after.size(); ++i) {
              const float step = std::fabs(after[i] - ffn[l][i]);
              if (step == 0) continue;
              ++moved;
              by_lr += step > 0.98e-3f && step < 1.02e-3f;
            }
          }
        }
        EXPECT_GT(moved, 0u);
        EXPECT_GE(by_lr, moved * 9 / 10) << "the first update is Adam's step 1";
      });

  // Resumed with its states on NVMe (and its compute weights too), the grown model computes
  // as in host memory: the new experts' compute weights are the FFN's, not drawn ones.
  auto evaluate = [&](const std::string& nvme, bool nvme_weights) {
    RunConfig c;
    c.dtype = DType::kBF16;
    c.nvme_dir = nvme;
    c.nvme_weights = nvme_weights;
    if (!nvme.empty()) std::filesystem::create_directories(nvme);
    SessionOptions options = engine_test::OptionsFor(c);
    options.model = grown;
    options.placement.resume_from = o.out;
    auto sim = SimBackend::Create({});
    EXPECT_TRUE(sim.ok());
    auto session = Session::Create(**sim, options);
    EXPECT_TRUE(session.ok()) << session.status();
    Session& s = **session;
    Backend& b = **sim;
    std::vector<uint32_t> tokens = {1, 2, 3, 4};
    const std::vector<uint32_t> rust = {3};
    const uint64_t elements = 4 * uint64_t{m.d_model};
    std::vector<BFloat16> x(elements, FloatToBf16(0.5f));
    auto in = b.device_memory().Allocate(elements * 2, MemoryTag::kActivations);
    auto out = b.device_memory().Allocate(elements * 2, MemoryTag::kActivations);
    EXPECT_TRUE(
        b.CopyAsync(s.compute_stream(), in->data(), x.data(), elements * 2, CopyKind::kHostToDevice)
            .ok());
    EXPECT_TRUE(s.BeginEvaluation({MicroBatch{tokens.data(), 1, 4, rust.data()}}).ok());
    std::vector<std::vector<BFloat16>> outputs;
    for (uint32_t l = 0; l < m.layers; ++l) {
      EXPECT_TRUE(s.Forward(MicroBatchIndex(0), LayerIndex(l), in->data(), out->data()).ok());
      outputs.emplace_back(elements);
      EXPECT_TRUE(b.CopyAsync(s.compute_stream(), outputs.back().data(), out->data(), elements * 2,
                              CopyKind::kDeviceToHost)
                      .ok());
      EXPECT_TRUE(b.SynchronizeStream(s.compute_stream()).ok());
    }
    EXPECT_TRUE(s.EndStep().ok());
    std::vector<uint16_t> bits;
    for (const auto& layer : outputs) {
      for (BFloat16 v : layer) bits.push_back(v.bits);
    }
    return bits;
  };
  const std::vector<uint16_t> in_memory = evaluate("", false);
  EXPECT_EQ(evaluate(StrCat(dir_, "/nvme-states"), false), in_memory);
  EXPECT_EQ(evaluate(StrCat(dir_, "/nvme-weights"), true), in_memory);

  // The grown model to safetensors with its optimizer state and back: the new experts stay
  // written at no update (the file's metadata names them), the others as they were.
  ExtractOptions file = Options({"c", "python", "docs", "rust"});
  file.checkpoint = o.out;
  file.with_optimizer_state = true;
  file.out = StrCat(dir_, "/grown.safetensors");
  file.verify = true;
  ASSERT_TRUE(ExtractToSafetensors(file).ok());
  auto header = ReadSafetensorsHeader(file.out);
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(header->metadata.at("written_without_update"), "0.7 0.8 1.7 1.8");
  ImportOptions back;
  back.file = file.out;
  back.out = StrCat(dir_, "/imported/rust");
  back.verify = true;
  auto imported = ImportSafetensors(back);
  ASSERT_TRUE(imported.ok()) << imported.status();
  ExpectMasters(grown, back.out, [](uint32_t e) { return e; });

  // The file's list of experts written without an update is checked: one with updates, one
  // out of the model, one out of order are DataLoss naming the metadata.
  {
    std::ifstream in(file.out, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (const std::string& listed :
         {std::string("0.7 0.8 1.7 1.3"), std::string("0.7 0.8 1.7 9.8"),
          std::string("0.8 0.7 1.7 1.8")}) {
      std::string edited = bytes;  // the same length: the header stays well formed
      const size_t at = edited.find("0.7 0.8 1.7 1.8");
      ASSERT_NE(at, std::string::npos);
      edited.replace(at, listed.size(), listed);
      const std::string path = StrCat(dir_, "/listed.safetensors");
      std::ofstream(path, std::ios::binary | std::ios::trunc) << edited;
      ImportOptions listed_back = back;
      listed_back.file = path;
      listed_back.out = StrCat(dir_, "/refused-import/rust");
      Status refused = ImportSafetensors(listed_back).status();
      EXPECT_EQ(refused.code(), StatusCode::kDataLoss) << listed << ": " << refused;
      EXPECT_NE(refused.message().find("written_without_update"), std::string::npos) << refused;
      EXPECT_FALSE(std::filesystem::exists(listed_back.out + "/checkpoint.manifest"));
    }
  }

  // Refused: both sources, neither, no expert count, a file without a layer's FFN or with a
  // value that is not finite.
  AddDomainOptions bad = o;
  bad.out = StrCat(dir_, "/refused/rust");
  bad.copy_of = "python";
  EXPECT_EQ(AddDomain(bad).status().code(), StatusCode::kInvalidArgument);
  bad = o;
  bad.out = StrCat(dir_, "/refused/rust");
  bad.experts = 0;
  EXPECT_EQ(AddDomain(bad).status().code(), StatusCode::kInvalidArgument);
  bad.experts = 2;
  bad.dense_ffn = file.out;  // a file of experts, not of a dense FFN
  Status missing = AddDomain(bad).status();
  EXPECT_EQ(missing.code(), StatusCode::kDataLoss) << missing;
  EXPECT_NE(missing.message().find("layers.0.w_in"), std::string::npos) << missing;
  {
    const std::string nan = StrCat(dir_, "/nan.safetensors");
    std::filesystem::copy_file(dense, nan);
    auto nan_header = ReadSafetensorsHeader(nan);
    ASSERT_TRUE(nan_header.ok());
    std::fstream f(nan, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(nan_header->data_start + 4 * 5));  // layers.0.w_in[5]
    f.write("\xff\xff\xff\x7f", 4);
    f.close();
    bad.dense_ffn = nan;
    Status not_finite = AddDomain(bad).status();
    EXPECT_EQ(not_finite.code(), StatusCode::kDataLoss) << not_finite;
    EXPECT_NE(not_finite.message().find("'layers.0.w_in'"), std::string::npos) << not_finite;
  }
  EXPECT_FALSE(std::filesystem::exists(bad.out + "/checkpoint.manifest"));
}

// Bad requests are refused naming what is wrong, and leave no file behind.
TEST_F(ExtractTest, BadRequestsAreRefusedAndLeaveNothing) {
  ExtractOptions o = Options({"rust"});
  Status unknown = ExtractToSafetensors(o).status();
  EXPECT_EQ(unknown.code(), StatusCode::kNotFound) << unknown;
  EXPECT_NE(unknown.message().find("c, python, docs"), std::string::npos) << unknown;
  EXPECT_EQ(ExtractToSafetensors(Options({"c", "c"})).status().code(),
            StatusCode::kInvalidArgument);
  o = Options({"python"});
  o.checkpoint = StrCat(root_, "/step3");
  EXPECT_EQ(ExtractToSafetensors(o).status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(std::filesystem::exists(o.out));

  // Never inside the checkpoint read, never over anything but a regular file.
  o = Options({"python"});
  o.out = StrCat(root_, "/step2/experts.bin");
  o.overwrite = true;
  EXPECT_EQ(ExtractToSafetensors(o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ExtractToCheckpoint(o).status().code(), StatusCode::kInvalidArgument);
  o.out = StrCat(dir_, "/a-directory");
  std::filesystem::create_directory(o.out);
  EXPECT_EQ(ExtractToSafetensors(o).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(ExtractToCheckpoint(o).status().code(), StatusCode::kAlreadyExists)
      << "not a checkpoint";
  EXPECT_TRUE(std::filesystem::is_directory(o.out));
  // Nor into a root holding a training run's checkpoints (a copy of this run's).
  std::filesystem::create_directories(StrCat(dir_, "/run2"));
  std::filesystem::copy(StrCat(root_, "/step2"), StrCat(dir_, "/run2/step2"));
  o.out = StrCat(dir_, "/run2/python");
  EXPECT_EQ(ExtractToCheckpoint(o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(o.out));
  // ... nor into any checkpoint's directory, the source's or another one's.
  o.out = StrCat(dir_, "/run2/step2/sub/python.safetensors");
  EXPECT_EQ(ExtractToSafetensors(o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ExtractToCheckpoint(o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(StrCat(dir_, "/run2/step2/sub")));
  // A checkpoint is not written beside the run's own (it would become the run's newest).
  o = Options({"python"});
  o.out = StrCat(root_, "/python-only");
  Status beside = ExtractToCheckpoint(o).status();
  EXPECT_EQ(beside.code(), StatusCode::kInvalidArgument) << beside;
  EXPECT_FALSE(std::filesystem::exists(o.out));
  // Domain ids ascend in the spec's order.
  SessionOptions descending;
  descending.model = SmallModel(DType::kBF16);
  descending.model.domains[0].id = 5;
  descending.limits.max_tokens_per_micro_batch = 1;
  EXPECT_EQ(descending.Validate().code(), StatusCode::kInvalidArgument);

  // An existing file is replaced only when asked.
  o = Options({"python"});
  ASSERT_TRUE(ExtractToSafetensors(o).ok());
  EXPECT_EQ(ExtractToSafetensors(o).status().code(), StatusCode::kAlreadyExists);
  o.overwrite = true;
  EXPECT_TRUE(ExtractToSafetensors(o).ok());

  // What crashed runs left (a scratch store, a partial file) goes with the next run there;
  // a checkpoint output replaced with --force.
  ExtractOptions sub = Options({"python"});
  sub.out = StrCat(dir_, "/subs/python");
  ASSERT_TRUE(ExtractToCheckpoint(sub).ok());
  const std::string stale = StrCat(dir_, "/subs/.python.extract-999999999");
  const std::string partial = o.out + ".partial-999999999";
  std::filesystem::create_directory(stale);
  std::ofstream(partial) << "half";
  sub.overwrite = true;
  ASSERT_TRUE(ExtractToCheckpoint(sub).ok());
  // ... but not a live writer's (it holds a lock on its file), whatever its pid.
  const std::string live = o.out + ".partial-1";
  const int held = ::open(live.c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_GE(held, 0);
  ASSERT_EQ(::flock(held, LOCK_EX), 0);
  ASSERT_TRUE(ExtractToSafetensors(o).ok());
  EXPECT_FALSE(std::filesystem::exists(stale));
  EXPECT_FALSE(std::filesystem::exists(partial));
  EXPECT_TRUE(std::filesystem::exists(live));
  ::close(held);

  // A damaged checkpoint: DataLoss naming the expert and state; the old file stays whole and
  // no partial file is left; a checkpoint output to be replaced stays too (the source is read
  // in full before it goes).
  const std::string experts = StrCat(root_, "/step2/experts.bin");
  {
    std::fstream f(experts, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    char byte = 0;
    f.read(&byte, 1);
    f.seekp(100);
    byte = static_cast<char>(byte ^ 0x10);
    f.write(&byte, 1);
  }
  const uint64_t before = std::filesystem::file_size(o.out);
  o.domains = {"c", "python", "docs"};
  Status damaged = ExtractToSafetensors(o).status();
  EXPECT_EQ(damaged.code(), StatusCode::kDataLoss) << damaged;
  EXPECT_NE(damaged.message().find("checksum mismatch"), std::string::npos) << damaged;
  EXPECT_NE(damaged.message().find("expert"), std::string::npos) << damaged;
  EXPECT_EQ(std::filesystem::file_size(o.out), before);
  EXPECT_FALSE(std::filesystem::exists(o.out + ".partial-" + std::to_string(getpid())));
  sub.domains = {"c", "python", "docs"};
  EXPECT_EQ(ExtractToCheckpoint(sub).status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(std::filesystem::exists(sub.out + "/checkpoint.manifest"));
  // A new domain's name cannot have a comma (--domains could not name it).
  AddDomainOptions comma;
  comma.checkpoint = StrCat(root_, "/step2");
  comma.name = "a,b";
  comma.copy_of = "c";
  comma.out = StrCat(dir_, "/comma/x");
  EXPECT_EQ(AddDomain(comma).status().code(), StatusCode::kInvalidArgument);
}

// A damaged or hostile header is DataLoss naming the file, never a crash or a huge allocation.
TEST(SafetensorsTest, AMalformedHeaderIsDataLoss) {
  char dir[] = "/tmp/ecss_safetensors_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  auto file = [&](const std::string& json, uint64_t length, uint64_t data) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(length >> (8 * i));
    return bytes + json + std::string(data, '\0');
  };
  auto header = [&](const std::string& json, uint64_t data) {
    return file(json, json.size(), data);
  };
  const std::vector<std::string> damaged = {
      "abc",                                                       // shorter than the length
      file("{}", 1000, 0),                                         // a length past the end
      file("{}", uint64_t{1} << 62, 0),                            // a huge length
      header("[1, 2]", 0),                                         // not an object
      header("{\"a\": 5}", 0),                                     // an entry not an object
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4),  // no offsets
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [\"0\", 4]}}", 4),
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4),
      header("{\"a\": {\"dtype\": \"Q7\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4),
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 4),
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8),
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 12),
      header("{\"a\": {\"dtype\": \"U8\", \"shape\": [4294967296, 4294967296], "
             "\"data_offsets\": [0, 0]}}",
             0),
      header("{\"__metadata__\": {\"k\": 1}}", 0),
      header("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
             "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
             4),                                                      // a tensor named twice
      header("{\"__metadata__\": {\"k\": \"1\", \"k\": \"2\"}}", 0),  // a key twice
  };
  for (size_t i = 0; i < damaged.size(); ++i) {
    const std::string path = StrCat(dir, "/", i, ".safetensors");
    std::ofstream(path, std::ios::binary) << damaged[i];
    Status status = ReadSafetensorsHeader(path).status();
    EXPECT_EQ(status.code(), StatusCode::kDataLoss) << i << ": " << status;
    EXPECT_NE(status.message().find(path), std::string::npos) << status;
  }
  // What the format allows: an empty tensor beside others, and metadata.
  const std::string path = StrCat(dir, "/good.safetensors");
  std::ofstream(path, std::ios::binary) << header(
      "{\"e\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}, "
      "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
      "\"__metadata__\": {\"k\": \"v\"}}",
      4);
  auto good = ReadSafetensorsHeader(path);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->tensors.size(), 2u);
  EXPECT_EQ(good->metadata.at("k"), "v");
  // Not a regular file: refused before it is opened (a FIFO would wait for a writer).
  const std::string fifo = StrCat(dir, "/fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& odd : {fifo, std::string(dir), std::string("/dev/zero")}) {
    EXPECT_EQ(ReadSafetensorsHeader(odd).status().code(), StatusCode::kInvalidArgument) << odd;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ecss
