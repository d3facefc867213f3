// A tensor handed in from Python, through the DLPack protocol (`__dlpack__`): torch tensors
// and numpy arrays alike, without a copy. What the bindings check before a byte is read: the
// dtype (f32 or bf16), the shape [rows, cols], row-major contiguity and the device.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/base/dtype.h"
#include "runtime/base/status.h"

namespace ecss::python {

struct TensorArg {
  pybind11::object capsule;  // keeps the producer's memory alive while the view is used
  void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // as given: [tokens, d] or [batch, seq, d]
  int64_t rows = 0, cols = 0;  // as a matrix: [tokens, d]
  bool on_host = true;         // DLPack kDLCPU (or pinned host memory)
  std::string device;          // "cpu", "cuda:0", ... for messages
  size_t bytes() const { return static_cast<size_t>(rows * cols) * DTypeSize(dtype); }
  std::string Describe() const;  // "f32[12, 64] on cpu"
};

// InvalidArgument naming `name` when `object` has no __dlpack__ (or refuses to export), its
// dtype is neither f32 nor bf16, it is not 2-D (a 3-D [batch, seq, d] is taken as
// [batch * seq, d]), a dimension or the element count is 2^32 or more, or it is not
// contiguous row-major.
StatusOr<TensorArg> ImportTensor(const pybind11::handle& object, const std::string& name);

}  // namespace ecss::python
