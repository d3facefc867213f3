// train_moe_lm: trains a small multi-domain causal language model whose sparse layers are RRE
// experts run by an ECSS session, on real text found on this machine (C headers, Python
// sources, licence texts, documentation, CMake files; an embedded corpus where missing).
//
// Model: next-token prediction from the current token. Embedding E [vocab, d] (dense, owned by
// this loop) -> L residual sparse layers x += MoE_l(x), each token routed by its domain's RRE
// table -> logits = x O (dense, [d, vocab]) -> softmax cross-entropy. The loop owns E and O and
// updates them with its own CpuOptimizer; the session owns the experts. The device (--device:
// the simulated device running the real CPU kernels by default, or a GPU) has a budget smaller
// than the experts, so experts stream in and out every step. Per step it prints loss, tokens/s,
// bytes streamed, cache hit rate and stalls; at the end the corpus's unigram entropy next to the
// final loss (both in nats), and it writes a Chrome trace.
//
// --checkpoint-dir DIR saves a checkpoint DIR/step-N every --checkpoint-every N steps, at the
// end, and when SIGTERM or Ctrl-C asks (at the end of that step, then exiting), with this
// loop's own state (embedding, output projection, the gates, their optimizer states, the
// data position, the losses so far) as its blobs; --resume continues from the newest one, bit for
// bit as if never stopped. The periodic saves overlap the next step (Session::StartCheckpoint)
// and are reported, durable, at its end; the last one and a signal's are taken whole.
//
// --routing gate replaces RRE with learned top-2 softmax gates (router/gates.h), one per
// sparse layer, trained by this loop with the Switch auxiliary loss: the session then routes
// reactively (each layer's experts are fetched once its gate ran) and returns each choice's
// output, from which the loop computes its gates' gradients.
//
// Options: train_moe_lm --help.
#include <cblas.h>
#include <signal.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "engine/session.h"
#include "router/gates.h"
#include "runtime/base/file_util.h"
#include "runtime/base/random.h"
#include "runtime/base/stop_request.h"
#include "runtime/base/str_cat.h"
#include "runtime/base/trace.h"
#include "runtime/device/backend_factory.h"
#include "tools/text/corpus.h"
#include "tools/text/tokenizer.h"

namespace ecss {
namespace {

constexpr const char* kUsage =
    "usage: train_moe_lm [options]\n"
    "  --device D        sim (real CPU kernels), cuda or cuda:N (default sim); not\n"
    "                    sim-timed, whose kernels compute nothing to train on\n"
    "  --steps N         training steps (default 300)\n"
    "  --layers N        sparse layers (default 2)\n"
    "  --d-model N       (default 64)\n"
    "  --d-ff N          (default 128)\n"
    "  --experts N       experts per domain and layer (default 4)\n"
    "  --vocab N         tokenizer vocabulary (default 2048)\n"
    "  --cache-experts N expert slots of the device cache; the session's device budget is\n"
    "                    what a step works in plus these (default 60% of the experts, 70%\n"
    "                    with --routing gate; at least one layer's experts)\n"
    "  --dtype T         f32 or bf16 (default bf16)\n"
    "  --strategy S      ecss, zero-offload, no-overlap or naive (default ecss)\n"
    "  --routing R       rre, or gate: learned top-2 gates (default rre)\n"
    "  --trace FILE      Chrome trace written at the end (default train_moe_lm.trace.json;\n"
    "                    a path that cannot be written is refused before the run)\n"
    "  --print-every N   steps between progress lines (default 20)\n"
    "  --checkpoint-dir DIR  checkpoints DIR/step-N (with the gates' state: --routing gate)\n"
    "  --checkpoint-every N  steps between checkpoints (default: only at the end)\n"
    "  --resume          continue from the newest checkpoint in --checkpoint-dir (none\n"
    "                    yet: start at step 0)\n"
    "                    (with --checkpoint-dir, SIGTERM or Ctrl-C saves one at the end of\n"
    "                    the step and exits; a second one ends it at once)\n"
    "  --help            this text\n";

struct Options {
  bool help = false;
  std::string device = "sim";
  int steps = 300;
  uint32_t layers = 2;
  uint32_t d_model = 64;
  uint32_t d_ff = 128;
  uint32_t experts = 4;  // per domain and layer
  uint32_t vocab = 2048;
  uint32_t cache_experts = 0;  // 0: 60% of the experts, 70% with gates
  DType dtype = DType::kBF16;
  Strategy strategy = Strategy::kEcss;
  bool gated = false;  // learned gates instead of RRE
  std::string trace_path = "train_moe_lm.trace.json";
  int print_every = 20;
  std::string checkpoint_dir;  // empty: no checkpoints
  int checkpoint_every = 0;    // 0: at the end only
  bool resume = false;
};

StatusOr<Options> Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      o.help = true;
      return o;
    }
    if (arg == "--resume") {
      o.resume = true;
      continue;
    }
    if (i + 1 >= argc) return InvalidArgumentError(StrCat("option ", arg, " needs a value"));
    const std::string value = argv[++i];
    if (arg == "--trace") {
      o.trace_path = value;
      continue;
    }
    if (arg == "--checkpoint-dir") {
      o.checkpoint_dir = value;
      continue;
    }
    if (arg == "--device") {
      ECSS_ASSIGN_OR_RETURN(BackendOptions device, ParseDeviceSetting(value));
      if (device.kind == BackendKind::kSim && device.sim.kernel_mode == KernelMode::kTimed) {
        return InvalidArgumentError(
            "--device sim-timed: its kernels compute nothing, so there is nothing to train; "
            "use sim or cuda");
      }
      o.device = value;
      continue;
    }
    if (arg == "--dtype") {
      ECSS_ASSIGN_OR_RETURN(o.dtype, ParseDType(value));
      continue;
    }
    if (arg == "--strategy") {
      ECSS_ASSIGN_OR_RETURN(o.strategy, ParseStrategy(value));
      continue;
    }
    if (arg == "--routing") {
      if (value != "rre" && value != "gate") {
        return InvalidArgumentError(StrCat("--routing '", value, "': rre or gate"));
      }
      o.gated = value == "gate";
      continue;
    }
    char* end = nullptr;
    const unsigned long long number = std::strtoull(value.c_str(), &end, 10);
    if (end == value.c_str() || *end != '\0' || number == 0) {
      return InvalidArgumentError(StrCat(arg, " = '", value, "' must be an integer > 0"));
    }
    if (arg == "--steps") {
      o.steps = static_cast<int>(number);
    } else if (arg == "--layers") {
      o.layers = static_cast<uint32_t>(number);
    } else if (arg == "--d-model") {
      o.d_model = static_cast<uint32_t>(number);
    } else if (arg == "--d-ff") {
      o.d_ff = static_cast<uint32_t>(number);
    } else if (arg == "--experts") {
      o.experts = static_cast<uint32_t>(number);
    } else if (arg == "--vocab") {
      o.vocab = static_cast<uint32_t>(number);
    } else if (arg == "--cache-experts") {
      o.cache_experts = static_cast<uint32_t>(number);
    } else if (arg == "--print-every") {
      o.print_every = static_cast<int>(number);
    } else if (arg == "--checkpoint-every") {
      o.checkpoint_every = static_cast<int>(number);
    } else {
      return InvalidArgumentError(StrCat("unknown option ", arg, " (see --help)"));
    }
  }
  if ((o.resume || o.checkpoint_every > 0) && o.checkpoint_dir.empty()) {
    return InvalidArgumentError("--resume and --checkpoint-every need --checkpoint-dir");
  }
  // The trace is written when the run ends: a path that cannot take it is refused now.
  ECSS_RETURN_IF_ERROR(CheckFileWritable(o.trace_path).Annotate("--trace"));
  return o;
}

// ---- Checkpoints: this loop's own state as blobs ------------------------------------------

// Appends the bytes of `values` to `out`.
template <typename T>
void Pack(const std::vector<T>& values, std::string* out) {
  const uint64_t count = values.size();
  out->append(reinterpret_cast<const char*>(&count), sizeof(count));
  out->append(reinterpret_cast<const char*>(values.data()), count * sizeof(T));
}
// Reads what Pack wrote into `values`, whose size must match unless `any_size`.
template <typename T>
Status Unpack(std::string_view* in, std::vector<T>* values, std::string_view what,
              bool any_size = false) {
  uint64_t count = 0;
  if (in->size() < sizeof(count)) return DataLossError(StrCat("loop state: ", what, " is missing"));
  std::memcpy(&count, in->data(), sizeof(count));
  in->remove_prefix(sizeof(count));
  if ((!any_size && count != values->size()) || count > in->size() / sizeof(T)) {
    return InvalidArgumentError(StrCat("loop state: ", what, " holds ", count, " values, this run ",
                                       values->size(), ": another model's checkpoint?"));
  }
  values->resize(count);
  std::memcpy(values->data(), in->data(), count * sizeof(T));
  in->remove_prefix(count * sizeof(T));
  return Status::Ok();
}

constexpr uint32_t kSamples = 8, kSeq = 64, kDomainsPerStep = 4;
constexpr uint32_t kGateK = 2;
constexpr float kAuxLossWeight = 0.01f;

Status Train(const Options& o) {
  // ---- Data: real text, one domain per kind of file --------------------------------------
  text::CorpusOptions corpus_options;
  corpus_options.max_bytes_per_domain = uint64_t{1} << 20;
  const std::vector<text::CorpusDomain> corpus = text::LoadMachineCorpus(corpus_options);
  ECSS_ASSIGN_OR_RETURN(text::TokenizedCorpus tokenized, text::TokenizeCorpus(corpus, o.vocab));
  const uint32_t vocab = tokenized.tokenizer.vocab_size();
  const std::vector<std::vector<uint32_t>>& tokens = tokenized.tokens;
  std::vector<uint32_t> all_tokens;
  ModelSpec model;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const text::CorpusDomain& d = corpus[i];
    all_tokens.insert(all_tokens.end(), tokens[i].begin(), tokens[i].end());
    model.domains.push_back({d.name, o.experts});
    std::printf("domain %-10s %8zu tokens (%zu files%s)\n", d.name.c_str(), tokens[i].size(),
                d.files, d.files == 0 ? ": embedded fallback" : "");
  }
  const double unigram_entropy = text::UnigramEntropy(all_tokens, vocab);

  // ---- Session: experts streamed through a small device ----------------------------------
  TraceRecorder trace("train_moe_lm");
  // The device holds the session's budget and this loop's buffers: input and output
  // activations and, with gates, each choice's output ([tokens, d_model] each, in 2 MiB
  // blocks as a GPU's allocator may round them), plus room for alignment.
  ECSS_ASSIGN_OR_RETURN(BackendOptions backend_options, ParseDeviceSetting(o.device));
  backend_options.sim.h2d_bandwidth_gbps = 25;
  backend_options.sim.d2h_bandwidth_gbps = 25;
  backend_options.sim.trace = &trace;
  backend_options.cuda.trace = &trace;
  auto make_device = [&](uint64_t bytes) -> StatusOr<std::unique_ptr<Backend>> {
    backend_options.sim.device_memory_bytes = bytes;
    backend_options.cuda.device_memory_bytes = bytes;
    StatusOr<std::unique_ptr<Backend>> created = CreateBackend(backend_options);
    if (!created.ok()) return created.status().Annotate(StrCat("--device ", o.device));
    return created;
  };
  constexpr uint64_t kBlock = uint64_t{2} << 20;
  const uint64_t act_block =
      (uint64_t{kSamples} * kSeq * o.d_model * DTypeSize(o.dtype) + kBlock - 1) / kBlock * kBlock;
  const uint64_t loop_bytes = act_block * (2 + kGateK) + (uint64_t{1} << 20);
  uint64_t device_bytes = uint64_t{64} << 20;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> device, make_device(device_bytes));
  model.layers = o.layers;
  model.d_model = o.d_model;
  model.d_ff = o.d_ff;
  model.activation = Activation::kGelu;
  model.dtype = o.dtype;
  model.vocab = vocab;
  model.seed = 7;
  model.init_scale = 0.5f / std::sqrt(static_cast<float>(o.d_model));
  SessionOptions session_options;
  session_options.model = model;
  session_options.strategy = o.strategy;
  session_options.limits.max_tokens_per_micro_batch = kSamples * kSeq;
  session_options.optimizer.groups[0].lr = 3e-3f;
  session_options.optimizer.skip_step_on_nonfinite = false;
  session_options.trace = &trace;
  if (o.gated) {
    session_options.routing = Routing::kLearnedGate;
    session_options.gate_k = kGateK;
  }
  if (!o.checkpoint_dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(o.checkpoint_dir, error);
    if (error) return InvalidArgumentError(StrCat("--checkpoint-dir: ", error.message()));
    StatusOr<std::vector<std::string>> earlier = ListCheckpoints(o.checkpoint_dir);
    if (!o.resume && earlier.ok() && !earlier->empty()) {
      return AlreadyExistsError(StrCat("--checkpoint-dir ", o.checkpoint_dir,
                                       " holds checkpoints of an earlier run: --resume from them, "
                                       "or give another directory"));
    }
    // SIGTERM (a scheduler's notice) or Ctrl-C: a checkpoint at the next step's end, then exit.
    ECSS_RETURN_IF_ERROR(StopRequest::Install({SIGTERM, SIGINT}));
    if (o.resume) {
      StatusOr<std::string> newest = LatestCheckpoint(o.checkpoint_dir);
      if (newest.ok()) {
        session_options.placement.resume_from = StrCat(o.checkpoint_dir, "/", *newest);
        std::printf("resuming from %s\n", session_options.placement.resume_from.c_str());
      } else if (newest.status().code() == StatusCode::kNotFound) {
        // A run stopped before its first checkpoint: a requeued job starts it again.
        std::printf("no checkpoint in %s yet: starting at step 0\n", o.checkpoint_dir.c_str());
      } else {
        return newest.status();
      }
    }
  }
  const uint64_t experts = uint64_t{o.layers} * corpus.size() * o.experts;
  // The budget: what the session's plan needs beside the cache, plus the cache's slots (planned
  // with room for every expert; the kernels' scratch is the device's own). The default is at
  // least one layer's experts, what a step needs.
  session_options.budgets.device_bytes = uint64_t{1} << 50;
  ECSS_ASSIGN_OR_RETURN(MemoryPlan plan, Session::PlanMemoryOn(*device, session_options));
  uint32_t slots = o.cache_experts;
  if (slots == 0) {
    slots = std::max(plan.max_groups,
                     static_cast<uint32_t>((experts * (o.gated ? 70 : 60) + 99) / 100));
  } else if (slots < plan.max_groups) {
    return InvalidArgumentError(StrCat("--cache-experts ", slots, ": a step needs at least ",
                                       plan.max_groups, " (one layer's experts)"));
  }
  session_options.budgets.device_bytes = plan.DeviceBudgetFor(slots);
  if (session_options.budgets.device_bytes + loop_bytes > device_bytes) {
    device.reset();  // a larger model: a device that holds it
    device_bytes = session_options.budgets.device_bytes + loop_bytes;
    ECSS_ASSIGN_OR_RETURN(device, make_device(device_bytes));
  }
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<Session> session,
                        Session::Create(*device, session_options));
  uint64_t expert_total = 0;
  for (uint32_t l = 0; l < o.layers; ++l) expert_total += session->experts_in_layer(l);
  std::printf(
      "%u sparse layers x %zu domains x %u experts = %llu experts of %llu params (%s); "
      "device cache: %u slots (%.0f%% of the experts)\n",
      o.layers, corpus.size(), o.experts, static_cast<unsigned long long>(expert_total),
      static_cast<unsigned long long>(session->expert_params()),
      std::string(DTypeName(o.dtype)).c_str(), session->cache_slots(),
      100.0 * session->cache_slots() / static_cast<double>(expert_total));

  // ---- Dense parameters, owned by the loop ----------------------------------------------
  const uint32_t d = o.d_model;
  const uint64_t T = uint64_t{kSamples} * kSeq;
  std::vector<float> emb(uint64_t{vocab} * d), out(uint64_t{d} * vocab);
  std::vector<float> emb_m(emb.size()), emb_v(emb.size()), out_m(out.size()), out_v(out.size());
  CounterRng rng(3, 0);
  for (float& w : emb) w = (rng.UniformFloat() * 2 - 1) * 0.5f;
  for (float& w : out) w = (rng.UniformFloat() * 2 - 1) / std::sqrt(static_cast<float>(d));
  // Learned gates (--routing gate): one per sparse layer, dense parameters of this loop.
  std::vector<TopKGate> gates;
  std::vector<std::vector<float>> gate_m, gate_v, d_gate;
  std::vector<uint32_t> gate_ids;
  if (o.gated) {
    for (uint32_t l = 0; l < o.layers; ++l) {
      GateOptions gate_options;
      gate_options.d_model = o.d_model;
      gate_options.num_experts = session->experts_in_layer(l);
      gate_options.k = kGateK;
      gate_options.seed = 11 + l;
      ECSS_ASSIGN_OR_RETURN(TopKGate gate, TopKGate::Create(gate_options));
      const size_t n = gate.weight().size();
      gates.push_back(std::move(gate));
      gate_m.emplace_back(n, 0.0f);
      gate_v.emplace_back(n, 0.0f);
      d_gate.emplace_back(n, 0.0f);
    }
  }
  // The loop's state a checkpoint carries: the dense weights and moments, then where the data
  // stands, the dense optimizer's update count and the losses so far.
  std::vector<size_t> cursor(corpus.size(), 0);
  std::vector<double> losses;
  std::vector<uint64_t> counters = {0, 0};  // the next step, the dense updates so far
  std::vector<std::vector<float>*> dense_arrays = {&emb, &out, &emb_m, &emb_v, &out_m, &out_v};
  for (size_t l = 0; l < gates.size(); ++l) {
    dense_arrays.insert(dense_arrays.end(), {&gates[l].weight(), &gate_m[l], &gate_v[l]});
  }
  const std::string routing = o.gated ? "gate" : "rre";  // what the dense state holds
  auto loop_state = [&] {
    std::vector<CheckpointBlob> blobs = {{"dense", ""}, {"loop", ""}, {"routing", routing}};
    for (const std::vector<float>* a : dense_arrays) Pack(*a, &blobs[0].bytes);
    Pack(counters, &blobs[1].bytes);
    Pack(cursor, &blobs[1].bytes);
    Pack(losses, &blobs[1].bytes);
    return blobs;
  };
  if (!session_options.placement.resume_from.empty()) {
    const std::vector<CheckpointBlob>& blobs = session->loop_state();
    if (blobs.size() < 2 || blobs.size() > 3 || blobs[0].name != "dense" ||
        blobs[1].name != "loop" || (blobs.size() == 3 && blobs[2].name != "routing")) {
      return InvalidArgumentError("the checkpoint holds no train_moe_lm loop state");
    }
    // Checkpoints of builds before gate checkpoints have no "routing": they are RRE runs'.
    const std::string saved = blobs.size() == 3 ? blobs[2].bytes : "rre";
    if (saved != routing) {
      return InvalidArgumentError(
          StrCat("the checkpoint was trained with --routing ", saved, ", this run has ", routing));
    }
    std::string_view in = blobs[0].bytes;
    for (std::vector<float>* a : dense_arrays) ECSS_RETURN_IF_ERROR(Unpack(&in, a, "dense"));
    in = blobs[1].bytes;
    ECSS_RETURN_IF_ERROR(Unpack(&in, &counters, "counters"));
    ECSS_RETURN_IF_ERROR(Unpack(&in, &cursor, "data position"));
    ECSS_RETURN_IF_ERROR(Unpack(&in, &losses, "losses", /*any_size=*/true));
    if (!in.empty() || losses.size() != counters[0]) {
      return DataLossError(StrCat("loop state: ", in.size(), " bytes left over, ", losses.size(),
                                  " losses for ", counters[0], " steps"));
    }
  }
  CpuOptimizerOptions dense_options;
  dense_options.groups[0].lr = 1e-2f;
  dense_options.skip_step_on_nonfinite = false;
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CpuOptimizer> dense, CpuOptimizer::Create(dense_options));
  ECSS_ASSIGN_OR_RETURN(uint32_t emb_id,
                        dense->RegisterExpert({emb.data(), emb_m.data(), emb_v.data(), nullptr,
                                               emb.size(), 0, counters[1]}));
  ECSS_ASSIGN_OR_RETURN(uint32_t out_id,
                        dense->RegisterExpert({out.data(), out_m.data(), out_v.data(), nullptr,
                                               out.size(), 0, counters[1]}));
  for (size_t l = 0; l < gates.size(); ++l) {  // updated every step, as the embedding
    ECSS_ASSIGN_OR_RETURN(
        uint32_t id,
        dense->RegisterExpert({gates[l].weight().data(), gate_m[l].data(), gate_v[l].data(),
                               nullptr, gate_m[l].size(), 0, counters[1]}));
    gate_ids.push_back(id);
  }
  const uint64_t act_bytes = T * d * DTypeSize(o.dtype);
  ECSS_ASSIGN_OR_RETURN(Buffer dev_in,
                        device->device_memory().Allocate(act_bytes, MemoryTag::kActivations));
  ECSS_ASSIGN_OR_RETURN(Buffer dev_out,
                        device->device_memory().Allocate(act_bytes, MemoryTag::kActivations));
  const Stream stream = session->compute_stream();
  Buffer dev_choices;  // each choice's expert output, for the gates' gradients
  std::vector<char> choice_staging;
  if (o.gated) {
    ECSS_ASSIGN_OR_RETURN(
        dev_choices, device->device_memory().Allocate(act_bytes * kGateK, MemoryTag::kActivations));
    choice_staging.resize(act_bytes * kGateK);
  }
  // Moves host activations through one sparse-layer call and back.
  std::vector<char> staging(act_bytes);
  auto through = [&](const std::vector<float>& in, std::vector<float>* result,
                     auto call) -> Status {
    ConvertFromF32(in.data(), staging.data(), o.dtype, in.size());
    ECSS_RETURN_IF_ERROR(device->CopyAsync(stream, dev_in.data(), staging.data(), act_bytes,
                                           CopyKind::kHostToDevice));
    ECSS_RETURN_IF_ERROR(call(dev_in.data(), dev_out.data()));
    ECSS_RETURN_IF_ERROR(device->CopyAsync(stream, staging.data(), dev_out.data(), act_bytes,
                                           CopyKind::kDeviceToHost));
    ECSS_RETURN_IF_ERROR(device->SynchronizeStream(stream));
    result->resize(in.size());
    ConvertToF32(staging.data(), o.dtype, result->data(), in.size());
    return Status::Ok();
  };

  std::vector<uint32_t> ids(T), domains(kSamples);
  std::vector<std::vector<float>> xs(o.layers + 1, std::vector<float>(T * d));
  std::vector<float> y, logits(T * vocab), g(T * d), dx, d_emb(emb.size()), d_out(out.size());
  std::vector<GateOutput> routed(o.layers);
  std::vector<std::vector<float>> choice_out(o.layers);
  std::vector<float> d_weights(T * kGateK), d_hidden(T * d);
  double fetch_bytes = 0;
  std::printf("%6s %9s %10s %12s %9s %9s\n", "step", "loss", "tokens/s", "streamed", "hit rate",
              "stalls");
  std::string saving;  // the checkpoint being saved while the next step trains
  auto report_save = [&](const std::string& name, const CheckpointStats& saved) {
    std::printf(
        "checkpoint %s/%s: %.2f MiB written with the loop state (%s: %llu experts copied, "
        "%llu held by earlier checkpoints)\n",
        o.checkpoint_dir.c_str(), name.c_str(),
        static_cast<double>(saved.bytes_written) / (1 << 20), saved.full ? "full" : "incremental",
        static_cast<unsigned long long>(saved.experts_copied),
        static_cast<unsigned long long>(saved.experts_referenced));
  };
  for (int step = static_cast<int>(counters[0]); step < o.steps; ++step) {
    // Samples from 4 of the domains, rotating, each domain's text read in order.
    const auto num_domains = static_cast<uint32_t>(corpus.size());
    for (uint32_t s = 0; s < kSamples; ++s) {
      const uint32_t dom = (static_cast<uint32_t>(step) + s % kDomainsPerStep) % num_domains;
      domains[s] = dom;
      const auto& src = tokens[dom];
      for (uint32_t p = 0; p < kSeq; ++p) ids[s * kSeq + p] = src[cursor[dom]++ % src.size()];
    }
    ECSS_RETURN_IF_ERROR(
        session->BeginStep({MicroBatch{ids.data(), kSamples, kSeq, domains.data()}}));
    for (uint64_t t = 0; t < T; ++t) std::copy_n(&emb[uint64_t{ids[t]} * d], d, &xs[0][t * d]);
    double aux_loss = 0;
    for (uint32_t l = 0; l < o.layers; ++l) {
      if (!o.gated) {
        ECSS_RETURN_IF_ERROR(through(xs[l], &y, [&](void* in, void* res) {
          return session->Forward(MicroBatchIndex{0}, LayerIndex{l}, in, res);
        }));
      } else {
        // The gate runs on the layer's input; the session fetches the experts it chose.
        ECSS_RETURN_IF_ERROR(gates[l].Forward(xs[l].data(), static_cast<uint32_t>(T), &routed[l]));
        aux_loss += routed[l].aux_loss;
        auto routed_forward = [&](void* in, void* res) -> Status {
          Status forward = session->Forward(
              MicroBatchIndex{0}, LayerIndex{l}, in, res,
              {routed[l].experts.data(), routed[l].weights.data(), kGateK}, dev_choices.data());
          if (!forward.ok()) return forward;
          return device->CopyAsync(stream, choice_staging.data(), dev_choices.data(),
                                   choice_staging.size(), CopyKind::kDeviceToHost);
        };
        ECSS_RETURN_IF_ERROR(through(xs[l], &y, routed_forward));
        choice_out[l].resize(T * kGateK * d);
        ConvertToF32(choice_staging.data(), o.dtype, choice_out[l].data(), choice_out[l].size());
      }
      for (uint64_t i = 0; i < T * d; ++i) xs[l + 1][i] = xs[l][i] + y[i];
    }
    // logits = x_L O; loss over positions that have a next token.
    const std::vector<float>& x_last = xs[o.layers];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(T),
                static_cast<int>(vocab), static_cast<int>(d), 1.0f, x_last.data(),
                static_cast<int>(d), out.data(), static_cast<int>(vocab), 0.0f, logits.data(),
                static_cast<int>(vocab));
    double loss = 0;
    const double predicted = static_cast<double>(kSamples) * (kSeq - 1);
    for (uint64_t t = 0; t < T; ++t) {
      float* row = &logits[t * vocab];
      if (t % kSeq == kSeq - 1) {  // no next token: no loss, no gradient
        std::fill_n(row, vocab, 0.0f);
        continue;
      }
      const float peak = *std::max_element(row, row + vocab);
      double sum = 0;
      for (uint32_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v] - peak));
      const uint32_t target = ids[t + 1];
      loss += std::log(sum) - (row[target] - peak);
      for (uint32_t v = 0; v < vocab; ++v) {
        row[v] = static_cast<float>(std::exp(static_cast<double>(row[v] - peak)) / sum / predicted);
      }
      row[target] -= static_cast<float>(1.0 / predicted);
    }
    loss /= predicted;
    losses.push_back(loss);  // the language-model loss (the gates' auxiliary loss apart)
    // dO = x_L^T dlogits; g = dlogits O^T.
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(d),
                static_cast<int>(vocab), static_cast<int>(T), 1.0f, x_last.data(),
                static_cast<int>(d), logits.data(), static_cast<int>(vocab), 0.0f, d_out.data(),
                static_cast<int>(vocab));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(d),
                static_cast<int>(vocab), 1.0f, logits.data(), static_cast<int>(vocab), out.data(),
                static_cast<int>(vocab), 0.0f, g.data(), static_cast<int>(d));
    for (uint32_t l = o.layers; l-- > 0;) {
      ECSS_RETURN_IF_ERROR(through(g, &dx, [&](void* in, void* res) {
        return session->Backward(MicroBatchIndex{0}, LayerIndex{l}, in, res);
      }));
      if (o.gated) {
        // dLoss/dweight of each choice = dy . that choice's output; the gate turns it (and the
        // auxiliary loss) into its weight gradient and one more input gradient.
        for (uint64_t slot = 0; slot < T * kGateK; ++slot) {
          const uint64_t t = slot / kGateK;
          double dot = 0;
          for (uint32_t c = 0; c < d; ++c) dot += g[t * d + c] * choice_out[l][slot * d + c];
          d_weights[slot] = static_cast<float>(dot);
        }
        std::fill(d_gate[l].begin(), d_gate[l].end(), 0.0f);
        ECSS_RETURN_IF_ERROR(gates[l].Backward(xs[l].data(), routed[l], d_weights.data(),
                                               kAuxLossWeight, d_hidden.data(), d_gate[l].data()));
        for (uint64_t i = 0; i < T * d; ++i) dx[i] += d_hidden[i];
      }
      for (uint64_t i = 0; i < T * d; ++i) g[i] += dx[i];
    }
    std::fill(d_emb.begin(), d_emb.end(), 0.0f);
    for (uint64_t t = 0; t < T; ++t) {
      for (uint32_t c = 0; c < d; ++c) d_emb[uint64_t{ids[t]} * d + c] += g[t * d + c];
    }
    ECSS_ASSIGN_OR_RETURN(StepStats stats, session->EndStep());
    ECSS_RETURN_IF_ERROR(dense->BeginStep());
    ECSS_RETURN_IF_ERROR(dense->SubmitGradient(emb_id, d_emb.data(), DType::kF32));
    ECSS_RETURN_IF_ERROR(dense->SubmitGradient(out_id, d_out.data(), DType::kF32));
    for (size_t l = 0; l < gate_ids.size(); ++l) {
      ECSS_RETURN_IF_ERROR(dense->SubmitGradient(gate_ids[l], d_gate[l].data(), DType::kF32));
    }
    ECSS_RETURN_IF_ERROR(dense->FinishStep().status());
    ECSS_RETURN_IF_ERROR(dense->Synchronize());
    counters = {static_cast<uint64_t>(step) + 1, dense->version(emb_id)};
    fetch_bytes += static_cast<double>(stats.expert_fetch_bytes);
    if (step % o.print_every == 0 || step + 1 == o.steps) {
      std::printf("%6d %9.4f %10.0f %10.2f MiB %9.2f %7.2f ms", step, loss, stats.tokens_per_s,
                  static_cast<double>(stats.expert_fetch_bytes) / (1 << 20), stats.hit_rate,
                  stats.stalls.total() * 1e3);
      if (o.gated) std::printf("  (gate aux loss %.3f)", aux_loss / o.layers);
      std::printf("\n");
      std::fflush(stdout);  // a log being followed (tail -f) shows each step as it ends
    }
    // A save started after the step before has copied its experts during this one: it is
    // durable once taken (and before the next step begins in any case).
    if (!saving.empty()) {
      ECSS_ASSIGN_OR_RETURN(CheckpointStats saved, session->WaitForCheckpoint());
      report_save(saving, saved);
      saving.clear();
    }
    const bool last = step + 1 == o.steps;
    const int stop_signal = StopRequest::requested();
    if (!o.checkpoint_dir.empty() &&
        (last || stop_signal != 0 ||
         (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0))) {
      const std::string name = StrCat("step-", step + 1);
      if (!last && stop_signal == 0) {  // overlapping the next step
        ECSS_RETURN_IF_ERROR(session->StartCheckpoint(o.checkpoint_dir, name, loop_state()));
        saving = name;
        continue;
      }
      ECSS_ASSIGN_OR_RETURN(CheckpointStats saved,
                            session->SaveCheckpoint(o.checkpoint_dir, name, loop_state()));
      report_save(name, saved);
      if (stop_signal != 0) {
        std::printf("stopped by signal %d after step %d; continue with --resume\n", stop_signal,
                    step);
        break;
      }
    }
  }
  ECSS_RETURN_IF_ERROR(session->Synchronize());
  const size_t tail = std::max<size_t>(1, losses.size() / 10);
  double final_loss = 0;
  for (size_t i = losses.size() - tail; i < losses.size(); ++i) final_loss += losses[i];
  final_loss /= static_cast<double>(tail);
  std::printf(
      "\nunigram entropy of the corpus: %.4f nats/token\n"
      "first loss: %.4f, mean loss of the last %zu steps: %.4f nats/token (%.2f nats "
      "below the unigram entropy)\n"
      "last loss: %.9g (all its digits: a resumed run ends with the same)\n"
      "expert bytes streamed to the device in this run: %.1f MiB (%d steps in all)\n",
      unigram_entropy, losses.front(), tail, final_loss, unigram_entropy - final_loss,
      losses.back(), fetch_bytes / (1 << 20), static_cast<int>(losses.size()));
  ECSS_RETURN_IF_ERROR(trace.WriteJson(o.trace_path));
  std::printf("trace: %s\n", o.trace_path.c_str());
  return Status::Ok();
}

}  // namespace
}  // namespace ecss

int main(int argc, char** argv) {
  ecss::StatusOr<ecss::Options> options = ecss::Parse(argc, argv);
  if (!options.ok()) {
    std::fprintf(stderr, "train_moe_lm: %s\n", options.status().ToString().c_str());
    return 2;
  }
  if (options->help) {
    std::fputs(ecss::kUsage, stdout);
    return 0;
  }
  const ecss::Status status = ecss::Train(*options);
  if (!status.ok()) {
    std::fprintf(stderr, "train_moe_lm: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
