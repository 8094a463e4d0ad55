// The GMNM mixture on the CPU: one pass over the data with the loop over components inside.
//
//   out = init + sum_k pi_k * exp(-0.5 * z_k^2),   z_k = clamp((x - mu_k) * s_k, -Z, Z)
//
// where `init` is 0, the value already in `out` (the base activation, computed by PyTorch so
// that residual modules stay bit-exact), or a learned a*x + c. The backward recomputes the
// Gaussians from x (nothing of size [..., K] is ever stored) and reduces the parameter
// gradients per thread, so threads never write the same memory.
//
// The input is a contiguous tensor seen as [outer, C, inner]: C channels along the mixture's
// dimension, G parameter groups of C / G consecutive channels. Three layouts cover every case:
//   - G == 1: every element shares one parameter set; the data is cut into flat chunks.
//   - inner == 1 (the dimension is the last one): rows of C channels; the parameters are
//     expanded to one value per channel, laid out [K][C], so a block of consecutive channels
//     reads consecutive parameters and the loops vectorise. The backward cuts the work into
//     tiles of kTileRows rows by kBlock channels, so that a tile's parameters and partial sums
//     stay in the L1 cache while its rows stream through.
//   - otherwise: runs of `inner` elements that all belong to one channel, hence one group.
//
// The exported functions use a C ABI and raw pointers; the Python side (gmnm/cpu_kernel.py)
// checks shapes, dtypes and contiguity before calling them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Elements processed together; the inner loops run over a block and vectorise.
constexpr int64_t kBlock = 64;
// Elements per parallel work item when all elements share one parameter set.
constexpr int64_t kChunk = 16384;
// Float partial sums are moved into double totals this often (in blocks, or rows of C), which
// keeps the gradient reductions accurate over tens of millions of elements.
constexpr int64_t kFlushBlocks = 256;
constexpr int64_t kTileRows = 256;

enum Mode : int { kWrite = 0, kAccumulate = 1, kLinear = 2 };
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

struct BFloat16 {
  uint16_t bits;
};

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename S>
struct Store;
template <>
struct Store<float> {
  static float from(float v) { return v; }
};
template <>
struct Store<double> {
  static double from(double v) { return v; }
};
template <>
struct Store<BFloat16> {
  // Round to nearest even, as PyTorch does; NaN stays a (quiet) NaN.
  static BFloat16 from(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return BFloat16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
  }
};

// The kernels work with u = z * kU instead of z, so that exp(-z^2 / 2) = 2^(-u^2): one fused
// multiply-add gives both the integer and the fractional part of the exponent. Sums that
// depend on z are converted back once per group at the end, the input gradient once per element.
template <typename T>
constexpr T kU = T(0.84932180028801904272);  // sqrt(log2(e) / 2)
template <typename T>
constexpr T kUClamp = T(30) * kU<T>;  // |z| <= 30, as in the reference

// 2^(-u^2), written so that the compiler vectorises it (std::exp does not vectorise without
// -ffast-math, which would also break NaN handling): the exponent splits into an integer n
// and r in [-1/2, 1/2]; a degree-6 polynomial gives 2^r to about 1 ulp and n goes into the
// exponent bits. Exactly 0 where the result would leave the normal float range.
inline float exp2_of_negative_square(float u) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = std::fma(-u, u, kRound);
  const float n = shifted - kRound;
  const float r = std::fma(-u, u, -n);
  float p = 1.5403530393381606e-4f;  // ln(2)^k / k!, k = 6 .. 0
  p = std::fma(p, r, 1.3333558146428443e-3f);
  p = std::fma(p, r, 9.6181291076284772e-3f);
  p = std::fma(p, r, 5.5504108664821580e-2f);
  p = std::fma(p, r, 2.4022650695910071e-1f);
  p = std::fma(p, r, 6.9314718055994531e-1f);
  p = std::fma(p, r, 1.0f);
  // the low bits of `shifted` hold n; 2^n is (n + 127) << 23 as a float's bits
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B3FFF81u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return n < -126.0f ? 0.0f : p * scale;
}

inline double exp2_of_negative_square(double u) { return std::exp2(-u * u); }

template <typename T>
inline T clamp_u(T u) {
  return std::min(std::max(u, -kUClamp<T>), kUClamp<T>);
}

// Parameters of one call in the compute type: per group [G][K], and, for the row layout, the
// same values expanded per channel [K][C].
template <typename T>
struct Params {
  int64_t K;
  const T* pi;
  const T* mu;
  const T* scale;
  const T* a;  // [G] or nullptr
  const T* c;  // [G] or nullptr
};

template <typename T>
struct ChannelTables {
  std::vector<T> pi, mu, scale, a, c;  // [K][C] and [C]

  ChannelTables(const Params<T>& p, int64_t C, int64_t G) {
    const int64_t K = p.K, per_group = C / G;
    pi.resize(K * C);
    mu.resize(K * C);
    scale.resize(K * C);
    for (int64_t ch = 0; ch < C; ++ch) {
      const int64_t g = ch / per_group;
      for (int64_t k = 0; k < K; ++k) {
        pi[k * C + ch] = p.pi[g * K + k];
        mu[k * C + ch] = p.mu[g * K + k];
        scale[k * C + ch] = p.scale[g * K + k] * kU<T>;
      }
    }
    // the backward reads only a
    if (p.a != nullptr) {
      a.resize(C);
      for (int64_t ch = 0; ch < C; ++ch) a[ch] = p.a[ch / per_group];
    }
    if (p.c != nullptr) {
      c.resize(C);
      for (int64_t ch = 0; ch < C; ++ch) c[ch] = p.c[ch / per_group];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward

// One block of m elements whose parameters are read with stride `step` (0: one set for all,
// 1: one value per element, as in the [K][C] tables with `kstride` = C).
template <typename S, typename T, int64_t step>
inline void forward_block(const S* x, S* out, int64_t m, int64_t K, const T* pi, const T* mu,
                          const T* scale, int64_t kstride, int mode, const T* a, const T* c) {
  T xb[kBlock], acc[kBlock];
  for (int64_t j = 0; j < m; ++j) xb[j] = load(x[j]);
  if (mode == kAccumulate) {
    for (int64_t j = 0; j < m; ++j) acc[j] = load(out[j]);
  } else if (mode == kLinear) {
    for (int64_t j = 0; j < m; ++j) acc[j] = a[j * step] * xb[j] + c[j * step];
  } else {
    for (int64_t j = 0; j < m; ++j) acc[j] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (step == 0) {
      const T p = pi[k], mean = mu[k], s = scale[k] * kU<T>;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const T u = clamp_u((xb[j] - mean) * s);
        acc[j] += p * exp2_of_negative_square(u);
      }
    } else {
      const T* pk = pi + k * kstride;
      const T* mk = mu + k * kstride;
      const T* sk = scale + k * kstride;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const T u = clamp_u((xb[j] - mk[j]) * sk[j]);
        acc[j] += pk[j] * exp2_of_negative_square(u);
      }
    }
  }
  for (int64_t j = 0; j < m; ++j) out[j] = Store<S>::from(acc[j]);
}

template <typename S, typename T, int64_t step>
void forward_run(const S* x, S* out, int64_t len, int64_t K, const T* pi, const T* mu,
                 const T* scale, int64_t kstride, int mode, const T* a, const T* c) {
  int64_t start = 0;
  for (; start + kBlock <= len; start += kBlock) {
    const int64_t o = start * step;
    forward_block<S, T, step>(x + start, out + start, kBlock, K, pi + o, mu + o, scale + o,
                              kstride, mode, a ? a + o : nullptr, c ? c + o : nullptr);
  }
  if (start < len) {
    const int64_t o = start * step;
    forward_block<S, T, step>(x + start, out + start, len - start, K, pi + o, mu + o, scale + o,
                              kstride, mode, a ? a + o : nullptr, c ? c + o : nullptr);
  }
}

template <typename S, typename T>
void forward(const S* x, S* out, int64_t n, int64_t C, int64_t inner, int64_t G,
             const Params<T>& p, int mode, int threads) {
  const int64_t K = p.K;
  if (G == 1) {
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t start = i * kChunk, len = std::min(kChunk, n - start);
      forward_run<S, T, 0>(x + start, out + start, len, K, p.pi, p.mu, p.scale, 1, mode, p.a,
                           p.c);
    }
  } else if (inner == 1) {
    // whole rows: the forward keeps no partial sums, and contiguous rows stream best
    const ChannelTables<T> t(p, C, G);
    const T* a = mode == kLinear ? t.a.data() : nullptr;
    const T* c = mode == kLinear ? t.c.data() : nullptr;
    const int64_t rows = n / C;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      forward_run<S, T, 1>(x + r * C, out + r * C, C, K, t.pi.data(), t.mu.data(),
                           t.scale.data(), C, mode, a, c);
    }
  } else {
    const int64_t runs = n / inner, per_group = C / G;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < runs; ++s) {
      const int64_t g = (s % C) / per_group;
      forward_run<S, T, 0>(x + s * inner, out + s * inner, inner, K, p.pi + g * K,
                           p.mu + g * K, p.scale + g * K, 1, mode, p.a ? p.a + g : nullptr,
                           p.c ? p.c + g : nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// Per element and component, with e = exp(-0.5 z^2) and g the incoming gradient:
//   dL/dpi_k  = sum g e                     (quantity A_k)
//   dL/dmu_k  = pi_k s_k * sum g e z        (B_k)
//   dL/drho_k = -pi_k * sum g e z^2         (C_k)
//   dL/dx     = base'(x) g - g * sum_k pi_k s_k e z
//   dL/da = sum g x (D), dL/dc = sum g (E) for the linear base.
// The kernels produce the raw sums A, B, C, D, E per group; Python applies the factors.

inline int64_t num_quantities(int64_t K) { return 3 * K + 2; }

// Accumulates one block into `lanes` ([Q][lane_stride] partial sums, one lane per element of
// the block or per channel) and writes dx.
template <typename S, typename T, int64_t step>
inline void backward_block(const S* x, const S* g, S* dx, int64_t m, int64_t K, const T* pi,
                           const T* mu, const T* scale, int64_t kstride, int mode, const T* a,
                           T* lanes, int64_t lane_stride) {
  T xb[kBlock], gb[kBlock], dsum[kBlock];
  for (int64_t j = 0; j < m; ++j) {
    xb[j] = load(x[j]);
    gb[j] = load(g[j]);
    dsum[j] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    T* la = lanes + k * lane_stride;
    T* lb = lanes + (K + k) * lane_stride;
    T* lc = lanes + (2 * K + k) * lane_stride;
    if constexpr (step == 0) {
      const T mean = mu[k], s = scale[k] * kU<T>, w = pi[k] * s;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const T u = clamp_u((xb[j] - mean) * s);
        const T e = exp2_of_negative_square(u);
        const T ge = gb[j] * e;
        const T geu = ge * u;
        la[j] += ge;
        lb[j] += geu;
        lc[j] += geu * u;
        dsum[j] += w * e * u;
      }
    } else {
      const T* pk = pi + k * kstride;
      const T* mk = mu + k * kstride;
      const T* sk = scale + k * kstride;
      // the parameter tables and the lanes never overlap; without the pragma the compiler
      // gives up on proving it and leaves the loop scalar
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const T u = clamp_u((xb[j] - mk[j]) * sk[j]);
        const T e = exp2_of_negative_square(u);
        const T ge = gb[j] * e;
        const T geu = ge * u;
        la[j] += ge;
        lb[j] += geu;
        lc[j] += geu * u;
        dsum[j] += pk[j] * sk[j] * e * u;
      }
    }
  }
  // dsum holds sum_k pi_k s_k e_k z_k times kU^2
  constexpr T kUnscale = T(1) / (kU<T> * kU<T>);
  for (int64_t j = 0; j < m; ++j) dsum[j] *= gb[j] * kUnscale;
  if (mode == kLinear) {
    T* ld = lanes + 3 * K * lane_stride;
    T* le = lanes + (3 * K + 1) * lane_stride;
    for (int64_t j = 0; j < m; ++j) {
      ld[j] += gb[j] * xb[j];
      le[j] += gb[j];
      dx[j] = Store<S>::from(a[j * step] * gb[j] - dsum[j]);
    }
  } else if (mode == kAccumulate) {
    for (int64_t j = 0; j < m; ++j) dx[j] = Store<S>::from(load(dx[j]) - dsum[j]);
  } else {
    for (int64_t j = 0; j < m; ++j) dx[j] = Store<S>::from(-dsum[j]);
  }
}

// Adds the lanes of every quantity into `totals` ([Q] doubles) and clears them.
template <typename T>
void flush_lanes(std::vector<T>& lanes, int64_t Q, double* totals) {
  for (int64_t q = 0; q < Q; ++q) {
    double sum = 0.0;
    for (int64_t j = 0; j < kBlock; ++j) sum += lanes[q * kBlock + j];
    totals[q] += sum;
  }
  std::fill(lanes.begin(), lanes.end(), T(0));
}

// A run of elements sharing the parameter set of one group.
template <typename S, typename T>
void backward_run(const S* x, const S* g, S* dx, int64_t len, int64_t K, const T* pi,
                  const T* mu, const T* scale, int mode, const T* a, std::vector<T>& lanes,
                  double* totals) {
  const int64_t Q = num_quantities(K);
  int64_t blocks = 0;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t m = std::min(kBlock, len - start);
    if (m == kBlock) {
      backward_block<S, T, 0>(x + start, g + start, dx + start, kBlock, K, pi, mu, scale, 1,
                              mode, a, lanes.data(), kBlock);
    } else {
      backward_block<S, T, 0>(x + start, g + start, dx + start, m, K, pi, mu, scale, 1, mode, a,
                              lanes.data(), kBlock);
    }
    if (++blocks == kFlushBlocks) {
      flush_lanes(lanes, Q, totals);
      blocks = 0;
    }
  }
  flush_lanes(lanes, Q, totals);
}

template <typename S, typename T>
void accumulate_sums(const S* x, const S* g, S* dx, int64_t n, int64_t C, int64_t inner,
                     int64_t G, const Params<T>& p, int mode, double* sums, int threads) {
  const int64_t K = p.K, Q = num_quantities(K);
  const int64_t per_group = G == 1 ? 1 : C / G;
  // Per-thread totals, summed in a fixed order at the end so results do not depend on timing.
  std::vector<double> totals;

  if (G > 1 && inner == 1) {
    const ChannelTables<T> t(p, C, G);
    const int64_t rows = n / C, col_blocks = (C + kBlock - 1) / kBlock;
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows * col_blocks;
    totals.assign(static_cast<size_t>(threads) * Q * C, 0.0);
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
      const int tid = omp_get_thread_num();
#else
      const int tid = 0;
#endif
      std::vector<T> lanes(Q * kBlock, T(0));
      double* mine = totals.data() + static_cast<size_t>(tid) * Q * C;
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t first = tile / col_blocks * kTileRows, c0 = tile % col_blocks * kBlock;
        const int64_t m = std::min(kBlock, C - c0);
        const T* a = mode == kLinear ? t.a.data() + c0 : nullptr;
        for (int64_t r = first; r < std::min(rows, first + kTileRows); ++r) {
          const int64_t o = r * C + c0;
          if (m == kBlock) {
            backward_block<S, T, 1>(x + o, g + o, dx + o, kBlock, K, t.pi.data() + c0,
                                    t.mu.data() + c0, t.scale.data() + c0, C, mode, a,
                                    lanes.data(), kBlock);
          } else {
            backward_block<S, T, 1>(x + o, g + o, dx + o, m, K, t.pi.data() + c0,
                                    t.mu.data() + c0, t.scale.data() + c0, C, mode, a,
                                    lanes.data(), kBlock);
          }
        }
        // lanes are channels c0 .. c0 + m of this tile
        for (int64_t q = 0; q < Q; ++q) {
          for (int64_t j = 0; j < m; ++j) mine[q * C + c0 + j] += lanes[q * kBlock + j];
        }
        std::fill(lanes.begin(), lanes.end(), T(0));
      }
    }
    for (int th = 0; th < threads; ++th) {
      const double* part = totals.data() + static_cast<size_t>(th) * Q * C;
      for (int64_t q = 0; q < Q; ++q) {
        for (int64_t ch = 0; ch < C; ++ch) sums[(ch / per_group) * Q + q] += part[q * C + ch];
      }
    }
    return;
  }

  totals.assign(static_cast<size_t>(threads) * G * Q, 0.0);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    std::vector<T> lanes(Q * kBlock, T(0));
    double* mine = totals.data() + static_cast<size_t>(tid) * G * Q;
    if (G == 1) {
      const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < chunks; ++i) {
        const int64_t start = i * kChunk, len = std::min(kChunk, n - start);
        backward_run<S, T>(x + start, g + start, dx + start, len, K, p.pi, p.mu, p.scale, mode,
                           p.a, lanes, mine);
      }
    } else {
      const int64_t runs = n / inner;
#pragma omp for schedule(static)
      for (int64_t s = 0; s < runs; ++s) {
        const int64_t grp = (s % C) / per_group;
        backward_run<S, T>(x + s * inner, g + s * inner, dx + s * inner, inner, K,
                           p.pi + grp * K, p.mu + grp * K, p.scale + grp * K, mode,
                           p.a ? p.a + grp : nullptr, lanes, mine + grp * Q);
      }
    }
  }
  for (int th = 0; th < threads; ++th) {
    for (int64_t i = 0; i < G * Q; ++i) sums[i] += totals[static_cast<size_t>(th) * G * Q + i];
  }
}

template <typename S, typename T>
void backward(const S* x, const S* g, S* dx, int64_t n, int64_t C, int64_t inner, int64_t G,
              const Params<T>& p, int mode, double* sums, int threads) {
  accumulate_sums(x, g, dx, n, C, inner, G, p, mode, sums, threads);
  // the lanes summed g e u and g e u^2; the gradients need g e z and g e z^2
  const int64_t K = p.K, Q = num_quantities(K);
  const double u = static_cast<double>(kU<T>);
  for (int64_t grp = 0; grp < G; ++grp) {
    for (int64_t k = 0; k < K; ++k) {
      sums[grp * Q + K + k] /= u;
      sums[grp * Q + 2 * K + k] /= u * u;
    }
  }
}

template <typename T>
Params<T> make_params(int64_t K, const void* pi, const void* mu, const void* scale,
                      const void* a, const void* c) {
  return Params<T>{K,
                   static_cast<const T*>(pi),
                   static_cast<const T*>(mu),
                   static_cast<const T*>(scale),
                   static_cast<const T*>(a),
                   static_cast<const T*>(c)};
}

bool valid_layout(int64_t n, int64_t C, int64_t inner, int64_t G, int64_t K) {
  if (n < 0 || C < 1 || inner < 1 || G < 1 || K < 1) return false;
  if (G > 1 && (C % G != 0 || n % (C * inner) != 0)) return false;
  return true;
}

}  // namespace

extern "C" {

// Version of the calling convention below; the Python side refuses a library with another one.
int gmnm_cpu_abi_version() { return 1; }

// out (same dtype and layout as x) <- init + mixture(x). Parameters are [G][K] (a, c: [G] or
// null) in the compute type: float32 for float32 and bfloat16 inputs, float64 for float64.
// Returns 0 on success, a negative number for arguments it refuses.
int gmnm_cpu_forward(int dtype, const void* x, void* out, int64_t n, int64_t C, int64_t inner,
                     int64_t G, int64_t K, const void* pi, const void* mu, const void* scale,
                     const void* a, const void* c, int mode, int threads) {
  if (!valid_layout(n, C, inner, G, K) || threads < 1) return -1;
  if (mode == kLinear && (a == nullptr || c == nullptr)) return -2;
  switch (dtype) {
    case kFloat32:
      forward(static_cast<const float*>(x), static_cast<float*>(out), n, C, inner, G,
              make_params<float>(K, pi, mu, scale, a, c), mode, threads);
      return 0;
    case kFloat64:
      forward(static_cast<const double*>(x), static_cast<double*>(out), n, C, inner, G,
              make_params<double>(K, pi, mu, scale, a, c), mode, threads);
      return 0;
    case kBFloat16:
      forward(static_cast<const BFloat16*>(x), static_cast<BFloat16*>(out), n, C, inner, G,
              make_params<float>(K, pi, mu, scale, a, c), mode, threads);
      return 0;
    default:
      return -3;
  }
}

// dx <- (init) - g * sum_k pi_k s_k e_k z_k, and sums ([G][3K+2] doubles, zeroed by the caller)
// <- the raw per-group sums A, B, C, D, E described above.
int gmnm_cpu_backward(int dtype, const void* x, const void* g, void* dx, int64_t n, int64_t C,
                      int64_t inner, int64_t G, int64_t K, const void* pi, const void* mu,
                      const void* scale, const void* a, int mode, double* sums, int threads) {
  if (!valid_layout(n, C, inner, G, K) || threads < 1) return -1;
  if (mode == kLinear && a == nullptr) return -2;
  switch (dtype) {
    case kFloat32:
      backward(static_cast<const float*>(x), static_cast<const float*>(g),
               static_cast<float*>(dx), n, C, inner, G,
               make_params<float>(K, pi, mu, scale, a, nullptr), mode, sums, threads);
      return 0;
    case kFloat64:
      backward(static_cast<const double*>(x), static_cast<const double*>(g),
               static_cast<double*>(dx), n, C, inner, G,
               make_params<double>(K, pi, mu, scale, a, nullptr), mode, sums, threads);
      return 0;
    case kBFloat16:
      backward(static_cast<const BFloat16*>(x), static_cast<const BFloat16*>(g),
               static_cast<BFloat16*>(dx), n, C, inner, G,
               make_params<float>(K, pi, mu, scale, a, nullptr), mode, sums, threads);
      return 0;
    default:
      return -3;
  }
}

}  // extern "C"
