// WordTokenizer: a deterministic word-level tokenizer for the corpus tools. Pieces are runs of
// letters, digits and '_' ("words", with one leading space folded in: " word"), runs of
// 2-16 spaces or tabs (indentation), and single other bytes (punctuation, newlines). Ids
// 0..255 are the bytes themselves (so every text encodes), then the most frequent words of
// the training texts (ties in byte order) up to the vocabulary size. A word outside the
// vocabulary is spelled as its bytes. Thread-compatible; Encode is const.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/base/status.h"
#include "tools/text/corpus.h"

namespace ecss::text {

class WordTokenizer {
 public:
  // InvalidArgument when vocab_size <= 256 (the bytes alone take 256 ids).
  static StatusOr<WordTokenizer> Train(const std::vector<std::string_view>& texts,
                                       uint32_t vocab_size);

  std::vector<uint32_t> Encode(std::string_view text) const;
  // The text of a token id ("" for ids outside the vocabulary).
  std::string_view Piece(uint32_t id) const;
  uint32_t vocab_size() const { return static_cast<uint32_t>(pieces_.size()); }

 private:
  std::vector<std::string> pieces_;                  // id -> text
  std::unordered_map<std::string, uint32_t> words_;  // word -> id (>= 256)
};

// Unigram frequencies of `tokens` over a vocabulary of `vocab_size`.
// A tokenizer trained on every domain of `corpus`, and each domain's text encoded with it
// (tokens[d] is corpus[d]'s), as benchmarks and examples start from.
struct TokenizedCorpus {
  WordTokenizer tokenizer;
  std::vector<std::vector<uint32_t>> tokens;
};
StatusOr<TokenizedCorpus> TokenizeCorpus(const std::vector<CorpusDomain>& corpus,
                                         uint32_t vocab_size);

std::vector<double> TokenFrequencies(const std::vector<uint32_t>& tokens, uint32_t vocab_size);
// Shannon entropy, in nats, of the unigram distribution of `tokens`.
double UnigramEntropy(const std::vector<uint32_t>& tokens, uint32_t vocab_size);

}  // namespace ecss::text
