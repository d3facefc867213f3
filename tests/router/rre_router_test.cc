#include "router/rre_router.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/checksum.h"
#include "runtime/base/file_util.h"

namespace ecss {
namespace {

DomainMap TwoDomains(uint32_t layers = 3) {
  DomainMap map = *DomainMap::Create(layers);
  EXPECT_TRUE(map.AddDomainUniform("chinese", 0, 8).ok());
  EXPECT_TRUE(map.AddDomain("code", 5, std::vector<uint32_t>(layers, 5)).ok());
  return map;
}

std::vector<double> Zipf(uint32_t vocab, double exponent = 1.1) {
  std::vector<double> f(vocab);
  for (uint32_t t = 0; t < vocab; ++t) f[t] = 1.0 / std::pow(t + 1.0, exponent);
  return f;
}

TEST(DomainMapTest, GroupsAreAppendedAndNeverMove) {
  DomainMap map = *DomainMap::Create(2);
  ASSERT_TRUE(map.AddDomain("en", 1, {4, 2}).ok());
  ASSERT_TRUE(map.AddDomain("zh", 0, {3, 3}).ok());
  EXPECT_EQ(map.domains()[0].name, "zh") << "sorted by id";
  EXPECT_EQ((*map.Find(1))->groups[0].first, 0u);
  EXPECT_EQ((*map.Find(0))->groups[0].first, 4u);
  EXPECT_EQ((*map.Find(0))->groups[1].first, 2u);
  ASSERT_TRUE(map.RemoveDomain(1).ok());
  ASSERT_TRUE(map.AddDomain("code", 2, {1, 1}).ok());
  EXPECT_EQ((*map.Find(2))->groups[0].first, 7u) << "a removed domain's experts stay a hole";
  EXPECT_EQ((*map.Find(0))->groups[0].first, 4u) << "existing groups never move";
  EXPECT_EQ(map.experts_in_layer(0), 8u);
  EXPECT_EQ(*map.IdOf("code"), 2u);
}

TEST(DomainMapTest, BadInputIsNamed) {
  DomainMap map = *DomainMap::Create(2);
  ASSERT_TRUE(map.AddDomainUniform("en", 1, 4).ok());
  EXPECT_EQ(map.AddDomainUniform("en", 2, 4).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(map.AddDomainUniform("fr", 1, 4).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(map.AddDomainUniform("", 3, 4).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(map.AddDomain("fr", 3, std::vector<uint32_t>{4}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(map.AddDomain("fr", 3, {4, 0}).code(), StatusCode::kInvalidArgument);
  Status unknown = map.Find(9).status();
  EXPECT_EQ(unknown.code(), StatusCode::kNotFound);
  EXPECT_NE(unknown.message().find("unknown domain id 9"), std::string_view::npos);
  EXPECT_NE(unknown.message().find("'en'"), std::string_view::npos) << "lists the known ones";
  EXPECT_EQ(map.IdOf("klingon").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(map.RemoveDomain(9).code(), StatusCode::kNotFound);
  EXPECT_EQ(DomainMap::Create(0).status().code(), StatusCode::kInvalidArgument);
  // Persisted parts that overlap are rejected.
  std::vector<DomainInfo> overlapping = {{"a", 0, {{0, 4}}}, {"b", 1, {{2, 4}}}};
  EXPECT_EQ(DomainMap::FromParts(1, {8}, overlapping).status().code(),
            StatusCode::kInvalidArgument);
}

// Expert token-id counts differ by at most one, for many (vocabulary, group size) pairs.
TEST(RreRouterTest, UniformBuilderBalanceBound) {
  for (uint32_t vocab : {1u, 7u, 100u, 1000u, 4099u, 50257u}) {
    for (uint32_t group : {1u, 2u, 3u, 7u, 8u, 64u, 100u, 1000u}) {
      if (group > vocab) continue;
      DomainMap map = *DomainMap::Create(2);
      ASSERT_TRUE(map.AddDomainUniform("d", 0, group).ok());
      StatusOr<RreRouter> router = RreRouter::Create(map, {vocab, 99, TableBuilder::kRreUniform});
      ASSERT_TRUE(router.ok()) << router.status();
      for (uint32_t layer = 0; layer < 2; ++layer) {
        std::vector<uint32_t> counts = *router->TokenIdCounts(layer, 0);
        const auto [low, high] = std::minmax_element(counts.begin(), counts.end());
        ASSERT_LE(*high - *low, 1u) << "vocab " << vocab << " group " << group;
      }
    }
  }
}

// The same seed gives the same tables on every run and build: the table bytes are pinned.
TEST(RreRouterTest, SameSeedSameTablesEverywhere) {
  StatusOr<RreRouter> a = RreRouter::Create(TwoDomains(), {32000, 1234, TableBuilder::kRreUniform});
  StatusOr<RreRouter> b = RreRouter::Create(TwoDomains(), {32000, 1234, TableBuilder::kRreUniform});
  StatusOr<RreRouter> other =
      RreRouter::Create(TwoDomains(), {32000, 1235, TableBuilder::kRreUniform});
  ASSERT_TRUE(a.ok() && b.ok() && other.ok());
  auto table_crc = [](const RreRouter& r, uint32_t layer, size_t domain) {
    return Crc32c(r.LocalTable(layer, domain), r.vocab_size() * sizeof(uint16_t));
  };
  for (uint32_t layer = 0; layer < 3; ++layer) {
    for (size_t d = 0; d < 2; ++d) EXPECT_EQ(table_crc(*a, layer, d), table_crc(*b, layer, d));
    EXPECT_NE(table_crc(*a, layer, 0), table_crc(*other, layer, 0));
  }
  EXPECT_NE(table_crc(*a, 0, 0), table_crc(*a, 1, 0)) << "layers are independent";
  // Golden values, pinned from this implementation: a change here changes every saved model's
  // routing, so it must be deliberate (and bump the table file format).
  EXPECT_EQ(table_crc(*a, 0, 0), 0x5E8814A7u);
  EXPECT_EQ(table_crc(*a, 2, 1), 0x6EE17E73u);
  EXPECT_EQ(*a->Route(1, 5, 31999),
            a->domains().domains()[1].groups[1].first + a->LocalTable(1, 1)[31999]);
}

TEST(RreRouterTest, AddingOrRemovingADomainChangesNoOtherRoute) {
  for (TableBuilder builder : {TableBuilder::kRreUniform, TableBuilder::kRreFrequency,
                               TableBuilder::kHashRandom, TableBuilder::kHashBalanced}) {
    const uint32_t vocab = 5000;
    DomainFrequencies frequencies = {{0, Zipf(vocab)}, {5, Zipf(vocab, 0.9)}};
    StatusOr<RreRouter> router = RreRouter::Create(TwoDomains(), {vocab, 7, builder}, frequencies);
    ASSERT_TRUE(router.ok()) << router.status();
    auto routes_of = [&](uint32_t domain) {
      std::vector<uint32_t> routes;
      for (uint32_t layer = 0; layer < 3; ++layer) {
        for (uint32_t token = 0; token < vocab; ++token) {
          routes.push_back(*router->Route(layer, domain, token));
        }
      }
      return routes;
    };
    const std::vector<uint32_t> before = routes_of(0);
    std::vector<double> new_frequencies = Zipf(vocab, 1.3);
    ASSERT_TRUE(router->AddDomain("english", 9, {16, 16, 16}, &new_frequencies).ok());
    EXPECT_EQ(routes_of(0), before) << TableBuilderName(builder);
    ASSERT_TRUE(router->RemoveDomain(5).ok());
    EXPECT_EQ(routes_of(0), before) << TableBuilderName(builder);
    EXPECT_EQ(router->Route(0, 5, 0).status().code(), StatusCode::kNotFound);
    // A failed add changes nothing.
    EXPECT_FALSE(router->AddDomain("english", 10, {1, 1, 1}, &new_frequencies).ok());
    EXPECT_EQ(routes_of(0), before);
  }
}

TEST(RreRouterTest, FrequencyAwareBuilderEvensExpectedLoad) {
  const uint32_t vocab = 20000;
  const std::vector<double> f = Zipf(vocab);
  DomainMap map = *DomainMap::Create(1);
  ASSERT_TRUE(map.AddDomainUniform("text", 0, 16).ok());
  double imbalance[4];
  for (TableBuilder builder : {TableBuilder::kRreUniform, TableBuilder::kRreFrequency,
                               TableBuilder::kHashRandom, TableBuilder::kHashBalanced}) {
    StatusOr<RreRouter> router = RreRouter::Create(map, {vocab, 3, builder}, {{0, f}});
    ASSERT_TRUE(router.ok()) << router.status();
    const std::vector<double> load = *router->ExpectedLoad(0, 0, f);
    imbalance[static_cast<int>(builder)] = Summarize(load).imbalance();
    if (builder == TableBuilder::kRreFrequency) {
      // Greedy LPT: no expert exceeds the mean by more than the largest single token.
      const double largest = *std::max_element(f.begin(), f.end());
      EXPECT_LE(Summarize(load).max, Summarize(load).mean + largest);
    }
  }
  EXPECT_LT(imbalance[1], imbalance[0]) << "frequency-aware beats uniform on Zipf text";
  EXPECT_LT(imbalance[3], imbalance[2]) << "balanced hash beats random hash";
  EXPECT_GE(imbalance[1], 1.0);
}

TEST(RreRouterTest, BadInputIsAnError) {
  StatusOr<RreRouter> router =
      RreRouter::Create(TwoDomains(), {1000, 1, TableBuilder::kRreUniform});
  ASSERT_TRUE(router.ok());
  Status token = router->Route(0, 0, 1000).status();
  EXPECT_EQ(token.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(token.message().find("token id 1000"), std::string_view::npos);
  EXPECT_EQ(router->Route(3, 0, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Route(0, 4, 1).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(RreRouter::Create(TwoDomains(), {0, 1, TableBuilder::kRreUniform}).status().code(),
            StatusCode::kInvalidArgument);
  Status missing = RreRouter::Create(TwoDomains(), {1000, 1, TableBuilder::kRreFrequency}).status();
  EXPECT_EQ(missing.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(missing.message().find("chinese"), std::string_view::npos) << missing;
  std::vector<double> negative(1000, 1.0);
  negative[17] = -1;
  EXPECT_EQ(RreRouter::Create(TwoDomains(), {1000, 1, TableBuilder::kRreFrequency},
                              {{0, negative}, {5, negative}})
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RreRouter::Create(TwoDomains(), {4, 1, TableBuilder::kRreUniform}).status().code(),
            StatusCode::kInvalidArgument)
      << "a group larger than the vocabulary";
  EXPECT_EQ(ParseTableBuilder("lsh").status().code(), StatusCode::kInvalidArgument);
}

class RouterFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ::testing::TempDir() + "/ecss_router_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".rrt";
    router_ = std::make_unique<RreRouter>(
        *RreRouter::Create(TwoDomains(), {3000, 42, TableBuilder::kRreUniform}));
    ASSERT_TRUE(router_->Save(path_).ok());
    bytes_ = *ReadFileToString(path_);
  }
  void Rewrite(const std::string& contents) {
    ASSERT_TRUE(WriteFileAtomically(path_, contents).ok());
  }

  std::string path_;
  std::unique_ptr<RreRouter> router_;
  std::string bytes_;
};

TEST_F(RouterFileTest, RoundTripIsExact) {
  StatusOr<RreRouter> loaded = RreRouter::Load(path_);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->options().seed, 42u);
  EXPECT_EQ(loaded->options().builder, TableBuilder::kRreUniform);
  ASSERT_EQ(loaded->domains().domains().size(), 2u);
  EXPECT_EQ(loaded->domains().domains()[1].name, "code");
  for (uint32_t layer = 0; layer < 3; ++layer) {
    for (uint32_t token = 0; token < 3000; token += 7) {
      for (uint32_t domain : {0u, 5u}) {
        ASSERT_EQ(*loaded->Route(layer, domain, token), *router_->Route(layer, domain, token));
      }
    }
  }
  EXPECT_TRUE(RreRouter::LoadFor(path_, 3000, 3).ok());
}

TEST_F(RouterFileTest, MismatchedModelIsRejectedWithBothValues) {
  Status vocab = RreRouter::LoadFor(path_, 50000, 3).status();
  EXPECT_EQ(vocab.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(vocab.message().find("vocabulary of 3000"), std::string_view::npos) << vocab;
  EXPECT_NE(vocab.message().find("50000"), std::string_view::npos) << vocab;
  Status layers = RreRouter::LoadFor(path_, 3000, 8).status();
  EXPECT_EQ(layers.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(layers.message().find("3 sparse layers"), std::string_view::npos) << layers;
}

TEST_F(RouterFileTest, TruncatedFilesAreRejected) {
  for (size_t length :
       {size_t{0}, size_t{10}, size_t{63}, size_t{64}, size_t{100}, bytes_.size() - 1}) {
    Rewrite(bytes_.substr(0, length));
    Status status = RreRouter::Load(path_).status();
    EXPECT_EQ(status.code(), StatusCode::kDataLoss) << length << ": " << status;
    EXPECT_NE(status.message().find("truncated"), std::string_view::npos) << status;
  }
  Rewrite(bytes_ + "x");
  EXPECT_EQ(RreRouter::Load(path_).status().code(), StatusCode::kDataLoss);
}

TEST_F(RouterFileTest, AlteredBytesAreRejected) {
  for (size_t offset :
       {size_t{12}, size_t{20}, size_t{40}, size_t{70}, bytes_.size() / 2, bytes_.size() - 1}) {
    std::string altered = bytes_;
    altered[offset] ^= 0x10;
    Rewrite(altered);
    Status status = RreRouter::Load(path_).status();
    EXPECT_EQ(status.code(), StatusCode::kDataLoss) << offset << ": " << status;
    EXPECT_NE(status.message().find("checksum mismatch"), std::string_view::npos) << status;
  }
  std::string wrong_magic = bytes_;
  wrong_magic[0] = 'X';
  Rewrite(wrong_magic);
  EXPECT_EQ(RreRouter::Load(path_).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RreRouter::Load(path_ + ".missing").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace ecss
