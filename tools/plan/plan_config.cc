#include "tools/plan/plan_config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "runtime/base/str_cat.h"

namespace ecss::plan {
namespace {

using Json = nlohmann::json;

std::string TypeName(const Json& j) {
  return j.is_number()    ? "a number"
         : j.is_string()  ? "a string"
         : j.is_object()  ? "an object"
         : j.is_array()   ? "an array"
         : j.is_boolean() ? "true/false"
                          : "null";
}

// What a field may hold, inclusive. The upper bounds keep every product of sizes the planner
// forms inside 64 bits and every figure physical; the lower ones keep times finite.
struct Range {
  double min = 1;
  double max = 1 << 20;
};
constexpr Range kCount{1, 1 << 20};          // layers, experts, devices, steps, ...
constexpr Range kOptionalCount{0, 1 << 20};  // the same, 0 allowed
constexpr Range kWidth{1, 1 << 18};          // d_model, d_ff
constexpr Range kGroup{1, 65535};            // experts of a domain's group (router tables)
constexpr Range kTokens{1, 1 << 24};         // tokens of a micro-batch, vocabulary
constexpr Range kGib{1e-3, 1 << 30};         // memory and capacity, GiB (up to 1 EiB)
constexpr Range kRate{1e-3, 1e9};            // GB/s, TFLOPS
constexpr Range kOptionalRate{0, 1e9};
constexpr Range kMicroseconds{0, 1e6};
constexpr Range kNanoseconds{0, 1e9};
constexpr Range kFraction{1e-3, 1};
constexpr Range kSessionFraction{1e-3, kMostSessionFraction};  // NvmeDrive::session_fraction

// One JSON object being read: each field is read once, by name; Finish refuses the fields
// nobody read (a misspelt or unknown one), naming its path.
class Fields {
 public:
  Fields(const Json& j, std::string path) : j_(j), path_(std::move(path)) {}

  static StatusOr<Fields> Of(const Json& j, std::string path) {
    if (!j.is_object()) {
      return InvalidArgumentError(StrCat(path, ": must be an object, not ", TypeName(j)));
    }
    return Fields(j, std::move(path));
  }

  std::string Path(std::string_view key) const { return StrCat(path_, ".", key); }
  bool Has(std::string_view key) const { return j_.contains(std::string(key)); }

  // A number in `range`, finite; absent: `*out` keeps its default unless required.
  Status Number(std::string_view key, double* out, bool required, Range range) {
    const Json* v = Get(key);
    if (v == nullptr) return Missing(key, required);
    if (!v->is_number()) return Wrong(key, "a number", *v);
    const double x = v->get<double>();
    ECSS_RETURN_IF_ERROR(Check(key, x, range, *v));
    *out = x;
    return Status::Ok();
  }

  // A whole number in `range` (which T holds).
  template <typename T>
  Status Integer(std::string_view key, T* out, bool required, Range range) {
    const Json* v = Get(key);
    if (v == nullptr) return Missing(key, required);
    if (!v->is_number()) return Wrong(key, "an integer", *v);
    const double x = v->get<double>();
    if (v->is_number_float() && x != std::floor(x)) return Wrong(key, "an integer", *v);
    ECSS_RETURN_IF_ERROR(Check(key, x, range, *v));
    *out = v->is_number_unsigned() ? static_cast<T>(v->get<uint64_t>()) : static_cast<T>(x);
    return Status::Ok();
  }

  Status String(std::string_view key, std::string* out, bool required) {
    const Json* v = Get(key);
    if (v == nullptr) return Missing(key, required);
    if (!v->is_string()) return Wrong(key, "a string", *v);
    *out = v->get<std::string>();
    return Status::Ok();
  }

  // A string parsed by `parse` (StatusOr<T>(std::string_view)); its error gets the path.
  template <typename T, typename Parse>
  Status Enum(std::string_view key, T* out, bool required, Parse parse) {
    std::string text;
    const bool present = Has(key);
    ECSS_RETURN_IF_ERROR(String(key, &text, required));
    if (!present) return Status::Ok();
    StatusOr<T> parsed = parse(text);
    if (!parsed.ok()) {
      return InvalidArgumentError(StrCat(Path(key), ": ", parsed.status().message()));
    }
    *out = *parsed;
    return Status::Ok();
  }

  // A non-empty array of numbers in `range`; absent: `*out` is left as it is.
  Status Numbers(std::string_view key, std::vector<double>* out, Range range) {
    const Json* v = Get(key);
    if (v == nullptr) return Status::Ok();
    if (!v->is_array() || v->empty()) return Wrong(key, "a non-empty array of numbers", *v);
    std::vector<double> values;
    for (size_t i = 0; i < v->size(); ++i) {
      const Json& x = (*v)[i];
      const std::string element = StrCat(key, "[", i, "]");
      if (!x.is_number()) return Wrong(element, "a number", x);
      ECSS_RETURN_IF_ERROR(Check(element, x.get<double>(), range, x));
      values.push_back(x.get<double>());
    }
    *out = std::move(values);
    return Status::Ok();
  }

  // A nested object or array (null when absent and not required).
  StatusOr<const Json*> Child(std::string_view key, bool required) {
    const Json* v = Get(key);
    if (v == nullptr && required) return Missing(key, true);
    return v;
  }

  Status Finish() const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (read_.count(it.key()) == 0) {
        return InvalidArgumentError(StrCat(Path(it.key()), ": unknown field"));
      }
    }
    return Status::Ok();
  }

 private:
  const Json* Get(std::string_view key) {
    read_.insert(std::string(key));
    auto it = j_.find(std::string(key));
    return it == j_.end() ? nullptr : &*it;
  }
  Status Missing(std::string_view key, bool required) const {
    return required ? InvalidArgumentError(StrCat(Path(key), ": required")) : Status::Ok();
  }
  Status Wrong(std::string_view key, std::string_view want, const Json& v) const {
    return InvalidArgumentError(
        StrCat(Path(key), ": must be ", want, ", not ", TypeName(v), " (", v.dump(), ")"));
  }

  Status Check(std::string_view key, double x, Range range, const Json& v) const {
    if (!std::isfinite(x) || x < 0 || (range.min > 0 && x == 0)) {
      return InvalidArgumentError(
          StrCat(Path(key), ": must be ", range.min > 0 ? "> 0" : ">= 0", " (got ", v.dump(), ")"));
    }
    if (x < range.min) {
      return InvalidArgumentError(
          StrCat(Path(key), ": must be at least ", range.min, " (got ", v.dump(), ")"));
    }
    if (x > range.max) {
      return InvalidArgumentError(
          StrCat(Path(key), ": must be at most ", range.max, " (got ", v.dump(), ")"));
    }
    return Status::Ok();
  }

  const Json& j_;
  std::string path_;
  std::set<std::string> read_;
};

StatusOr<Json> ParseJson(std::string_view text, std::string_view root) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return InvalidArgumentError(StrCat(root, ": not valid JSON"));
  }
  return j;
}

StatusOr<Tier> ParseWeightsTier(std::string_view name) {
  if (name == "pinned") return Tier::kPinned;
  if (name == "nvme") return Tier::kNvme;
  return InvalidArgumentError(StrCat("'", name, "': pinned or nvme"));
}

StatusOr<Tier> ParseStatesTier(std::string_view name) {
  if (name == "host") return Tier::kHost;
  if (name == "nvme") return Tier::kNvme;
  return InvalidArgumentError(StrCat("'", name, "': host or nvme"));
}

StatusOr<DeviceKind> ParseDeviceKind(std::string_view name) {
  if (name == "cuda") return DeviceKind::kCuda;
  if (name == "sim") return DeviceKind::kSim;
  return InvalidArgumentError(StrCat("'", name, "': cuda or sim"));
}

// ---- Presets -----------------------------------------------------------------------------------

struct PresetText {
  const char* kind;
  const char* name;
  const char* about;
  const char* json;
};

// The figures and where they come from. Shapes not stated in a paper are derived from its
// parameter count and said so.
const PresetText kPresets[] = {
    {"model", "pangu-sigma",
     "PanGu-Σ 1.085T: 8 RRE layers of 40 domains x 16 experts, d_model 5120, d_ff 20480 "
     "(PanGu-α 13B's shapes; 8 x 640 experts x 209.7M = 1.074T, plus the dense 11.5B)",
     R"({"name": "pangu-sigma", "sparse_layers": 8, "d_model": 5120, "d_ff": 20480,
         "activation": "gelu",
         "routing": {"kind": "rre", "domains": 40, "experts_per_domain": 16},
         "dense_params": 11500000000, "vocab": 40000, "dtype": "bf16",
         "gradient_dtype": "f32", "optimizer": "adam"})"},
    {"model", "m6-10t",
     "M6-10T: 48 MoE layers, 10,240 experts (secondary source), d_model 1024, d_ff 10240 "
     "(assumed, to give 10.3T), learned top-1 gate",
     R"({"name": "m6-10t", "sparse_layers": 48, "d_model": 1024, "d_ff": 10240,
         "activation": "gelu",
         "routing": {"kind": "gate", "experts": 10240, "k": 1, "load_balance": "uniform"},
         "dense_params": 4000000000, "vocab": 50000, "dtype": "bf16",
         "gradient_dtype": "f32", "optimizer": "adamw"})"},
    {"model", "yuan2-m32",
     "Yuan2.0-M32: 24 layers of 32 SwiGLU experts, d_model 2048, d_ff 8192, attention router "
     "top-2 (24 x 32 x 50.3M = 38.7B experts of its 40B)",
     R"({"name": "yuan2-m32", "sparse_layers": 24, "d_model": 2048, "d_ff": 8192,
         "activation": "swiglu",
         "routing": {"kind": "gate", "experts": 32, "k": 2, "load_balance": "uniform"},
         "dense_params": 1300000000, "vocab": 135040, "dtype": "bf16",
         "gradient_dtype": "f32", "optimizer": "adamw"})"},
    {"model", "bench-default",
     "ecss-bench step's default model: 4 RRE layers of 40 domains x 2 experts, d_model 512, "
     "d_ff 1024",
     R"({"name": "bench-default", "sparse_layers": 4, "d_model": 512, "d_ff": 1024,
         "activation": "gelu",
         "routing": {"kind": "rre", "domains": 40, "experts_per_domain": 2},
         "vocab": 50257, "dtype": "bf16", "gradient_dtype": "f32", "optimizer": "adamw"})"},
    {"hardware", "8xh100-sxm",
     "8 H100 SXM 80 GB (datasheet), PCIe 5 x16 at 50 GB/s, 2 TiB host, 112 optimizer threads, "
     "8 NVMe drives of 3.84 TB at 6.8 / 4.0 GB/s",
     R"({"name": "8xh100-sxm", "nodes": 1, "devices_per_node": 8,
         "device": {"kind": "cuda", "memory_gib": 80, "profile": "h100-sxm",
                    "h2d_gbps": 50, "d2h_gbps": 50},
         "host": {"memory_gib": 2048, "pinned_limit_gib": 1536, "optimizer_threads": 112,
                  "optimizer_params_per_s_per_thread": 250000000},
         "nvme": {"drives": 8, "capacity_gib": 3576, "read_gbps": 6.8, "write_gbps": 4.0},
         "network_gbps": 50})"},
    {"hardware", "8xa100-80g",
     "8 A100 SXM 80 GB (datasheet), PCIe 4 x16 at 25 GB/s, 1 TiB host, 96 optimizer threads, "
     "4 NVMe drives of 3.84 TB at 6.8 / 4.0 GB/s",
     R"({"name": "8xa100-80g", "nodes": 1, "devices_per_node": 8,
         "device": {"kind": "cuda", "memory_gib": 80, "profile": "a100-sxm",
                    "h2d_gbps": 25, "d2h_gbps": 25},
         "host": {"memory_gib": 1024, "pinned_limit_gib": 768, "optimizer_threads": 96,
                  "optimizer_params_per_s_per_thread": 250000000},
         "nvme": {"drives": 4, "capacity_gib": 3576, "read_gbps": 6.8, "write_gbps": 4.0},
         "network_gbps": 25})"},
    {"hardware", "910x8",
     "a 910-class node: 8 accelerators of 32 GB HBM, 256 TFLOPS fp16, 1.2 TB/s, PCIe 4 x16 at "
     "25 GB/s, 768 GiB host, 192 optimizer threads (4 x 48-core ARM), 100 Gb/s between nodes",
     R"({"name": "910x8", "nodes": 1, "devices_per_node": 8,
         "device": {"kind": "cuda", "memory_gib": 32, "tflops_bf16": 256, "tflops_f32": 64,
                    "memory_bandwidth_gbps": 1200, "launch_overhead_us": 10,
                    "h2d_gbps": 25, "d2h_gbps": 25},
         "host": {"memory_gib": 768, "pinned_limit_gib": 512, "optimizer_threads": 192,
                  "optimizer_params_per_s_per_thread": 100000000},
         "nvme": {"drives": 2, "capacity_gib": 3576, "read_gbps": 3.0, "write_gbps": 2.0},
         "network_gbps": 12.5})"},
    {"hardware", "910x512", "PanGu-Σ's cluster: 64 nodes of the 910-class node (512 accelerators)",
     R"({"name": "910x512", "nodes": 64, "devices_per_node": 8,
         "device": {"kind": "cuda", "memory_gib": 32, "tflops_bf16": 256, "tflops_f32": 64,
                    "memory_bandwidth_gbps": 1200, "launch_overhead_us": 10,
                    "h2d_gbps": 25, "d2h_gbps": 25},
         "host": {"memory_gib": 768, "pinned_limit_gib": 512, "optimizer_threads": 192,
                  "optimizer_params_per_s_per_thread": 100000000},
         "nvme": {"drives": 2, "capacity_gib": 3576, "read_gbps": 3.0, "write_gbps": 2.0},
         "network_gbps": 12.5})"},
    {"hardware", "this-machine",
     "this development VM: the simulated device (sim-timed, h100-sxm profile), 2 cores, 24 GiB, "
     "one virtual disk; uncalibrated figures",
     R"({"name": "this-machine", "nodes": 1, "devices_per_node": 1,
         "device": {"kind": "sim", "memory_gib": 4, "profile": "h100-sxm"},
         "host": {"memory_gib": 24, "pinned_limit_gib": 16, "optimizer_threads": 1,
                  "optimizer_params_per_s_per_thread": 700000000},
         "nvme": {"drives": 1, "capacity_gib": 70, "read_gbps": 1.3, "write_gbps": 0.8}})"},
};

const PresetText* FindPreset(std::string_view kind, std::string_view name) {
  for (const PresetText& p : kPresets) {
    if (kind == p.kind && name == p.name) return &p;
  }
  return nullptr;
}

Status UnknownPreset(std::string_view kind, std::string_view name) {
  std::string known;
  for (const PresetText& p : kPresets) {
    if (kind == p.kind) known += StrCat(known.empty() ? "" : ", ", p.name);
  }
  return NotFoundError(StrCat(kind, " '", name, "': no such file or preset (presets: ", known,
                              "; ecss-plan --list-presets)"));
}

// The JSON text of a file, or of a preset.
StatusOr<std::string> TextOf(std::string_view kind, std::string_view file_or_preset) {
  const std::string path(file_or_preset);
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (!error && std::filesystem::exists(status)) {
    if (!std::filesystem::is_regular_file(status)) {  // a directory, a fifo, a device
      return InvalidArgumentError(StrCat(kind, " file '", path, "': not a regular file"));
    }
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) return NotFoundError(StrCat(kind, " file '", path, "': cannot be read"));
    return text.str();
  }
  const bool looks_like_file = kind == "workload" || path.find('/') != std::string::npos ||
                               (path.size() > 5 && path.substr(path.size() - 5) == ".json");
  if (looks_like_file) return NotFoundError(StrCat(kind, " file '", path, "': no such file"));
  const PresetText* preset = FindPreset(kind, file_or_preset);
  if (preset == nullptr) return UnknownPreset(kind, file_or_preset);
  return std::string(preset->json);
}

Status ReadRouting(const Json& j, const std::string& path, ModelConfig& m) {
  ECSS_ASSIGN_OR_RETURN(Fields f, Fields::Of(j, path));
  std::string kind;
  ECSS_RETURN_IF_ERROR(f.String("kind", &kind, true));
  if (kind == "rre") {
    m.routing = Routing::kRre;
    ECSS_ASSIGN_OR_RETURN(const Json* domains, f.Child("domains", true));
    if (domains->is_array()) {  // [{"name", "experts"}, ...]: groups may differ in size
      if (domains->empty()) return InvalidArgumentError(StrCat(f.Path("domains"), ": empty"));
      for (size_t d = 0; d < domains->size(); ++d) {
        ECSS_ASSIGN_OR_RETURN(Fields g,
                              Fields::Of((*domains)[d], StrCat(f.Path("domains"), "[", d, "]")));
        DomainSpec spec;
        spec.name = StrCat("domain", d);
        ECSS_RETURN_IF_ERROR(g.String("name", &spec.name, false));
        ECSS_RETURN_IF_ERROR(g.Integer("experts", &spec.experts, true, kGroup));
        ECSS_RETURN_IF_ERROR(g.Finish());
        m.domains.push_back(std::move(spec));
      }
    } else {  // "domains": N, "experts_per_domain": E
      uint32_t count = 0, experts = 0;
      ECSS_RETURN_IF_ERROR(f.Integer("domains", &count, true, kCount));
      ECSS_RETURN_IF_ERROR(f.Integer("experts_per_domain", &experts, true, kGroup));
      for (uint32_t d = 0; d < count; ++d) m.domains.push_back({StrCat("domain", d), experts});
    }
    uint64_t width = 0;
    std::set<std::string> names;
    for (size_t d = 0; d < m.domains.size(); ++d) {
      width += m.domains[d].experts;
      if (!names.insert(m.domains[d].name).second) {
        return InvalidArgumentError(StrCat(f.Path("domains"), "[", d, "].name: '",
                                           m.domains[d].name, "' names an earlier domain too"));
      }
    }
    if (width > kCount.max) {
      return InvalidArgumentError(
          StrCat(path, ": ", width, " experts per layer, at most ", kCount.max));
    }
    uint32_t stated = 0;  // optional: the layer's width, checked against the groups
    ECSS_RETURN_IF_ERROR(f.Integer("experts_per_layer", &stated, false, kCount));
    if (stated != 0 && stated != m.experts_per_layer()) {
      return InvalidArgumentError(StrCat(f.Path("experts_per_layer"), ": ", stated,
                                         ", but the domains' groups add up to ",
                                         m.experts_per_layer()));
    }
  } else if (kind == "gate") {
    m.routing = Routing::kLearnedGate;
    ECSS_RETURN_IF_ERROR(f.Integer("experts", &m.gate_experts, true, kGroup));
    ECSS_RETURN_IF_ERROR(f.Integer("k", &m.gate_k, true, kCount));
    std::string balance = "uniform";
    ECSS_RETURN_IF_ERROR(f.String("load_balance", &balance, false));
    if (balance != "uniform") {
      return InvalidArgumentError(
          StrCat(f.Path("load_balance"), ": '", balance, "': only \"uniform\" is modelled"));
    }
    if (m.gate_k > m.gate_experts) {
      return InvalidArgumentError(
          StrCat(f.Path("k"), ": ", m.gate_k, " is more than the ", m.gate_experts, " experts"));
    }
  } else {
    return InvalidArgumentError(StrCat(f.Path("kind"), ": '", kind, "': rre or gate"));
  }
  return f.Finish();
}

StatusOr<Json> Root(std::string_view json, std::string_view root) {
  ECSS_ASSIGN_OR_RETURN(Json j, ParseJson(json, root));
  if (!j.is_object()) {
    return InvalidArgumentError(StrCat(root, ": must be an object, not ", TypeName(j)));
  }
  return j;
}

}  // namespace

double HardwareConfig::OptimizerParamsPerSecond(double threads) const {
  const std::vector<double>& by = optimizer_params_per_s_by_threads;
  if (by.empty()) return optimizer_params_per_s_per_thread * threads;
  if (threads <= 1) return by[0] * threads;
  const auto measured = static_cast<double>(by.size());
  if (threads >= measured) return by.back() / measured * threads;
  const auto below = static_cast<size_t>(threads);  // >= 1
  return by[below - 1] + (threads - static_cast<double>(below)) * (by[below] - by[below - 1]);
}

double HardwareConfig::nvme_capacity_gib() const {
  double gib = 0;
  for (const NvmeDrive& drive : nvme) gib += drive.capacity_gib;
  return gib;
}

uint32_t ModelConfig::experts_per_layer() const {
  if (routing == Routing::kLearnedGate) return gate_experts;
  uint32_t n = 0;
  for (const DomainSpec& d : domains) n += d.experts;
  return n;
}

uint64_t ModelConfig::expert_params() const {
  const uint64_t d_in = activation == Activation::kSwiGlu ? 2ull * d_ff : d_ff;
  return uint64_t{d_model} * d_in + uint64_t{d_ff} * d_model;
}

uint64_t ModelConfig::total_params() const {
  return uint64_t{sparse_layers} * experts_per_layer() * expert_params() + dense_params;
}

StatusOr<ModelConfig> ParseModel(std::string_view json, std::string_view root) {
  ECSS_ASSIGN_OR_RETURN(const Json j, Root(json, root));
  Fields f(j, std::string(root));
  ModelConfig m;
  ECSS_RETURN_IF_ERROR(f.String("name", &m.name, false));
  ECSS_RETURN_IF_ERROR(f.Integer("sparse_layers", &m.sparse_layers, true, {1, 4096}));
  ECSS_RETURN_IF_ERROR(f.Integer("d_model", &m.d_model, true, kWidth));
  ECSS_RETURN_IF_ERROR(f.Integer("d_ff", &m.d_ff, true, kWidth));
  ECSS_RETURN_IF_ERROR(f.Enum("activation", &m.activation, false, ParseActivation));
  ECSS_ASSIGN_OR_RETURN(const Json* routing, f.Child("routing", true));
  ECSS_RETURN_IF_ERROR(ReadRouting(*routing, f.Path("routing"), m));
  ECSS_RETURN_IF_ERROR(f.Integer("dense_params", &m.dense_params, false, {0, 1e15}));
  ECSS_RETURN_IF_ERROR(f.Integer("vocab", &m.vocab, true, kTokens));
  ECSS_RETURN_IF_ERROR(f.Enum("dtype", &m.dtype, false, ParseDType));
  ECSS_RETURN_IF_ERROR(f.Enum("gradient_dtype", &m.gradient_dtype, false, ParseDType));
  ECSS_RETURN_IF_ERROR(f.Enum("optimizer", &m.optimizer, false, ParseOptimizerKind));
  ECSS_RETURN_IF_ERROR(f.Finish());
  if (m.dtype != DType::kBF16 && m.dtype != DType::kF32) {
    return InvalidArgumentError(StrCat(f.Path("dtype"), ": bf16 or f32"));
  }
  if (m.gradient_dtype != DType::kBF16 && m.gradient_dtype != DType::kF32) {
    return InvalidArgumentError(StrCat(f.Path("gradient_dtype"), ": bf16 or f32"));
  }
  for (size_t d = 0; d < m.domains.size(); ++d) {
    if (m.domains[d].experts > m.vocab) {
      return InvalidArgumentError(StrCat(root, ".routing.domains[", d,
                                         "].experts: ", m.domains[d].experts,
                                         " is more than the vocabulary (", m.vocab, " token ids)"));
    }
  }
  // Every size the planner multiplies stays far inside 64 bits.
  const double params = static_cast<double>(m.sparse_layers) * m.experts_per_layer() *
                        static_cast<double>(m.expert_params());
  if (params > 1e15) {
    return InvalidArgumentError(StrCat(root, ": ", params,
                                       " expert parameters; the planner takes "
                                       "up to 10^15"));
  }
  return m;
}

StatusOr<HardwareConfig> ParseHardware(std::string_view json, std::string_view root) {
  ECSS_ASSIGN_OR_RETURN(const Json j, Root(json, root));
  Fields f(j, std::string(root));
  HardwareConfig h;
  ECSS_RETURN_IF_ERROR(f.String("name", &h.name, false));
  ECSS_RETURN_IF_ERROR(f.Integer("nodes", &h.nodes, false, {1, 65536}));
  ECSS_RETURN_IF_ERROR(f.Integer("devices_per_node", &h.devices_per_node, false, {1, 1024}));
  {
    ECSS_ASSIGN_OR_RETURN(const Json* device, f.Child("device", true));
    ECSS_ASSIGN_OR_RETURN(Fields d, Fields::Of(*device, f.Path("device")));
    ECSS_RETURN_IF_ERROR(d.Enum("kind", &h.device_kind, false, ParseDeviceKind));
    ECSS_RETURN_IF_ERROR(d.Number("memory_gib", &h.device_memory_gib, true, kGib));
    std::string profile;
    ECSS_RETURN_IF_ERROR(d.String("profile", &profile, false));
    if (!profile.empty()) {
      StatusOr<DeviceProfile> found = FindDeviceProfile(profile);
      if (!found.ok()) {
        return InvalidArgumentError(StrCat(d.Path("profile"), ": ", found.status().message()));
      }
      h.device = *found;
    } else {
      h.device.name = h.name;
    }
    // Each figure is the profile's unless given; without a profile every one is required.
    const bool need = profile.empty();
    DeviceProfile& p = h.device;
    ECSS_RETURN_IF_ERROR(d.Number("tflops_bf16", &p.peak_tflops_bf16, need, kRate));
    ECSS_RETURN_IF_ERROR(d.Number("tflops_f32", &p.peak_tflops_f32, need, kRate));
    ECSS_RETURN_IF_ERROR(d.Number("memory_bandwidth_gbps", &p.memory_bandwidth_gbps, need, kRate));
    ECSS_RETURN_IF_ERROR(
        d.Number("launch_overhead_us", &p.launch_overhead_us, false, kMicroseconds));
    ECSS_RETURN_IF_ERROR(d.Number("gemm_efficiency", &p.gemm_efficiency, false, kFraction));
    ECSS_RETURN_IF_ERROR(d.Number("h2d_gbps", &p.h2d_bandwidth_gbps, need, kRate));
    ECSS_RETURN_IF_ERROR(d.Number("d2h_gbps", &p.d2h_bandwidth_gbps, need, kRate));
    ECSS_RETURN_IF_ERROR(d.Number("copy_latency_us", &h.copy_latency_us, false, kMicroseconds));
    ECSS_RETURN_IF_ERROR(
        d.Number("host_wait_latency_us", &h.host_wait_latency_us, false, kMicroseconds));
    ECSS_RETURN_IF_ERROR(d.Finish());
  }
  {
    ECSS_ASSIGN_OR_RETURN(const Json* host, f.Child("host", true));
    ECSS_ASSIGN_OR_RETURN(Fields o, Fields::Of(*host, f.Path("host")));
    ECSS_RETURN_IF_ERROR(o.Number("memory_gib", &h.host_memory_gib, true, kGib));
    ECSS_RETURN_IF_ERROR(o.Number("pinned_limit_gib", &h.pinned_limit_gib, false, kGib));
    ECSS_RETURN_IF_ERROR(o.Integer("optimizer_threads", &h.optimizer_threads, true, kCount));
    constexpr Range kUpdates{1, 1e13};
    const bool per_thread = o.Has("optimizer_params_per_s_per_thread");
    if (per_thread == o.Has("optimizer_params_per_s_by_threads")) {
      return InvalidArgumentError(
          StrCat(o.Path("optimizer_params_per_s_per_thread"), ": ",
                 per_thread ? "give it or optimizer_params_per_s_by_threads, not both"
                            : "required (or optimizer_params_per_s_by_threads)"));
    }
    ECSS_RETURN_IF_ERROR(o.Number("optimizer_params_per_s_per_thread",
                                  &h.optimizer_params_per_s_per_thread, false, kUpdates));
    ECSS_RETURN_IF_ERROR(o.Numbers("optimizer_params_per_s_by_threads",
                                   &h.optimizer_params_per_s_by_threads, kUpdates));
    ECSS_RETURN_IF_ERROR(
        o.Number("optimizer_update_gap_us", &h.optimizer_update_gap_us, false, kMicroseconds));
    ECSS_RETURN_IF_ERROR(
        o.Number("routing_ns_per_token_layer", &h.routing_ns_per_token_layer, false, kNanoseconds));
    ECSS_RETURN_IF_ERROR(
        o.Number("routing_ns_per_table_line", &h.routing_ns_per_table_line, false, kNanoseconds));
    ECSS_RETURN_IF_ERROR(
        o.Number("step_begin_ns_per_op", &h.step_begin_ns_per_op, false, kNanoseconds));
    ECSS_RETURN_IF_ERROR(o.Number("gradient_add_gbps", &h.gradient_add_gbps, false, kOptionalRate));
    ECSS_RETURN_IF_ERROR(o.Number("gradient_add_beside_optimizer_gbps",
                                  &h.gradient_add_beside_optimizer_gbps, false, kOptionalRate));
    if (h.gradient_add_beside_optimizer_gbps > h.gradient_add_gbps) {
      return InvalidArgumentError(StrCat(
          o.Path("gradient_add_beside_optimizer_gbps"), ": ", h.gradient_add_beside_optimizer_gbps,
          " is more than gradient_add_gbps (", h.gradient_add_gbps,
          "): the additions beside the optimizer are no faster than alone"));
    }
    ECSS_RETURN_IF_ERROR(o.Number("optimizer_rate_beside_additions",
                                  &h.optimizer_rate_beside_additions, false, kFraction));
    ECSS_RETURN_IF_ERROR(o.Finish());
    if (h.pinned_limit_gib == 0) h.pinned_limit_gib = h.host_memory_gib;
    if (h.pinned_limit_gib > h.host_memory_gib) {
      return InvalidArgumentError(StrCat(o.Path("pinned_limit_gib"), ": ", h.pinned_limit_gib,
                                         " is more than host.memory_gib (", h.host_memory_gib,
                                         ")"));
    }
  }
  ECSS_ASSIGN_OR_RETURN(const Json* nvme, f.Child("nvme", false));
  if (nvme != nullptr) {  // {"drives": N, capacity, read, write}: N alike drives
    ECSS_ASSIGN_OR_RETURN(Fields n, Fields::Of(*nvme, f.Path("nvme")));
    uint32_t drives = 1;
    NvmeDrive drive;
    ECSS_RETURN_IF_ERROR(n.Integer("drives", &drives, false, {1, 1024}));
    ECSS_RETURN_IF_ERROR(n.Number("capacity_gib", &drive.capacity_gib, true, kGib));
    ECSS_RETURN_IF_ERROR(n.Number("read_gbps", &drive.read_gbps, true, kRate));
    ECSS_RETURN_IF_ERROR(n.Number("write_gbps", &drive.write_gbps, true, kRate));
    ECSS_RETURN_IF_ERROR(
        n.Number("session_fraction", &drive.session_fraction, false, kSessionFraction));
    ECSS_RETURN_IF_ERROR(
        n.Number("update_overhead_us", &drive.update_overhead_us, false, kMicroseconds));
    ECSS_RETURN_IF_ERROR(n.Finish());
    h.nvme.assign(drives, drive);
  }
  ECSS_RETURN_IF_ERROR(f.Number("network_gbps", &h.network_gbps, false, kOptionalRate));
  ECSS_RETURN_IF_ERROR(f.Finish());
  if (h.nodes > 1 && h.network_gbps == 0) {
    return InvalidArgumentError(StrCat(root, ".network_gbps: required with more than one node"));
  }
  return h;
}

StatusOr<WorkloadConfig> ParseWorkload(std::string_view json, std::string_view root) {
  ECSS_ASSIGN_OR_RETURN(const Json j, Root(json, root));
  Fields f(j, std::string(root));
  WorkloadConfig w;
  ECSS_RETURN_IF_ERROR(
      f.Integer("tokens_per_micro_batch", &w.tokens_per_micro_batch, true, kTokens));
  ECSS_RETURN_IF_ERROR(f.Integer("seq_len", &w.seq_len, false, kTokens));
  ECSS_RETURN_IF_ERROR(f.Integer("micro_batches", &w.micro_batches, false, {1, 1024}));
  ECSS_RETURN_IF_ERROR(f.Integer("domains_per_step", &w.domains_per_step, false, kCount));
  ECSS_RETURN_IF_ERROR(f.Enum("strategy", &w.strategy, false, ParseStrategy));
  ECSS_ASSIGN_OR_RETURN(const Json* placement, f.Child("placement", false));
  if (placement != nullptr) {
    ECSS_ASSIGN_OR_RETURN(Fields p, Fields::Of(*placement, f.Path("placement")));
    ECSS_RETURN_IF_ERROR(p.Enum("weights", &w.weights, false, ParseWeightsTier));
    ECSS_RETURN_IF_ERROR(p.Enum("states", &w.states, false, ParseStatesTier));
    ECSS_RETURN_IF_ERROR(p.Finish());
    if (w.weights == Tier::kNvme && w.states != Tier::kNvme) {
      return InvalidArgumentError(
          StrCat(p.Path("weights"), ": nvme needs placement.states nvme too"));
    }
  }
  ECSS_RETURN_IF_ERROR(f.Number("device_budget_gib", &w.device_budget_gib, false, {0, 1 << 30}));
  ECSS_RETURN_IF_ERROR(
      f.Integer("prefetch_window_experts", &w.prefetch_window_experts, false, kOptionalCount));
  ECSS_RETURN_IF_ERROR(f.Integer("steps", &w.steps, false, {1, 1000}));
  ECSS_RETURN_IF_ERROR(f.Integer("seed", &w.seed, false, {0, 9e15}));
  ECSS_RETURN_IF_ERROR(f.Integer("checkpoints_kept", &w.checkpoints_kept, false, {0, 1000}));
  ECSS_RETURN_IF_ERROR(f.Finish());
  if (w.tokens_per_micro_batch % w.seq_len != 0) {
    return InvalidArgumentError(StrCat(root, ".seq_len: ", w.seq_len,
                                       " does not divide tokens_per_micro_batch (",
                                       w.tokens_per_micro_batch, ")"));
  }
  if (uint64_t{w.tokens_per_micro_batch} * w.micro_batches > (uint64_t{1} << 31)) {
    return InvalidArgumentError(StrCat(root, ": ", w.micro_batches, " micro-batches of ",
                                       w.tokens_per_micro_batch,
                                       " tokens are more than 2^31 tokens a step"));
  }
  return w;
}

namespace {

// A file's or a preset's text parsed; a file's errors name the file.
template <typename Config>
StatusOr<Config> Load(std::string_view kind, std::string_view file_or_preset,
                      StatusOr<Config> (*parse)(std::string_view, std::string_view)) {
  ECSS_ASSIGN_OR_RETURN(const std::string text, TextOf(kind, file_or_preset));
  StatusOr<Config> parsed = parse(text, kind);
  if (!parsed.ok() && FindPreset(kind, file_or_preset) == nullptr) {
    return parsed.status().Annotate(StrCat(kind, " file '", file_or_preset, "'"));
  }
  return parsed;
}

}  // namespace

StatusOr<ModelConfig> LoadModel(std::string_view file_or_preset) {
  return Load("model", file_or_preset, &ParseModel);
}

StatusOr<HardwareConfig> LoadHardware(std::string_view file_or_preset) {
  return Load("hardware", file_or_preset, &ParseHardware);
}

StatusOr<WorkloadConfig> LoadWorkload(std::string_view file_or_preset) {
  return Load("workload", file_or_preset, &ParseWorkload);
}

std::vector<Preset> Presets() {
  std::vector<Preset> out;
  for (const PresetText& p : kPresets) out.push_back({p.kind, p.name, p.about});
  return out;
}

WorkloadConfig DefaultWorkloadFor(const ModelConfig& model) {
  WorkloadConfig w;
  // ecss-bench step's default shape: 8 samples of 256 tokens, 4 domains a step.
  w.tokens_per_micro_batch = 2048;
  w.domains_per_step = std::min<uint32_t>(4, std::max<size_t>(model.domains.size(), 1));
  return w;
}

}  // namespace ecss::plan
