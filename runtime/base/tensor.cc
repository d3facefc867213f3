#include "runtime/base/tensor.h"

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {

std::string Device::ToString() const {
  switch (kind) {
    case DeviceKind::kHost:
      return "host";
    case DeviceKind::kSim:
      return StrCat("sim:", index);
    case DeviceKind::kCuda:
      return StrCat("cuda:", index);
  }
  return "invalid-device";
}

Shape::Shape(std::initializer_list<int64_t> dims) {
  ECSS_CHECK(dims.size() <= static_cast<size_t>(kMaxRank)) << "rank " << dims.size();
  for (int64_t d : dims) {
    ECSS_CHECK(d >= 0) << "negative extent " << d;
    dims_[rank_++] = d;
  }
}

StatusOr<Shape> Shape::Make(const int64_t* dims, int rank) {
  if (rank < 0 || rank > kMaxRank) {
    return InvalidArgumentError(StrCat("shape rank ", rank, " is outside [0, ", kMaxRank, "]"));
  }
  Shape shape;
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 0) {
      return InvalidArgumentError(StrCat("shape extent ", i, " is negative (", dims[i], ")"));
    }
    shape.dims_[i] = dims[i];
  }
  shape.rank_ = rank;
  return shape;
}

int64_t Shape::dim(int i) const {
  ECSS_CHECK(i >= 0 && i < rank_) << "dimension " << i << " of a rank-" << rank_ << " shape";
  return dims_[i];
}

int64_t Shape::num_elements() const {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= dims_[i];
  return n;
}

std::string Shape::ToString() const {
  std::string text = "[";
  for (int i = 0; i < rank_; ++i) text += StrCat(i ? ", " : "", dims_[i]);
  return text + "]";
}

bool operator==(const Shape& a, const Shape& b) {
  if (a.rank_ != b.rank_) return false;
  for (int i = 0; i < a.rank_; ++i) {
    if (a.dims_[i] != b.dims_[i]) return false;
  }
  return true;
}

StatusOr<TensorView> TensorView::Make(void* data, DType dtype, Shape shape, Device device) {
  if (data == nullptr && shape.num_elements() > 0) {
    return InvalidArgumentError(
        StrCat("tensor ", DTypeName(dtype), shape.ToString(), " has a null data pointer"));
  }
  return TensorView{data, dtype, shape, device};
}

std::string TensorView::ToString() const {
  return StrCat(DTypeName(dtype), shape.ToString(), "@", device.ToString());
}

}  // namespace ecss
