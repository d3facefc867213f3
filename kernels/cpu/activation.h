// Element-wise activation kernels of the CPU implementation, written as plain loops that the
// compiler vectorises for AVX-512, AVX2 and SSE (function multi-versioning picks one at load
// time). exp and erf use polynomial approximations that vectorise (erf: Abramowitz & Stegun
// 7.1.26); both stay within 4e-7 absolute of the exact functions (tested against double).
// Every function is deterministic: the same input gives the same bits whatever the thread.
// Internal to kernels/cpu.
#pragma once

#include <cstddef>

namespace ecss::cpu {

// a[i] = gelu(h[i]) = h * Phi(h)
void GeluForward(const float* h, float* a, size_t n);
// grad[i] *= gelu'(h[i]) = Phi(h) + h * phi(h)
void GeluBackward(const float* h, float* grad, size_t n);
// a[i] = silu(ha[i]) * hb[i]
void SwiGluForward(const float* ha, const float* hb, float* a, size_t n);
// In: grad_a holds dA. Out: grad_a = dA * hb * silu'(ha), grad_b = dA * silu(ha).
void SwiGluBackward(const float* ha, const float* hb, float* grad_a, float* grad_b, size_t n);
// x[i] = bf16(x[i]) as float, round to nearest even (NaN stays NaN).
void RoundToBf16(float* x, size_t n);

// Scalar forms, for references and tests.
float ExpApprox(float x);
float ErfApprox(float x);

}  // namespace ecss::cpu
