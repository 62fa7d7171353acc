// Decode-size matrix products on the CPU: out[M, N] = x[M, K] @ W[N, K]^T for 1..8 rows of x (a decode step's R
// stacked loop streams), with bf16, int8 (per output channel) or int4 (grouped) weights. See docs/cpu.md.
//
// Why not PyTorch's kernels: decode reads every weight once per token, so the time should be the weight bytes over
// the memory bandwidth whatever the number of rows. aten's bf16 one-row product reaches ~50 % of it on a Zen 4
// core, and its int8/int4 weight-only kernels pay a fixed ~0.75 / ~1.0 ms of arithmetic per extra row on a
// 27648 x 5120 product (docs/cpu.md has the measurements). Here each weight block is loaded (and for int4
// unpacked) once, then multiplied into every row with AVX512-BF16 dot products (VDPBF16PS: bf16 pairs, float32
// accumulation; bf16 weights), AVX512-VNNI integer dot products (VPDPWSSD: int8 weights, activations rounded to
// 16-bit integers; VPDPBUSD: int4 weights, activations rounded to 8-bit integers per group) or float32 FMAs (int8
// weights, float32 activations), so an extra row costs one or two instructions per block.
//
// Every kernel walks a weight row along K (the checkpoint's own layout, no repacking) and keeps NB rows of W
// in flight: independent accumulator chains, and NB concurrent memory streams, each running through consecutive
// rows (`over_rows`). `at::parallel_for` splits the output rows over torch's threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstring>

namespace {

// every loop over rows (m) or weight rows in flight (j) is unrolled, so that accumulators stay in registers
#define UNROLL _Pragma("GCC unroll 8")

constexpr int64_t kMaxRows = 8;

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// float32 from 16 bfloat16 values (a bf16 is the upper half of a float32)
inline __m512 load_bf16_as_f32(const c10::BFloat16* p, __mmask16 mask) {
  __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
inline void store(T* out, float value) { *out = static_cast<T>(value); }

// the load mask of a block of Mask's width with `left` elements still to go: all lanes, or the first `left`
template <typename Mask>
inline Mask first_lanes(int64_t left) {
  constexpr int64_t width = 8 * sizeof(Mask);
  return left >= width ? static_cast<Mask>(~Mask(0)) : left <= 0 ? Mask(0) : static_cast<Mask>((Mask(1) << left) - 1);
}

// ---- bf16 weights: 32 inputs per VDPBF16PS ----
template <int M, int NB, typename T>
void bf16_rows(const c10::BFloat16* x, const c10::BFloat16* w, T* out, int64_t n0, int64_t stride, int64_t N,
               int64_t K) {
  __m512 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = first_lanes<__mmask32>(K - k);
    __m512i wv[NB];
    UNROLL for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w + (n0 + j * stride) * K + k);
    UNROLL for (int m = 0; m < M; ++m) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(mask, x + m * K + k));
      UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], as_bh(wv[j]), xv);
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) store(out + m * N + n0 + j * stride, _mm512_reduce_add_ps(acc[m][j]));
}

// ---- int8 weights, float32 activations: 16 inputs per FMA, one scale per output row ----
template <int M, int NB, typename T>
void int8_rows(const float* x, const int8_t* w, const c10::BFloat16* scale, T* out, int64_t n0,
               int64_t stride, int64_t N, int64_t K) {
  __m512 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = first_lanes<__mmask16>(K - k);
    __m512 wv[NB];
    UNROLL for (int j = 0; j < NB; ++j)
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + (n0 + j * stride) * K + k)));
    UNROLL for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xv, acc[m][j]);
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j)
      store(out + m * N + n0 + j * stride,
            _mm512_reduce_add_ps(acc[m][j]) * static_cast<float>(scale[n0 + j * stride]));
}

// ---- int8 weights, bf16 activations: 16-bit integer dot products, 32 inputs per VPDPWSSD ----
// Converting int8 weights to floats costs three instructions per 16 of them, which leaves the product well short
// of the memory bandwidth from two rows on. Instead the activations become 16-bit integers, and each 32 weights
// need one sign extension before VPDPWSSD multiplies them into every row (pairs of int16 products summed into 16
// int32 lanes). Lane l of every 32-input step takes inputs k with (k mod 32) / 2 = l, its *class*: each row of x
// gets one scale per class, s = max |x| over the class / 32767, so that an outlier coarsens only its own class, and
// rounding to 16 bits is finer than bf16's own 8 bits for every input above 1/128 of its class's largest. The
// int32 sums are moved to float32 every kChunk inputs, before they could overflow (kChunk / 32 * 2 * 127 * 32767
// < 2^31).
constexpr int64_t kChunk = 4096;

inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  // GCC 12 copies each accumulator around the _mm512_dpwssd_epi32 intrinsic, doubling the loop's instructions
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// x [M, K] as 16-bit integers x / scale [M, Kp] (Kp: K rounded up to 32, padded with zeros) and the scales
// [M, 16], one per lane class (see above).
void quantize_rows(const c10::BFloat16* x, int64_t M, int64_t K, int64_t Kp, int16_t* x16, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const c10::BFloat16* row = x + m * K;
    auto load = [&](int64_t k) {  // 16 inputs as float32, zero past K
      const __mmask16 mask = first_lanes<__mmask16>(K - k);
      return load_bf16_as_f32(row + std::min(k, K), mask);
    };
    __m512 peak[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < Kp; k += 32)
      for (int h = 0; h < 2; ++h) peak[h] = _mm512_max_ps(peak[h], _mm512_abs_ps(load(k + 16 * h)));
    // lane i of peak[h] holds the inputs with k mod 32 = 16 h + i: class 8 h + i / 2
    alignas(64) float lanes[32], inverse[32];
    _mm512_store_ps(lanes, peak[0]);
    _mm512_store_ps(lanes + 16, peak[1]);
    for (int c = 0; c < 16; ++c) {
      const float top = std::max(lanes[2 * c], lanes[2 * c + 1]);
      const float s = top > 0 ? top / 32767.f : 1.f;
      scales[m * 16 + c] = s;
      inverse[2 * c] = inverse[2 * c + 1] = 1.f / s;
    }
    const __m512i limit = _mm512_set1_epi32(32767), negative_limit = _mm512_set1_epi32(-32767);
    for (int64_t k = 0; k < Kp; k += 32)
      for (int h = 0; h < 2; ++h) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load(k + 16 * h), _mm512_load_ps(inverse + 16 * h)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + m * Kp + k + 16 * h),
                            _mm512_cvtepi32_epi16(_mm512_max_epi32(_mm512_min_epi32(v, limit), negative_limit)));
      }
  }
}

template <int M, int NB>
void int8_dot_rows(const int16_t* x16, const float* xs, int64_t Kp, const int8_t* w, const c10::BFloat16* scale,
                   c10::BFloat16* out, int64_t n0, int64_t stride, int64_t N, int64_t K) {
  __m512 total[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) total[m][j] = _mm512_setzero_ps();
  for (int64_t chunk = 0; chunk < K; chunk += kChunk) {
    __m512i acc[M][NB];
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t k = chunk; k < std::min(K, chunk + kChunk); k += 32) {
      const __mmask32 mask = first_lanes<__mmask32>(K - k);
      __m512i xv[M];
      UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(x16 + m * Kp + k);
      UNROLL for (int j = 0; j < NB; ++j) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + (n0 + j * stride) * K + k));
        UNROLL for (int m = 0; m < M; ++m) acc[m][j] = dpwssd(acc[m][j], xv[m], wv);
      }
    }
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < NB; ++j) total[m][j] = _mm512_add_ps(total[m][j], _mm512_cvtepi32_ps(acc[m][j]));
  }
  UNROLL for (int m = 0; m < M; ++m) {
    const __m512 class_scales = _mm512_loadu_ps(xs + m * 16);
    UNROLL for (int j = 0; j < NB; ++j)
      store(out + m * N + n0 + j * stride, _mm512_reduce_add_ps(_mm512_mul_ps(total[m][j], class_scales)) *
                                               static_cast<float>(scale[n0 + j * stride]));
  }
}

// ---- int4 weights in groups of G inputs, activations rounded to int8 per group: 64 codes per VPDPBUSD ----
// w = (q - 8) * s + z with q in 0..15; each row of x is rounded to int8 per group, x ~ a * sx (sx = the group's
// max |x| / 127, as llama.cpp's Q8 activations), so that VPDPBUSD multiplies 64 unsigned codes by 64 signed
// activations per instruction: half the dot products of bf16 pairs, and 3 instructions to unpack 128 codes instead
// of 7. Per group
// sum_k x_k w_k = s sx sum_k q_k a_k + (z - 8 s) sum_k x_k, with sum_k x_k taken from the rounded x (`xsum`).
// The file stores each 16 groups of a row (fewer in the last) with one group per int32 lane (docs/cpu.md):
// block t of such a superblock holds, for each group l, 4 bytes whose low nibbles are the group's inputs 8 t .. 8 t
// + 3 and whose high nibbles are 8 t + 4 .. 8 t + 7, so every lane sums one group and the scales meet the sums
// once per superblock. `x8` holds the activations in the same order: [M, superblocks, G / 8, 2 (low, high), 16, 4].
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));  // see dpwssd
  return acc;
}

struct Int4Layout {
  int64_t K, G, groups, supers, words;  // words: 8-input words per group (G / 8)
  Int4Layout(int64_t K_, int64_t G_) : K(K_), G(G_), groups(K_ / G_), supers((K_ / G_ + 15) / 16), words(G_ / 8) {}
  int64_t x8_row() const { return supers * words * 128; }  // bytes of one row of x8
};

// x [M, K] bf16 -> x8 (zero-filled by the caller), sx [M, groups], xsum [M, groups] (see above)
void quantize_groups(const c10::BFloat16* x, int64_t M, const Int4Layout& L, int8_t* x8, float* sx, float* xsum) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < L.groups; ++g) {
      const c10::BFloat16* p = x + m * L.K + g * L.G;
      __m512 peak = _mm512_setzero_ps();
      for (int64_t i = 0; i < L.G; i += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(load_bf16_as_f32(p + i, 0xFFFF)));
      const float top = _mm512_reduce_max_ps(peak), s = top > 0 ? top / 127.f : 1.f;
      const __m512 inverse = _mm512_set1_ps(1.f / s);
      __m512i total = _mm512_setzero_si512();
      // the 16 inputs 16 c .. 16 c + 15 are words 2 c and 2 c + 1: four 4-byte pieces, 64 bytes apart in x8
      int8_t* dst = x8 + m * L.x8_row() + (g / 16) * L.words * 128 + (g % 16) * 4;
      for (int64_t c = 0; c < L.G / 16; ++c) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16_as_f32(p + 16 * c, 0xFFFF), inverse));
        total = _mm512_add_epi32(total, q);
        alignas(16) int32_t piece[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(piece), _mm512_cvtsepi32_epi8(q));
        for (int i = 0; i < 4; ++i) std::memcpy(dst + (4 * c + i) * 64, piece + i, 4);
      }
      sx[m * L.groups + g] = s;
      xsum[m * L.groups + g] = s * static_cast<float>(_mm512_reduce_add_epi32(total));
    }
}

template <int M, int NB, typename T>
void int4_rows(const int8_t* x8, const float* sx, const float* xsum, const uint8_t* w, const c10::BFloat16* scale,
               const c10::BFloat16* zero, T* out, int64_t n0, int64_t stride, int64_t N, const Int4Layout& L) {
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  __m512 total[M][NB];
  UNROLL for (int j = 0; j < NB; ++j) {
    // the offset term, 16 groups at a time, lane by lane into `total` (all lanes are summed at the end)
    UNROLL for (int m = 0; m < M; ++m) total[m][j] = _mm512_setzero_ps();
    const int64_t row = (n0 + j * stride) * L.groups;
    for (int64_t g = 0; g < L.groups; g += 16) {
      const __mmask16 mask = first_lanes<__mmask16>(L.groups - g);
      const __m512 s = load_bf16_as_f32(scale + row + g, mask), z = load_bf16_as_f32(zero + row + g, mask);
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);
      UNROLL for (int m = 0; m < M; ++m)
        total[m][j] = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(mask, xsum + m * L.groups + g), total[m][j]);
    }
  }
  for (int64_t sb = 0; sb < L.supers; ++sb) {
    const int64_t g0 = 16 * sb, S = std::min<int64_t>(16, L.groups - g0);  // S groups: blocks of 4 S bytes
    const __mmask16 lanes = first_lanes<__mmask16>(S);
    __m512i acc[M][NB];  // lane l: the int32 sum of group g0 + l
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t t = 0; t < L.words; ++t) {
      const int8_t* xt = x8 + (sb * L.words + t) * 128;
      __m512i low[M], high[M];  // up to 4 rows the activations stay in registers; beyond, the accumulators need them
      if constexpr (M <= 4) {
        UNROLL for (int m = 0; m < M; ++m) {
          low[m] = _mm512_loadu_si512(xt + m * L.x8_row());
          high[m] = _mm512_loadu_si512(xt + m * L.x8_row() + 64);
        }
      }
      UNROLL for (int j = 0; j < NB; ++j) {
        const uint8_t* block = w + (n0 + j * stride) * (L.K / 2) + g0 * L.G / 2 + t * 4 * S;
        const __m512i u = _mm512_maskz_loadu_epi32(lanes, block);
        const __m512i lo = _mm512_and_si512(u, low_nibble), hi = _mm512_and_si512(_mm512_srli_epi16(u, 4), low_nibble);
        UNROLL for (int m = 0; m < M; ++m) {
          if constexpr (M <= 4) {
            acc[m][j] = dpbusd(dpbusd(acc[m][j], lo, low[m]), hi, high[m]);
          } else {
            acc[m][j] = dpbusd(dpbusd(acc[m][j], lo, _mm512_loadu_si512(xt + m * L.x8_row())), hi,
                               _mm512_loadu_si512(xt + m * L.x8_row() + 64));
          }
        }
      }
    }
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512 s = load_bf16_as_f32(scale + (n0 + j * stride) * L.groups + g0, lanes);
      UNROLL for (int m = 0; m < M; ++m) {
        const __m512 both = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes, sx + m * L.groups + g0));
        total[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][j]), both, total[m][j]);
      }
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) store(out + m * N + n0 + j * stride, _mm512_reduce_add_ps(total[m][j]));
}

// Calls f(std::integral_constant<int, M>) for M = rows, so that each row count gets its own unrolled kernel.
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Weight rows in flight per row count M: enough memory streams to keep reads outstanding, as long as the
// accumulators (M x NB) and the activations (int4: 2 M) fit the 32 registers. Measured on the 27648 x 5120
// product, 2 threads (docs/cpu.md).
template <int M>
constexpr int bf16_rows_in_flight() { return M <= 3 ? 8 : (M == 4 ? 6 : 3); }
template <int M>
constexpr int int8_rows_in_flight() { return M <= 2 ? 8 : (M == 3 ? 6 : (M == 4 ? 4 : 3)); }
template <int M>  // M NB accumulators and M activation vectors
constexpr int int8_dot_rows_in_flight() { return M <= 3 ? 8 : (M == 4 ? 6 : (M <= 6 ? 3 : 2)); }
template <int M>
constexpr int int4_rows_in_flight() { return M <= 2 ? 8 : (M == 3 ? 6 : (M == 4 ? 4 : (M == 5 ? 4 : 3))); }

// Runs `block(n0, stride)` (weight rows n0, n0 + stride, ..., NB of them) and `single(n)` over the output rows on
// torch's threads. Each thread takes a contiguous range of rows and walks NB equal parts of it side by side, so
// that each of the NB memory streams runs through consecutive weight rows: one long stream per part, instead of a
// new one every row (or block of rows). The hardware prefetcher needs a few misses to pick up each new stream,
// which cost int4's 2.5 KB rows 15-25 % of their time (docs/cpu.md).
constexpr int64_t kMinRowsPerThread = 128;

template <int NB, typename FB, typename F1>
void over_rows(int64_t N, FB block, F1 single) {
  at::parallel_for(0, N, kMinRowsPerThread, [&](int64_t begin, int64_t end) {
    const int64_t part = (end - begin) / NB;
    for (int64_t i = 0; i < part; ++i) block(begin + i, part);
    for (int64_t n = begin + NB * part; n < end; ++n) single(n);
  });
}

void check_rows(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, name, ": x must have 1 to ", kMaxRows,
              " rows, got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == K, name, ": x has ", x.size(1), " inputs, the weight ", K);
  TORCH_CHECK(x.is_contiguous(), name, ": x must be contiguous");
}

template <typename T>
void bf16_dispatch(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t N = w.size(0), K = w.size(1);
  auto* xp = x.data_ptr<c10::BFloat16>();
  auto* wp = w.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<T>();
  auto run = [&](auto rows_tag) {
    constexpr int M = decltype(rows_tag)::value;
    constexpr int NB = bf16_rows_in_flight<M>();
    over_rows<NB>(
        N, [&](int64_t n0, int64_t stride) { bf16_rows<M, NB, T>(xp, wp, op, n0, stride, N, K); },
        [&](int64_t n) { bf16_rows<M, 1, T>(xp, wp, op, n, 1, N, K); });
  };
  with_rows(x.size(0), run);
}

}  // namespace

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "linear_bf16: the weight must be a contiguous bfloat16 [N, K] tensor");
  check_rows(x, w.size(1), "linear_bf16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "linear_bf16: x must be bfloat16");
  auto out = at::empty({x.size(0), w.size(0)}, x.options());
  bf16_dispatch<c10::BFloat16>(x, w, out);
  return out;
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "linear_int8: the weight must be a contiguous int8 [N, K] tensor");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0) && scale.is_contiguous(),
              "linear_int8: the scale must be a contiguous bfloat16 [N] tensor");
  check_rows(x, w.size(1), "linear_int8");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear_int8: x must be bfloat16 or float32");
  const int64_t N = w.size(0), K = w.size(1), rows = x.size(0);
  auto out = at::empty({rows, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const c10::BFloat16* sp = scale.data_ptr<c10::BFloat16>();
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    float* op = out.data_ptr<float>();
    with_rows(rows, [&](auto rows_tag) {
      constexpr int M = decltype(rows_tag)::value;
      over_rows<int8_rows_in_flight<M>()>(
          N,
          [&](int64_t n0, int64_t stride) {
            int8_rows<M, int8_rows_in_flight<M>(), float>(xp, wp, sp, op, n0, stride, N, K);
          },
          [&](int64_t n) { int8_rows<M, 1, float>(xp, wp, sp, op, n, 1, N, K); });
    });
    return out;
  }
  const int64_t Kp = (K + 31) / 32 * 32;
  auto x16 = at::empty({rows, Kp}, x.options().dtype(at::kShort));
  auto scales = at::empty({rows, 16}, x.options().dtype(at::kFloat));
  int16_t* xq = x16.data_ptr<int16_t>();
  float* xs = scales.data_ptr<float>();
  quantize_rows(x.data_ptr<c10::BFloat16>(), rows, K, Kp, xq, xs);
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  with_rows(rows, [&](auto rows_tag) {
    constexpr int M = decltype(rows_tag)::value;
    constexpr int NB = int8_dot_rows_in_flight<M>();
    over_rows<NB>(
        N, [&](int64_t n0, int64_t stride) { int8_dot_rows<M, NB>(xq, xs, Kp, wp, sp, op, n0, stride, N, K); },
        [&](int64_t n) { int8_dot_rows<M, 1>(xq, xs, Kp, wp, sp, op, n, 1, N, K); });
  });
  return out;
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group_size) {
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "linear_int4: the weight must be a contiguous uint8 [N, K/2] tensor");
  TORCH_CHECK(group_size % 64 == 0 && K % group_size == 0, "linear_int4: the group size ", group_size,
              " must be a multiple of 64 dividing K = ", K);
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == K / group_size,
                "linear_int4: scale and zero must be contiguous bfloat16 [N, K / group_size] tensors");
  check_rows(x, K, "linear_int4");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "linear_int4: x must be bfloat16");
  const int64_t rows = x.size(0);
  const Int4Layout L(K, group_size);
  auto x8 = at::zeros({rows, L.x8_row()}, x.options().dtype(at::kChar));
  auto sx = at::empty({rows, L.groups}, x.options().dtype(at::kFloat));
  auto xsum = at::empty({rows, L.groups}, x.options().dtype(at::kFloat));
  quantize_groups(x.data_ptr<c10::BFloat16>(), rows, L, x8.data_ptr<int8_t>(), sx.data_ptr<float>(),
                  xsum.data_ptr<float>());
  auto out = at::empty({rows, N}, x.options());
  auto* op = out.data_ptr<c10::BFloat16>();
  const int8_t* xq = x8.data_ptr<int8_t>();
  const float* sxp = sx.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto* sp = scale.data_ptr<c10::BFloat16>();
  const auto* zp = zero.data_ptr<c10::BFloat16>();
  with_rows(rows, [&](auto rows_tag) {
    constexpr int M = decltype(rows_tag)::value;
    constexpr int NB = int4_rows_in_flight<M>();
    over_rows<NB>(
        N, [&](int64_t n0, int64_t stride) { int4_rows<M, NB>(xq, sxp, xs, wp, sp, zp, op, n0, stride, N, L); },
        [&](int64_t n) { int4_rows<M, 1>(xq, sxp, xs, wp, sp, zp, op, n, 1, N, L); });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x[M, K] @ w[N, K]^T for bf16 weights, 1 <= M <= 8");
  m.def("linear_int8", &linear_int8, "x[M, K] @ (w * scale[:, None])^T for int8 weights, 1 <= M <= 8");
  m.def("linear_int4", &linear_int4, "x[M, K] @ dequant(w)^T for int4 weights in groups, 1 <= M <= 8");
  m.attr("max_rows") = kMaxRows;
}
