#include "router/rre_router.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <queue>

#include "runtime/base/check.h"
#include "runtime/base/checksum.h"
#include "runtime/base/file_util.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view TableBuilderName(TableBuilder builder) {
  switch (builder) {
    case TableBuilder::kRreUniform:
      return "rre-uniform";
    case TableBuilder::kRreFrequency:
      return "rre-frequency";
    case TableBuilder::kHashRandom:
      return "hash-random";
    case TableBuilder::kHashBalanced:
      return "hash-balanced";
  }
  return "invalid";
}

StatusOr<TableBuilder> ParseTableBuilder(std::string_view name) {
  for (TableBuilder builder : {TableBuilder::kRreUniform, TableBuilder::kRreFrequency,
                               TableBuilder::kHashRandom, TableBuilder::kHashBalanced}) {
    if (TableBuilderName(builder) == name) return builder;
  }
  return InvalidArgumentError(StrCat("unknown table builder '", name,
                                     "' (rre-uniform, rre-frequency, hash-random, hash-balanced)"));
}

bool BuilderUsesFrequencies(TableBuilder builder) {
  return builder == TableBuilder::kRreFrequency || builder == TableBuilder::kHashBalanced;
}

LoadSummary Summarize(const std::vector<double>& loads) {
  LoadSummary summary;
  if (loads.empty()) return summary;
  double total = 0;
  for (double load : loads) {
    summary.max = std::max(summary.max, load);
    total += load;
  }
  summary.mean = total / static_cast<double>(loads.size());
  return summary;
}

namespace {

// One independent stream per (layer, domain id): a domain's tables never depend on others.
uint64_t TableStream(uint32_t layer, uint32_t domain_id) { return MixBits(layer, domain_id); }

// A token order for the frequency builders: descending frequency, ties in a random order of
// this layer's stream (so that equal-frequency tokens do not land identically in every layer).
std::vector<uint32_t> FrequencyOrder(const std::vector<double>& frequencies, CounterRng& rng) {
  std::vector<uint32_t> tie_break(frequencies.size());
  for (uint32_t& key : tie_break) key = rng.Next32();
  std::vector<uint32_t> order(frequencies.size());
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    if (frequencies[a] != frequencies[b]) return frequencies[a] > frequencies[b];
    if (tie_break[a] != tie_break[b]) return tie_break[a] < tie_break[b];
    return a < b;
  });
  return order;
}

void BuildUniform(uint32_t vocab, uint32_t group, CounterRng& rng, uint16_t* table) {
  std::vector<uint32_t> permutation(vocab);
  std::iota(permutation.begin(), permutation.end(), 0u);
  for (uint32_t i = vocab - 1; i > 0; --i)
    std::swap(permutation[i], permutation[rng.Uniform(i + 1)]);
  for (uint32_t position = 0; position < vocab; ++position) {
    table[permutation[position]] = static_cast<uint16_t>(position % group);
  }
}

void BuildFrequency(const std::vector<double>& frequencies, uint32_t group, CounterRng& rng,
                    uint16_t* table) {
  // Min-heap of (expected load, token ids, expert): largest token first onto the least loaded
  // expert, ties to the one with fewest ids, then the lowest index.
  using Entry = std::tuple<double, uint32_t, uint32_t>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
  for (uint32_t expert = 0; expert < group; ++expert) heap.emplace(0.0, 0u, expert);
  for (uint32_t token : FrequencyOrder(frequencies, rng)) {
    auto [load, ids, expert] = heap.top();
    heap.pop();
    table[token] = static_cast<uint16_t>(expert);
    heap.emplace(load + frequencies[token], ids + 1, expert);
  }
}

uint32_t HashToExpert(uint64_t seed, uint32_t layer, uint32_t domain, uint32_t token, uint32_t salt,
                      uint32_t group) {
  const uint64_t hash =
      MixBits(MixBits(seed, TableStream(layer, domain)), (uint64_t{salt} << 32) | token);
  return static_cast<uint32_t>(((hash >> 32) * group) >> 32);
}

void BuildHashRandom(uint64_t seed, uint32_t layer, uint32_t domain, uint32_t vocab, uint32_t group,
                     uint16_t* table) {
  for (uint32_t token = 0; token < vocab; ++token) {
    table[token] = static_cast<uint16_t>(HashToExpert(seed, layer, domain, token, 0, group));
  }
}

void BuildHashBalanced(const std::vector<double>& frequencies, uint64_t seed, uint32_t layer,
                       uint32_t domain, uint32_t group, CounterRng& rng, uint16_t* table) {
  std::vector<double> load(group, 0.0);
  std::vector<uint32_t> ids(group, 0);
  for (uint32_t token : FrequencyOrder(frequencies, rng)) {
    const uint32_t a = HashToExpert(seed, layer, domain, token, 1, group);
    const uint32_t b = HashToExpert(seed, layer, domain, token, 2, group);
    const bool take_b = load[b] < load[a] || (load[b] == load[a] && ids[b] < ids[a]);
    const uint32_t expert = take_b ? b : a;
    table[token] = static_cast<uint16_t>(expert);
    load[expert] += frequencies[token];
    ++ids[expert];
  }
}

Status CheckFrequencies(const DomainInfo& domain, const std::vector<double>* frequencies,
                        uint32_t vocab, TableBuilder builder) {
  if (!BuilderUsesFrequencies(builder)) return Status::Ok();
  if (frequencies == nullptr) {
    return InvalidArgumentError(StrCat("domain '", domain.name,
                                       "' has no token frequencies, which ", "builder ",
                                       TableBuilderName(builder), " needs"));
  }
  if (frequencies->size() != vocab) {
    return InvalidArgumentError(StrCat("domain '", domain.name, "': ", frequencies->size(),
                                       " token frequencies for a vocabulary of ", vocab));
  }
  for (size_t token = 0; token < frequencies->size(); ++token) {
    const double f = (*frequencies)[token];
    if (!(f >= 0) || !std::isfinite(f)) {
      return InvalidArgumentError(StrCat("domain '", domain.name, "': frequency of token ", token,
                                         " is ", f, " (must be finite and >= 0)"));
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<std::vector<uint16_t>> RreRouter::BuildDomainTables(
    const DomainInfo& domain, const std::vector<double>* frequencies) const {
  const uint32_t vocab = options_.vocab_size;
  ECSS_RETURN_IF_ERROR(CheckFrequencies(domain, frequencies, vocab, options_.builder));
  std::vector<uint16_t> tables(DomainTableBytes(vocab, num_layers()) / sizeof(uint16_t));
  for (uint32_t layer = 0; layer < num_layers(); ++layer) {
    const uint32_t group = domain.groups[layer].count;
    if (group > vocab) {
      return InvalidArgumentError(StrCat("domain '", domain.name, "' has ", group,
                                         " experts in layer ", layer, " but the vocabulary only ",
                                         vocab, " tokens"));
    }
    CounterRng rng(options_.seed, TableStream(layer, domain.id));
    uint16_t* table = tables.data() + static_cast<size_t>(layer) * vocab;
    switch (options_.builder) {
      case TableBuilder::kRreUniform:
        BuildUniform(vocab, group, rng, table);
        break;
      case TableBuilder::kRreFrequency:
        BuildFrequency(*frequencies, group, rng, table);
        break;
      case TableBuilder::kHashRandom:
        BuildHashRandom(options_.seed, layer, domain.id, vocab, group, table);
        break;
      case TableBuilder::kHashBalanced:
        BuildHashBalanced(*frequencies, options_.seed, layer, domain.id, group, rng, table);
        break;
    }
  }
  return tables;
}

StatusOr<RreRouter> RreRouter::Create(DomainMap domains, const RouterOptions& options,
                                      const DomainFrequencies& frequencies) {
  if (options.vocab_size == 0) return InvalidArgumentError("router vocab_size must be > 0");
  RreRouter router(std::move(domains), options);
  for (const DomainInfo& domain : router.domains_.domains()) {
    auto found = frequencies.find(domain.id);
    ECSS_ASSIGN_OR_RETURN(
        std::vector<uint16_t> tables,
        router.BuildDomainTables(domain, found == frequencies.end() ? nullptr : &found->second));
    router.tables_.push_back(std::move(tables));
  }
  return router;
}

Status RreRouter::AddDomain(std::string_view name, uint32_t id,
                            const std::vector<uint32_t>& group_sizes,
                            const std::vector<double>* frequencies) {
  DomainMap updated = domains_;
  ECSS_RETURN_IF_ERROR(updated.AddDomain(name, id, group_sizes));
  ECSS_ASSIGN_OR_RETURN(size_t index, updated.IndexOf(id));
  ECSS_ASSIGN_OR_RETURN(std::vector<uint16_t> tables,
                        BuildDomainTables(updated.domains()[index], frequencies));
  // Commit only after everything succeeded: a failed add changes nothing.
  domains_ = std::move(updated);
  tables_.insert(tables_.begin() + static_cast<long>(index), std::move(tables));
  return Status::Ok();
}

Status RreRouter::RemoveDomain(uint32_t id) {
  ECSS_ASSIGN_OR_RETURN(size_t index, domains_.IndexOf(id));
  ECSS_RETURN_IF_ERROR(domains_.RemoveDomain(id));
  tables_.erase(tables_.begin() + static_cast<long>(index));
  return Status::Ok();
}

StatusOr<uint32_t> RreRouter::Route(uint32_t layer, uint32_t domain_id, uint32_t token) const {
  if (layer >= num_layers()) {
    return InvalidArgumentError(
        StrCat("sparse layer ", layer, " out of range (", num_layers(), " layers)"));
  }
  if (token >= options_.vocab_size) {
    return InvalidArgumentError(
        StrCat("token id ", token, " is out of the vocabulary of ", options_.vocab_size));
  }
  ECSS_ASSIGN_OR_RETURN(size_t index, domains_.IndexOf(domain_id));
  return domains_.domains()[index].groups[layer].first + LocalTable(layer, index)[token];
}

StatusOr<std::vector<double>> RreRouter::ExpectedLoad(
    uint32_t layer, uint32_t domain_id, const std::vector<double>& frequencies) const {
  ECSS_ASSIGN_OR_RETURN(size_t index, domains_.IndexOf(domain_id));
  if (layer >= num_layers() || frequencies.size() != options_.vocab_size) {
    return InvalidArgumentError("ExpectedLoad: layer out of range or frequencies mis-sized");
  }
  std::vector<double> load(domains_.domains()[index].groups[layer].count, 0.0);
  const uint16_t* table = LocalTable(layer, index);
  for (uint32_t token = 0; token < options_.vocab_size; ++token)
    load[table[token]] += frequencies[token];
  return load;
}

StatusOr<std::vector<uint32_t>> RreRouter::TokenIdCounts(uint32_t layer, uint32_t domain_id) const {
  ECSS_ASSIGN_OR_RETURN(size_t index, domains_.IndexOf(domain_id));
  if (layer >= num_layers()) return InvalidArgumentError("TokenIdCounts: layer out of range");
  std::vector<uint32_t> counts(domains_.domains()[index].groups[layer].count, 0);
  const uint16_t* table = LocalTable(layer, index);
  for (uint32_t token = 0; token < options_.vocab_size; ++token) ++counts[table[token]];
  return counts;
}

// ---- Persistence ------------------------------------------------------------------------
//
// Note [Routing table file format]
// Little-endian. A 64-byte header, then the payload:
//   header:  magic "ECSSRRT\0" | u32 version | u32 header bytes (64) | u32 vocab | u32 layers
//            | u32 domains | u32 builder | u64 seed | u64 payload bytes | u32 payload crc32c
//            | u32 header crc32c (of the 52 bytes before it) | 4 bytes zero
//   payload: u32 layer end (next expert index) per layer;
//            per domain: u32 id, u32 name bytes, name, per layer u32 first, u32 count;
//            per domain: u16 local expert per (layer, token).
// Every value is checked on load (group counts, local indices < group size) after both
// checksums, so a file is either loaded whole or rejected with what was wrong.

namespace {

constexpr char kMagic[8] = {'E', 'C', 'S', 'S', 'R', 'R', 'T', '\0'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 64;
constexpr size_t kHeaderChecksumOffset = 52;  // the header checksum covers the bytes before it

struct Header {
  uint32_t version = kFormatVersion;
  uint32_t vocab = 0;
  uint32_t layers = 0;
  uint32_t domains = 0;
  uint32_t builder = 0;
  uint64_t seed = 0;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc = 0;
};

class Writer {
 public:
  template <typename T>
  void Put(T value) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(out.data() + at, &value, sizeof(T));
  }
  void PutBytes(const void* data, size_t bytes) {
    const auto* begin = static_cast<const char*>(data);
    out.append(begin, bytes);
  }
  std::string out;
};

class Reader {
 public:
  Reader(std::string_view data, std::string path) : data_(data), path_(std::move(path)) {}
  template <typename T>
  Status Get(T* value, std::string_view what) {
    if (data_.size() - offset_ < sizeof(T)) return Truncated(what);
    std::memcpy(value, data_.data() + offset_, sizeof(T));
    offset_ += sizeof(T);
    return Status::Ok();
  }
  Status GetBytes(void* dst, size_t bytes, std::string_view what) {
    if (data_.size() - offset_ < bytes) return Truncated(what);
    std::memcpy(dst, data_.data() + offset_, bytes);
    offset_ += bytes;
    return Status::Ok();
  }
  size_t remaining() const { return data_.size() - offset_; }

 private:
  Status Truncated(std::string_view what) const {
    return DataLossError(StrCat("routing table file '", path_, "' is truncated: ", what,
                                " at payload offset ", offset_, " runs past its end"));
  }
  std::string_view data_;
  std::string path_;
  size_t offset_ = 0;
};

std::string EncodeHeader(const Header& h) {
  Writer w;
  w.PutBytes(kMagic, sizeof(kMagic));
  w.Put(h.version);
  w.Put(static_cast<uint32_t>(kHeaderBytes));
  w.Put(h.vocab);
  w.Put(h.layers);
  w.Put(h.domains);
  w.Put(h.builder);
  w.Put(h.seed);
  w.Put(h.payload_bytes);
  w.Put(h.payload_crc);
  ECSS_CHECK(w.out.size() == kHeaderChecksumOffset);
  w.Put(Crc32c(w.out.data(), w.out.size()));
  w.out.resize(kHeaderBytes, '\0');
  return w.out;
}

}  // namespace

Status RreRouter::Save(const std::string& path) const {
  Writer payload;
  for (uint32_t layer = 0; layer < num_layers(); ++layer)
    payload.Put(domains_.experts_in_layer(layer));
  for (const DomainInfo& domain : domains_.domains()) {
    payload.Put(domain.id);
    payload.Put(static_cast<uint32_t>(domain.name.size()));
    payload.PutBytes(domain.name.data(), domain.name.size());
    for (const ExpertRange& group : domain.groups) {
      payload.Put(group.first);
      payload.Put(group.count);
    }
  }
  for (const std::vector<uint16_t>& tables : tables_) {
    payload.PutBytes(tables.data(), tables.size() * sizeof(uint16_t));
  }
  Header header;
  header.vocab = options_.vocab_size;
  header.layers = num_layers();
  header.domains = static_cast<uint32_t>(domains_.domains().size());
  header.builder = static_cast<uint32_t>(options_.builder);
  header.seed = options_.seed;
  header.payload_bytes = payload.out.size();
  header.payload_crc = Crc32c(payload.out.data(), payload.out.size());
  return WriteFileAtomically(path, EncodeHeader(header) + payload.out);
}

StatusOr<RreRouter> RreRouter::Load(const std::string& path) {
  ECSS_ASSIGN_OR_RETURN(std::string contents, ReadFileToString(path));
  auto invalid = [&](std::string_view why) {
    return InvalidArgumentError(StrCat("routing table file '", path, "': ", why));
  };
  if (contents.size() < kHeaderBytes) {
    return DataLossError(StrCat("routing table file '", path, "' is truncated: ", contents.size(),
                                " bytes, the header alone is ", kHeaderBytes));
  }
  if (std::memcmp(contents.data(), kMagic, sizeof(kMagic)) != 0) {
    return invalid("not a routing table file (bad magic)");
  }
  const std::string_view all = contents;
  Reader header_reader(all.substr(sizeof(kMagic), kHeaderBytes), path);
  Header h;
  uint32_t header_bytes = 0;
  uint32_t header_crc = 0;
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.version, "version"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&header_bytes, "header size"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.vocab, "vocab"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.layers, "layers"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.domains, "domains"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.builder, "builder"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.seed, "seed"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.payload_bytes, "payload size"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&h.payload_crc, "payload checksum"));
  ECSS_RETURN_IF_ERROR(header_reader.Get(&header_crc, "header checksum"));
  if (Crc32c(contents.data(), kHeaderChecksumOffset) != header_crc) {
    return DataLossError(StrCat("routing table file '", path, "': header checksum mismatch"));
  }
  if (h.version != kFormatVersion) {
    return invalid(StrCat("format version ", h.version, " is not supported (this build reads ",
                          kFormatVersion, ")"));
  }
  if (header_bytes != kHeaderBytes) return invalid(StrCat("header size ", header_bytes));
  if (contents.size() - kHeaderBytes != h.payload_bytes) {
    return DataLossError(
        StrCat("routing table file '", path, "' is ",
               contents.size() - kHeaderBytes < h.payload_bytes ? "truncated" : "too long",
               ": payload is ", contents.size() - kHeaderBytes, " bytes, the header says ",
               h.payload_bytes));
  }
  const std::string_view payload = all.substr(kHeaderBytes);
  if (Crc32c(payload.data(), payload.size()) != h.payload_crc) {
    return DataLossError(StrCat("routing table file '", path, "': payload checksum mismatch"));
  }
  if (h.builder > static_cast<uint32_t>(TableBuilder::kHashBalanced)) {
    return invalid(StrCat("unknown builder ", h.builder));
  }
  if (h.vocab == 0 || h.layers == 0) return invalid("zero vocabulary or layers");

  Reader reader(payload, path);
  std::vector<uint32_t> layer_ends(h.layers);
  for (uint32_t& end : layer_ends) ECSS_RETURN_IF_ERROR(reader.Get(&end, "layer ends"));
  std::vector<DomainInfo> domains(h.domains);
  for (DomainInfo& domain : domains) {
    uint32_t name_bytes = 0;
    ECSS_RETURN_IF_ERROR(reader.Get(&domain.id, "domain id"));
    ECSS_RETURN_IF_ERROR(reader.Get(&name_bytes, "domain name size"));
    if (name_bytes > reader.remaining()) return invalid("domain name runs past the end");
    domain.name.resize(name_bytes);
    ECSS_RETURN_IF_ERROR(reader.GetBytes(domain.name.data(), name_bytes, "domain name"));
    domain.groups.resize(h.layers);
    for (ExpertRange& group : domain.groups) {
      ECSS_RETURN_IF_ERROR(reader.Get(&group.first, "group first expert"));
      ECSS_RETURN_IF_ERROR(reader.Get(&group.count, "group size"));
    }
  }
  StatusOr<DomainMap> map = DomainMap::FromParts(h.layers, std::move(layer_ends), domains);
  if (!map.ok()) return invalid(map.status().message());
  RouterOptions options{h.vocab, h.seed, static_cast<TableBuilder>(h.builder)};
  RreRouter router(std::move(map).value(), options);
  const size_t table_entries = static_cast<size_t>(h.vocab) * h.layers;
  for (const DomainInfo& domain : router.domains_.domains()) {
    std::vector<uint16_t> tables(table_entries);
    ECSS_RETURN_IF_ERROR(reader.GetBytes(tables.data(), table_entries * sizeof(uint16_t),
                                         StrCat("tables of domain '", domain.name, "'")));
    for (uint32_t layer = 0; layer < h.layers; ++layer) {
      const uint32_t group = domain.groups[layer].count;
      const uint16_t* table = tables.data() + static_cast<size_t>(layer) * h.vocab;
      for (uint32_t token = 0; token < h.vocab; ++token) {
        if (table[token] >= group) {
          return DataLossError(StrCat("routing table file '", path, "': domain '", domain.name,
                                      "' layer ", layer, " routes token ", token, " to expert ",
                                      table[token], " of a group of ", group));
        }
      }
    }
    router.tables_.push_back(std::move(tables));
  }
  if (reader.remaining() != 0) return invalid(StrCat(reader.remaining(), " trailing bytes"));
  return router;
}

StatusOr<RreRouter> RreRouter::LoadFor(const std::string& path, uint32_t vocab_size,
                                       uint32_t num_layers) {
  ECSS_ASSIGN_OR_RETURN(RreRouter router, Load(path));
  if (router.vocab_size() != vocab_size) {
    return FailedPreconditionError(StrCat("routing table file '", path,
                                          "' was made for a vocabulary of ", router.vocab_size(),
                                          " tokens; this model has ", vocab_size));
  }
  if (router.num_layers() != num_layers) {
    return FailedPreconditionError(StrCat("routing table file '", path, "' was made for ",
                                          router.num_layers(), " sparse layers; this model has ",
                                          num_layers));
  }
  return router;
}

}  // namespace ecss
