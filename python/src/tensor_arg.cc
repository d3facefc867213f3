#include "python/src/tensor_arg.h"

#include <dlpack/dlpack.h>

#include "runtime/base/str_cat.h"

namespace ecss::python {
namespace {

namespace py = pybind11;

constexpr const char* kCapsuleName = "dltensor";

std::string DeviceName(const DLDevice& device) {
  switch (device.device_type) {
    case kDLCPU:
      return "cpu";
    case kDLCUDA:
      return StrCat("cuda:", device.device_id);
    case kDLCUDAHost:
      return "cuda-pinned";
    default:
      return StrCat("dlpack device ", static_cast<int>(device.device_type));
  }
}

std::string DTypeDescription(const DLDataType& type) {
  const char* code = type.code == kDLFloat    ? "float"
                     : type.code == kDLBfloat ? "bfloat"
                     : type.code == kDLInt    ? "int"
                     : type.code == kDLUInt   ? "uint"
                                              : "other";
  return StrCat(code, static_cast<int>(type.bits));
}

}  // namespace

std::string TensorArg::Describe() const {
  std::string dims;
  for (int64_t dim : shape) dims += StrCat(dims.empty() ? "" : ", ", dim);
  return StrCat(DTypeName(dtype), "[", dims, "] on ", device);
}

StatusOr<TensorArg> ImportTensor(const py::handle& object, const std::string& name) {
  if (object.is_none() || !py::hasattr(object, "__dlpack__")) {
    return InvalidArgumentError(StrCat(name, " must be a tensor (a torch tensor or numpy array: ",
                                       "anything with __dlpack__), got ",
                                       std::string(py::str(py::type::of(object)))));
  }
  TensorArg arg;
  try {
    arg.capsule = object.attr("__dlpack__")();
  } catch (py::error_already_set& error) {  // e.g. numpy's read-only arrays
    // KeyboardInterrupt and the like are not about the tensor: they go on as they are.
    if (!error.matches(PyExc_Exception)) throw;
    return InvalidArgumentError(
        StrCat(name, " cannot be exported through DLPack: ", std::string(py::str(error.value()))));
  }
  if (!PyCapsule_IsValid(arg.capsule.ptr(), kCapsuleName)) {
    return InvalidArgumentError(StrCat(name, ": __dlpack__ did not return a DLPack capsule"));
  }
  const auto* managed =
      static_cast<DLManagedTensor*>(PyCapsule_GetPointer(arg.capsule.ptr(), kCapsuleName));
  const DLTensor& t = managed->dl_tensor;
  arg.device = DeviceName(t.device);
  arg.on_host = t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost;
  if (t.dtype.lanes == 1 && t.dtype.code == kDLFloat && t.dtype.bits == 32) {
    arg.dtype = DType::kF32;
  } else if (t.dtype.lanes == 1 && t.dtype.code == kDLBfloat && t.dtype.bits == 16) {
    arg.dtype = DType::kBF16;
  } else {
    return InvalidArgumentError(StrCat(name, " is ", DTypeDescription(t.dtype),
                                       "; ECSS takes float32 or bfloat16 activations"));
  }
  if (t.ndim != 2 && t.ndim != 3) {
    return InvalidArgumentError(StrCat(name, " has ", t.ndim,
                                       " dimensions; expected [tokens, d_model] or "
                                       "[batch, seq, d_model]"));
  }
  arg.shape.assign(t.shape, t.shape + t.ndim);
  constexpr int64_t kMaxDim = int64_t{1} << 32;
  int64_t elements = 1;
  for (int64_t dim : arg.shape) {
    if (dim < 0 || dim >= kMaxDim || __builtin_mul_overflow(elements, dim, &elements) ||
        elements >= kMaxDim) {
      return InvalidArgumentError(StrCat(name, " is too large: 2^32 elements or more"));
    }
  }
  arg.cols = arg.shape.back();
  arg.rows = arg.cols == 0 ? 0 : elements / arg.cols;
  if (t.ndim == 3) arg.rows = arg.shape[0] * arg.shape[1];
  // Row-major contiguity: strides (in elements) null, or each the product of the sizes after
  // (a tensor without elements has nothing to lay out).
  if (t.strides != nullptr && elements > 0) {
    int64_t expected = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      if (t.shape[d] != 1 && t.strides[d] != expected) {
        return InvalidArgumentError(
            StrCat(name, " is not contiguous row-major (call .contiguous() first)"));
      }
      expected *= t.shape[d];
    }
  }
  arg.data = static_cast<char*>(t.data) + t.byte_offset;
  if (arg.data == nullptr && arg.rows * arg.cols > 0) {
    return InvalidArgumentError(StrCat(name, " has no data"));
  }
  return arg;
}

}  // namespace ecss::python
