"""The CPU masked gradient's own kernels, in C++ built by Inductor's C++ toolchain on first use.

`sddmm_rowdot`: `out[k] = sum_t a[t, r_k] * b[t, c_k]` for any element list (sorted or tile
ordered: each thread's elements then read few columns). Each thread takes a contiguous run of
the elements and, chunk by chunk of CHUNK steps of T, transposes the columns of a and b that
its run touches into its own small fp32 buffer (8x8 register transposes, upcasting bf16/fp16 on
the way), then takes one CHUNK-long vectorised dot per element. One parallel region per call
and no barrier inside it: the threads never wait for each other until the end, which on a
shared machine is what a descheduled thread costs.

`sddmm_diagonals`: the same sums for elements on diagonals (struct's: runs of elements whose row
and column both step by one), by streaming a and b once, a few rows of T at a time, vectorised
along each run; each thread takes a range of b's columns. No transposes, no temporaries beyond
a few rows. (Dense rows stay GEMMs: torch.mm beats rank-one updates streamed beside the
diagonal, measured 1.1-1.9x, bench/RESULTS.md.)

Both read a and b through their strides (no copies of either) and accumulate in fp32.
`available()` says whether the kernels built here; the dispatcher falls back to
`torch.sparse.sampled_addmm` and plain torch where they did not.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

CHUNK = 64  # steps of T per transposed chunk (a multiple of 32: the dot's vector width x 4)
# below this many multiply-adds a call runs on one thread: a parallel region costs more
_PARALLEL_WORK = 1 << 21
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_LOCK = threading.RLock()  # the build's own check calls the kernels
_STATE: dict[str, object] = {}

_PREFIX = r"""
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t CH = %(chunk)d;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (!man) return bits_to_float(sign);
  uint32_t e = 113;  // subnormal: normalise the mantissa
  while (!(man & 0x400u)) { man <<= 1; --e; }
  return bits_to_float(sign | (e << 23) | ((man & 0x3ffu) << 13));
}

// dtype codes: 0 float32, 1 bfloat16, 2 float16, 3 float64; every value is read as fp32
template <int DT>
inline float ld(const void* p, int64_t i) {
  if constexpr (DT == 0) return static_cast<const float*>(p)[i];
  else if constexpr (DT == 1) return bits_to_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
  else if constexpr (DT == 2) return half_to_float(static_cast<const uint16_t*>(p)[i]);
  else return static_cast<float>(static_cast<const double*>(p)[i]);
}

#if defined(__AVX2__)
template <int DT>
inline __m256 ld8(const void* p, int64_t i) {
  if constexpr (DT == 0) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (DT == 1) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (DT == 2) {
#if defined(__F16C__)
    const uint16_t* h = static_cast<const uint16_t*>(p) + i;
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
#else
    float v[8];
    for (int j = 0; j < 8; ++j) v[j] = ld<2>(p, i + j);
    return _mm256_loadu_ps(v);
#endif
  } else {
    const double* d = static_cast<const double*>(p) + i;
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(d + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(d)));
  }
}
#endif

template <template <int> class F, typename... Args>
inline void by_dtype(int64_t dtype, Args... args) {
  switch (dtype) {
    case 0: F<0>::run(args...); break;
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    default: F<3>::run(args...); break;
  }
}
}  // namespace
"""

_ROWDOT = r"""
namespace {
#if defined(__AVX2__)
// v[i]: 8 consecutive columns at step i; column j is stored at dst + j * CH
inline void store_transposed8(const __m256 v[8], float* dst) {
  __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * CH, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * CH, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * CH, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * CH, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * CH, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * CH, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * CH, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * CH, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// dst[(j - j0) * CH + t] = x[t0 + t, j] (fp32) for columns j in [j0, j1), t < n; zeros for n <= t < CH
template <int DT>
struct TransposeChunk {
  static void run(const void* x, int64_t s0, int64_t s1, int64_t t0, int64_t n, int64_t j0, int64_t j1,
                  float* dst) {
    int64_t j = j0;
#if defined(__AVX2__)
    if (s1 == 1) {
      const int64_t n8 = n / 8 * 8;
      for (; j + 8 <= j1; j += 8) {
        float* d = dst + (j - j0) * CH;
        for (int64_t t = 0; t < n8; t += 8) {
          __m256 v[8];
          for (int i = 0; i < 8; ++i) v[i] = ld8<DT>(x, (t0 + t + i) * s0 + j);
          store_transposed8(v, d + t);
        }
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t t = n8; t < n; ++t) d[c * CH + t] = ld<DT>(x, (t0 + t) * s0 + j + c);
      }
    }
#endif
    for (; j < j1; ++j) {
      float* d = dst + (j - j0) * CH;
      for (int64_t t = 0; t < n; ++t) d[t] = ld<DT>(x, (t0 + t) * s0 + j * s1);
    }
    if (n < CH)
      for (int64_t c = j0; c < j1; ++c) std::memset(dst + (c - j0) * CH + n, 0, sizeof(float) * (CH - n));
  }
};

inline float dot(const float* __restrict x, const float* __restrict y) {
#if defined(__AVX2__)
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i < CH; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), s3);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
#else
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < CH; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += x[i + j] * y[i + j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}
}  // namespace

extern "C" void kernel(const void* a, const void* b, const void* flat, float* out, int64_t T, int64_t B,
                       int64_t sa0, int64_t sa1, int64_t sb0, int64_t sb1, int64_t m, int64_t dtype_a,
                       int64_t dtype_b, int64_t flat64, int64_t nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t k0 = m * tid / nt, mk = m * (tid + 1) / nt - k0;
    if (mk > 0) {
      // this thread's elements as offsets into its buffers, and the columns of a and b they read
      std::unique_ptr<int64_t[]> off(new int64_t[2 * mk]);
      int64_t rlo = INT64_MAX, rhi = -1, clo = INT64_MAX, chi = -1;
      const bool narrow = B <= UINT32_MAX;
      for (int64_t k = 0; k < mk; ++k) {
        const int64_t f = flat64 ? static_cast<const int64_t*>(flat)[k0 + k]
                                 : static_cast<int64_t>(static_cast<const int32_t*>(flat)[k0 + k]);
        const int64_t r = narrow && f <= UINT32_MAX ? int64_t(uint32_t(f) / uint32_t(B)) : f / B;
        const int64_t c = f - r * B;
        off[2 * k] = r;
        off[2 * k + 1] = c;
        rlo = std::min(rlo, r); rhi = std::max(rhi, r); clo = std::min(clo, c); chi = std::max(chi, c);
      }
      const int64_t nr = rhi - rlo + 1, nc = chi - clo + 1;
      for (int64_t k = 0; k < mk; ++k) {
        off[2 * k] = (off[2 * k] - rlo) * CH;
        off[2 * k + 1] = (off[2 * k + 1] - clo) * CH;
      }
      std::unique_ptr<float[]> buf(new float[(nr + nc) * CH]);
      float* at = buf.get();
      float* bt = at + nr * CH;
      float* o = out + k0;
      for (int64_t t0 = 0; t0 < T; t0 += CH) {
        const int64_t n = std::min(CH, T - t0);
        by_dtype<TransposeChunk>(dtype_a, a, sa0, sa1, t0, n, rlo, rhi + 1, at);
        by_dtype<TransposeChunk>(dtype_b, b, sb0, sb1, t0, n, clo, chi + 1, bt);
        if (t0 == 0)
          for (int64_t k = 0; k < mk; ++k) o[k] = dot(at + off[2 * k], bt + off[2 * k + 1]);
        else
          for (int64_t k = 0; k < mk; ++k) o[k] += dot(at + off[2 * k], bt + off[2 * k + 1]);
      }
    }
  }
}
"""

_DIAGONALS = r"""
namespace {
constexpr int64_t ROWS = 8;  // steps of T read per pass

// dst[i * w + (j - j0)] = x[t0 + i, j] (fp32) for i < n, j in [j0, j0 + w)
template <int DT>
struct CopyRows {
  static void run(const void* x, int64_t s0, int64_t s1, int64_t t0, int64_t n, int64_t j0, int64_t w,
                  float* dst) {
    for (int64_t i = 0; i < n; ++i) {
      float* d = dst + i * w;
      const int64_t base = (t0 + i) * s0;
      int64_t j = 0;
#if defined(__AVX2__)
      if (s1 == 1)
        for (; j + 8 <= w; j += 8) _mm256_storeu_ps(d + j, ld8<DT>(x, base + j0 + j));
#endif
      for (; j < w; ++j) d[j] = ld<DT>(x, base + (j0 + j) * s1);
    }
  }
};

// acc[k] += sum_{i < n} x[i * sx + k] * y[i * sy + k] for k < len
inline void stream_dots(float* acc, const float* x, int64_t sx, const float* y, int64_t sy, int64_t n,
                        int64_t len) {
  int64_t k = 0;
#if defined(__AVX2__)
  for (; k + 8 <= len; k += 8) {
    __m256 s = _mm256_loadu_ps(acc + k);
    for (int64_t i = 0; i < n; ++i)
      s = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * sx + k), _mm256_loadu_ps(y + i * sy + k), s);
    _mm256_storeu_ps(acc + k, s);
  }
#endif
  for (; k < len; ++k) {
    float s = acc[k];
    for (int64_t i = 0; i < n; ++i) s += x[i * sx + k] * y[i * sy + k];
    acc[k] = s;
  }
}

}  // namespace

// out[k] = sum_t a[t, r_k] * b[t, c_k] for flat diag[k] = r_k * B + c_k on diagonals (struct's: runs
// whose row and column both step by one; any elements are exact, only slower). Each thread takes a range
// of b's columns and the parts of the runs that fall there; a and b are read once, ROWS steps at a time.
extern "C" void kernel(const void* a, const void* b, const int64_t* diag, float* out, int64_t T, int64_t B,
                       int64_t sa0, int64_t sa1, int64_t sb0, int64_t sb1, int64_t nd, int64_t dtype_a,
                       int64_t dtype_b, int64_t nthreads) {
  // the diagonal elements as runs (first element, row, column, length)
  std::unique_ptr<int64_t[]> runs(new int64_t[4 * (nd + 1)]);
  int64_t nruns = 0;
  for (int64_t k = 0; k < nd; ++k) {
    const int64_t r = diag[k] / B, c = diag[k] - r * B;
    int64_t* last = runs.get() + 4 * (nruns - 1);
    if (nruns && r == last[1] + last[3] && c == last[2] + last[3]) {
      ++last[3];
    } else {
      int64_t* run = runs.get() + 4 * nruns++;
      run[0] = k; run[1] = r; run[2] = c; run[3] = 1;
    }
  }
  std::fill(out, out + nd, 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t c0 = (B * tid / nt) / 8 * 8, c1 = tid + 1 == nt ? B : (B * (tid + 1) / nt) / 8 * 8;
    // this thread's parts of the runs, and the span of a's columns they read
    std::unique_ptr<int64_t[]> mine(new int64_t[4 * (nruns + 1)]);
    int64_t nmine = 0, rlo = INT64_MAX, rhi = -1;
    for (int64_t q = 0; q < nruns; ++q) {
      const int64_t* run = runs.get() + 4 * q;
      const int64_t lo = std::max(c0, run[2]), hi = std::min(c1, run[2] + run[3]);
      if (lo >= hi) continue;
      int64_t* m = mine.get() + 4 * nmine++;
      m[0] = run[0] + (lo - run[2]); m[1] = run[1] + (lo - run[2]); m[2] = lo; m[3] = hi - lo;
      rlo = std::min(rlo, m[1]); rhi = std::max(rhi, m[1] + m[3] - 1);
    }
    if (nmine) {
      // the span of b's columns the runs read (within this thread's range)
      int64_t clo = INT64_MAX, chi = -1;
      for (int64_t q = 0; q < nmine; ++q) {
        clo = std::min(clo, mine[4 * q + 2]);
        chi = std::max(chi, mine[4 * q + 2] + mine[4 * q + 3] - 1);
      }
      const int64_t wc = chi - clo + 1, wr = rhi - rlo + 1;
      std::unique_ptr<float[]> buf(new float[ROWS * (wc + wr)]);
      float* bb = buf.get();
      float* ab = bb + ROWS * wc;
      for (int64_t t0 = 0; t0 < T; t0 += ROWS) {
        const int64_t n = std::min(ROWS, T - t0);
        by_dtype<CopyRows>(dtype_b, b, sb0, sb1, t0, n, clo, wc, bb);
        by_dtype<CopyRows>(dtype_a, a, sa0, sa1, t0, n, rlo, wr, ab);
        for (int64_t q = 0; q < nmine; ++q) {
          const int64_t* m = mine.get() + 4 * q;
          stream_dots(out + m[0], ab + (m[1] - rlo), wr, bb + (m[2] - clo), wc, n, m[3]);
        }
      }
    }
  }
}
"""

_ROWDOT_ARGS = ["const void*", "const void*", "const void*", "float*"] + ["int64_t"] * 11
_DIAGONALS_ARGS = ["const void*", "const void*", "const int64_t*", "float*"] + ["int64_t"] * 10


def _build() -> None:
    """Compile both kernels once per process (Inductor caches the libraries on disk), and check
    them on a tiny case; on any failure record why and leave them unavailable."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    prefix = _PREFIX % {"chunk": CHUNK}
    try:
        rowdot = CppPythonBindingsCodeCache.load_pybinding(_ROWDOT_ARGS, prefix + _ROWDOT)
        diagonals = CppPythonBindingsCodeCache.load_pybinding(_DIAGONALS_ARGS, prefix + _DIAGONALS)
        _STATE["rowdot"], _STATE["diagonals"] = rowdot, diagonals
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(70, 5, generator=g), torch.randn(70, 6, generator=g)
        flat = torch.tensor([0, 7, 14, 29])  # (0, 0), (1, 1), (2, 2), (4, 5): a diagonal and one more
        want = (a.t() @ b).view(-1)[flat]
        ok = torch.allclose(sddmm_rowdot(a, b, flat, 6), want, rtol=1e-5, atol=1e-5)
        ok = ok and torch.allclose(sddmm_diagonals(a, b, flat, 6), want, rtol=1e-5, atol=1e-5)
    except Exception as e:  # noqa: BLE001 - any failure (no compiler, no OpenMP) means: other paths
        _STATE.pop("rowdot", None)
        _STATE.pop("diagonals", None)
        _STATE["error"] = f"{type(e).__name__}: {e}"
        return
    if not ok:
        _STATE.pop("rowdot")
        _STATE.pop("diagonals")
        _STATE["error"] = "the compiled kernels gave a wrong result"


def _kernel(name: str):
    with _LOCK:
        if "built" not in _STATE:
            _STATE["built"] = True
            _build()
        return _STATE.get(name)


def available() -> bool:
    """Whether the C++ kernels built on this machine (builds them on first use)."""
    return _kernel("rowdot") is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False, if it is."""
    return None if available() else str(_STATE.get("error", "not built"))


def threads_for(work: int, threads: int | None = None) -> int:
    """The threads a C++ kernel runs `work` multiply-adds on: one below `_PARALLEL_WORK` (a
    parallel region costs more than it saves there), else `threads` (torch's by default)."""
    return max(1, torch.get_num_threads() if threads is None else threads) if work >= _PARALLEL_WORK else 1


def _check(name: str, a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> None:
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError(f"{name}: runs on CPU tensors, found {a.device} and {b.device}")
    if a.dtype not in _DTYPES or b.dtype not in _DTYPES:
        raise ValueError(f"{name}: a and b must be fp32, bf16, fp16 or fp64, found {a.dtype} and {b.dtype}")
    if b.shape[1] != ncols or a.shape[0] != b.shape[0]:
        raise ValueError(f"{name}: expected a (T, A) and b (T, ncols = {ncols}), found {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def _call(name: str):
    kernel = _kernel(name)
    if kernel is None:
        raise RuntimeError(f"sddmm_cpp: the C++ kernels are unavailable: {unavailable_reason()}")
    return kernel


def _run(kind: str, a: Tensor, b: Tensor, flat: Tensor, ncols: int, *extra: int) -> Tensor:
    """Check the operands, then run the C++ kernel `kind` into a fresh fp32 output of one element
    per offset in `flat` (already contiguous, of the dtype the kernel reads)."""
    kernel = _call(kind)
    _check(f"sddmm_{kind}", a, b, flat, ncols)
    m, T = flat.shape[0], a.shape[0]
    out = torch.empty(m, dtype=torch.float32)
    if m == 0 or T == 0:
        return out.zero_()
    kernel(a, b, flat, out, T, ncols, a.stride(0), a.stride(1), b.stride(0), b.stride(1), m,
           _DTYPES[a.dtype], _DTYPES[b.dtype], *extra, threads_for(m * T))
    return out


def sddmm_rowdot(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[flat]` on CPU by the chunked row-dot kernel, for flat offsets in
    any order (int32 or int64; the structure's tile order keeps each thread's columns few).
    Raises RuntimeError when `available()` is False."""
    flat = flat.contiguous()
    return _run("rowdot", a, b, flat, ncols, int(flat.dtype == torch.int64))


def sddmm_diagonals(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[flat]` on CPU for elements on diagonals (consecutive elements whose
    row and column both step by one: `mask_structure`'s `diag`), streaming a and b once; any other
    elements are still exact, only slower. Raises RuntimeError when `available()` is False."""
    return _run("diagonals", a, b, flat.long().contiguous(), ncols)
