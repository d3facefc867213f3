// The session's records in a checkpoint: the model record reads back exactly, strictly, and
// names what differs.
#include "engine/checkpoint_record.h"

#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace ecss {
namespace {

ModelSpec AModel() {
  ModelSpec m;
  m.layers = 3;
  m.d_model = 48;
  m.d_ff = 80;
  m.activation = Activation::kSwiGlu;
  m.dtype = DType::kF32;
  m.vocab = 500;
  m.seed = (uint64_t{1} << 63) + 7;
  m.builder = TableBuilder::kHashBalanced;
  m.init_scale = 0.1f;  // not exact in decimal
  m.domains = {{"en", 4}, {"source code", 2}, {"zh", 3}};
  m.domains[2].id = 7;  // as a sub-model's: the ids and initial values of the model it came from
  m.domains[2].source_first_expert = 11;
  return m;
}

TEST(CheckpointRecordTest, TheModelReadsBackExactly) {
  const ModelSpec m = AModel();
  const std::string text = FormatModelRecord(m);
  auto parsed = ParseModelRecord(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << text;
  EXPECT_TRUE(CheckSameModel(*parsed, m).ok());
  EXPECT_EQ(FormatModelRecord(*parsed), text);
  EXPECT_EQ(parsed->domains[1].name, "source code");
  EXPECT_EQ(parsed->init_scale, 0.1f);
  EXPECT_EQ(parsed->DomainId(1), 1u);
  EXPECT_EQ(parsed->DomainId(2), 7u);
  EXPECT_EQ(parsed->InitialKey(3), 3u);
  EXPECT_EQ(parsed->InitialKey(7), 12u);
}

TEST(CheckpointRecordTest, ARecordIsParsedStrictly) {
  const std::string good = FormatModelRecord(AModel());
  const std::vector<std::string> damaged = {
      good + "colour blue\n",                                        // an unknown key
      good + "layers 3\n",                                           // a repeated key
      good.substr(0, good.size() - 1),                               // no final line end
      "d_model 48\n",                                                // fields missing
      std::string(good).replace(0, 8, "layers x"),                   // not a number
      good + "domain many zh2\n",                                    // a domain without a count
      good + "domain 4 8 0 en\n",                                    // a domain named twice
      good + "domain 4 7 0 de\n",                                    // an id taken
      good + "domain 4 9 de\n",                                      // no initial values' key
      std::string(good).replace(good.find("d_ff 80"), 7, "d_ff 0"),  // not a valid model
  };
  for (const std::string& text : damaged) {
    Status status = ParseModelRecord(text).status();
    EXPECT_EQ(status.code(), StatusCode::kDataLoss) << text;
  }
}

// The session record (step count, hyper-parameters, held experts) reads back to the bit and
// is as strict; CheckSessionRecords refuses held gradients that do not fit the session.
TEST(CheckpointRecordTest, TheSessionRecordReadsBackExactlyAndStrictly) {
  SessionRecord r;
  r.steps = (uint64_t{1} << 40) + 3;
  r.hyper_params.lr = 0.1f;
  r.hyper_params.beta2 = 0.95f;
  r.hyper_params.nesterov = true;
  r.held = {{2, 1}, {0, 8}};
  r.held_loss_scale = 1024;
  r.gradient_dtype = DType::kBF16;
  const std::string good = FormatSessionRecord(r);
  auto parsed = ParseSessionRecord(good);
  ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << good;
  EXPECT_EQ(FormatSessionRecord(*parsed), good);
  EXPECT_EQ(parsed->hyper_params.lr, 0.1f);
  EXPECT_TRUE(parsed->held == r.held);
  EXPECT_EQ(parsed->steps, r.steps);
  std::vector<std::string> damaged = {
      good + "colour blue\n",           // an unknown key
      good + "steps 3\n",               // a repeated key
      good.substr(0, good.size() - 1),  // no final line end
      "steps 3\n",                      // fields missing
      good + "held 1\n",                // a held expert without its id
      std::string(good).replace(good.find("nesterov 1"), 10, "nesterov 2"),
      std::string(good).replace(good.find("gradient_dtype bf16"), 19, "gradient_dtype f64"),
  };
  SessionRecord unscaled = r;
  unscaled.held_loss_scale = 0;
  damaged.push_back(FormatSessionRecord(unscaled));
  SessionRecord endless = r;
  endless.steps = UINT64_MAX;
  damaged.push_back(FormatSessionRecord(endless));
  for (const std::string& text : damaged) {
    EXPECT_EQ(ParseSessionRecord(text).status().code(), StatusCode::kDataLoss) << text;
  }

  SessionOptions options;
  options.model = AModel();
  options.delayed_update = true;
  options.gradient_dtype = DType::kBF16;
  const uint64_t bytes = r.held.size() * HeldGradientBytes(r, options.model);
  EXPECT_EQ(bytes, 2 * options.model.expert_params() * 2);
  auto blobs = [&](const SessionRecord& record, uint64_t held_bytes) {
    return std::vector<CheckpointBlob>{{"ecss.session", FormatSessionRecord(record)},
                                       {"ecss.held_gradients", std::string(held_bytes, '\0')}};
  };
  auto state = CheckSessionRecords(blobs(r, bytes), options);
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_TRUE(state->has_value());
  EXPECT_TRUE((*state)->record.held == r.held);
  EXPECT_EQ((*state)->held_gradients.size(), bytes);
  EXPECT_EQ(CheckSessionRecords(blobs(r, bytes - 1), options).status().code(),
            StatusCode::kDataLoss);
  SessionRecord outside = r;
  outside.held.push_back({3, 0});  // the model has 3 layers
  EXPECT_EQ(CheckSessionRecords(blobs(outside, bytes), options).status().code(),
            StatusCode::kDataLoss);
  SessionRecord twice = r;
  twice.held.push_back({2, 1});
  EXPECT_EQ(CheckSessionRecords(blobs(twice, bytes), options).status().code(),
            StatusCode::kDataLoss);
  SessionRecord bad_lr = r;
  bad_lr.hyper_params.lr = -1;
  EXPECT_EQ(CheckSessionRecords(blobs(bad_lr, bytes), options).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(CheckSessionRecords({{"ecss.held_gradients", "x"}}, options).status().code(),
            StatusCode::kDataLoss);
  std::vector<CheckpointBlob> newer = blobs(r, bytes);
  newer.push_back({"ecss.rng", "x"});  // a record a later build might add
  Status unknown = CheckSessionRecords(newer, options).status();
  EXPECT_EQ(unknown.code(), StatusCode::kFailedPrecondition) << unknown;
  EXPECT_NE(unknown.message().find("ecss.rng"), std::string::npos) << unknown;
  options.delayed_update = false;
  EXPECT_EQ(CheckSessionRecords(blobs(r, bytes), options).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST(CheckpointRecordTest, ADifferentModelIsNamedByItsField) {
  const ModelSpec m = AModel();
  auto differs = [&](auto change, std::string_view field) {
    ModelSpec other = m;
    change(other);
    Status status = CheckSameModel(m, other);
    EXPECT_EQ(status.code(), StatusCode::kFailedPrecondition) << field;
    EXPECT_NE(status.message().find(field), std::string::npos) << status;
  };
  differs([](ModelSpec& o) { o.d_model = 80; }, "d_model");
  differs([](ModelSpec& o) { o.activation = Activation::kGelu; }, "activation");
  differs([](ModelSpec& o) { o.init_scale = 0.2f; }, "init_scale");
  differs([](ModelSpec& o) { o.domains.pop_back(); }, "domains");
  differs([](ModelSpec& o) { std::swap(o.domains[0], o.domains[2]); }, "domains");
  differs([](ModelSpec& o) { o.domains[2].id.reset(); }, "domains");
  differs([](ModelSpec& o) { o.domains[1].source_first_expert = 0; }, "domains");
}

// What unwritten experts are: the same values for the same (seed, layer, expert), another
// stream for another expert.
TEST(CheckpointRecordTest, InitialMastersAreAFunctionOfTheExpert) {
  const ModelSpec m = AModel();
  std::vector<float> a(m.expert_params()), b(m.expert_params()), c(m.expert_params());
  DrawInitialMaster(m, 1, 2, a.data());
  DrawInitialMaster(m, 1, 2, b.data());
  DrawInitialMaster(m, 2, 1, c.data());
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // A group with a source_first_expert draws as the experts it names did.
  ModelSpec plain = m;
  plain.domains[2].source_first_expert.reset();
  std::vector<float> moved(m.expert_params()), there(m.expert_params());
  DrawInitialMaster(m, 1, 6, moved.data());       // zh's first expert, keyed 11
  DrawInitialMaster(plain, 1, 11, there.data());  // (a layer's index need not exist to draw)
  EXPECT_EQ(moved, there);
  EXPECT_NE(InitialValuesId(m), InitialValuesId(plain));
  for (float x : a) EXPECT_LE(std::abs(x), 0.1f);
  // A model grown from a shallow one (initial_layers) repeats the shallow one's layers.
  ModelSpec deep = m;
  deep.layers = 6;
  deep.initial_layers = 2;
  std::vector<float> shallow(m.expert_params()), repeated(m.expert_params());
  DrawInitialMaster(m, 1, 4, shallow.data());
  DrawInitialMaster(deep, 5, 4, repeated.data());  // layer 5 draws as layer 1
  EXPECT_EQ(shallow, repeated);
  DrawInitialMaster(deep, 4, 4, repeated.data());
  EXPECT_NE(shallow, repeated);
  EXPECT_NE(InitialValuesId(deep), InitialValuesId(m));
  auto parsed = ParseModelRecord(FormatModelRecord(deep));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->initial_layers, 2u);
  ModelSpec repeats_another = deep;
  repeats_another.initial_layers = 3;
  Status differs = CheckSameModel(repeats_another, deep);
  EXPECT_EQ(differs.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(differs.message().find("initial_layers"), std::string::npos) << differs;
  deep.initial_layers = 7;  // beyond its layers
  EXPECT_EQ(ParseModelRecord(FormatModelRecord(deep)).status().code(), StatusCode::kDataLoss);
}

}  // namespace
}  // namespace ecss
