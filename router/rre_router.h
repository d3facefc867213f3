// RreRouter: RRE level 2, PanGu-Σ's Random Routed Experts. For every sparse layer and domain,
// a fixed table token id -> expert of the domain's group. Routing is a pure function of
// (layer, domain, token): the experts a batch needs are known before its forward pass.
//
// A domain's tables depend only on (seed, layer, domain id, group size, vocabulary, builder,
// and for the frequency-aware builders that domain's token frequencies), never on other
// domains, so adding or removing a domain leaves every other route bit for bit as it was.
// Random numbers come from a counter-based generator (runtime/base/random.h): the same seed
// gives the same tables on every platform and build.
//
// Builders (the same interface, a setting):
//   kRreUniform    random permutation of the vocabulary dealt round-robin: expert token-id
//                  counts differ by at most one (PanGu-Σ);
//   kRreFrequency  tokens by descending corpus frequency, each onto the expert with the least
//                  expected load (greedy LPT, ties to the fewest ids): evens expected load;
//   kHashRandom    a random hash of the token id (Roller et al.'s Hash Layers);
//   kHashBalanced  frequency-ordered two-choice hashing: each token takes the less loaded of
//                  two hashed experts (Hash Layers' balanced variant).
// Thread-compatible: const methods may run concurrently.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "router/domain_map.h"
#include "runtime/base/status.h"

namespace ecss {

enum class TableBuilder : uint8_t {
  kRreUniform = 0,
  kRreFrequency = 1,
  kHashRandom = 2,
  kHashBalanced = 3
};
std::string_view TableBuilderName(TableBuilder builder);  // "rre-uniform", ...
StatusOr<TableBuilder> ParseTableBuilder(std::string_view name);
// Whether the builder needs token frequencies.
bool BuilderUsesFrequencies(TableBuilder builder);

struct RouterOptions {
  uint32_t vocab_size = 0;  // token ids are [0, vocab_size); > 0
  uint64_t seed = 0;
  TableBuilder builder = TableBuilder::kRreUniform;
};

// Token frequencies (counts or probabilities, >= 0, one per token id) per domain id.
using DomainFrequencies = std::map<uint32_t, std::vector<double>>;

// Max and mean over a group's experts, and their ratio (1.0 = perfectly even).
struct LoadSummary {
  double max = 0;
  double mean = 0;
  double imbalance() const { return mean > 0 ? max / mean : 0; }
};
LoadSummary Summarize(const std::vector<double>& loads);

class RreRouter {
 public:
  // InvalidArgument for a zero vocabulary, missing or mis-sized frequencies (frequency
  // builders), or a group larger than the vocabulary.
  static StatusOr<RreRouter> Create(DomainMap domains, const RouterOptions& options,
                                    const DomainFrequencies& frequencies = {});

  // Adds a domain (DomainMap::AddDomain) and builds its tables; nothing else changes.
  Status AddDomain(std::string_view name, uint32_t id, const std::vector<uint32_t>& group_sizes,
                   const std::vector<double>* frequencies = nullptr);
  Status RemoveDomain(uint32_t id);

  // The global expert of `layer` that `token` of `domain_id` goes to. InvalidArgument for a
  // layer or token out of range; NotFound for an unknown domain.
  StatusOr<uint32_t> Route(uint32_t layer, uint32_t domain_id, uint32_t token) const;

  // The memory one domain's tables take (every layer's), and every domain's now: resident
  // host memory that grows with domains x layers x vocabulary (the session's memory plan
  // lists it).
  static uint64_t DomainTableBytes(uint32_t vocab, uint32_t layers) {
    return uint64_t{vocab} * layers * sizeof(uint16_t);
  }
  uint64_t table_bytes() const {
    return tables_.size() * DomainTableBytes(options_.vocab_size, num_layers());
  }

  // Hot path for plan building: the local table (vocab entries, group-local expert index) of
  // the domain at `domain_index` (its position in domains().domains()).
  const uint16_t* LocalTable(uint32_t layer, size_t domain_index) const {
    return tables_[domain_index].data() + static_cast<size_t>(layer) * options_.vocab_size;
  }

  // Expected load per expert of the domain's group in `layer` under `frequencies`.
  StatusOr<std::vector<double>> ExpectedLoad(uint32_t layer, uint32_t domain_id,
                                             const std::vector<double>& frequencies) const;
  // Token ids per expert of the group (what kRreUniform balances).
  StatusOr<std::vector<uint32_t>> TokenIdCounts(uint32_t layer, uint32_t domain_id) const;

  const DomainMap& domains() const { return domains_; }
  const RouterOptions& options() const { return options_; }
  uint32_t vocab_size() const { return options_.vocab_size; }
  uint32_t num_layers() const { return domains_.num_layers(); }

  // Saves the domain map and every table with a checksummed header; atomic (temp + rename).
  Status Save(const std::string& path) const;
  // Loads and verifies a file written by Save: a truncated or altered file is DataLoss or
  // InvalidArgument naming what is wrong; never a partially loaded router.
  static StatusOr<RreRouter> Load(const std::string& path);
  // Load, then FailedPrecondition when the file was made for another vocabulary or number of
  // sparse layers (the message names both values).
  static StatusOr<RreRouter> LoadFor(const std::string& path, uint32_t vocab_size,
                                     uint32_t num_layers);

 private:
  RreRouter(DomainMap domains, const RouterOptions& options)
      : domains_(std::move(domains)), options_(options) {}
  // Builds the tables of one domain for every layer: [layers * vocab] local indices.
  StatusOr<std::vector<uint16_t>> BuildDomainTables(const DomainInfo& domain,
                                                    const std::vector<double>* frequencies) const;

  DomainMap domains_;
  RouterOptions options_;
  std::vector<std::vector<uint16_t>> tables_;  // parallel to domains_.domains()
};

}  // namespace ecss
