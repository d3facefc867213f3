// TensorView: a non-owning view of a dense row-major tensor: pointer, dtype, shape, device.
// Kernels and the engine pass these across module boundaries; ownership stays with the
// allocator's Buffer that the pointer came from.
// Thread-compatible value; C++17.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "runtime/base/device_id.h"
#include "runtime/base/dtype.h"
#include "runtime/base/status.h"

namespace ecss {

class Shape {
 public:
  static constexpr int kMaxRank = 6;

  Shape() = default;
  // REQUIRES: dims.size() <= kMaxRank (checked; use Shape::Make for untrusted input).
  Shape(std::initializer_list<int64_t> dims);
  // Validates rank and non-negative extents.
  static StatusOr<Shape> Make(const int64_t* dims, int rank);

  int rank() const { return rank_; }
  int64_t dim(int i) const;
  int64_t operator[](int i) const { return dim(i); }
  // Product of the extents (1 for rank 0).
  int64_t num_elements() const;
  // "[512, 1024]"
  std::string ToString() const;

  friend bool operator==(const Shape& a, const Shape& b);
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

 private:
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Shape shape;
  Device device;

  // Validates that data is non-null whenever the tensor has elements.
  static StatusOr<TensorView> Make(void* data, DType dtype, Shape shape, Device device);

  int64_t num_elements() const { return shape.num_elements(); }
  size_t bytes() const { return static_cast<size_t>(num_elements()) * DTypeSize(dtype); }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data);
  }
  // "f32[512, 1024]@sim:0"
  std::string ToString() const;
};

}  // namespace ecss
