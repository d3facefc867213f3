// The fused update and the gradient norm, written once over a vector type V and compiled once
// per instruction set (kernels_scalar.cc, kernels_avx2.cc, kernels_avx512.cc). Include only
// from those files, after defining V inside an anonymous namespace: everything here has
// internal linkage, so the copies compiled for different instruction sets never mix.
//
// V provides, for its register type T and kWidth lanes: Load, Store, Stream, LoadGrad<bf16>,
// Set1, Add, Mul, Div, Sqrt, Fma(a, b, c) = a*b + c and Fnma(a, b, c) = c - a*b (single rounding),
// Sign (+1, -1, or 0 for zero and NaN), StoreBf16 / StreamBf16 (round to nearest even, NaN
// quieted, bit-identical to FloatToBf16), and SumSquares8 for the 8-lane double accumulator.
// Tails run the scalar type's same operations, so a range's result never depends on where
// vectors start or end.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "optimizer/update_kernels.h"

namespace {

// The scalar reference type; every path uses it for heads and tails.
struct ScalarVec {
  using T = float;
  static constexpr size_t kWidth = 1;
  static constexpr size_t kAlignBytes = 4;
  static T Load(const float* p) { return *p; }
  static void Store(float* p, T v) { *p = v; }
  static void Stream(float* p, T v) { *p = v; }
  template <bool kBf16>
  static T LoadGrad(const void* grad, size_t i) {
    if constexpr (kBf16) {
      return ecss::Bf16ToFloat(static_cast<const ecss::BFloat16*>(grad)[i]);
    } else {
      return static_cast<const float*>(grad)[i];
    }
  }
  static T Set1(float v) { return v; }
  static T Add(T a, T b) { return a + b; }
  static T Mul(T a, T b) { return a * b; }
  static T Div(T a, T b) { return a / b; }
  static T Sqrt(T a) { return std::sqrt(a); }
  static T Fma(T a, T b, T c) { return std::fma(a, b, c); }
  static T Fnma(T a, T b, T c) { return std::fma(-a, b, c); }
  static T Sign(T a) { return a > 0 ? 1.0f : (a < 0 ? -1.0f : 0.0f); }
  static void StoreBf16(ecss::BFloat16* p, T v) { *p = ecss::FloatToBf16(v); }
  static void StreamBf16(ecss::BFloat16* p, T v) { *p = ecss::FloatToBf16(v); }
  static void Fence() {}
};

// Per-update constants broadcast once.
template <class V>
struct Constants {
  explicit Constants(const ecss::UpdateScalars& s)
      : grad_multiplier(V::Set1(s.grad_multiplier)),
        lr(V::Set1(s.lr)),
        beta1(V::Set1(s.beta1)),
        one_minus_beta1(V::Set1(s.one_minus_beta1)),
        beta2(V::Set1(s.beta2)),
        one_minus_beta2(V::Set1(s.one_minus_beta2)),
        eps(V::Set1(s.eps)),
        weight_decay(V::Set1(s.weight_decay)),
        decay_factor(V::Set1(s.decay_factor)),
        step_size(V::Set1(s.step_size)),
        inverse_bias2_sqrt(V::Set1(s.inverse_bias2_sqrt)),
        momentum(V::Set1(s.momentum)) {}
  typename V::T grad_multiplier, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
      weight_decay, decay_factor, step_size, inverse_bias2_sqrt, momentum;
};

template <class V, bool kStream>
void Put(float* p, typename V::T v) {
  if constexpr (kStream) {
    V::Stream(p, v);
  } else {
    V::Store(p, v);
  }
}

// One vector (or scalar) of elements starting at i.
template <class V, ecss::OptimizerKind K, bool kBf16Grad, bool kStream>
inline void UpdateAt(const ecss::UpdateScalars& s, const Constants<V>& c,
                     const ecss::ParamArrays& a, size_t i) {
  using ecss::OptimizerKind;
  using T = typename V::T;
  T g = V::Mul(V::template LoadGrad<kBf16Grad>(a.grad, i), c.grad_multiplier);
  T p = V::Load(a.master + i);
  if constexpr (K == OptimizerKind::kAdamW || K == OptimizerKind::kAdam) {
    if constexpr (K == OptimizerKind::kAdamW) {
      p = V::Mul(p, c.decay_factor);
    } else {
      g = V::Fma(c.weight_decay, p, g);
    }
    T m = V::Fma(c.beta1, V::Load(a.state0 + i), V::Mul(c.one_minus_beta1, g));
    T v = V::Fma(c.beta2, V::Load(a.state1 + i), V::Mul(V::Mul(c.one_minus_beta2, g), g));
    const T denom = V::Fma(V::Sqrt(v), c.inverse_bias2_sqrt, c.eps);
    p = V::Fnma(c.step_size, V::Div(m, denom), p);
    Put<V, kStream>(a.state0 + i, m);
    Put<V, kStream>(a.state1 + i, v);
  } else if constexpr (K == OptimizerKind::kAdagrad) {
    g = V::Fma(c.weight_decay, p, g);
    T sum = V::Fma(g, g, V::Load(a.state0 + i));
    p = V::Fnma(c.lr, V::Div(g, V::Add(V::Sqrt(sum), c.eps)), p);
    Put<V, kStream>(a.state0 + i, sum);
  } else if constexpr (K == OptimizerKind::kLion) {
    const T m = V::Load(a.state0 + i);
    const T direction = V::Sign(V::Fma(c.beta1, m, V::Mul(c.one_minus_beta1, g)));
    p = V::Fnma(c.lr, direction, V::Mul(p, c.decay_factor));
    Put<V, kStream>(a.state0 + i, V::Fma(c.beta2, m, V::Mul(c.one_minus_beta2, g)));
  } else {  // SGD with momentum (dampening 0), PyTorch's first-step buffer = gradient
    g = V::Fma(c.weight_decay, p, g);
    const T buffer = s.first_step ? g : V::Fma(c.momentum, V::Load(a.state0 + i), g);
    const T step = s.nesterov ? V::Fma(c.momentum, buffer, g) : buffer;
    p = V::Fnma(c.lr, step, p);
    Put<V, kStream>(a.state0 + i, buffer);
  }
  Put<V, kStream>(a.master + i, p);
  if (a.compute_copy != nullptr) {
    if constexpr (kStream) {
      V::StreamBf16(a.compute_copy + i, p);
    } else {
      V::StoreBf16(a.compute_copy + i, p);
    }
  }
}

template <class V, ecss::OptimizerKind K, bool kBf16Grad>
void UpdateKind(const ecss::UpdateScalars& s, const ecss::ParamArrays& a, size_t begin,
                size_t end) {
  const Constants<V> vc(s);
  const Constants<ScalarVec> sc(s);
  size_t i = begin;
  // Scalar head up to the vector alignment of the master array; then streaming stores when
  // every written array is aligned there and the range is long enough to leave the caches.
  while (i < end && (reinterpret_cast<uintptr_t>(a.master + i) % V::kAlignBytes) != 0) {
    UpdateAt<ScalarVec, K, kBf16Grad, false>(s, sc, a, i++);
  }
  auto aligned = [&](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % V::kAlignBytes == 0;
  };
  constexpr size_t kStreamMinElements = size_t{1} << 18;  // 1 MiB of fp32 per array
  const bool stream = V::kWidth > 1 && end - i >= kStreamMinElements && aligned(a.state0 + i) &&
                      (a.state1 == nullptr || aligned(a.state1 + i)) &&
                      (a.compute_copy == nullptr ||
                       reinterpret_cast<uintptr_t>(a.compute_copy + i) % (V::kAlignBytes / 2) == 0);
  if (stream) {
    for (; i + V::kWidth <= end; i += V::kWidth) UpdateAt<V, K, kBf16Grad, true>(s, vc, a, i);
    V::Fence();
  } else {
    for (; i + V::kWidth <= end; i += V::kWidth) UpdateAt<V, K, kBf16Grad, false>(s, vc, a, i);
  }
  for (; i < end; ++i) UpdateAt<ScalarVec, K, kBf16Grad, false>(s, sc, a, i);
}

template <class V, bool kBf16Grad>
void UpdateDispatchKind(const ecss::UpdateScalars& s, const ecss::ParamArrays& a, size_t begin,
                        size_t end) {
  using ecss::OptimizerKind;
  switch (s.kind) {
    case OptimizerKind::kAdamW:
      return UpdateKind<V, OptimizerKind::kAdamW, kBf16Grad>(s, a, begin, end);
    case OptimizerKind::kAdam:
      return UpdateKind<V, OptimizerKind::kAdam, kBf16Grad>(s, a, begin, end);
    case OptimizerKind::kAdagrad:
      return UpdateKind<V, OptimizerKind::kAdagrad, kBf16Grad>(s, a, begin, end);
    case OptimizerKind::kLion:
      return UpdateKind<V, OptimizerKind::kLion, kBf16Grad>(s, a, begin, end);
    case OptimizerKind::kSgdMomentum:
      return UpdateKind<V, OptimizerKind::kSgdMomentum, kBf16Grad>(s, a, begin, end);
  }
}

template <class V>
void UpdateRangeImpl(const ecss::UpdateScalars& s, const ecss::ParamArrays& a, size_t begin,
                     size_t end) {
  if (a.grad_dtype == ecss::DType::kBF16) {
    UpdateDispatchKind<V, true>(s, a, begin, end);
  } else {
    UpdateDispatchKind<V, false>(s, a, begin, end);
  }
}

// Adds the 8 lanes in a fixed tree order.
inline double ReduceLanes(const double lanes[8]) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <class V, bool kBf16>
double SumSquaresImpl(const void* grad, size_t begin, size_t end) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = begin;
  i = V::template SumSquares8<kBf16>(grad, i, end, lanes);  // whole groups of 8 (or none)
  for (; i < end; ++i) {
    const double x = ScalarVec::template LoadGrad<kBf16>(grad, i);
    double& lane = lanes[(i - begin) % 8];
    lane = std::fma(x, x, lane);
  }
  return ReduceLanes(lanes);
}

template <class V>
double GradSumOfSquaresImpl(const void* grad, ecss::DType dtype, size_t begin, size_t end) {
  return dtype == ecss::DType::kBF16 ? SumSquaresImpl<V, true>(grad, begin, end)
                                     : SumSquaresImpl<V, false>(grad, begin, end);
}

}  // namespace
