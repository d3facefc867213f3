// ecss-extract: a domain's sub-model cut out of a session's checkpoint, as a safetensors file
// (tools/extract/extract.h says what it holds). Exit codes: 0 written (and verified with
// --verify), 1 failed (the message names what), 2 bad arguments.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "engine/checkpoint_record.h"
#include "runtime/base/str_cat.h"
#include "tools/extract/extract.h"

namespace {

constexpr std::string_view kUsage =
    "usage: ecss-extract --checkpoint DIR --domains NAME[,NAME...] --out FILE\n"
    "                    [--format safetensors|ecss] [--with-optimizer-state] [--verify]\n"
    "                    [--force]\n"
    "       ecss-extract --checkpoint DIR --add-domain NAME --copy-of DOMAIN --out DIR\n"
    "                    [--verify] [--force]\n"
    "       ecss-extract --checkpoint DIR --add-domain NAME --from-dense FILE --experts N\n"
    "                    --out DIR [--verify] [--force]\n"
    "       ecss-extract --checkpoint DIR --repeat-layers K --out DIR [--verify] [--force]\n"
    "       ecss-extract --import FILE --out DIR [--verify] [--force]\n"
    "Keeps, in every sparse layer, only the named domains' expert groups of the checkpoint\n"
    "(ROOT/NAME as Session::SaveCheckpoint wrote it), renumbered in the model's domain order,\n"
    "with each layer's routing table rewritten to the new numbers. safetensors (the default):\n"
    "one file (tools/extract/README.md names its tensors); --with-optimizer-state adds the\n"
    "optimizer's moments and update counts; --verify reads the file back and checks every\n"
    "tensor bit for bit against the checkpoint and the model's routes. ecss: FILE is ROOT/NAME\n"
    "of a checkpoint of the sub-model that a session loads (placement.resume_from, with the\n"
    "model this prints); --verify runs both models' evaluation step on the same held-out\n"
    "inputs and requires bit-identical outputs. --force replaces FILE.\n"
    "--add-domain: model surgery, a new domain whose experts start as copies of DOMAIN's\n"
    "(weights, moments, update counts), or N experts per layer each starting from the dense\n"
    "FFN of its layer in safetensors FILE (layers.{l}.w_in, layers.{l}.w_out; zero moments,\n"
    "no update yet), written as checkpoint DIR; the old domains compute as before (--verify\n"
    "checks it through the evaluation step). To remove a domain, extract the others with\n"
    "--format ecss.\n"
    "--repeat-layers: model surgery, M6's Pseudo-to-Real: a model of K x the layers whose\n"
    "layer l starts as layer l % layers, each copy sharing its source's storage until its\n"
    "first update (--verify compares every expert with its source).\n"
    "--import: a safetensors FILE this tool wrote with --with-optimizer-state, back into a\n"
    "checkpoint DIR of its model that a session resumes (--verify compares it with FILE).\n"
    "Exit 0: written; 1: failed; 2: bad arguments.\n";

int BadArguments(std::string_view message) {
  std::cerr << "ecss-extract: " << message << "\n" << kUsage;
  return 2;
}

// What the command line asked for.
struct Args {
  ecss::ExtractOptions options;  // --checkpoint, --out, --with-optimizer-state, --verify, --force
  std::string domains, format = "safetensors", add_domain, copy_of, dense, experts, import, repeat;
  bool format_given = false;
};

// A bar redrawn in place on a terminal; otherwise a plain line at every tenth. Its stage
// becomes "verifying" once the first pass is done.
std::function<void(uint64_t, uint64_t)> ProgressBar(const char* first_stage) {
  struct State {
    bool terminal = isatty(STDERR_FILENO) != 0;
    int last_tenth = -1;
    const char* stage;
  };
  auto state = std::make_shared<State>();
  state->stage = first_stage;
  return [state](uint64_t done, uint64_t total) {
    const int tenth = static_cast<int>(done * 10 / total);
    const auto shown = static_cast<unsigned long long>(done);
    const auto of = static_cast<unsigned long long>(total);
    if (state->terminal) {
      const int width = 30, filled = static_cast<int>(done * width / total);
      std::fprintf(stderr, "\r%s [%s%s] %llu/%llu experts", state->stage,
                   std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(),
                   shown, of);
      if (done == total) std::fputc('\n', stderr);
    } else if (tenth != state->last_tenth) {
      std::fprintf(stderr, "%s: %llu/%llu experts\n", state->stage, shown, of);
    }
    state->last_tenth = tenth;
    if (done == total) {
      state->stage = "verifying";
      state->last_tenth = -1;
    }
  };
}

int Failed(const ecss::Status& status) {
  std::cerr << "ecss-extract: " << status << "\n";
  return 1;
}

int Import(const Args& a) {
  const ecss::ExtractOptions& o = a.options;
  if (o.out.empty() || !o.checkpoint.empty() || !a.domains.empty() || a.format_given ||
      o.with_optimizer_state || !a.add_domain.empty() || !a.copy_of.empty() || !a.dense.empty() ||
      !a.experts.empty() || !a.repeat.empty()) {
    return BadArguments("--import FILE takes --out DIR, and --verify and --force only");
  }
  ecss::StatusOr<ecss::ExtractReport> imported =
      ecss::ImportSafetensors({a.import, o.out, o.overwrite, o.verify, ProgressBar("importing")});
  if (!imported.ok()) return Failed(imported.status());
  std::cout << "wrote " << o.out << ": " << imported->experts << " experts (" << imported->initial
            << " never written), a checkpoint of " << imported->file_bytes << " bytes"
            << (imported->verified ? "; verified against the file" : "") << "\nmodel:\n"
            << ecss::FormatModelRecord(imported->model);
  return 0;
}

int RepeatLayers(const Args& a) {
  const ecss::ExtractOptions& o = a.options;
  uint32_t times = 0;
  const auto [end, error] =
      std::from_chars(a.repeat.data(), a.repeat.data() + a.repeat.size(), times);
  if (error != std::errc() || end != a.repeat.data() + a.repeat.size() || times < 2) {
    return BadArguments(ecss::StrCat("--repeat-layers '", a.repeat, "': a count of 2 or more"));
  }
  if (o.checkpoint.empty() || o.out.empty() || !a.domains.empty() || a.format_given ||
      o.with_optimizer_state || !a.add_domain.empty() || !a.copy_of.empty() || !a.dense.empty() ||
      !a.experts.empty()) {
    return BadArguments(
        "--repeat-layers K takes --checkpoint and --out, and --verify and --force only");
  }
  ecss::StatusOr<ecss::ExtractReport> deep =
      ecss::RepeatLayers({o.checkpoint, times, o.out, o.overwrite, o.verify});
  if (!deep.ok()) return Failed(deep.status());
  std::cout << "wrote " << o.out << ": " << deep->model.layers << " layers, " << deep->experts
            << " experts (" << deep->initial << " never written), a checkpoint of "
            << deep->file_bytes << " bytes"
            << (deep->verified ? "; every expert verified against its source" : "") << "\nmodel:\n"
            << ecss::FormatModelRecord(deep->model);
  return 0;
}

int AddDomain(const Args& a) {
  const ecss::ExtractOptions& o = a.options;
  if (a.add_domain.empty() || a.copy_of.empty() == a.dense.empty() || o.checkpoint.empty() ||
      o.out.empty()) {
    return BadArguments(
        "--add-domain NAME goes with --copy-of DOMAIN or --from-dense FILE (one of them), "
        "--checkpoint and --out");
  }
  uint64_t experts = 0;
  if (a.dense.empty() != a.experts.empty() ||
      (!a.experts.empty() && (!ecss::ParseUint(a.experts, UINT32_MAX, &experts) || experts == 0))) {
    return BadArguments("--from-dense FILE needs --experts N (N >= 1), and only it");
  }
  if (!a.domains.empty() || a.format_given || o.with_optimizer_state) {
    return BadArguments(
        "--add-domain writes a checkpoint: no --domains, --format or --with-optimizer-state");
  }
  ecss::AddDomainOptions add;
  add.checkpoint = o.checkpoint;
  add.name = a.add_domain;
  add.copy_of = a.copy_of;
  add.dense_ffn = a.dense;
  add.experts = static_cast<uint32_t>(experts);
  add.out = o.out;
  add.overwrite = o.overwrite;
  add.verify = o.verify;
  ecss::StatusOr<ecss::ExtractReport> grown = ecss::AddDomain(add);
  if (!grown.ok()) return Failed(grown.status());
  std::cout << "wrote " << o.out << ": domain '" << a.add_domain << "' added "
            << (a.dense.empty() ? ecss::StrCat("as a copy of '", a.copy_of, "'")
                                : ecss::StrCat("from the dense FFN of '", a.dense, "', ", experts,
                                               " experts per layer"))
            << "; " << grown->file_bytes << " bytes"
            << (grown->verified ? "; every expert verified against its source, the old domains by "
                                  "evaluation"
                                : "")
            << "\nmodel:\n"
            << ecss::FormatModelRecord(grown->model);
  return 0;
}

int Extract(Args a) {
  ecss::ExtractOptions& o = a.options;
  if (o.checkpoint.empty() || a.domains.empty() || o.out.empty()) {
    return BadArguments("--checkpoint, --domains and --out are required");
  }
  if (a.format != "safetensors" && a.format != "ecss") {
    return BadArguments(ecss::StrCat("--format '", a.format, "': safetensors or ecss"));
  }
  for (size_t start = 0; start <= a.domains.size();) {
    const size_t comma = std::min(a.domains.find(',', start), a.domains.size());
    o.domains.push_back(a.domains.substr(start, comma - start));
    start = comma + 1;
  }
  o.progress = ProgressBar("extracting");
  const bool ecss_format = a.format == "ecss";
  ecss::StatusOr<ecss::ExtractReport> report =
      ecss_format ? ecss::ExtractToCheckpoint(o) : ecss::ExtractToSafetensors(o);
  if (!report.ok()) return Failed(report.status());
  std::string kept;
  for (const ecss::DomainSpec& d : report->model.domains) {
    kept += ecss::StrCat(kept.empty() ? "" : ", ", d.name, " (", d.experts, " experts a layer)");
  }
  std::cout << "wrote " << o.out << ": " << kept << "; " << report->experts << " experts over "
            << report->model.layers << " layers (" << report->initial << " never written), "
            << (ecss_format ? "a checkpoint of " : ecss::StrCat(report->tensors, " tensors, "))
            << report->file_bytes << " bytes"
            << (report->verified ? ecss_format ? "; verified by evaluation" : "; verified" : "")
            << "\n";
  // What a session that loads the sub-model is created with (its options' model).
  if (ecss_format) std::cout << "model:\n" << ecss::FormatModelRecord(report->model);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  ecss::ExtractOptions& o = a.options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (arg == "--checkpoint") {
      if (!value(&o.checkpoint)) return BadArguments("--checkpoint needs a directory");
    } else if (arg == "--domains") {
      if (!value(&a.domains)) return BadArguments("--domains needs a list of names");
    } else if (arg == "--out") {
      if (!value(&o.out)) return BadArguments("--out needs a file");
    } else if (arg == "--format") {
      if (!value(&a.format)) return BadArguments("--format needs a name");
      a.format_given = true;
    } else if (arg == "--add-domain") {
      if (!value(&a.add_domain)) return BadArguments("--add-domain needs a name");
    } else if (arg == "--copy-of") {
      if (!value(&a.copy_of)) return BadArguments("--copy-of needs a domain");
    } else if (arg == "--from-dense") {
      if (!value(&a.dense)) return BadArguments("--from-dense needs a file");
    } else if (arg == "--experts") {
      if (!value(&a.experts)) return BadArguments("--experts needs a number");
    } else if (arg == "--repeat-layers") {
      if (!value(&a.repeat)) return BadArguments("--repeat-layers needs a count");
    } else if (arg == "--import") {
      if (!value(&a.import)) return BadArguments("--import needs a file");
    } else if (arg == "--with-optimizer-state") {
      o.with_optimizer_state = true;
    } else if (arg == "--verify") {
      o.verify = true;
    } else if (arg == "--force") {
      o.overwrite = true;
    } else {
      return BadArguments(ecss::StrCat("unknown argument '", arg, "'"));
    }
  }
  if (!a.import.empty()) return Import(a);
  if (!a.repeat.empty()) return RepeatLayers(a);
  if (!a.add_domain.empty() || !a.copy_of.empty() || !a.dense.empty() || !a.experts.empty()) {
    return AddDomain(a);
  }
  return Extract(std::move(a));
}
