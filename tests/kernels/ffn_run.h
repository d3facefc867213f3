// Runs a ReferenceFfn's problem through an implementation and returns fp32 results, so tests
// can compare implementations with the double reference and with each other.
#pragma once

#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "tests/kernels/ffn_reference.h"

namespace ecss::testing {

struct FfnResult {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> dw_in, dw_out;
};

// Host memory aligned for workspaces.
struct AlignedBuffer {
  explicit AlignedBuffer(uint64_t bytes)
      : data(static_cast<char*>(std::aligned_alloc(kWorkspaceAlignment,
                                                   AlignWorkspace(std::max<uint64_t>(bytes, 1)))),
             &std::free),
        size(bytes) {}
  std::unique_ptr<char, decltype(&std::free)> data;
  uint64_t size;
};

// The problem a reference describes.
inline GroupedFfnProblem ProblemFor(const ReferenceFfn& ref, DType dtype, SavedActivation saved) {
  GroupedFfnProblem p;
  p.d_model = ref.d_model;
  p.d_ff = ref.d_ff;
  p.activation = ref.activation;
  p.dtype = dtype;
  p.saved = saved;
  p.num_groups = ref.groups();
  p.group_offsets = ref.offsets.data();
  p.rows = ref.rows();
  return p;
}

// A reference's fp32 data in the element type of `dtype` (bytes), and back.
inline std::vector<char> AsBytes(const std::vector<float>& values, DType dtype) {
  std::vector<char> bytes(values.size() * DTypeSize(dtype));
  ConvertFromF32(values.data(), bytes.data(), dtype, values.size());
  return bytes;
}

inline std::vector<float> FromBytes(const std::vector<char>& bytes, DType dtype) {
  std::vector<float> values(bytes.size() / DTypeSize(dtype));
  ConvertToF32(bytes.data(), dtype, values.data(), values.size());
  return values;
}

}  // namespace ecss::testing
