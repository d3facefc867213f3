// ecss-extract: a domain's sub-model cut out of a session's checkpoint, as a safetensors file
// (tools/extract/extract.h says what it holds). Exit codes: 0 written (and verified with
// --verify), 1 failed (the message names what), 2 bad arguments.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <iostream>
#include <string>
#include <string_view>

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
    "(weights, moments, update counts), written as checkpoint DIR; the old domains compute\n"
    "as before (--verify checks it through the evaluation step). To remove a domain, extract\n"
    "the others with --format ecss.\n"
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

}  // namespace

int main(int argc, char** argv) {
  ecss::ExtractOptions options;
  std::string domains, format = "safetensors", add_domain, copy_of, import, repeat;
  bool format_given = false;
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
      if (!value(&options.checkpoint)) return BadArguments("--checkpoint needs a directory");
    } else if (arg == "--domains") {
      if (!value(&domains)) return BadArguments("--domains needs a list of names");
    } else if (arg == "--out") {
      if (!value(&options.out)) return BadArguments("--out needs a file");
    } else if (arg == "--format") {
      if (!value(&format)) return BadArguments("--format needs a name");
      format_given = true;
    } else if (arg == "--add-domain") {
      if (!value(&add_domain)) return BadArguments("--add-domain needs a name");
    } else if (arg == "--copy-of") {
      if (!value(&copy_of)) return BadArguments("--copy-of needs a domain");
    } else if (arg == "--repeat-layers") {
      if (!value(&repeat)) return BadArguments("--repeat-layers needs a count");
    } else if (arg == "--import") {
      if (!value(&import)) return BadArguments("--import needs a file");
    } else if (arg == "--with-optimizer-state") {
      options.with_optimizer_state = true;
    } else if (arg == "--verify") {
      options.verify = true;
    } else if (arg == "--force") {
      options.overwrite = true;
    } else {
      return BadArguments(ecss::StrCat("unknown argument '", arg, "'"));
    }
  }
  // A bar redrawn in place on a terminal; otherwise a plain line at every tenth.
  const bool terminal = isatty(STDERR_FILENO) != 0;
  int last_tenth = -1;
  const char* stage = import.empty() ? "extracting" : "importing";
  auto progress = [&](uint64_t done, uint64_t total) {
    const int tenth = static_cast<int>(done * 10 / total);
    if (terminal) {
      const int width = 30, filled = static_cast<int>(done * width / total);
      std::fprintf(stderr, "\r%s [%s%s] %llu/%llu experts", stage, std::string(filled, '#').c_str(),
                   std::string(width - filled, ' ').c_str(), static_cast<unsigned long long>(done),
                   static_cast<unsigned long long>(total));
      if (done == total) std::fputc('\n', stderr);
    } else if (tenth != last_tenth) {
      std::fprintf(stderr, "%s: %llu/%llu experts\n", stage, static_cast<unsigned long long>(done),
                   static_cast<unsigned long long>(total));
    }
    last_tenth = tenth;
    if (done == total) {
      stage = "verifying";
      last_tenth = -1;
    }
  };
  if (!import.empty()) {
    if (options.out.empty() || !options.checkpoint.empty() || !domains.empty() || format_given ||
        options.with_optimizer_state || !add_domain.empty() || !copy_of.empty()) {
      return BadArguments("--import FILE takes --out DIR, and --verify and --force only");
    }
    ecss::ImportOptions import_options{import, options.out, options.overwrite, options.verify,
                                       progress};
    ecss::StatusOr<ecss::ExtractReport> imported = ecss::ImportSafetensors(import_options);
    if (!imported.ok()) {
      std::cerr << "ecss-extract: " << imported.status() << "\n";
      return 1;
    }
    std::cout << "wrote " << options.out << ": " << imported->experts << " experts ("
              << imported->initial << " never updated), a checkpoint of " << imported->file_bytes
              << " bytes" << (imported->verified ? "; verified against the file" : "")
              << "\nmodel:\n"
              << ecss::FormatModelRecord(imported->model);
    return 0;
  }
  if (!repeat.empty()) {
    uint32_t times = 0;
    const auto [end, error] = std::from_chars(repeat.data(), repeat.data() + repeat.size(), times);
    if (error != std::errc() || end != repeat.data() + repeat.size() || times < 2) {
      return BadArguments(ecss::StrCat("--repeat-layers '", repeat, "': a count of 2 or more"));
    }
    if (options.checkpoint.empty() || options.out.empty() || !domains.empty() || format_given ||
        options.with_optimizer_state || !add_domain.empty() || !copy_of.empty()) {
      return BadArguments(
          "--repeat-layers K takes --checkpoint and --out, and --verify and --force only");
    }
    ecss::RepeatLayersOptions deepen{options.checkpoint, times, options.out, options.overwrite,
                                     options.verify};
    ecss::StatusOr<ecss::ExtractReport> deep = ecss::RepeatLayers(deepen);
    if (!deep.ok()) {
      std::cerr << "ecss-extract: " << deep.status() << "\n";
      return 1;
    }
    std::cout << "wrote " << options.out << ": " << deep->model.layers << " layers, "
              << deep->experts << " experts (" << deep->initial
              << " never updated), a checkpoint of " << deep->file_bytes << " bytes"
              << (deep->verified ? "; every expert verified against its source" : "")
              << "\nmodel:\n"
              << ecss::FormatModelRecord(deep->model);
    return 0;
  }
  const bool surgery = !add_domain.empty() || !copy_of.empty();
  if (surgery) {
    if (add_domain.empty() || copy_of.empty() || options.checkpoint.empty() ||
        options.out.empty()) {
      return BadArguments(
          "--add-domain NAME and --copy-of DOMAIN go together, with --checkpoint "
          "and --out");
    }
    if (!domains.empty() || format_given || options.with_optimizer_state) {
      return BadArguments(
          "--add-domain writes a checkpoint: no --domains, --format or "
          "--with-optimizer-state");
    }
    ecss::AddDomainOptions add{options.checkpoint, add_domain,        copy_of,
                               options.out,        options.overwrite, options.verify};
    ecss::StatusOr<ecss::ExtractReport> grown = ecss::AddDomain(add);
    if (!grown.ok()) {
      std::cerr << "ecss-extract: " << grown.status() << "\n";
      return 1;
    }
    std::cout << "wrote " << options.out << ": domain '" << add_domain << "' added as a copy of '"
              << copy_of << "'; " << grown->file_bytes << " bytes"
              << (grown->verified ? "; the old domains verified by evaluation" : "") << "\nmodel:\n"
              << ecss::FormatModelRecord(grown->model);
    return 0;
  }
  if (options.checkpoint.empty() || domains.empty() || options.out.empty()) {
    return BadArguments("--checkpoint, --domains and --out are required");
  }
  if (format != "safetensors" && format != "ecss") {
    return BadArguments(ecss::StrCat("--format '", format, "': safetensors or ecss"));
  }
  options.progress = progress;
  for (size_t start = 0; start <= domains.size();) {
    const size_t comma = std::min(domains.find(',', start), domains.size());
    options.domains.push_back(domains.substr(start, comma - start));
    start = comma + 1;
  }
  ecss::StatusOr<ecss::ExtractReport> report =
      format == "ecss" ? ecss::ExtractToCheckpoint(options) : ecss::ExtractToSafetensors(options);
  if (!report.ok()) {
    std::cerr << "ecss-extract: " << report.status() << "\n";
    return 1;
  }
  std::string kept;
  for (const ecss::DomainSpec& d : report->model.domains) {
    kept += ecss::StrCat(kept.empty() ? "" : ", ", d.name, " (", d.experts, " experts a layer)");
  }
  std::cout << "wrote " << options.out << ": " << kept << "; " << report->experts
            << " experts over " << report->model.layers << " layers (" << report->initial
            << " never updated), "
            << (format == "ecss" ? "a checkpoint of " : ecss::StrCat(report->tensors, " tensors, "))
            << report->file_bytes << " bytes"
            << (report->verified ? format == "ecss" ? "; verified by evaluation" : "; verified"
                                 : "")
            << "\n";
  // What a session that loads the sub-model is created with (its options' model).
  if (format == "ecss") std::cout << "model:\n" << ecss::FormatModelRecord(report->model);
  return 0;
}
