#include "engine/checkpoint_record.h"

#include <charconv>
#include <cmath>
#include <set>

#include "runtime/base/random.h"
#include "runtime/base/str_cat.h"

namespace ecss {

namespace {

template <typename T>
bool ParseNumber(std::string_view text, T* value) {
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), *value);
  return error == std::errc() && end == text.data() + text.size();
}

// name:experts, with the id and initial values' key where they are not the defaults.
std::string Domains(const ModelSpec& m) {
  std::string list;
  uint32_t first = 0;
  for (size_t d = 0; d < m.domains.size(); ++d) {
    list += StrCat(list.empty() ? "" : ", ", m.domains[d].name, ":", m.domains[d].experts);
    if (m.DomainId(d) != d) list += StrCat(" id ", m.DomainId(d));
    if (m.InitialKey(first) != first) list += StrCat(" drawn from expert ", m.InitialKey(first));
    first += m.domains[d].experts;
  }
  return StrCat("[", list, "]");
}

}  // namespace

Status ValidateModel(const ModelSpec& model) {
  SessionOptions options;  // the model's rules, with limits that pass their own
  options.model = model;
  options.limits.max_tokens_per_micro_batch = 1;
  return options.Validate();
}

std::string FormatModelRecord(const ModelSpec& m) {
  std::string text =
      StrCat("layers ", m.layers, "\nd_model ", m.d_model, "\nd_ff ", m.d_ff, "\nactivation ",
             ActivationName(m.activation), "\ndtype ", DTypeName(m.dtype), "\nvocab ", m.vocab,
             "\nseed ", m.seed, "\nbuilder ", TableBuilderName(m.builder), "\ninit_scale_bits ",
             FloatBits(m.init_scale), "\n");
  uint32_t first = 0;
  for (size_t d = 0; d < m.domains.size(); ++d) {
    text += StrCat("domain ", m.domains[d].experts, " ", m.DomainId(d), " ", m.InitialKey(first),
                   " ", m.domains[d].name, "\n");
    first += m.domains[d].experts;
  }
  return text;
}

StatusOr<ModelSpec> ParseModelRecord(std::string_view text) {
  ModelSpec m;
  std::set<std::string, std::less<>> seen;
  size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const size_t end = text.find('\n');
    if (end == std::string_view::npos) {
      return DataLossError(StrCat("model record line ", line_number, ": no line end"));
    }
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(end + 1);
    const size_t space = line.find(' ');
    const std::string_view key = line.substr(0, space);
    const std::string_view value = space == std::string_view::npos ? "" : line.substr(space + 1);
    auto bad = [&] {
      return DataLossError(StrCat("model record line ", line_number, ": '", line, "'"));
    };
    if (key != "domain" && !seen.insert(std::string(key)).second) return bad();
    bool ok = true;
    if (key == "layers") {
      ok = ParseNumber(value, &m.layers);
    } else if (key == "d_model") {
      ok = ParseNumber(value, &m.d_model);
    } else if (key == "d_ff") {
      ok = ParseNumber(value, &m.d_ff);
    } else if (key == "activation") {
      StatusOr<Activation> a = ParseActivation(value);
      ok = a.ok();
      if (ok) m.activation = *a;
    } else if (key == "dtype") {
      StatusOr<DType> d = ParseDType(value);
      ok = d.ok();
      if (ok) m.dtype = *d;
    } else if (key == "vocab") {
      ok = ParseNumber(value, &m.vocab);
    } else if (key == "seed") {
      ok = ParseNumber(value, &m.seed);
    } else if (key == "builder") {
      StatusOr<TableBuilder> b = ParseTableBuilder(value);
      ok = b.ok();
      if (ok) m.builder = *b;
    } else if (key == "init_scale_bits") {
      uint32_t bits = 0;
      ok = ParseNumber(value, &bits);
      m.init_scale = BitsToFloat(bits);
    } else if (key == "domain") {  // EXPERTS ID KEY NAME
      DomainSpec d;
      uint32_t numbers[3] = {};
      std::string_view rest = value;
      for (uint32_t& n : numbers) {
        const size_t split = rest.find(' ');
        ok = ok && split != std::string_view::npos && ParseNumber(rest.substr(0, split), &n);
        rest.remove_prefix(ok ? split + 1 : rest.size());
      }
      d.experts = numbers[0];
      d.id = numbers[1];
      d.source_first_expert = numbers[2];
      d.name = std::string(rest);
      m.domains.push_back(std::move(d));
    } else {
      ok = false;
    }
    if (!ok) return bad();
  }
  for (std::string_view key : {"layers", "d_model", "d_ff", "activation", "dtype", "vocab", "seed",
                               "builder", "init_scale_bits"}) {
    if (seen.count(key) == 0) return DataLossError(StrCat("model record: no ", key));
  }
  Status valid = ValidateModel(m);
  if (!valid.ok()) return DataLossError(StrCat("model record: ", valid.message()));
  return m;
}

Status CheckSameModel(const ModelSpec& saved, const ModelSpec& here) {
  auto differs = [](std::string_view field, const auto& there, const auto& now) {
    return FailedPreconditionError(StrCat("the checkpoint is of another model: ", field, " ", there,
                                          " there, ", now, " here"));
  };
  if (saved.layers != here.layers) return differs("layers", saved.layers, here.layers);
  if (saved.d_model != here.d_model) return differs("d_model", saved.d_model, here.d_model);
  if (saved.d_ff != here.d_ff) return differs("d_ff", saved.d_ff, here.d_ff);
  if (saved.activation != here.activation) {
    return differs("activation", ActivationName(saved.activation), ActivationName(here.activation));
  }
  if (saved.dtype != here.dtype)
    return differs("dtype", DTypeName(saved.dtype), DTypeName(here.dtype));
  if (saved.vocab != here.vocab) return differs("vocab", saved.vocab, here.vocab);
  if (saved.seed != here.seed) return differs("seed", saved.seed, here.seed);
  if (saved.builder != here.builder) {
    return differs("builder", TableBuilderName(saved.builder), TableBuilderName(here.builder));
  }
  if (FloatBits(saved.init_scale) != FloatBits(here.init_scale)) {
    return differs("init_scale",
                   StrCat(saved.init_scale, " (bits ", FloatBits(saved.init_scale), ")"),
                   StrCat(here.init_scale, " (bits ", FloatBits(here.init_scale), ")"));
  }
  bool same_domains = saved.domains.size() == here.domains.size();
  uint32_t first = 0;
  for (size_t d = 0; same_domains && d < saved.domains.size(); ++d) {
    same_domains = saved.domains[d].name == here.domains[d].name &&
                   saved.domains[d].experts == here.domains[d].experts &&
                   saved.DomainId(d) == here.DomainId(d) &&
                   saved.InitialKey(first) == here.InitialKey(first);
    first += saved.domains[d].experts;
  }
  if (!same_domains) return differs("domains", Domains(saved), Domains(here));
  return Status::Ok();
}

StatusOr<ModelSpec> CheckpointModel(const CheckpointReader& reader) {
  for (const CheckpointBlob& blob : reader.blobs()) {
    if (blob.name != kModelBlob) continue;
    StatusOr<ModelSpec> model = ParseModelRecord(blob.bytes);
    if (!model.ok()) return model.status().Annotate(StrCat("checkpoint '", reader.where(), "'"));
    return model;
  }
  return FailedPreconditionError(StrCat("checkpoint '", reader.where(),
                                        "' does not record its model (saved by a build before "
                                        "the model record)"));
}

StatusOr<ModelSpec> CheckpointModel(const std::string& checkpoint) {
  const auto [root, name] = SplitCheckpointPath(checkpoint);
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::Open(root, name));
  return CheckpointModel(*reader);
}

Status CheckSessionRecords(const std::vector<CheckpointBlob>& blobs,
                           const SessionOptions& options) {
  for (const CheckpointBlob& blob : blobs) {
    if (blob.name == kOptimizerBlob && blob.bytes != OptimizerKindName(options.optimizer.kind)) {
      return FailedPreconditionError(StrCat("the checkpoint's moments are ", blob.bytes,
                                            "'s; this session's optimizer is ",
                                            OptimizerKindName(options.optimizer.kind)));
    }
    if (blob.name == kModelBlob) {
      ECSS_ASSIGN_OR_RETURN(const ModelSpec saved, ParseModelRecord(blob.bytes));
      ECSS_RETURN_IF_ERROR(CheckSameModel(saved, options.model));
    }
  }
  return Status::Ok();
}

std::string InitialValuesId(const ModelSpec& m) {
  std::string id = StrCat("uniform per expert from a counter rng, seed ", m.seed, ", scale ",
                          m.init_scale > 0 ? StrCat(m.init_scale) : std::string("1/sqrt(fan-in)"),
                          ", ", DTypeName(m.dtype), " weights, zero moments");
  // A sub-model's groups drawn as experts of the model they came from.
  uint32_t first = 0;
  for (const DomainSpec& d : m.domains) {
    if (m.InitialKey(first) != first) {
      id += StrCat("; experts ", first, "-", first + d.experts - 1, " drawn as ",
                   m.InitialKey(first), "-", m.InitialKey(first) + d.experts - 1);
    }
    first += d.experts;
  }
  return id;
}

void DrawInitialMaster(const ModelSpec& m, uint32_t layer, uint32_t expert, float* master) {
  const float in_scale =
      m.init_scale > 0 ? m.init_scale : 1.0f / std::sqrt(static_cast<float>(m.d_model));
  const float out_scale =
      m.init_scale > 0 ? m.init_scale : 1.0f / std::sqrt(static_cast<float>(m.d_ff));
  const uint64_t in_elems = uint64_t{m.d_model} * m.d_in();
  const uint64_t params = m.expert_params();
  CounterRng rng(m.seed, (uint64_t{layer} << 32) | m.InitialKey(expert));
  for (uint64_t i = 0; i < params; ++i) {
    const float scale = i < in_elems ? in_scale : out_scale;
    master[i] = (rng.UniformFloat() * 2 - 1) * scale;
  }
}

}  // namespace ecss
