#include "router/routing_plan.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

// Note [Plan buffer layout]
// uint32 words: [num_layers, num_tokens]; per layer a directory entry of kDirectoryWords words
// {layer, k, num_active, active, offsets, permutation, inverse, weights}, the last five word
// offsets from the start of the buffer; then every layer's permutation, inverse and weights
// (rows words each); then every layer's active experts and offsets. The arrays the rows size
// come first, so each layer is written in place in one pass before its number of active
// experts is known: the buffer is sized for min(rows, experts) of them and trimmed after.
namespace {

constexpr uint32_t kPreambleWords = 2;
constexpr uint32_t kDirectoryWords = 8;

// Note [Counting sort in lanes]: a counting sort's count (++counts[e]) and scatter
// (counts[e]++) are each a chain through memory wherever consecutive slots go to one expert,
// and under RRE they mostly do (a sample's tokens all go to its domain's few experts): one
// store-to-load round trip per slot. So the slots are cut into kLanes consecutive runs, each
// with its own counts and its own next row per expert, and one loop steps through every run at
// once: kLanes chains, independent. Run j's rows of an expert follow run j-1's, so the sort
// stays stable. `ecss-bench router` (4 layers x 32,768 tokens, 2 experts a domain): 316 -> 532
// M routings/s (router/README.md).
constexpr uint32_t kLanes = 4;

// Calls visit(lane, slot) for every slot of `rows`, the kLanes runs stepped through together.
template <typename Visit>
void ForEachSlotInLanes(uint32_t rows, Visit&& visit) {
  const uint32_t run = (rows + kLanes - 1) / kLanes;
  uint32_t first[kLanes], length[kLanes];
  for (uint32_t j = 0; j < kLanes; ++j) {
    first[j] = std::min(rows, j * run);
    length[j] = std::min(rows, (j + 1) * run) - first[j];
  }
  const uint32_t together = length[kLanes - 1];  // the last run is the shortest
  for (uint32_t i = 0; i < together; ++i) {
    for (uint32_t j = 0; j < kLanes; ++j) visit(j, first[j] + i);
  }
  for (uint32_t j = 0; j < kLanes; ++j) {
    for (uint32_t i = together; i < length[j]; ++i) visit(j, first[j] + i);
  }
}

// One layer's slots before they are sorted by expert.
struct LayerSlots {
  uint32_t layer = 0;
  uint32_t k = 1;
  uint32_t rows = 0;
  uint32_t num_experts = 0;
  const uint32_t* expert_of_slot = nullptr;  // [rows], each < num_experts; null: Write routes
  const float* weight_of_slot = nullptr;     // [rows], or null: every row weighs 1
};

// A layer's words (Note [Plan buffer layout]) with `rows` rows and `active` active experts.
uint64_t LayerWords(uint64_t rows, uint64_t active) {
  return kDirectoryWords + 3 * rows + active + (active + 1);
}

// The buffer's words at most; InvalidArgument where its word offsets would not fit 32 bits.
StatusOr<size_t> MostWords(const std::vector<LayerSlots>& layers) {
  size_t words = kPreambleWords;
  for (const LayerSlots& l : layers) words += LayerWords(l.rows, std::min(l.rows, l.num_experts));
  if (words > UINT32_MAX) {
    return InvalidArgumentError(StrCat("a plan of ", layers.size(), " layer(s) of ",
                                       layers.empty() ? 0 : layers[0].rows,
                                       " rows is too large for 32-bit offsets"));
  }
  return words;
}

// The plan of `layers` (MostWords checked), written into `storage` (whatever it held: its
// capacity is reused). A layer without expert_of_slot (and so without weight_of_slot) has
// route(index, experts) write its slots' experts, into the words its weights take after them.
template <typename Route>
std::vector<uint32_t> Write(std::vector<uint32_t> storage, size_t most_words, uint32_t num_tokens,
                            const std::vector<LayerSlots>& layers, Route&& route) {
  storage.reserve(most_words);  // not more (resize may double): the memory plan's MostBytes
  storage.resize(most_words);
  storage[0] = static_cast<uint32_t>(layers.size());
  storage[1] = num_tokens;
  size_t large_at = kPreambleWords + kDirectoryWords * layers.size(), small_at = large_at;
  for (const LayerSlots& l : layers) small_at += size_t{3} * l.rows;
  std::vector<uint32_t> next;  // [kLanes][experts]: rows of each run, then its next free row
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerSlots& l = layers[i];
    const size_t permutation = large_at, inverse = permutation + l.rows, weights = inverse + l.rows;
    large_at = weights + l.rows;
    const uint32_t* expert_of = l.expert_of_slot;
    if (expert_of == nullptr) {
      ECSS_CHECK(l.weight_of_slot == nullptr) << "routed slots weigh 1";
      route(i, storage.data() + weights);
      expert_of = storage.data() + weights;
    }
    const uint32_t experts = l.num_experts;
    next.assign(size_t{kLanes} * experts, 0);
    ForEachSlotInLanes(l.rows, [&](uint32_t lane, uint32_t slot) {
      ++next[size_t{lane} * experts + expert_of[slot]];
    });
    uint32_t num_active = 0;
    for (uint32_t e = 0; e < experts; ++e) {
      uint32_t rows = 0;
      for (uint32_t j = 0; j < kLanes; ++j) rows += next[size_t{j} * experts + e];
      num_active += rows > 0 ? 1 : 0;
    }
    const size_t active = small_at, offsets = active + num_active;
    small_at = offsets + num_active + 1;
    uint32_t row = 0, a = 0;
    for (uint32_t e = 0; e < experts; ++e) {
      const uint32_t expert_first = row;
      for (uint32_t j = 0; j < kLanes; ++j) {
        const uint32_t count = next[size_t{j} * experts + e];
        next[size_t{j} * experts + e] = row;
        row += count;
      }
      if (row == expert_first) continue;
      storage[active + a] = e;
      storage[offsets + a] = expert_first;
      ++a;
    }
    storage[offsets + a] = row;
    const uint32_t entry[kDirectoryWords] = {l.layer,
                                             l.k,
                                             num_active,
                                             static_cast<uint32_t>(active),
                                             static_cast<uint32_t>(offsets),
                                             static_cast<uint32_t>(permutation),
                                             static_cast<uint32_t>(inverse),
                                             static_cast<uint32_t>(weights)};
    std::memcpy(storage.data() + kPreambleWords + kDirectoryWords * i, entry, sizeof(entry));
    uint32_t* const to_slot = storage.data() + permutation;
    uint32_t* const to_row = storage.data() + inverse;
    uint32_t* const weight = storage.data() + weights;  // a float's bits a word
    if (l.weight_of_slot == nullptr) {
      ForEachSlotInLanes(l.rows, [&](uint32_t lane, uint32_t slot) {
        const uint32_t target = next[size_t{lane} * experts + expert_of[slot]]++;
        to_slot[target] = slot;
        to_row[slot] = target;
      });
      std::fill(weight, weight + l.rows, std::bit_cast<uint32_t>(1.0f));  // over expert_of, read
    } else {
      const float* const weight_of = l.weight_of_slot;
      ForEachSlotInLanes(l.rows, [&](uint32_t lane, uint32_t slot) {
        const uint32_t target = next[size_t{lane} * experts + expert_of[slot]]++;
        to_slot[target] = slot;
        to_row[slot] = target;
        weight[target] = std::bit_cast<uint32_t>(weight_of[slot]);
      });
    }
  }
  ECSS_CHECK(small_at <= most_words);
  storage.resize(small_at);
  return storage;
}

}  // namespace

StatusOr<RoutingPlan> RoutingPlan::BuildRre(const RreRouter& router, const MicroBatch& batch,
                                            RoutingPlan* recycled) {
  const uint64_t num_tokens = uint64_t{batch.batch_size} * batch.seq_len;
  if (num_tokens == 0) return InvalidArgumentError("micro-batch has no tokens");
  if (num_tokens > UINT32_MAX / 2) {
    return InvalidArgumentError(StrCat("micro-batch of ", num_tokens, " tokens is too large"));
  }
  if (batch.token_ids == nullptr || batch.domain_ids == nullptr) {
    return InvalidArgumentError("micro-batch token_ids or domain_ids is null");
  }
  const DomainMap& domains = router.domains();
  // Resolve each sample's domain once.
  std::vector<uint32_t> domain_index(batch.batch_size);
  for (uint32_t sample = 0; sample < batch.batch_size; ++sample) {
    StatusOr<size_t> index = domains.IndexOf(batch.domain_ids[sample]);
    if (!index.ok()) return index.status().Annotate(StrCat("micro-batch sample ", sample));
    domain_index[sample] = static_cast<uint32_t>(*index);
  }
  const uint32_t vocab = router.vocab_size();
  for (uint32_t sample = 0; sample < batch.batch_size; ++sample) {
    const uint32_t* tokens = batch.token_ids + static_cast<size_t>(sample) * batch.seq_len;
    for (uint32_t position = 0; position < batch.seq_len; ++position) {
      if (tokens[position] >= vocab) {
        return InvalidArgumentError(StrCat("micro-batch sample ", sample, " position ", position,
                                           ": token id ", tokens[position],
                                           " is out of the vocabulary of ", vocab));
      }
    }
  }
  const auto tokens = static_cast<uint32_t>(num_tokens);
  std::vector<LayerSlots> layers(router.num_layers());
  for (uint32_t layer = 0; layer < layers.size(); ++layer) {
    layers[layer].layer = layer;
    layers[layer].rows = tokens;
    layers[layer].num_experts = domains.experts_in_layer(layer);
  }
  ECSS_ASSIGN_OR_RETURN(const size_t most_words, MostWords(layers));
  const auto route = [&](size_t layer, uint32_t* experts) {
    for (uint32_t sample = 0; sample < batch.batch_size; ++sample) {
      const uint32_t d = domain_index[sample];
      const uint16_t* table = router.LocalTable(static_cast<uint32_t>(layer), d);
      const uint32_t first = domains.domains()[d].groups[layer].first;
      const size_t base = static_cast<size_t>(sample) * batch.seq_len;
      for (uint32_t position = 0; position < batch.seq_len; ++position) {
        experts[base + position] = first + table[batch.token_ids[base + position]];
      }
    }
  };
  std::vector<uint32_t> storage;
  if (recycled != nullptr) storage = std::move(recycled->storage_);
  return RoutingPlan(Write(std::move(storage), most_words, tokens, layers, route));
}

StatusOr<RoutingPlan> RoutingPlan::FromAssignments(uint32_t layer, uint32_t num_experts,
                                                   uint32_t num_tokens, uint32_t k,
                                                   const uint32_t* experts, const float* weights) {
  if (num_tokens == 0 || k == 0 || num_experts == 0 || k > num_experts) {
    return InvalidArgumentError(StrCat("assignment plan needs tokens, 0 < k <= experts (tokens ",
                                       num_tokens, ", k ", k, ", experts ", num_experts, ")"));
  }
  if (experts == nullptr || weights == nullptr) {
    return InvalidArgumentError("assignment experts or weights is null");
  }
  const uint64_t rows = uint64_t{num_tokens} * k;
  if (rows > UINT32_MAX / 2) return InvalidArgumentError("assignment plan is too large");
  for (uint32_t token = 0; token < num_tokens; ++token) {
    for (uint32_t choice = 0; choice < k; ++choice) {
      const uint32_t expert = experts[token * k + choice];
      if (expert >= num_experts) {
        return InvalidArgumentError(StrCat("token ", token, " choice ", choice, ": expert ", expert,
                                           " is out of range (", num_experts, " experts)"));
      }
      for (uint32_t earlier = 0; earlier < choice; ++earlier) {
        if (experts[token * k + earlier] == expert) {
          return InvalidArgumentError(
              StrCat("token ", token, " chooses expert ", expert, " twice"));
        }
      }
    }
  }
  std::vector<LayerSlots> layers(1);
  layers[0].layer = layer;
  layers[0].k = k;
  layers[0].rows = static_cast<uint32_t>(rows);
  layers[0].num_experts = num_experts;
  layers[0].expert_of_slot = experts;
  layers[0].weight_of_slot = weights;
  ECSS_ASSIGN_OR_RETURN(const size_t most_words, MostWords(layers));
  return RoutingPlan(Write({}, most_words, num_tokens, layers, [](size_t, uint32_t*) {}));
}

uint64_t RoutingPlan::MostBytes(uint64_t layers, uint64_t rows, uint64_t active) {
  return (kPreambleWords + layers * LayerWords(rows, active)) * sizeof(uint32_t);
}

uint32_t RoutingPlan::num_layers() const { return storage_[0]; }
uint32_t RoutingPlan::num_tokens() const { return storage_[1]; }

LayerPlan RoutingPlan::LayerAt(const void* base, uint32_t index) {
  const auto* words = static_cast<const uint32_t*>(base);
  ECSS_CHECK(index < words[0]) << "layer " << index << " of a " << words[0] << "-layer plan";
  const uint32_t* entry = words + kPreambleWords + kDirectoryWords * index;
  LayerPlan plan;
  plan.layer = entry[0];
  plan.k = entry[1];
  plan.num_active = entry[2];
  plan.num_tokens = words[1];
  plan.active_experts = words + entry[3];
  plan.expert_offsets = words + entry[4];
  plan.permutation = words + entry[5];
  plan.inverse = words + entry[6];
  plan.combine_weights = reinterpret_cast<const float*>(words + entry[7]);
  return plan;
}

LayerPlan RoutingPlan::DeviceLayer(uint32_t index, const void* device_base) const {
  const LayerPlan host = layer(index);
  const auto* host_words = storage_.data();
  const auto* device_words = static_cast<const uint32_t*>(device_base);
  auto rebase = [&](const void* ptr) {
    return device_words + (static_cast<const uint32_t*>(ptr) - host_words);
  };
  LayerPlan plan = host;
  plan.active_experts = rebase(host.active_experts);
  plan.expert_offsets = rebase(host.expert_offsets);
  plan.permutation = rebase(host.permutation);
  plan.inverse = rebase(host.inverse);
  plan.combine_weights = reinterpret_cast<const float*>(rebase(host.combine_weights));
  return plan;
}

std::vector<ExpertAccess> StepAccessSequence(const std::vector<RoutingPlan>& micro_batches) {
  std::vector<ExpertAccess> sequence;
  for (uint32_t m = 0; m < micro_batches.size(); ++m) {
    const RoutingPlan& plan = micro_batches[m];
    const uint32_t layers = plan.num_layers();
    for (int pass = 0; pass < 2; ++pass) {
      for (uint32_t i = 0; i < layers; ++i) {
        const LayerPlan layer = plan.layer(pass == 0 ? i : layers - 1 - i);
        for (uint32_t a = 0; a < layer.num_active; ++a) {
          sequence.push_back(ExpertAccess{m, layer.layer, layer.active_experts[a], layer.count(a),
                                          pass == 0 ? Pass::kForward : Pass::kBackward});
        }
      }
    }
  }
  return sequence;
}

RoutingStats::RoutingStats(const DomainMap& domains) {
  for (uint32_t layer = 0; layer < domains.num_layers(); ++layer) {
    step_.emplace_back(domains.experts_in_layer(layer), 0);
    run_.emplace_back(domains.experts_in_layer(layer), 0);
  }
}

Status RoutingStats::Add(const RoutingPlan& plan) {
  for (uint32_t i = 0; i < plan.num_layers(); ++i) {
    const LayerPlan layer = plan.layer(i);
    if (layer.layer >= step_.size() ||
        (layer.num_active > 0 &&
         layer.active_experts[layer.num_active - 1] >= step_[layer.layer].size())) {
      return InvalidArgumentError(
          StrCat("plan layer ", layer.layer, " does not fit the stats' domain map"));
    }
  }
  for (uint32_t i = 0; i < plan.num_layers(); ++i) {
    const LayerPlan layer = plan.layer(i);
    for (uint32_t a = 0; a < layer.num_active; ++a) {
      step_[layer.layer][layer.active_experts[a]] += layer.count(a);
    }
  }
  return Status::Ok();
}

void RoutingStats::EndStep() {
  for (size_t layer = 0; layer < step_.size(); ++layer) {
    for (size_t e = 0; e < step_[layer].size(); ++e) {
      run_[layer][e] += step_[layer][e];
      step_[layer][e] = 0;
    }
  }
}

LoadSummary RoutingStats::Summarize(const std::vector<uint64_t>& counts, ExpertRange group) {
  std::vector<double> loads;
  for (uint32_t e = group.first; e < group.first + group.count && e < counts.size(); ++e) {
    loads.push_back(static_cast<double>(counts[e]));
  }
  return ecss::Summarize(loads);
}

}  // namespace ecss
