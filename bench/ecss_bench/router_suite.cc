// `ecss-bench router`: how fast routing plans are built for RRE layers, on one core.
// Reference, same run: a lookup-only pass (the table lookups of the same tokens, no sort, no
// plan), the floor of any plan builder.
// `ecss-bench router-imbalance`: per-domain expert load on real text found on this machine,
// for the uniform and frequency-aware builders. Tables are built from the first half of each
// domain's tokens and measured on the second half, so the frequency-aware figure is held out.
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <vector>

#include "bench/ecss_bench/suite.h"
#include "router/routing_plan.h"
#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"
#include "tools/text/corpus.h"
#include "tools/text/tokenizer.h"

namespace ecss::bench {

namespace {
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}
}  // namespace

Status RunRouterSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(uint64_t layers, args.Uint("layers", 4));
  ECSS_ASSIGN_OR_RETURN(uint64_t tokens, args.Uint("tokens", 65536));
  ECSS_ASSIGN_OR_RETURN(uint64_t seq_len, args.Uint("seq-len", 2048));
  ECSS_ASSIGN_OR_RETURN(uint64_t vocab, args.Uint("vocab", 50257));
  ECSS_ASSIGN_OR_RETURN(uint64_t domains, args.Uint("domains", 40));
  ECSS_ASSIGN_OR_RETURN(uint64_t group, args.Uint("experts-per-domain", 8));
  ECSS_ASSIGN_OR_RETURN(uint64_t domains_per_batch, args.Uint("domains-per-batch", 4));
  ECSS_ASSIGN_OR_RETURN(uint64_t iterations, args.Uint("iterations", 30));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (layers == 0 || seq_len == 0 || tokens % seq_len != 0 || domains == 0 || iterations == 0 ||
      domains_per_batch == 0 || domains_per_batch > domains || vocab > UINT32_MAX) {
    return InvalidArgumentError(
        "need layers, iterations, domains >= domains-per-batch >= 1, and tokens a multiple of "
        "seq-len");
  }
  ECSS_ASSIGN_OR_RETURN(DomainMap map, DomainMap::Create(static_cast<uint32_t>(layers)));
  for (uint32_t d = 0; d < domains; ++d) {
    ECSS_RETURN_IF_ERROR(
        map.AddDomainUniform(StrCat("domain", d), d, static_cast<uint32_t>(group)));
  }
  ECSS_ASSIGN_OR_RETURN(RreRouter router,
                        RreRouter::Create(std::move(map), {static_cast<uint32_t>(vocab), 1,
                                                           TableBuilder::kRreUniform}));

  // The micro-batch: random token ids; samples from `domains_per_batch` domains.
  const auto batch_size = static_cast<uint32_t>(tokens / seq_len);
  std::vector<uint32_t> token_ids(tokens), domain_ids(batch_size);
  CounterRng rng(5, 5);
  for (uint32_t& t : token_ids) t = rng.Uniform(static_cast<uint32_t>(vocab));
  for (uint32_t s = 0; s < batch_size; ++s)
    domain_ids[s] = static_cast<uint32_t>(s % domains_per_batch);
  const MicroBatch batch{token_ids.data(), batch_size, static_cast<uint32_t>(seq_len),
                         domain_ids.data()};

  std::vector<double> plan_seconds, lookup_seconds;
  uint64_t checksum = 0;
  for (uint64_t i = 0; i < iterations; ++i) {
    Clock::time_point start = Clock::now();
    ECSS_ASSIGN_OR_RETURN(RoutingPlan plan, RoutingPlan::BuildRre(router, batch));
    plan_seconds.push_back(Seconds(start));
    checksum += plan.layer(0).permutation[0];

    start = Clock::now();
    for (uint32_t layer = 0; layer < layers; ++layer) {
      for (uint32_t s = 0; s < batch_size; ++s) {
        const uint16_t* lookup = router.LocalTable(layer, domain_ids[s]);
        const uint32_t* row = token_ids.data() + static_cast<size_t>(s) * seq_len;
        uint32_t sum = 0;
        for (uint32_t p = 0; p < seq_len; ++p) sum += lookup[row[p]];
        checksum += sum;
      }
    }
    lookup_seconds.push_back(Seconds(start));
  }
  const double routings = static_cast<double>(tokens * layers);
  const double routings_per_s = routings / Median(plan_seconds);
  const double lookup_per_s = routings / Median(lookup_seconds);
  json.Field("routings_per_s", routings_per_s)
      .Field("threads", 1)
      .Field("layers", layers)
      .Field("tokens", tokens)
      .Field("vocab", vocab)
      .Field("experts_per_layer", domains * group)
      .Field("plan_bytes", static_cast<uint64_t>(RoutingPlan::BuildRre(router, batch)->bytes()))
      .Field("lookup_only_per_s", lookup_per_s)
      .Field("plan_vs_lookup_only", routings_per_s / lookup_per_s)
      .Field("target_routings_per_s", 50e6)
      .Field("reference",
             "lookup_only_per_s: the same tokens' table lookups without sort or plan, same run; "
             "medians over iterations")
      .Field("checksum", checksum);
  table << std::fixed << std::setprecision(1) << "router suite: " << layers << " RRE layers x "
        << tokens << " tokens, one core, median of " << iterations << "\n"
        << "  plans:        " << routings_per_s / 1e6 << " M token-layer routings/s (target 50)\n"
        << "  lookup only:  " << lookup_per_s / 1e6 << " M/s (reference)\n";
  return Status::Ok();
}

Status RunRouterImbalanceSuite(BenchArgs& args, JsonWriter& json, std::ostream& table) {
  ECSS_ASSIGN_OR_RETURN(uint64_t vocab, args.Uint("vocab", 16384));
  ECSS_ASSIGN_OR_RETURN(uint64_t group, args.Uint("experts-per-domain", 16));
  ECSS_ASSIGN_OR_RETURN(uint64_t max_bytes, args.Uint("max-bytes-per-domain", uint64_t{4} << 20));
  ECSS_RETURN_IF_ERROR(args.CheckAllUsed());
  if (vocab <= 256 || vocab > 65536 || group == 0) {
    return InvalidArgumentError("need 256 < vocab <= 65536 and experts-per-domain >= 1");
  }
  text::CorpusOptions corpus_options;
  corpus_options.max_bytes_per_domain = max_bytes;
  const std::vector<text::CorpusDomain> corpus = text::LoadMachineCorpus(corpus_options);
  ECSS_ASSIGN_OR_RETURN(text::TokenizedCorpus tokenized,
                        text::TokenizeCorpus(corpus, static_cast<uint32_t>(vocab)));
  const text::WordTokenizer& tokenizer = tokenized.tokenizer;

  ECSS_ASSIGN_OR_RETURN(DomainMap map, DomainMap::Create(1));
  DomainFrequencies train_frequencies;
  std::vector<std::vector<uint32_t>> held_out(corpus.size());
  for (uint32_t d = 0; d < corpus.size(); ++d) {
    ECSS_RETURN_IF_ERROR(map.AddDomainUniform(corpus[d].name, d, static_cast<uint32_t>(group)));
    const std::vector<uint32_t>& ids = tokenized.tokens[d];
    const size_t half = ids.size() / 2;
    train_frequencies[d] = text::TokenFrequencies(
        std::vector<uint32_t>(ids.begin(), ids.begin() + static_cast<long>(half)),
        tokenizer.vocab_size());
    held_out[d].assign(ids.begin() + static_cast<long>(half), ids.end());
  }
  const RouterOptions base{tokenizer.vocab_size(), 11, TableBuilder::kRreUniform};
  ECSS_ASSIGN_OR_RETURN(RreRouter uniform, RreRouter::Create(map, base));
  RouterOptions frequency_options = base;
  frequency_options.builder = TableBuilder::kRreFrequency;
  ECSS_ASSIGN_OR_RETURN(RreRouter frequency,
                        RreRouter::Create(map, frequency_options, train_frequencies));

  json.Field("vocab", static_cast<uint64_t>(tokenizer.vocab_size()))
      .Field("experts_per_domain", group)
      .Field("reference", "uniform RRE builder on the same held-out tokens")
      .Key("domains")
      .BeginArray();
  table << "router-imbalance: max/mean expert load on held-out tokens (" << group
        << " experts per domain, vocab " << tokenizer.vocab_size() << ")\n"
        << std::left << std::setw(12) << "domain" << std::right << std::setw(8) << "files"
        << std::setw(12) << "tokens" << std::setw(10) << "uniform" << std::setw(12) << "frequency"
        << std::setw(10) << "bound"
        << "  top token\n"
        << std::fixed << std::setprecision(3);
  for (uint32_t d = 0; d < corpus.size(); ++d) {
    const std::vector<double> measured =
        text::TokenFrequencies(held_out[d], tokenizer.vocab_size());
    ECSS_ASSIGN_OR_RETURN(std::vector<double> uniform_load, uniform.ExpectedLoad(0, d, measured));
    ECSS_ASSIGN_OR_RETURN(std::vector<double> frequency_load,
                          frequency.ExpectedLoad(0, d, measured));
    const double u = Summarize(uniform_load).imbalance();
    const double f = Summarize(frequency_load).imbalance();
    // A token id goes to one expert, so no table beats E x (share of the most frequent token).
    double total = 0;
    uint32_t top = 0;
    for (uint32_t t = 0; t < measured.size(); ++t) {
      total += measured[t];
      if (measured[t] > measured[top]) top = t;
    }
    const double bound = std::max(1.0, static_cast<double>(group) * measured[top] / total);
    std::string top_piece(tokenizer.Piece(top));
    for (char& c : top_piece) {
      if (c == '\n') c = '~';
    }
    json.BeginObject()
        .Field("name", corpus[d].name)
        .Field("files", static_cast<uint64_t>(corpus[d].files))
        .Field("held_out_tokens", static_cast<uint64_t>(held_out[d].size()))
        .Field("uniform_max_over_mean", u)
        .Field("frequency_max_over_mean", f)
        .Field("lower_bound_max_over_mean", bound)
        .Field("top_token", tokenizer.Piece(top))
        .EndObject();
    table << std::left << std::setw(12) << corpus[d].name << std::right << std::setw(8)
          << corpus[d].files << std::setw(12) << held_out[d].size() << std::setw(10) << u
          << std::setw(12) << f << std::setw(10) << bound << "  '" << top_piece << "'\n";
  }
  json.EndArray();
  return Status::Ok();
}

}  // namespace ecss::bench
