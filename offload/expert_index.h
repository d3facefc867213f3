// ExpertIndex: the one mapping between an expert's identity, (layer, expert), and the dense
// index that per-expert tables (the store's files and regions, the updater's entries) use:
// layer-major, and layers may have different expert counts. Nothing else computes
// `layer * experts_per_layer`. Immutable after construction; thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace ecss {

// Who an expert is: the unit the store, the device cache, the prefetcher, the stager and the
// plans key their tables by. Ordered layer-major; hashable.
struct ExpertId {
  uint32_t layer = 0;
  uint32_t expert = 0;  // within the layer
  friend bool operator==(ExpertId a, ExpertId b) {
    return a.layer == b.layer && a.expert == b.expert;
  }
  friend bool operator!=(ExpertId a, ExpertId b) { return !(a == b); }
  friend bool operator<(ExpertId a, ExpertId b) {
    return a.layer != b.layer ? a.layer < b.layer : a.expert < b.expert;
  }
};

class ExpertIndex {
 public:
  ExpertIndex() = default;
  explicit ExpertIndex(std::vector<uint32_t> experts_per_layer);

  uint32_t size() const { return first_.empty() ? 0 : first_.back(); }  // experts in all
  uint32_t layers() const { return static_cast<uint32_t>(counts_.size()); }
  uint32_t experts_in_layer(uint32_t layer) const {
    return layer < counts_.size() ? counts_[layer] : 0;
  }
  bool Contains(ExpertId id) const {
    return id.layer < counts_.size() && id.expert < counts_[id.layer];
  }
  // REQUIRES: Contains(id) / index < size().
  uint32_t Flat(ExpertId id) const { return first_[id.layer] + id.expert; }
  ExpertId Id(uint32_t index) const;
  // "expert (layer, expert)", for error messages.
  std::string Name(uint32_t index) const;

 private:
  std::vector<uint32_t> counts_;
  std::vector<uint32_t> first_;  // [layers + 1]: the index of each layer's expert 0
};

}  // namespace ecss

template <>
struct std::hash<ecss::ExpertId> {
  size_t operator()(ecss::ExpertId id) const noexcept {
    return std::hash<uint64_t>()((uint64_t{id.layer} << 32) | id.expert);
  }
};
