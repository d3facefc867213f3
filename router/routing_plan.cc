#include "router/routing_plan.h"

#include <algorithm>
#include <cstring>

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

// Note [Plan buffer layout]
// uint32 words: [num_layers, num_tokens], then per layer a directory entry of kDirectoryWords
// words {layer, k, num_active, active, offsets, permutation, inverse, weights} where the last
// five are word offsets from the start of the buffer, then the arrays themselves.
namespace {

constexpr uint32_t kPreambleWords = 2;
constexpr uint32_t kDirectoryWords = 8;

struct LayerBuild {
  uint32_t layer;
  uint32_t k;
  std::vector<uint32_t> active;
  std::vector<uint32_t> offsets;
  std::vector<uint32_t> permutation;
  std::vector<uint32_t> inverse;
  std::vector<float> weights;  // per row
};

// Counting sort of slots by expert: stable, O(rows + experts).
void SortSlots(const uint32_t* expert_of_slot, uint32_t rows, uint32_t num_experts,
               const float* weight_of_slot, std::vector<uint32_t>& counts, LayerBuild& out) {
  counts.assign(num_experts, 0);
  for (uint32_t slot = 0; slot < rows; ++slot) ++counts[expert_of_slot[slot]];
  out.active.clear();
  out.offsets.clear();
  uint32_t row = 0;
  for (uint32_t expert = 0; expert < num_experts; ++expert) {
    const uint32_t count = counts[expert];
    if (count == 0) continue;
    out.active.push_back(expert);
    out.offsets.push_back(row);
    counts[expert] = row;  // now the next free row of the expert
    row += count;
  }
  out.offsets.push_back(row);
  out.permutation.resize(rows);
  out.inverse.resize(rows);
  out.weights.resize(rows);
  for (uint32_t slot = 0; slot < rows; ++slot) {
    const uint32_t target = counts[expert_of_slot[slot]]++;
    out.permutation[target] = slot;
    out.inverse[slot] = target;
    out.weights[target] = weight_of_slot ? weight_of_slot[slot] : 1.0f;
  }
}

std::vector<uint32_t> Pack(uint32_t num_tokens, const std::vector<LayerBuild>& layers) {
  size_t words = kPreambleWords + kDirectoryWords * layers.size();
  for (const LayerBuild& l : layers) {
    words += l.active.size() + l.offsets.size() + 3 * l.permutation.size();
  }
  std::vector<uint32_t> storage;
  storage.reserve(words);
  storage.push_back(static_cast<uint32_t>(layers.size()));
  storage.push_back(num_tokens);
  storage.resize(kPreambleWords + kDirectoryWords * layers.size());
  auto append = [&storage](const void* data, size_t count) {
    const auto at = static_cast<uint32_t>(storage.size());
    storage.resize(storage.size() + count);
    std::memcpy(storage.data() + at, data, count * sizeof(uint32_t));
    return at;
  };
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerBuild& l = layers[i];
    const uint32_t entry[kDirectoryWords] = {l.layer,
                                             l.k,
                                             static_cast<uint32_t>(l.active.size()),
                                             append(l.active.data(), l.active.size()),
                                             append(l.offsets.data(), l.offsets.size()),
                                             append(l.permutation.data(), l.permutation.size()),
                                             append(l.inverse.data(), l.inverse.size()),
                                             append(l.weights.data(), l.weights.size())};
    std::memcpy(storage.data() + kPreambleWords + kDirectoryWords * i, entry, sizeof(entry));
  }
  ECSS_CHECK(storage.size() == words);
  return storage;
}

}  // namespace

StatusOr<RoutingPlan> RoutingPlan::BuildRre(const RreRouter& router, const MicroBatch& batch) {
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
  std::vector<uint32_t> expert_of(tokens);
  std::vector<uint32_t> scratch;
  std::vector<LayerBuild> layers(router.num_layers());
  for (uint32_t layer = 0; layer < router.num_layers(); ++layer) {
    for (uint32_t sample = 0; sample < batch.batch_size; ++sample) {
      const uint32_t d = domain_index[sample];
      const uint16_t* table = router.LocalTable(layer, d);
      const uint32_t first = domains.domains()[d].groups[layer].first;
      const size_t base = static_cast<size_t>(sample) * batch.seq_len;
      for (uint32_t position = 0; position < batch.seq_len; ++position) {
        expert_of[base + position] = first + table[batch.token_ids[base + position]];
      }
    }
    layers[layer].layer = layer;
    layers[layer].k = 1;
    SortSlots(expert_of.data(), tokens, domains.experts_in_layer(layer), nullptr, scratch,
              layers[layer]);
  }
  return RoutingPlan(Pack(tokens, layers));
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
  std::vector<LayerBuild> layers(1);
  layers[0].layer = layer;
  layers[0].k = k;
  std::vector<uint32_t> scratch;
  SortSlots(experts, static_cast<uint32_t>(rows), num_experts, weights, scratch, layers[0]);
  return RoutingPlan(Pack(num_tokens, layers));
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
