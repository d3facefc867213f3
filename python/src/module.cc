// The `ecss` Python module's native part (_ecss): the session and its options, the device, the
// RRE tables, step statistics and checkpoints, over the C++ API of engine/session.h. Errors
// raise ecss.Error subclasses (python/src/errors.h); tensors cross through DLPack
// (python/src/tensor_arg.h). The Python package (python/ecss) re-exports this and adds the
// PyTorch layer. Calls that wait (a step's forward, backward and end, synchronize, creation)
// release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "engine/checkpoint_record.h"
#include "engine/memory_plan.h"
#include "engine/plan_inputs.h"
#include "engine/session.h"
#include "python/src/errors.h"
#include "python/src/tensor_arg.h"
#include "runtime/base/str_cat.h"
#include "runtime/base/trace.h"
#include "runtime/device/backend_factory.h"
#include "tools/plan/plan_config.h"
#include "tools/plan/planner.h"

namespace ecss::python {
namespace {

namespace py = pybind11;
// pybind11's documented way to its "name"_a keyword literal (clang-tidy takes the using-
// declaration of the operator for unused).
using namespace pybind11::literals;  // NOLINT(google-build-using-namespace)

// ---- Options: plain structs with keyword construction ----------------------------------------

// T(**kwargs): each keyword sets the field of its name; an unknown one is InvalidArgument
// naming it (a typo must not be silently ignored).
template <typename T>
void KeywordInit(py::class_<T>& cls, const char* type_name) {
  cls.def(py::init([type_name](const py::kwargs& kwargs) {
    py::object object = py::cast(T{});
    for (const auto& [key, value] : kwargs) {
      const std::string field = py::str(key);
      if (!py::hasattr(object, key)) {
        ThrowIfError(InvalidArgumentError(StrCat(type_name, " has no field '", field, "'")));
      }
      try {
        object.attr(key) = value;
      } catch (py::error_already_set& error) {       // a value of the wrong type, a read-only field
        if (!error.matches(PyExc_Exception)) throw;  // KeyboardInterrupt and the like
        ThrowIfError(InvalidArgumentError(
            StrCat(type_name, ".", field, ": ", std::string(py::str(error.value())))));
      }
    }
    return object.cast<T>();
  }));
}

// A list field, read as a copy and written whole: `spec.domains = [...]` (an element read from
// it is the caller's own: changing it or appending to the list changes no spec).
template <typename T, typename V>
void ListField(py::class_<T>& cls, const char* field, std::vector<V> T::*member) {
  cls.def_property(
      field, [member](const T& t) { return t.*member; },
      [member](T& t, std::vector<V> value) { t.*member = std::move(value); });
}

// A field of enum type E, read and written as its name ("bf16", "gelu", "nvme").
template <typename T, typename E, typename NameFn, typename ParseFn>
void EnumField(py::class_<T>& cls, const char* field, E T::*member, NameFn name, ParseFn parse) {
  cls.def_property(
      field, [member, name](const T& t) { return std::string(name(t.*member)); },
      [member, parse](T& t, const std::string& value) { t.*member = ValueOrThrow(parse(value)); });
}

void BindOptions(py::module_& m) {
  py::class_<DomainSpec> domain(m, "DomainSpec", "A domain and its experts per sparse layer.");
  domain
      .def(py::init([](std::string name, uint32_t experts, std::optional<uint32_t> id,
                       std::optional<uint32_t> source_first_expert) {
             DomainSpec d{std::move(name), experts};
             d.id = id;
             d.source_first_expert = source_first_expert;
             return d;
           }),
           "name"_a, "experts"_a, "id"_a = py::none(), "source_first_expert"_a = py::none())
      .def_readwrite("name", &DomainSpec::name)
      .def_readwrite("experts", &DomainSpec::experts)
      .def_readwrite("id", &DomainSpec::id, "routing key and sample id; None: the index")
      .def_readwrite("source_first_expert", &DomainSpec::source_first_expert,
                     "initial values' key of the first expert (a sub-model's); None: its own");

  py::class_<ModelSpec> model(m, "ModelSpec",
                              "The sparse layers' shape (engine/session_options.h).");
  KeywordInit(model, "ModelSpec");
  model.def_readwrite("layers", &ModelSpec::layers)
      .def_readwrite("d_model", &ModelSpec::d_model)
      .def_readwrite("d_ff", &ModelSpec::d_ff)
      .def_readwrite("vocab", &ModelSpec::vocab)
      .def_readwrite("seed", &ModelSpec::seed)
      .def_readwrite("init_scale", &ModelSpec::init_scale)
      .def_readwrite("initial_layers", &ModelSpec::initial_layers)
      .def_property_readonly("expert_params", &ModelSpec::expert_params);
  ListField(model, "domains", &ModelSpec::domains);
  EnumField(model, "activation", &ModelSpec::activation, ActivationName, ParseActivation);
  EnumField(model, "dtype", &ModelSpec::dtype, DTypeName, ParseDType);
  EnumField(model, "builder", &ModelSpec::builder, TableBuilderName, ParseTableBuilder);

  py::class_<StepLimits> limits(m, "StepLimits");
  KeywordInit(limits, "StepLimits");
  limits.def_readwrite("max_tokens_per_micro_batch", &StepLimits::max_tokens_per_micro_batch)
      .def_readwrite("max_micro_batches", &StepLimits::max_micro_batches)
      .def_readwrite("max_active_experts_per_layer", &StepLimits::max_active_experts_per_layer);

  py::class_<Budgets> budgets(m, "Budgets");
  KeywordInit(budgets, "Budgets");
  budgets.def_readwrite("device_bytes", &Budgets::device_bytes)
      .def_readwrite("pinned_bytes", &Budgets::pinned_bytes)
      .def_readwrite("host_bytes", &Budgets::host_bytes)
      .def_readwrite("lock_pinned", &Budgets::lock_pinned);

  py::class_<Placement> placement(m, "Placement");
  KeywordInit(placement, "Placement");
  EnumField(placement, "weights", &Placement::weights, TierName, ParseTier);
  EnumField(placement, "master", &Placement::master, TierName, ParseTier);
  EnumField(placement, "moments", &Placement::moments, TierName, ParseTier);
  EnumField(placement, "gradients", &Placement::gradients, TierName, ParseTier);
  ListField(placement, "nvme_dirs", &Placement::nvme_dirs);
  placement.def_readwrite("max_file_bytes", &Placement::max_file_bytes)
      .def_readwrite("write_initial_states", &Placement::write_initial_states)
      .def_readwrite("resume", &Placement::resume)
      .def_readwrite("overwrite", &Placement::overwrite)
      .def_readwrite("resume_from", &Placement::resume_from)
      .def_readwrite("weight_staging_blocks", &Placement::weight_staging_blocks);

  py::class_<HyperParams> hyper(m, "HyperParams");
  KeywordInit(hyper, "HyperParams");
  hyper.def_readwrite("lr", &HyperParams::lr)
      .def_readwrite("beta1", &HyperParams::beta1)
      .def_readwrite("beta2", &HyperParams::beta2)
      .def_readwrite("eps", &HyperParams::eps)
      .def_readwrite("weight_decay", &HyperParams::weight_decay)
      .def_readwrite("momentum", &HyperParams::momentum)
      .def_readwrite("nesterov", &HyperParams::nesterov);

  py::class_<CpuOptimizerOptions> optimizer(m, "OptimizerOptions");
  KeywordInit(optimizer, "OptimizerOptions");
  EnumField(optimizer, "kind", &CpuOptimizerOptions::kind, OptimizerKindName, ParseOptimizerKind);
  ListField(optimizer, "groups", &CpuOptimizerOptions::groups);
  optimizer.def_readwrite("threads", &CpuOptimizerOptions::threads)
      .def_readwrite("max_grad_norm", &CpuOptimizerOptions::max_grad_norm)
      .def_readwrite("skip_step_on_nonfinite", &CpuOptimizerOptions::skip_step_on_nonfinite);

  py::class_<SessionOptions> options(m, "SessionOptions");
  KeywordInit(options, "SessionOptions");
  EnumField(options, "strategy", &SessionOptions::strategy, StrategyName, ParseStrategy);
  EnumField(options, "gradient_dtype", &SessionOptions::gradient_dtype, DTypeName, ParseDType);
  options.def_readwrite("model", &SessionOptions::model)
      .def_readwrite("limits", &SessionOptions::limits)
      .def_readwrite("budgets", &SessionOptions::budgets)
      .def_readwrite("placement", &SessionOptions::placement)
      .def_readwrite("optimizer", &SessionOptions::optimizer)
      .def_readwrite("delayed_update", &SessionOptions::delayed_update)
      .def_readwrite("prefetch_window_experts", &SessionOptions::prefetch_window_experts)
      .def_readwrite("kernel_threads", &SessionOptions::kernel_threads)
      .def_readwrite("record_op_times", &SessionOptions::record_op_times)
      .def("validate", [](const SessionOptions& o) { ThrowIfError(o.Validate()); });
}

// ---- Device ---------------------------------------------------------------------------------

// A backend and the trace its lanes record into (the session's trace too).
struct PyDevice {
  std::unique_ptr<TraceRecorder> trace;
  std::unique_ptr<Backend> backend;
};

std::shared_ptr<PyDevice> MakeDevice(const std::string& setting, uint64_t memory_bytes,
                                     double h2d_gbps, double d2h_gbps, bool trace) {
  auto device = std::make_shared<PyDevice>();
  if (trace) device->trace = std::make_unique<TraceRecorder>("ecss");
  BackendOptions options = ValueOrThrow(ParseDeviceSetting(setting));
  options.sim.device_memory_bytes = memory_bytes;
  options.sim.h2d_bandwidth_gbps = h2d_gbps;
  options.sim.d2h_bandwidth_gbps = d2h_gbps;
  options.sim.trace = device->trace.get();
  options.cuda.device_memory_bytes = memory_bytes;
  options.cuda.trace = device->trace.get();
  py::gil_scoped_release release;
  device->backend = ValueOrThrow(CreateBackend(options));
  return device;
}

// ---- Step statistics ------------------------------------------------------------------------

// EndStep's statistics, and the bytes the binding itself copied between Python's host tensors
// and the device for them (already inside h2d_bytes / d2h_bytes: every byte of the backend),
// and the time its forward and backward calls spent below Python (the GIL released: copies
// in, the session's call, copies out and the wait for them), from which a loop tells the
// binding's and its own glue's share of a step.
struct PyStepStats {
  StepStats stats;
  uint64_t tensor_h2d_bytes = 0;
  uint64_t tensor_d2h_bytes = 0;
  double call_seconds = 0;
};

py::dict StatsDict(const PyStepStats& p) {
  const StepStats& s = p.stats;
  py::dict stalls("update_fence_seconds"_a = s.stalls.update_fence_seconds,
                  "gradient_copy_seconds"_a = s.stalls.gradient_copy_seconds,
                  "stage_sync_seconds"_a = s.stalls.stage_sync_seconds,
                  "optimizer_seconds"_a = s.stalls.optimizer_seconds,
                  "update_backlog_seconds"_a = s.stalls.update_backlog_seconds,
                  "total_seconds"_a = s.stalls.total());
  py::dict resources;
  for (const ResourceUse& r : s.metrics.resources) {
    resources[py::str(r.name)] =
        py::dict("busy_seconds"_a = r.busy_seconds, "exposed_seconds"_a = r.exposed_seconds);
  }
  py::object overlap =
      s.metrics.overlap_fraction ? py::cast(*s.metrics.overlap_fraction) : py::object(py::none());
  return py::dict(
      "step"_a = s.step, "tokens"_a = s.tokens, "seconds"_a = s.seconds,
      "begin_seconds"_a = s.begin_seconds, "tokens_per_s"_a = s.tokens_per_s,
      "h2d_bytes"_a = s.h2d_bytes, "d2h_bytes"_a = s.d2h_bytes,
      "expert_fetch_bytes"_a = s.expert_fetch_bytes, "gradient_bytes"_a = s.gradient_bytes,
      "tensor_h2d_bytes"_a = p.tensor_h2d_bytes, "tensor_d2h_bytes"_a = p.tensor_d2h_bytes,
      "call_seconds"_a = p.call_seconds, "nvme_bytes"_a = s.nvme_bytes,
      "nvme_read_bytes"_a = s.nvme_read_bytes, "nvme_written_bytes"_a = s.nvme_written_bytes,
      "nvme_fresh_written_bytes"_a = s.nvme_fresh_written_bytes, "cache_hits"_a = s.cache_hits,
      "cache_misses"_a = s.cache_misses, "hit_rate"_a = s.hit_rate, "stalls"_a = stalls,
      "stall_fraction"_a = s.stall_fraction, "bottleneck"_a = s.metrics.bottleneck,
      "bound_ratio"_a = s.metrics.bound_ratio, "overlap_fraction"_a = overlap,
      "resources"_a = resources, "updated_experts"_a = s.updated_experts,
      "updated_params"_a = s.updated_params, "global_norm"_a = s.optimizer.global_norm,
      "clip_coefficient"_a = s.optimizer.clip_coefficient, "skipped"_a = s.optimizer.skipped,
      "compute_busy_seconds"_a = s.compute_busy_seconds, "h2d_busy_seconds"_a = s.h2d_busy_seconds,
      "d2h_busy_seconds"_a = s.d2h_busy_seconds,
      "optimizer_busy_seconds"_a = s.optimizer_busy_seconds,
      "stall_records"_a = s.stall_records.size());
}

// ---- Micro-batches --------------------------------------------------------------------------

// Token and domain ids as uint32, from any integer array-like (numpy, torch via __array__,
// lists); InvalidArgument naming `name` for floats or values outside [0, 2^32).
std::vector<uint32_t> ToIds(const py::handle& object, const std::string& name,
                            std::vector<py::ssize_t>* shape) {
  py::array array = py::array::ensure(object);
  if (!array) {
    PyErr_Clear();  // ensure() leaves the conversion's error set
    ThrowIfError(InvalidArgumentError(StrCat(name, " is not an array of integers")));
  }
  const char kind = array.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    ThrowIfError(InvalidArgumentError(
        StrCat(name, " must hold integers, got dtype ", std::string(py::str(array.dtype())))));
  }
  shape->assign(array.shape(), array.shape() + array.ndim());
  // Unsigned arrays read as uint64 and signed as int64, so that no value wraps before the check.
  auto convert = [&](auto typed) {
    std::vector<uint32_t> ids(static_cast<size_t>(typed.size()));
    const auto* data = typed.data();
    for (size_t i = 0; i < ids.size(); ++i) {
      if (data[i] < 0 || static_cast<uint64_t>(data[i]) > uint64_t{0xffffffff}) {
        ThrowIfError(InvalidArgumentError(
            StrCat(name, "[", i, "] = ", data[i], " is not a valid id (0 .. 2^32 - 1)")));
      }
      ids[i] = static_cast<uint32_t>(data[i]);
    }
    return ids;
  };
  constexpr int kFlags = py::array::c_style | py::array::forcecast;
  if (kind == 'u') return convert(py::array_t<uint64_t, kFlags>::ensure(array));
  return convert(py::array_t<int64_t, kFlags>::ensure(array));
}

// A micro-batch's ids, owned: token_ids [batch, seq] (or [seq]: one sample) and a domain id
// per sample (or one int for all).
struct OwnedMicroBatch {
  std::vector<uint32_t> tokens;
  std::vector<uint32_t> domains;
  uint32_t batch = 0, seq = 0;
  MicroBatch view() const { return {tokens.data(), batch, seq, domains.data()}; }
};

// `where` names the ids in errors ("micro_batches[2]").
OwnedMicroBatch ToMicroBatch(const py::handle& token_ids, const py::handle& domain_ids,
                             const std::string& where) {
  OwnedMicroBatch mb;
  std::vector<py::ssize_t> shape;
  mb.tokens = ToIds(token_ids, where + ".token_ids", &shape);
  if (shape.size() == 1) shape.insert(shape.begin(), 1);
  if (shape.size() != 2) {
    ThrowIfError(InvalidArgumentError(
        StrCat(where, ".token_ids has ", shape.size(), " dimensions; expected [batch, seq]")));
  }
  if (shape[0] > py::ssize_t{0xffffffff} || shape[1] > py::ssize_t{0xffffffff}) {
    ThrowIfError(InvalidArgumentError(StrCat(where, ".token_ids is [", shape[0], ", ", shape[1],
                                             "]: more than 2^32 - 1 in a dimension")));
  }
  mb.batch = static_cast<uint32_t>(shape[0]);
  mb.seq = static_cast<uint32_t>(shape[1]);
  std::vector<py::ssize_t> domain_shape;
  mb.domains = ToIds(domain_ids, where + ".domain_ids", &domain_shape);
  if (mb.domains.size() == 1 && mb.batch > 1) mb.domains.assign(mb.batch, mb.domains[0]);
  if (mb.domains.size() != mb.batch) {
    ThrowIfError(InvalidArgumentError(
        StrCat(where, " has ", mb.batch, " samples but ", mb.domains.size(), " domain ids")));
  }
  return mb;
}

std::vector<OwnedMicroBatch> ToMicroBatches(const py::sequence& micro_batches) {
  std::vector<OwnedMicroBatch> out;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    py::object item = micro_batches[i];
    const std::string where = StrCat("micro_batches[", i, "]");
    if (!(py::isinstance<py::tuple>(item) || py::isinstance<py::list>(item)) ||
        py::len(item) != 2) {
      ThrowIfError(InvalidArgumentError(
          StrCat(where, " must be a pair (token_ids [batch, seq], domain_ids [batch])")));
    }
    out.push_back(ToMicroBatch(item[py::int_(0)], item[py::int_(1)], where));
  }
  return out;
}

std::vector<MicroBatch> Views(const std::vector<OwnedMicroBatch>& owned) {
  std::vector<MicroBatch> views;
  views.reserve(owned.size());
  for (const OwnedMicroBatch& mb : owned) views.push_back(mb.view());
  return views;
}

// ---- Session --------------------------------------------------------------------------------

// A checkpoint's loop state as blobs (each value bytes; InvalidArgument naming a key otherwise).
std::vector<CheckpointBlob> BlobsOf(const py::dict& loop_state) {
  std::vector<CheckpointBlob> blobs;
  for (const auto& [key, value] : loop_state) {
    if (!py::isinstance<py::str>(key)) {
      ThrowIfError(InvalidArgumentError(
          StrCat("loop_state key ", std::string(py::repr(key)), " must be a str")));
    }
    if (!py::isinstance<py::bytes>(value)) {
      ThrowIfError(InvalidArgumentError(
          StrCat("loop_state['", std::string(py::str(key)), "'] must be bytes")));
    }
    blobs.push_back(
        {std::string(py::str(key)), std::string(py::reinterpret_borrow<py::bytes>(value))});
  }
  return blobs;
}

py::dict CheckpointDict(const CheckpointStats& s) {
  return py::dict(
      "full"_a = s.full, "sequence"_a = s.sequence, "experts_copied"_a = s.experts_copied,
      "experts_referenced"_a = s.experts_referenced, "experts_initial"_a = s.experts_initial,
      "experts_shared"_a = s.experts_shared, "experts_preserved"_a = s.experts_preserved,
      "bytes_written"_a = s.bytes_written, "full_bytes"_a = s.full_bytes);
}

// The device memory a Session of `options` takes on `device`: its budget (budgets.device_bytes;
// 0 = the plan's, every expert cached) and the two staging buffers, each a micro-batch's
// activations as the device's allocator reserves it, that CPU tensors are copied through.
uint64_t DeviceMemoryFor(const PyDevice& device, SessionOptions options) {
  if (options.budgets.device_bytes == 0) options.budgets.device_bytes = uint64_t{1} << 50;
  const MemoryPlan plan = ValueOrThrow(Session::PlanMemoryOn(*device.backend, options));
  const uint64_t budget = options.budgets.device_bytes == (uint64_t{1} << 50)
                              ? plan.DeviceBudgetFor(plan.cache_slots)
                              : options.budgets.device_bytes;
  const DeviceMemoryRules rules = DeviceMemoryRules::Of(device.backend->capabilities());
  return budget + 2 * rules.Block(plan.activation_bytes);
}

class PySession {
 public:
  PySession(std::shared_ptr<PyDevice> device, SessionOptions options)
      : device_(std::move(device)), options_(std::move(options)) {
    if (options_.trace == nullptr) options_.trace = device_->trace.get();
    Backend& backend = *device_->backend;
    {
      py::gil_scoped_release release;
      session_ = ValueOrThrow(Session::Create(backend, options_));
    }
    // Host tensors are staged through two device buffers of a micro-batch's activations.
    const uint64_t bytes = session_->memory_plan().activation_bytes;
    for (Buffer* buffer : {&in_, &out_}) {
      StatusOr<Buffer> made = backend.device_memory().Allocate(bytes, MemoryTag::kActivations);
      if (!made.ok()) {
        ThrowIfError(ResourceExhaustedError(StrCat(
            "the device holds the session's budget (", options_.budgets.device_bytes,
            " bytes) but not the two staging buffers of ", bytes,
            " bytes each that CPU tensors are copied through: give the Device memory_bytes >= ",
            DeviceMemoryFor(*device_, options_), " (Session.device_memory_for; ",
            made.status().message(), ")")));
      }
      *buffer = std::move(made).value();
    }
  }
  ~PySession() {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    session_.reset();
  }

  void BeginStep(const py::sequence& micro_batches, float loss_scale) {
    std::vector<OwnedMicroBatch> owned = ToMicroBatches(micro_batches);
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    ThrowIfError(session_->BeginStep(Views(owned), loss_scale));
    Began(owned);
  }
  void BeginEvaluation(const py::sequence& micro_batches) {
    std::vector<OwnedMicroBatch> owned = ToMicroBatches(micro_batches);
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    ThrowIfError(session_->BeginEvaluation(Views(owned)));
    Began(owned);
  }

  void Forward(uint32_t micro_batch, uint32_t layer, const py::handle& x, const py::handle& y) {
    StageAndCall({"x", "y"}, micro_batch, x, y, [&](const TensorView& in, const TensorView& out) {
      return session_->Forward(MicroBatchIndex{micro_batch}, LayerIndex{layer}, in, out);
    });
  }
  void Backward(uint32_t micro_batch, uint32_t layer, const py::handle& dy, const py::handle& dx) {
    StageAndCall(
        {"dy", "dx"}, micro_batch, dy, dx, [&](const TensorView& in, const TensorView& out) {
          return session_->Backward(MicroBatchIndex{micro_batch}, LayerIndex{layer}, in, out);
        });
  }
  PyStepStats EndStep() {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    PyStepStats stats;
    stats.stats = ValueOrThrow(session_->EndStep());
    step_shapes_.clear();  // outside a step, the session itself refuses the calls
    stats.tensor_h2d_bytes = tensor_h2d_;
    stats.tensor_d2h_bytes = tensor_d2h_;
    stats.call_seconds = call_seconds_;
    return stats;
  }
  void Synchronize() {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    ThrowIfError(session_->Synchronize());
  }
  void SetHyperParams(const HyperParams& params) {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    ThrowIfError(session_->SetHyperParams(params));
  }

  py::array_t<float> MasterWeights(uint32_t layer, uint32_t expert) {
    std::vector<float> weights;
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(mutex_);
      weights = ValueOrThrow(session_->MasterWeights(LayerIndex{layer}, expert));
    }
    py::array_t<float> array(static_cast<py::ssize_t>(weights.size()));
    std::copy(weights.begin(), weights.end(), array.mutable_data());
    return array;
  }

  py::dict SaveCheckpoint(const std::string& root, const std::string& name,
                          const py::dict& loop_state) {
    const std::vector<CheckpointBlob> blobs = BlobsOf(loop_state);
    CheckpointStats s;
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(mutex_);
      s = ValueOrThrow(session_->SaveCheckpoint(root, name, blobs));
    }
    return CheckpointDict(s);
  }
  void StartCheckpoint(const std::string& root, const std::string& name,
                       const py::dict& loop_state) {
    const std::vector<CheckpointBlob> blobs = BlobsOf(loop_state);
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    ThrowIfError(session_->StartCheckpoint(root, name, blobs));
  }
  py::dict WaitForCheckpoint() {
    CheckpointStats s;
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(mutex_);
      s = ValueOrThrow(session_->WaitForCheckpoint());
    }
    return CheckpointDict(s);
  }
  py::dict LoopState() const {
    py::dict state;
    for (const CheckpointBlob& blob : session_->loop_state()) {
      state[py::str(blob.name)] = py::bytes(blob.bytes);
    }
    return state;
  }

  void WriteTrace(const std::string& path) const {
    if (device_->trace == nullptr) {
      ThrowIfError(FailedPreconditionError("the device was made without trace=True"));
    }
    ThrowIfError(device_->trace->WriteJson(path));
  }

  const Session& session() const { return *session_; }
  SessionOptions options() const { return options_; }

 private:
  // A step began: its micro-batches' shapes, and its counters from zero.
  void Began(const std::vector<OwnedMicroBatch>& owned) {
    step_shapes_.clear();
    for (const OwnedMicroBatch& mb : owned) step_shapes_.emplace_back(mb.batch, mb.seq);
    tensor_h2d_ = tensor_d2h_ = 0;
    call_seconds_ = 0;
  }

  struct Names {
    const char* in;   // "x" or "dy"
    const char* out;  // "y" or "dx"
  };

  // What a forward or backward call's tensors must be, checked before a byte is staged: on the
  // host, of the model's dtype and width, alike, and (inside a step) shaped as the micro-batch.
  void CheckTensors(Names names, uint32_t micro_batch, const TensorArg& in,
                    const TensorArg& out) const {
    const ModelSpec& model = options_.model;
    for (const auto& [t, name] : {std::pair{&in, names.in}, std::pair{&out, names.out}}) {
      if (!t->on_host) {
        ThrowIfError(UnimplementedError(
            StrCat(name, " is on ", t->device,
                   ": this build takes CPU tensors (copied to the session's device); device "
                   "tensors in place are not supported yet")));
      }
      if (t->dtype != model.dtype || t->cols != model.d_model) {
        ThrowIfError(
            InvalidArgumentError(StrCat(name, " is ", t->Describe(), "; the model takes ",
                                        DTypeName(model.dtype), "[tokens, ", model.d_model, "]")));
      }
      if (t->bytes() > in_.size()) {
        ThrowIfError(InvalidArgumentError(
            StrCat(name, " is ", t->Describe(), ": more than a micro-batch of at most ",
                   options_.limits.max_tokens_per_micro_batch, " tokens")));
      }
    }
    if (in.shape != out.shape) {
      ThrowIfError(InvalidArgumentError(StrCat(names.out, " is ", out.Describe(), " but ", names.in,
                                               " is ", in.Describe(), ": they must match")));
    }
    if (micro_batch < step_shapes_.size()) {
      const auto [batch, seq] = step_shapes_[micro_batch];
      const bool three_d = in.shape.size() == 3;
      if (in.rows != int64_t{batch} * seq ||
          (three_d && (in.shape[0] != batch || in.shape[1] != seq))) {
        ThrowIfError(InvalidArgumentError(
            StrCat(names.in, " is ", in.Describe(), " but micro-batch ", micro_batch, " is ", batch,
                   " x ", seq, " tokens: [", int64_t{batch} * seq, ", ", model.d_model, "] or [",
                   batch, ", ", seq, ", ", model.d_model, "] (batch first)")));
      }
    }
  }

  // Stages `in` to the device, makes the session's call on it, copies the result into `out`
  // and waits. Every exit after the first copy waits for the stream, so that no queued copy
  // outlives the caller's tensors (a refused call among them).
  template <typename CallFn>
  void StageAndCall(Names names, uint32_t micro_batch, const py::handle& in_object,
                    const py::handle& out_object, CallFn call) {
    const TensorArg in = ValueOrThrow(ImportTensor(in_object, names.in));
    const TensorArg out = ValueOrThrow(ImportTensor(out_object, names.out));
    CheckTensors(names, micro_batch, in, out);
    Backend& backend = *device_->backend;
    const Device device = backend.device();
    const TensorView in_view{in_.data(), in.dtype, Shape{in.rows, in.cols}, device};
    const TensorView out_view{out_.data(), out.dtype, Shape{out.rows, out.cols}, device};
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto start = std::chrono::steady_clock::now();
    const Stream stream = session_->compute_stream();
    ThrowIfError(
        backend.CopyAsync(stream, in_.data(), in.data, in.bytes(), CopyKind::kHostToDevice));
    struct WaitOnExit {
      Backend& backend;
      Stream stream;
      ~WaitOnExit() { backend.SynchronizeStream(stream).IgnoreError(); }
    } wait{backend, stream};
    ThrowIfError(call(in_view, out_view));
    ThrowIfError(
        backend.CopyAsync(stream, out.data, out_.data(), out.bytes(), CopyKind::kDeviceToHost));
    ThrowIfError(backend.SynchronizeStream(stream));
    tensor_h2d_ += in.bytes();
    tensor_d2h_ += out.bytes();
    call_seconds_ +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  std::shared_ptr<PyDevice> device_;  // first: outlives the buffers and the session
  SessionOptions options_;
  Buffer in_, out_;
  std::unique_ptr<Session> session_;
  std::vector<std::pair<uint32_t, uint32_t>> step_shapes_;  // [batch, seq] per micro-batch
  uint64_t tensor_h2d_ = 0, tensor_d2h_ = 0;
  double call_seconds_ = 0;
  // A session is driven by one thread; the calls of several Python threads (the GIL released
  // inside them) take turns instead of racing.
  std::mutex mutex_;
};

// The RRE tables of a model, as its sessions route: the global expert of each token.
class PyRreTables {
 public:
  explicit PyRreTables(const ModelSpec& model) : router_(ValueOrThrow(RouterOf(model))) {}
  py::array_t<uint32_t> Route(uint32_t layer, const py::handle& token_ids,
                              const py::handle& domain_ids) const {
    const OwnedMicroBatch mb = ToMicroBatch(token_ids, domain_ids, "route");
    py::array_t<uint32_t> experts(static_cast<py::ssize_t>(mb.tokens.size()));
    uint32_t* out = experts.mutable_data();
    for (uint32_t b = 0; b < mb.batch; ++b) {
      for (uint32_t s = 0; s < mb.seq; ++s) {
        const size_t i = size_t{b} * mb.seq + s;
        out[i] = ValueOrThrow(router_.Route(layer, mb.domains[b], mb.tokens[i]));
      }
    }
    return experts;
  }
  py::list Domains() const {
    py::list domains;
    for (const DomainInfo& d : router_.domains().domains()) {
      py::list groups;
      for (const ExpertRange& r : d.groups) groups.append(py::make_tuple(r.first, r.count));
      domains.append(py::dict("name"_a = d.name, "id"_a = d.id, "groups"_a = groups));
    }
    return domains;
  }

 private:
  RreRouter router_;
};

void BindSession(py::module_& m) {
  py::class_<PyDevice, std::shared_ptr<PyDevice>>(
      m, "Device",
      "A device: 'sim' (the simulated device running the real CPU kernels), 'sim-timed', or "
      "'cuda[:N]'. memory_bytes is its hard memory budget.")
      .def(py::init(&MakeDevice), "setting"_a = "sim", "memory_bytes"_a = uint64_t{1} << 30,
           "h2d_gbps"_a = 0.0, "d2h_gbps"_a = 0.0, "trace"_a = false)
      .def_property_readonly(
          "name", [](const PyDevice& d) { return d.backend->capabilities().device_name; })
      .def_property_readonly(
          "memory_bytes",
          [](const PyDevice& d) { return d.backend->capabilities().device_memory_bytes; })
      .def_property_readonly("used_bytes", [](const PyDevice& d) {
        return d.backend->device_memory().stats().used_bytes;
      });

  py::class_<MemoryPlan>(m, "MemoryPlan", "Every byte a session allocates (engine/memory_plan.h).")
      .def("device_budget_for", &MemoryPlan::DeviceBudgetFor, "slots"_a)
      .def_readonly("cache_slots", &MemoryPlan::cache_slots)
      .def_readonly("expert_bytes", &MemoryPlan::expert_bytes)
      .def_readonly("activation_bytes", &MemoryPlan::activation_bytes)
      .def_property_readonly("device_bytes",
                             [](const MemoryPlan& p) { return p.Total(MemoryTier::kDevice); })
      .def("__str__", &MemoryPlan::Summary);

  py::class_<PyStepStats>(m, "StepStats", "What a step did (engine/step_stats.h).")
      .def("to_dict", &StatsDict)
      .def("__getattr__",
           [](const PyStepStats& s, const std::string& name) -> py::object {
             py::dict d = StatsDict(s);
             if (!d.contains(name))
               throw py::attribute_error("StepStats has no field '" + name + "'");
             return d[py::str(name)];
           })
      .def("__repr__", [](const PyStepStats& s) {
        return StrCat("StepStats(step=", s.stats.step, ", tokens=", s.stats.tokens,
                      ", seconds=", s.stats.seconds, ", hit_rate=", s.stats.hit_rate, ")");
      });

  py::class_<PySession>(m, "Session", "A session over a device (engine/session.h).")
      .def(py::init<std::shared_ptr<PyDevice>, SessionOptions>(), "device"_a, "options"_a)
      .def_static(
          "plan_memory",
          [](const PyDevice& device, SessionOptions options) {
            // No device budget yet: plan as if unbounded, to size it with device_budget_for.
            if (options.budgets.device_bytes == 0) options.budgets.device_bytes = uint64_t{1} << 50;
            return ValueOrThrow(Session::PlanMemoryOn(*device.backend, options));
          },
          "device"_a, "options"_a)
      .def_static(
          "device_memory_for",
          [](const PyDevice& device, const SessionOptions& options) {
            return DeviceMemoryFor(device, options);
          },
          "device"_a, "options"_a)
      .def("begin_step", &PySession::BeginStep, "micro_batches"_a, "loss_scale"_a = 1.0f)
      .def("begin_evaluation", &PySession::BeginEvaluation, "micro_batches"_a)
      .def("forward", &PySession::Forward, "micro_batch"_a, "layer"_a, "x"_a, "y"_a)
      .def("backward", &PySession::Backward, "micro_batch"_a, "layer"_a, "dy"_a, "dx"_a)
      .def("end_step", &PySession::EndStep)
      .def("synchronize", &PySession::Synchronize)
      .def("set_hyper_params", &PySession::SetHyperParams, "params"_a)
      .def("master_weights", &PySession::MasterWeights, "layer"_a, "expert"_a)
      .def("save_checkpoint", &PySession::SaveCheckpoint, "root"_a, "name"_a,
           "loop_state"_a = py::dict())
      .def("start_checkpoint", &PySession::StartCheckpoint, "root"_a, "name"_a,
           "loop_state"_a = py::dict())
      .def("wait_for_checkpoint", &PySession::WaitForCheckpoint)
      .def_property_readonly("loop_state", &PySession::LoopState)
      .def("write_trace", &PySession::WriteTrace, "path"_a)
      .def_property_readonly("memory_plan",
                             [](const PySession& s) { return s.session().memory_plan(); })
      .def_property_readonly("options", &PySession::options)
      .def_property_readonly("cache_slots",
                             [](const PySession& s) { return s.session().cache_slots(); })
      .def("experts_in_layer",
           [](const PySession& s, uint32_t layer) { return s.session().experts_in_layer(layer); });

  py::class_<PyRreTables>(m, "RreTables", "A model's RRE tables, as its sessions route.")
      .def(py::init<const ModelSpec&>(), "model"_a)
      .def("route", &PyRreTables::Route, "layer"_a, "token_ids"_a, "domain_ids"_a)
      .def("domains", &PyRreTables::Domains);
}

// ecss-plan's entry point (tools/plan): the report as ecss-plan --json writes it, as a dict.
py::dict PlanReportOf(const std::string& model, const std::string& hardware,
                      const std::string& workload, bool optimize, bool only_workload_strategy) {
  std::string json;
  {
    py::gil_scoped_release release;
    const plan::ModelConfig m = ValueOrThrow(plan::LoadModel(model));
    const plan::HardwareConfig h = ValueOrThrow(plan::LoadHardware(hardware));
    const plan::WorkloadConfig w =
        workload.empty() ? plan::DefaultWorkloadFor(m) : ValueOrThrow(plan::LoadWorkload(workload));
    const plan::Strategies strategies =
        only_workload_strategy ? plan::Strategies::kWorkloadOnly : plan::Strategies::kEvery;
    const plan::PlanReport report = ValueOrThrow(optimize ? plan::Optimize(m, h, w, strategies)
                                                          : plan::Plan(m, h, w, strategies));
    JsonWriter out;
    plan::WriteJson(report, out);
    json = out.str();
  }
  return py::module_::import("json").attr("loads")(json);
}

void BindPlanner(py::module_& m) {
  m.def(
      "checkpoint_model",
      [](const std::string& checkpoint) {
        py::gil_scoped_release release;
        return ValueOrThrow(CheckpointModel(checkpoint));
      },
      "checkpoint"_a,
      "The ModelSpec checkpoint ROOT/NAME was saved from (a sub-model ecss-extract wrote, too): "
      "what a session resuming it is created with.");
  m.def("plan", &PlanReportOf, "model"_a, "hardware"_a, "workload"_a = "", "optimize"_a = false,
        "only_workload_strategy"_a = false,
        "ecss-plan (tools/plan): where every byte of MODEL lives on HARDWARE, whether it fits, "
        "and each strategy's predicted step (only_workload_strategy: the workload's alone); "
        "each argument a preset name or a JSON file (workload '' = the default for the model). "
        "Returns ecss-plan --json's report.");
  m.def("plan_presets", [] {
    py::list presets;
    for (const plan::Preset& p : plan::Presets()) {
      presets.append(py::dict("kind"_a = p.kind, "name"_a = p.name, "about"_a = p.about));
    }
    return presets;
  });
}

}  // namespace
}  // namespace ecss::python

PYBIND11_MODULE(_ecss, m) {
  m.doc() = "ECSS: an offload runtime for training MoE models (native part; import ecss)";
  ecss::python::RegisterErrors(m);
  ecss::python::BindOptions(m);
  ecss::python::BindSession(m);
  ecss::python::BindPlanner(m);
}
