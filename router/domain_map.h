// DomainMap: RRE level 1. A sample's domain (Chinese, English, code, ...) owns a group of
// experts in every sparse layer; groups may differ in size between domains and layers.
// Expert indices are global within a layer and never move: a new domain's group is appended
// after every index the layer has ever used, and a removed domain leaves a hole that is never
// reused. So adding or removing a domain changes no other domain's experts (continual
// learning, sub-model extraction), and expert ids stay valid keys for checkpoints.
// Thread-compatible: const methods may be called concurrently; mutation needs exclusion.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/status.h"

namespace ecss {

// Experts [first, first + count) of one sparse layer.
struct ExpertRange {
  uint32_t first = 0;
  uint32_t count = 0;
  bool Contains(uint32_t expert) const { return expert >= first && expert - first < count; }
};

struct DomainInfo {
  std::string name;
  uint32_t id = 0;
  std::vector<ExpertRange> groups;  // one per sparse layer
};

class DomainMap {
 public:
  // REQUIRES: num_layers > 0 (checked by Create).
  static StatusOr<DomainMap> Create(uint32_t num_layers);

  // Adds a domain owning group_sizes[l] experts in layer l. InvalidArgument for an empty
  // name, a size list of the wrong length or a zero size; AlreadyExists for a taken name or id.
  Status AddDomain(std::string_view name, uint32_t id, const std::vector<uint32_t>& group_sizes);
  // The same group size in every layer. (A separate name, so that a braced size list never
  // silently picks this overload.)
  Status AddDomainUniform(std::string_view name, uint32_t id, uint32_t group_size);
  // NotFound for an unknown id. The domain's experts become a hole.
  Status RemoveDomain(uint32_t id);

  StatusOr<uint32_t> IdOf(std::string_view name) const;
  // NotFound naming the id and the known domains.
  StatusOr<const DomainInfo*> Find(uint32_t id) const;
  // Position of the domain in domains(), or NotFound.
  StatusOr<size_t> IndexOf(uint32_t id) const;

  uint32_t num_layers() const { return num_layers_; }
  // One past the highest expert index ever assigned in `layer` (holes included).
  uint32_t experts_in_layer(uint32_t layer) const { return next_expert_[layer]; }
  // Sorted by id.
  const std::vector<DomainInfo>& domains() const { return domains_; }

  // Rebuilds a map exactly (expert placement included) from persisted parts; validates that
  // groups lie below the layer ends and do not overlap.
  static StatusOr<DomainMap> FromParts(uint32_t num_layers, std::vector<uint32_t> next_expert,
                                       std::vector<DomainInfo> domains);

 private:
  explicit DomainMap(uint32_t num_layers) : num_layers_(num_layers), next_expert_(num_layers, 0) {}
  std::string KnownDomains() const;

  uint32_t num_layers_;
  std::vector<uint32_t> next_expert_;  // per layer
  std::vector<DomainInfo> domains_;    // sorted by id
};

}  // namespace ecss
