// The nonlinearities of the generated gate math: lm_sigmoid, lm_tanh and lm_rsqrt, in float and
// in double (overloads: the generated code calls them on its scalar S).
//
// In float they are branch-free polynomials on a Cephes-style exp (a few ulp, the same
// forms as the Triton kernels), which the compiler vectorises inside the '#pragma omp
// simd' row loops where libm calls would not; in double they are libm's.
// tests/test_cpu_kernels.py measures their accuracy through lm_nonlinearities.
#pragma once

// exp(x) for x <= 0 (Cephes' expf polynomial after x = n ln 2 + r); 0 below
// ln(FLT_MIN) = -87.3365, where exp(x) leaves the normal floats
static inline float lm_exp_nonpositive(float x) {
  const float xc = x < -87.3365f ? -87.3365f : x;
  // round to nearest as truncation of a non-positive value minus 1/2 (floorf would not vectorise)
  const float n = (float)(int)(xc * 1.44269504088896341f - 0.5f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = ((int)n + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  const float keep = x < -87.3365f ? 0.0f : 1.0f;  // a product, not a branch: it vectorises
  return p * scale * keep;
}

// 1 / (1 + exp(-x)) as two branches on e = exp(-|x|), which cannot overflow
static inline float lm_sigmoid(float x) {
  const float e = lm_exp_nonpositive(x < 0.0f ? x : -x);
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

// tanh: Cephes' odd polynomial for |x| < 0.625, (1 - e) / (1 + e), e = exp(-2|x|), above.
// Both are computed and combined by arithmetic, not chosen by a branch, so that the loop
// vectorises: the polynomial's input is 0 where it is not wanted, and large is then
// multiplied by 1, or by 0 where the polynomial is the answer (both finite).
static inline float lm_tanh(float x) {
  const float a = __builtin_fabsf(x);
  const float near_zero = a < 0.625f ? 1.0f : 0.0f;
  const float xs = a < 0.625f ? x : 0.0f;
  const float s = xs * xs;
  const float p = (((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s
                   + 1.33314422036e-1f) * s - 3.33332819422e-1f;
  const float small = p * s * xs + xs;
  const float e = lm_exp_nonpositive(-2.0f * a);
  const float large = __builtin_copysignf((1.0f - e) / (1.0f + e), x);
  return small + large * (1.0f - near_zero);
}

// the same sigmoid in double, on libm's exp
static inline double lm_sigmoid(double x) {
  const double e = __builtin_exp(-__builtin_fabs(x));
  const double r = 1.0 / (1.0 + e);
  return x >= 0.0 ? r : e * r;
}

static inline double lm_tanh(double x) { return __builtin_tanh(x); }

// 1 / sqrt(x), the gate math's rsqrt: a correctly rounded square root and one division, as
// the array code's 1 / sqrt(x) (x > 0 where the gate math adds its epsilon)
static inline float lm_rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
static inline double lm_rsqrt(double x) { return 1.0 / __builtin_sqrt(x); }
