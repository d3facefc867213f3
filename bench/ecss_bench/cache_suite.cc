// `ecss-bench cache`: hit rate and bytes moved of the device cache under Belady (exact next
// use within the current step, which RRE knows before the step starts) and LRU, with a device
// budget of a fraction of all experts, on the expert access sequences of real routing plans:
// RRE layers routing micro-batches of real text found on this machine, each step's samples
// from a rotating subset of domains. The reference is LRU on the same sequence.
#include <iomanip>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "offload/device_cache.h"
#include "router/routing_plan.h"
#include "runtime/base/str_cat.h"
#include "runtime/device/sim/sim_backend.h"
#include "tools/text/corpus.h"
#include "tools/text/tokenizer.h"

namespace ecss::bench {

Status RunCacheSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(uint64_t layers, args.Uint("layers", 4));
  ECSS_ASSIGN_OR_RETURN(uint64_t group, args.Uint("experts-per-domain", 16));
  ECSS_ASSIGN_OR_RETURN(uint64_t steps, args.Uint("steps", 20));
  ECSS_ASSIGN_OR_RETURN(uint64_t budget_percent, args.Uint("budget-percent", 25));
  ECSS_ASSIGN_OR_RETURN(uint64_t expert_bytes, args.Uint("expert-bytes", 64 * 1024));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (layers == 0 || group == 0 || steps == 0 || budget_percent == 0 || budget_percent > 100 ||
      expert_bytes == 0) {
    return InvalidArgumentError(
        "need layers, experts-per-domain, steps, expert-bytes > 0 and budget in (0, 100]");
  }
  // Real text, one domain per kind of file.
  text::CorpusOptions corpus_options;
  corpus_options.max_bytes_per_domain = uint64_t{1} << 20;
  const std::vector<text::CorpusDomain> corpus = text::LoadMachineCorpus(corpus_options);
  ECSS_ASSIGN_OR_RETURN(text::TokenizedCorpus tokenized, text::TokenizeCorpus(corpus, 8192));
  const std::vector<std::vector<uint32_t>>& tokens = tokenized.tokens;
  ECSS_ASSIGN_OR_RETURN(DomainMap map, DomainMap::Create(static_cast<uint32_t>(layers)));
  for (uint32_t d = 0; d < corpus.size(); ++d) {
    ECSS_RETURN_IF_ERROR(map.AddDomainUniform(corpus[d].name, d, static_cast<uint32_t>(group)));
  }
  ECSS_ASSIGN_OR_RETURN(RreRouter router, RreRouter::Create(map, {tokenized.tokenizer.vocab_size(),
                                                                  3, TableBuilder::kRreUniform}));

  // Each step: 2 micro-batches of 8 samples x 256 tokens, samples from 4 of the domains (the
  // subset rotates every step), reading each domain's text in order.
  constexpr uint32_t kSamples = 8, kSeq = 256, kMicroBatches = 2;
  const auto domains = static_cast<uint32_t>(corpus.size());
  const uint32_t per_step = std::min<uint32_t>(4, domains);
  std::vector<size_t> cursor(domains, 0);
  std::vector<ExpertId> sequence;
  uint64_t longest_step = 0;
  for (uint64_t step = 0; step < steps; ++step) {
    std::vector<RoutingPlan> plans;
    for (uint32_t m = 0; m < kMicroBatches; ++m) {
      std::vector<uint32_t> ids(kSamples * kSeq), sample_domains(kSamples);
      for (uint32_t s = 0; s < kSamples; ++s) {
        const uint32_t d = static_cast<uint32_t>((step + s % per_step) % domains);
        sample_domains[s] = d;
        for (uint32_t p = 0; p < kSeq; ++p)
          ids[s * kSeq + p] = tokens[d][cursor[d]++ % tokens[d].size()];
      }
      ECSS_ASSIGN_OR_RETURN(RoutingPlan plan,
                            RoutingPlan::BuildRre(router, MicroBatch{ids.data(), kSamples, kSeq,
                                                                     sample_domains.data()}));
      plans.push_back(std::move(plan));
    }
    const std::vector<ExpertAccess> accesses = StepAccessSequence(plans);
    longest_step = std::max<uint64_t>(longest_step, accesses.size());
    for (const ExpertAccess& a : accesses) sequence.push_back(ExpertId{a.layer, a.expert});
  }

  uint64_t total_experts = 0;
  for (uint32_t l = 0; l < layers; ++l) total_experts += map.experts_in_layer(l);
  const auto slots =
      static_cast<uint32_t>(std::max<uint64_t>(1, total_experts * budget_percent / 100));
  std::vector<uint8_t> weights(expert_bytes,
                               1);  // every expert's host copy: only the traffic matters here

  struct Result {
    const char* policy;
    CacheStats stats;
  };
  std::vector<Result> results;
  for (int which = 0; which < 2; ++which) {
    SimOptions sim_options;
    sim_options.device_memory_bytes = slots * expert_bytes;
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<SimBackend> sim, SimBackend::Create(sim_options));
    ECSS_ASSIGN_OR_RETURN(OwnedStream copy, CreateOwnedStream(*sim, "h2d"));
    ECSS_ASSIGN_OR_RETURN(OwnedStream compute, CreateOwnedStream(*sim, "compute"));
    std::unique_ptr<EvictionPolicy> policy =
        which == 0 ? MakeBeladyPolicy(sequence, longest_step) : MakeLruPolicy();
    ECSS_ASSIGN_OR_RETURN(std::unique_ptr<DeviceCache> cache,
                          DeviceCache::Create(*sim, {expert_bytes, slots}, std::move(policy)));
    for (uint64_t p = 0; p < sequence.size(); ++p) {
      ECSS_ASSIGN_OR_RETURN(Lease lease,
                            cache->Acquire(sequence[p], weights.data(), copy.get(), p));
      ECSS_RETURN_IF_ERROR(lease.Release(compute.get()));
    }
    ECSS_RETURN_IF_ERROR(sim->SynchronizeAll());
    if (sim->copy_stats().bytes[static_cast<int>(CopyKind::kHostToDevice)] !=
        cache->stats().bytes_moved) {
      return InternalError("cache byte count disagrees with the backend's copy statistics");
    }
    results.push_back({which == 0 ? "belady" : "lru", cache->stats()});
  }

  json.Field("layers", layers)
      .Field("experts", total_experts)
      .Field("slots", static_cast<uint64_t>(slots))
      .Field("budget_fraction", static_cast<double>(slots) / static_cast<double>(total_experts))
      .Field("accesses", static_cast<uint64_t>(sequence.size()))
      .Field("steps", steps)
      .Field("belady_lookahead", longest_step)
      .Field("reference",
             "LRU on the same access sequence; bytes from the sim backend's copy statistics");
  for (const Result& r : results) {
    json.Key(r.policy)
        .BeginObject()
        .Field("hit_rate", r.stats.hit_rate())
        .Field("bytes_moved", r.stats.bytes_moved)
        .Field("evictions", r.stats.evictions)
        .EndObject();
  }
  json.Field("belady_vs_lru_bytes", static_cast<double>(results[0].stats.bytes_moved) /
                                        static_cast<double>(results[1].stats.bytes_moved));
  table << "cache suite: " << sequence.size() << " expert accesses of " << steps << " steps over "
        << total_experts << " experts (" << layers << " layers), " << slots << " device slots ("
        << budget_percent << "%)\n"
        << std::left << std::setw(10) << "policy" << std::right << std::setw(10) << "hit rate"
        << std::setw(16) << "bytes moved"
        << "\n"
        << std::fixed << std::setprecision(3);
  for (const Result& r : results) {
    table << std::left << std::setw(10) << r.policy << std::right << std::setw(10)
          << r.stats.hit_rate() << std::setw(16) << r.stats.bytes_moved << "\n";
  }
  return Status::Ok();
}

}  // namespace ecss::bench
