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

bool ParseFloatBits(std::string_view text, float* value) {
  uint32_t bits = 0;
  if (!ParseNumber(text, &bits)) return false;
  *value = BitsToFloat(bits);
  return true;
}

// A value by its name, through the enum's own parser.
template <typename T, typename Parse>
bool ParseNamed(std::string_view text, Parse parse, T* value) {
  StatusOr<T> parsed = parse(text);
  if (parsed.ok()) *value = *parsed;
  return parsed.ok();
}

// Calls field(key, value) for each "key value" line of record `what`'s `text`, in order (a
// key with no value gets ""); DataLoss naming the record and the line for a line without its
// end, a key repeated (but `repeatable`) or one `field` refuses (returns false), and naming
// the key for one of `required` missing.
template <typename Field>
Status ParseRecord(std::string_view what, std::string_view text, std::string_view repeatable,
                   std::initializer_list<std::string_view> required, Field field) {
  std::set<std::string, std::less<>> seen;
  size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const size_t end = text.find('\n');
    if (end == std::string_view::npos) {
      return DataLossError(StrCat(what, " record line ", line_number, ": no line end"));
    }
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(end + 1);
    const size_t space = line.find(' ');
    const std::string_view key = line.substr(0, space);
    const std::string_view value = space == std::string_view::npos ? "" : line.substr(space + 1);
    const bool repeated = key != repeatable && !seen.insert(std::string(key)).second;
    if (repeated || !field(key, value)) {
      return DataLossError(StrCat(what, " record line ", line_number, ": '", line, "'"));
    }
  }
  for (std::string_view key : required) {
    if (seen.count(key) == 0) return DataLossError(StrCat(what, " record: no ", key));
  }
  return Status::Ok();
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
  if (m.initial_layers != 0) text += StrCat("initial_layers ", m.initial_layers, "\n");
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
  auto field = [&m](std::string_view key, std::string_view value) {
    if (key == "layers") return ParseNumber(value, &m.layers);
    if (key == "d_model") return ParseNumber(value, &m.d_model);
    if (key == "d_ff") return ParseNumber(value, &m.d_ff);
    if (key == "activation") return ParseNamed(value, ParseActivation, &m.activation);
    if (key == "dtype") return ParseNamed(value, ParseDType, &m.dtype);
    if (key == "vocab") return ParseNumber(value, &m.vocab);
    if (key == "seed") return ParseNumber(value, &m.seed);
    if (key == "builder") return ParseNamed(value, ParseTableBuilder, &m.builder);
    if (key == "init_scale_bits") return ParseFloatBits(value, &m.init_scale);
    if (key == "initial_layers") return ParseNumber(value, &m.initial_layers);  // when not 0
    if (key != "domain") return false;
    // EXPERTS ID KEY NAME
    DomainSpec d;
    uint32_t numbers[3] = {};
    std::string_view rest = value;
    for (uint32_t& n : numbers) {
      const size_t split = rest.find(' ');
      if (split == std::string_view::npos || !ParseNumber(rest.substr(0, split), &n)) {
        return false;
      }
      rest.remove_prefix(split + 1);
    }
    d.experts = numbers[0];
    d.id = numbers[1];
    d.source_first_expert = numbers[2];
    d.name = std::string(rest);
    m.domains.push_back(std::move(d));
    return true;
  };
  ECSS_RETURN_IF_ERROR(ParseRecord("model", text, "domain",
                                   {"layers", "d_model", "d_ff", "activation", "dtype", "vocab",
                                    "seed", "builder", "init_scale_bits"},
                                   field));
  Status valid = ValidateModel(m);
  if (!valid.ok()) return DataLossError(StrCat("model record: ", valid.message()));
  return m;
}

std::string FormatSessionRecord(const SessionRecord& r) {
  const HyperParams& h = r.hyper_params;
  std::string text =
      StrCat("steps ", r.steps, "\nlr_bits ", FloatBits(h.lr), "\nbeta1_bits ", FloatBits(h.beta1),
             "\nbeta2_bits ", FloatBits(h.beta2), "\neps_bits ", FloatBits(h.eps),
             "\nweight_decay_bits ", FloatBits(h.weight_decay), "\nmomentum_bits ",
             FloatBits(h.momentum), "\nnesterov ", h.nesterov ? 1 : 0, "\nheld_loss_scale_bits ",
             FloatBits(r.held_loss_scale), "\ngradient_dtype ", DTypeName(r.gradient_dtype), "\n");
  for (ExpertId id : r.held) text += StrCat("held ", id.layer, " ", id.expert, "\n");
  return text;
}

StatusOr<SessionRecord> ParseSessionRecord(std::string_view text) {
  SessionRecord r;
  HyperParams& h = r.hyper_params;
  ECSS_RETURN_IF_ERROR(ParseRecord(
      "session", text, "held",
      {"steps", "lr_bits", "beta1_bits", "beta2_bits", "eps_bits", "weight_decay_bits",
       "momentum_bits", "nesterov", "held_loss_scale_bits", "gradient_dtype"},
      [&](std::string_view key, std::string_view value) {
        if (key == "steps") return ParseNumber(value, &r.steps);
        if (key == "lr_bits") return ParseFloatBits(value, &h.lr);
        if (key == "beta1_bits") return ParseFloatBits(value, &h.beta1);
        if (key == "beta2_bits") return ParseFloatBits(value, &h.beta2);
        if (key == "eps_bits") return ParseFloatBits(value, &h.eps);
        if (key == "weight_decay_bits") return ParseFloatBits(value, &h.weight_decay);
        if (key == "momentum_bits") return ParseFloatBits(value, &h.momentum);
        if (key == "nesterov") {
          h.nesterov = value == "1";
          return value == "0" || value == "1";
        }
        if (key == "held_loss_scale_bits") return ParseFloatBits(value, &r.held_loss_scale);
        if (key == "gradient_dtype") return ParseNamed(value, ParseDType, &r.gradient_dtype);
        if (key != "held") return false;  // LAYER EXPERT
        const size_t split = value.find(' ');
        ExpertId id;
        if (split == std::string_view::npos || !ParseNumber(value.substr(0, split), &id.layer) ||
            !ParseNumber(value.substr(split + 1), &id.expert)) {
          return false;
        }
        r.held.push_back(id);
        return true;
      }));
  if (r.steps > (uint64_t{1} << 62)) {  // far beyond any run; StepStats::step must not wrap
    return DataLossError(StrCat("session record: ", r.steps, " steps"));
  }
  if (!(r.held_loss_scale > 0) || !std::isfinite(r.held_loss_scale)) {
    return DataLossError(StrCat("session record: held loss scale ", r.held_loss_scale));
  }
  return r;
}

uint64_t HeldGradientBytes(const SessionRecord& record, const ModelSpec& model) {
  return model.expert_params() * DTypeSize(record.gradient_dtype);
}

StatusOr<std::optional<SessionState>> SessionStateOf(const std::vector<CheckpointBlob>& blobs,
                                                     const ModelSpec& model) {
  const CheckpointBlob* session = FindBlob(blobs, kSessionBlob);
  const CheckpointBlob* held = FindBlob(blobs, kHeldGradientsBlob);
  if (session == nullptr) {
    if (held == nullptr) return std::optional<SessionState>();
    return DataLossError(StrCat(kHeldGradientsBlob, " without ", kSessionBlob));
  }
  SessionState state;
  ECSS_ASSIGN_OR_RETURN(state.record, ParseSessionRecord(session->bytes));
  if (held != nullptr) state.held_gradients = held->bytes;
  const uint64_t want = state.record.held.size() * HeldGradientBytes(state.record, model);
  if (state.held_gradients.size() != want) {
    return DataLossError(StrCat(kHeldGradientsBlob, ": ", state.held_gradients.size(),
                                " bytes, not the ", want, " of ", state.record.held.size(),
                                " held experts' gradients"));
  }
  return std::optional<SessionState>(std::move(state));
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
  if (saved.initial_layers != here.initial_layers) {
    return differs("initial_layers", saved.initial_layers, here.initial_layers);
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
  if (const CheckpointBlob* blob = FindBlob(reader.blobs(), kModelBlob); blob != nullptr) {
    StatusOr<ModelSpec> model = ParseModelRecord(blob->bytes);
    if (!model.ok()) return model.status().Annotate(StrCat("checkpoint '", reader.where(), "'"));
    return model;
  }
  return FailedPreconditionError(StrCat("checkpoint '", reader.where(),
                                        "' does not record its model (saved by a build before "
                                        "the model record)"));
}

StatusOr<ModelSpec> CheckpointModel(const std::string& checkpoint) {
  ECSS_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader,
                        CheckpointReader::OpenPath(checkpoint));
  return CheckpointModel(*reader);
}

StatusOr<std::optional<SessionState>> CheckSessionRecords(const std::vector<CheckpointBlob>& blobs,
                                                          const SessionOptions& options) {
  for (const CheckpointBlob& blob : blobs) {
    if (blob.name.rfind(kSessionBlobPrefix, 0) == 0 && blob.name != kOptimizerBlob &&
        blob.name != kModelBlob && blob.name != kSessionBlob && blob.name != kHeldGradientsBlob) {
      return FailedPreconditionError(StrCat("the checkpoint holds a session record '", blob.name,
                                            "' this build does not know (a newer build's?)"));
    }
  }
  const CheckpointBlob* kind = FindBlob(blobs, kOptimizerBlob);
  if (kind != nullptr && kind->bytes != OptimizerKindName(options.optimizer.kind)) {
    return FailedPreconditionError(StrCat("the checkpoint's moments are ", kind->bytes,
                                          "'s; this session's optimizer is ",
                                          OptimizerKindName(options.optimizer.kind)));
  }
  if (const CheckpointBlob* model = FindBlob(blobs, kModelBlob); model != nullptr) {
    ECSS_ASSIGN_OR_RETURN(const ModelSpec saved, ParseModelRecord(model->bytes));
    ECSS_RETURN_IF_ERROR(CheckSameModel(saved, options.model));
  }
  ECSS_ASSIGN_OR_RETURN(std::optional<SessionState> state, SessionStateOf(blobs, options.model));
  if (!state) return state;  // a build before the session record
  const SessionRecord& record = state->record;
  Status valid = ValidateHyperParams(options.optimizer.kind, record.hyper_params);
  if (!valid.ok()) return DataLossError(StrCat("session record: ", valid.message()));
  if (record.held.empty()) return state;
  if (!options.delayed_update) {
    return FailedPreconditionError(
        StrCat("the checkpoint holds the delayed update's gradients of ", record.held.size(),
               " experts for the next step's update: resume it with delayed_update"));
  }
  if (record.gradient_dtype != options.gradient_dtype) {
    return FailedPreconditionError(
        StrCat("the checkpoint's held gradients are ", DTypeName(record.gradient_dtype),
               "; this session's gradient_dtype is ", DTypeName(options.gradient_dtype)));
  }
  std::set<ExpertId> distinct;
  for (ExpertId id : record.held) {
    if (id.layer >= options.model.layers || id.expert >= options.model.experts_per_layer() ||
        !distinct.insert(id).second) {
      return DataLossError(StrCat("session record: held expert (", id.layer, ", ", id.expert,
                                  ") is not one expert of the model once"));
    }
  }
  return state;
}

std::string InitialValuesId(const ModelSpec& m) {
  std::string id = StrCat("uniform per expert from a counter rng, seed ", m.seed, ", scale ",
                          m.init_scale > 0 ? StrCat(m.init_scale) : std::string("1/sqrt(fan-in)"),
                          ", ", DTypeName(m.dtype), " weights, zero moments");
  if (m.initial_layers != 0) id += StrCat("; layer l drawn as layer l % ", m.initial_layers);
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
  CounterRng rng(m.seed, (uint64_t{m.InitialLayer(layer)} << 32) | m.InitialKey(expert));
  for (uint64_t i = 0; i < params; ++i) {
    const float scale = i < in_elems ? in_scale : out_scale;
    master[i] = (rng.UniformFloat() * 2 - 1) * scale;
  }
}

}  // namespace ecss
