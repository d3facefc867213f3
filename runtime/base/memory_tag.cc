#include "runtime/base/memory_tag.h"

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {
constexpr std::array<std::string_view, kNumMemoryTags> kTagNames = {
    "expert_weights", "master_weights", "optimizer_moments", "gradients",
    "staging",        "activations",    "workspace",         "other"};
}  // namespace

std::string_view MemoryTagName(MemoryTag tag) {
  const auto index = static_cast<size_t>(tag);
  return index < kTagNames.size() ? kTagNames[index] : "invalid";
}

StatusOr<MemoryTag> ParseMemoryTag(std::string_view name) {
  for (size_t i = 0; i < kTagNames.size(); ++i) {
    if (kTagNames[i] == name) return static_cast<MemoryTag>(i);
  }
  return InvalidArgumentError(StrCat("unknown memory tag '", name, "'"));
}

void MemoryAccounting::Add(Counter& counter, uint64_t bytes) {
  const uint64_t now = counter.bytes.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  counter.allocations.fetch_add(1, std::memory_order_relaxed);
  uint64_t peak = counter.peak_bytes.load(std::memory_order_relaxed);
  while (now > peak &&
         !counter.peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void MemoryAccounting::Subtract(Counter& counter, uint64_t bytes, std::string_view what) {
  const uint64_t before = counter.bytes.fetch_sub(bytes, std::memory_order_relaxed);
  ECSS_CHECK(before >= bytes) << "releasing " << bytes << " bytes of " << what << " but only "
                              << before << " are charged";
  const uint64_t live = counter.allocations.fetch_sub(1, std::memory_order_relaxed);
  ECSS_CHECK(live >= 1) << "releasing an allocation of " << what << " but none is live";
}

MemoryUsage MemoryAccounting::Read(const Counter& counter) {
  return MemoryUsage{counter.bytes.load(std::memory_order_relaxed),
                     counter.peak_bytes.load(std::memory_order_relaxed),
                     counter.allocations.load(std::memory_order_relaxed)};
}

void MemoryAccounting::Charge(MemoryTag tag, uint64_t bytes) {
  Add(per_tag_[static_cast<size_t>(tag)], bytes);
  Add(total_, bytes);
}

void MemoryAccounting::Release(MemoryTag tag, uint64_t bytes) {
  Subtract(per_tag_[static_cast<size_t>(tag)], bytes, MemoryTagName(tag));
  Subtract(total_, bytes, "all tags");
}

MemoryUsage MemoryAccounting::Usage(MemoryTag tag) const {
  return Read(per_tag_[static_cast<size_t>(tag)]);
}

MemoryUsage MemoryAccounting::Total() const { return Read(total_); }

std::string MemoryAccounting::Summary() const {
  std::string text;
  for (int i = 0; i < kNumMemoryTags; ++i) {
    const MemoryUsage usage = Read(per_tag_[i]);
    if (usage.peak_bytes == 0) continue;
    if (!text.empty()) text += ", ";
    text += StrCat(kTagNames[i], " ", HumanBytes(usage.bytes), " (peak ",
                   HumanBytes(usage.peak_bytes), ", ", usage.allocations, " live)");
  }
  return text.empty() ? "nothing allocated" : text;
}

}  // namespace ecss
