#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tools/text/corpus.h"
#include "tools/text/tokenizer.h"

namespace ecss::text {
namespace {

TEST(WordTokenizerTest, EncodesEveryByteAndPrefersKnownWords) {
  const std::string text = "int main() {\n    return main_value + main;\n}\n";
  StatusOr<WordTokenizer> tokenizer = WordTokenizer::Train({text}, 300);
  ASSERT_TRUE(tokenizer.ok());
  const std::vector<uint32_t> ids = tokenizer->Encode(text);
  std::string decoded;
  for (uint32_t id : ids) decoded += tokenizer->Piece(id);
  EXPECT_EQ(decoded, text) << "encoding is lossless";
  bool has_word = false;
  for (uint32_t id : ids) has_word |= id >= 256;
  EXPECT_TRUE(has_word);
  // Unknown words fall back to bytes; nothing is ever out of the vocabulary.
  for (uint32_t id : tokenizer->Encode("zebra\x01\xff")) EXPECT_LT(id, tokenizer->vocab_size());
  EXPECT_EQ(WordTokenizer::Train({text}, 256).status().code(), StatusCode::kInvalidArgument);
}

TEST(WordTokenizerTest, DeterministicAcrossRuns) {
  const std::vector<std::string_view> texts = {"b a a c c c", "d d d d a"};
  StatusOr<WordTokenizer> a = WordTokenizer::Train(texts, 1000);
  StatusOr<WordTokenizer> b = WordTokenizer::Train(texts, 1000);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->Encode("a b c d"), b->Encode("a b c d"));
}

TEST(TokenStatsTest, FrequenciesAndEntropy) {
  const std::vector<uint32_t> tokens = {0, 1, 2, 3, 0, 1, 2, 3};
  const std::vector<double> f = TokenFrequencies(tokens, 5);
  EXPECT_EQ(f, (std::vector<double>{2, 2, 2, 2, 0}));
  EXPECT_NEAR(UnigramEntropy(tokens, 5), std::log(4.0), 1e-12);
  EXPECT_NEAR(UnigramEntropy({7, 7, 7}, 8), 0.0, 1e-12);
}

TEST(CorpusTest, EveryDomainHasText) {
  CorpusOptions options;
  options.max_bytes_per_domain = 64 << 10;
  const std::vector<CorpusDomain> corpus = LoadMachineCorpus(options);
  ASSERT_EQ(corpus.size(), 5u);
  for (const CorpusDomain& domain : corpus) {
    EXPECT_FALSE(domain.text.empty()) << domain.name;
    // The byte budget is honoured up to one file's size.
    EXPECT_LE(domain.text.size(), (64u << 10) + (256u << 10) + 1) << domain.name;
  }
}

}  // namespace
}  // namespace ecss::text
