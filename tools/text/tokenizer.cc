#include "tools/text/tokenizer.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "runtime/base/str_cat.h"

namespace ecss::text {

namespace {

bool IsWordByte(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

// Calls `piece(text, is_word)` for each piece of `text` in order.
template <typename Fn>
void Split(std::string_view text, Fn&& piece) {
  size_t i = 0;
  while (i < text.size()) {
    // A single space joins the word after it (" word"), as in byte-level BPE vocabularies, so
    // that spaces do not become the dominant token.
    const bool spaced_word = text[i] == ' ' && i + 1 < text.size() &&
                             IsWordByte(static_cast<unsigned char>(text[i + 1]));
    if (spaced_word || IsWordByte(static_cast<unsigned char>(text[i]))) {
      size_t end = i + 1;
      while (end < text.size() && IsWordByte(static_cast<unsigned char>(text[end]))) ++end;
      piece(text.substr(i, end - i), true);
      i = end;
    } else if ((text[i] == ' ' || text[i] == '\t') && i + 1 < text.size() &&
               text[i + 1] == text[i]) {
      // A run of spaces or tabs (indentation) is one piece, up to 16 long.
      size_t end = i + 1;
      while (end < text.size() && end - i < 16 && text[end] == text[i]) ++end;
      piece(text.substr(i, end - i), true);
      i = end;
    } else {
      piece(text.substr(i, 1), false);
      ++i;
    }
  }
}

}  // namespace

StatusOr<WordTokenizer> WordTokenizer::Train(const std::vector<std::string_view>& texts,
                                             uint32_t vocab_size) {
  if (vocab_size <= 256) {
    return InvalidArgumentError(StrCat("tokenizer vocab_size ", vocab_size, " must exceed 256"));
  }
  std::map<std::string, uint64_t> counts;
  for (std::string_view text : texts) {
    Split(text, [&](std::string_view piece, bool is_word) {
      if (is_word && piece.size() > 1) ++counts[std::string(piece)];
    });
  }
  std::vector<std::pair<std::string, uint64_t>> ranked(counts.begin(), counts.end());
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const auto& a, const auto& b) { return a.second > b.second; });
  WordTokenizer tokenizer;
  for (int b = 0; b < 256; ++b) tokenizer.pieces_.emplace_back(1, static_cast<char>(b));
  for (const auto& [word, count] : ranked) {
    if (tokenizer.pieces_.size() >= vocab_size) break;
    tokenizer.words_.emplace(word, static_cast<uint32_t>(tokenizer.pieces_.size()));
    tokenizer.pieces_.push_back(word);
  }
  return tokenizer;
}

std::vector<uint32_t> WordTokenizer::Encode(std::string_view text) const {
  std::vector<uint32_t> ids;
  ids.reserve(text.size() / 3);
  Split(text, [&](std::string_view piece, bool is_word) {
    if (is_word) {
      auto it = words_.find(std::string(piece));
      if (it != words_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    for (char c : piece) ids.push_back(static_cast<unsigned char>(c));
  });
  return ids;
}

std::string_view WordTokenizer::Piece(uint32_t id) const {
  if (id >= pieces_.size()) return {};
  return pieces_[id];
}

std::vector<double> TokenFrequencies(const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
  std::vector<double> frequencies(vocab_size, 0.0);
  for (uint32_t t : tokens) {
    if (t < vocab_size) frequencies[t] += 1.0;
  }
  return frequencies;
}

double UnigramEntropy(const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
  const std::vector<double> counts = TokenFrequencies(tokens, vocab_size);
  double total = 0;
  for (double c : counts) total += c;
  double entropy = 0;
  for (double c : counts) {
    if (c > 0) entropy -= (c / total) * std::log(c / total);
  }
  return entropy;
}

StatusOr<TokenizedCorpus> TokenizeCorpus(const std::vector<CorpusDomain>& corpus,
                                         uint32_t vocab_size) {
  std::vector<std::string_view> texts;
  texts.reserve(corpus.size());
  for (const CorpusDomain& domain : corpus) texts.push_back(domain.text);
  ECSS_ASSIGN_OR_RETURN(WordTokenizer tokenizer, WordTokenizer::Train(texts, vocab_size));
  TokenizedCorpus out{std::move(tokenizer), {}};
  out.tokens.reserve(corpus.size());
  for (const CorpusDomain& domain : corpus) out.tokens.push_back(out.tokenizer.Encode(domain.text));
  return out;
}

}  // namespace ecss::text
