// Variable-length attention over a packed batch on CPUs with AVX512-BF16 (bei/modeling/packed/cpu_attention.py
// compiles this with the host's g++ and calls it through ctypes).
//
// In:  qkv  bf16 [tokens][3][heads][dim]: every row's real tokens one after another (no padding)
//      cu   int32 [rows + 1]: where each row starts (cu_seqlens)
// Out: out  bf16 [tokens][heads][dim]: softmax(q k^T * scale) v within each row, for heads [h0, h1)
//
// Both products run on bf16 pairs with fp32 accumulation (vdpbf16ps); the scores, the softmax and its
// sum stay fp32, the probabilities are rounded to bf16 for P @ V, and the output is rounded to bf16 once. Per row and head: K is transposed into pairs of dims per key (so
// one broadcast of a query's pair meets 16 keys), V is interleaved by pairs of keys (so one broadcast of
// two probabilities meets 16 dims), then blocks of query rows run scores -> softmax -> P @ V with the
// accumulators in registers. torch's CPU flash attention runs head_dim 32 at a third of this rate: it
// multiplies small fp32 blocks through a general GEMM and pads every row to the longest.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

namespace {

typedef uint32_t u32;  // two bf16 side by side: the unit of vdpbf16ps

// 2^x for x <= 0 (fp32, relative error < 4e-5: a fiftieth of the bf16 rounding of the probabilities)
inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const __m512 magic = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23: x + magic rounds x to an integer n
    __m512 r = _mm512_add_ps(x, magic);
    __m512 f = _mm512_sub_ps(x, _mm512_sub_ps(r, magic));  // x - n in [-0.5, 0.5]
    __m512 p = _mm512_set1_ps(9.6181291e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i n = _mm512_slli_epi32(_mm512_castps_si512(r), 23);  // n in the exponent bits
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), n));
}

// the first `count` lanes (count may be <= 0 or >= 16)
inline __mmask16 first(int count) {
    return count <= 0 ? 0 : count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1);
}

inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

struct Scratch {
    std::vector<u32> kt, v2, pb;
    std::vector<float> s;
};

// One head of one row. kt [D/2][Lp]: key j's dims (2p, 2p+1) at [p][j], zero past L. v2 [Lp/2][D]: keys
// (2m, 2m+1) of dim d at [m][d], zero past L. q: the row's first query at stride qstride (in pairs).
template <int D>
void head(const u32 *kt, const u32 *v2, const u32 *q, int qstride, uint16_t *out, int ostride, int L, int Lp,
          float scale, Scratch &w) {
    constexpr int DV = D / 16;                       // fp32 vectors per output row
    constexpr int R = 24 / DV < 12 ? 24 / DV : 12;   // query rows per block: 24 accumulators in P @ V
    constexpr int RB = R >= 6 ? 6 : R;               // query rows per scores pass: 24 accumulators
    const int Lh = Lp / 2;
    float *s = w.s.data();
    u32 *pb = w.pb.data();
    for (int i0 = 0; i0 < L; i0 += R) {
        const int rows = L - i0 < R ? L - i0 : R;
        float mx[R];
        for (int r = 0; r < R; r++) mx[r] = -INFINITY;
        for (int b0 = 0; b0 < rows; b0 += RB) {
            const int rb = rows - b0 < RB ? rows - b0 : RB;
            const u32 *qr[RB];
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++) qr[r] = q + (size_t)(i0 + b0 + (r < rb ? r : 0)) * qstride;
            for (int j0 = 0; j0 < Lp; j0 += 64) {
                __m512 acc[RB][4];
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
                const u32 *kp = kt + j0;
#pragma GCC unroll 2
                for (int p = 0; p < D / 2; p++, kp += Lp) {
                    __m512i k0 = _mm512_loadu_si512(kp), k1 = _mm512_loadu_si512(kp + 16);
                    __m512i k2 = _mm512_loadu_si512(kp + 32), k3 = _mm512_loadu_si512(kp + 48);
#pragma GCC unroll 8
                    for (int r = 0; r < RB; r++) {
                        __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qr[r][p]);
                        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, (__m512bh)k0);
                        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, (__m512bh)k1);
                        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], qb, (__m512bh)k2);
                        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], qb, (__m512bh)k3);
                    }
                }
#pragma GCC unroll 8
                for (int r = 0; r < RB; r++) {  // every block row, so that acc stays in registers
                    __m512 m = _mm512_set1_ps(mx[b0 + r]);
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) {
                        const int j = j0 + 16 * c;
                        __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), first(L - j), acc[r][c]);
                        _mm512_storeu_ps(s + (b0 + r) * Lp + j, x);
                        m = _mm512_max_ps(m, x);
                    }
                    mx[b0 + r] = _mm512_reduce_max_ps(m);
                }
            }
        }
        float inv[R];
        for (int r = 0; r < rows; r++) {
            const float *sr = s + r * Lp;
            u32 *pr = pb + r * Lh;
            const __m512 sc = _mm512_set1_ps(scale), top = _mm512_set1_ps(mx[r] * scale);
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < Lp; j += 32) {
                __m512 e0 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sc, top));
                __m512 e1 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j + 16), sc, top));
                if (j + 32 > L) {  // exact zeros past the row (the scores there are -inf, clamped to 2^-126)
                    e0 = _mm512_maskz_mov_ps(first(L - j), e0);
                    e1 = _mm512_maskz_mov_ps(first(L - j - 16), e1);
                }
                sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
                _mm512_storeu_si512(pr + j / 2, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        __m512 o[R][DV];
#pragma GCC unroll 12
        for (int r = 0; r < R; r++)
#pragma GCC unroll 8
            for (int c = 0; c < DV; c++) o[r][c] = _mm512_setzero_ps();
        const u32 *pr[R];
#pragma GCC unroll 12
        for (int r = 0; r < R; r++) pr[r] = pb + (r < rows ? r : 0) * Lh;
        const int pairs = (L + 1) / 2;
        for (int m = 0; m < pairs; m++) {
            __m512i vv[DV];
#pragma GCC unroll 8
            for (int c = 0; c < DV; c++) vv[c] = _mm512_loadu_si512(v2 + m * D + 16 * c);
#pragma GCC unroll 12
            for (int r = 0; r < R; r++) {
                __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pr[r][m]);
#pragma GCC unroll 8
                for (int c = 0; c < DV; c++) o[r][c] = _mm512_dpbf16_ps(o[r][c], pp, (__m512bh)vv[c]);
            }
        }
#pragma GCC unroll 12
        for (int r = 0; r < R; r++) {
            if (r < rows) {
                const __m512 norm = _mm512_set1_ps(inv[r]);
                uint16_t *dst = out + (size_t)(i0 + r) * ostride;
#pragma GCC unroll 8
                for (int c = 0; c < DV; c += 2) {
                    __m512 a = _mm512_mul_ps(o[r][c], norm), b = _mm512_mul_ps(o[r][c + 1], norm);
                    _mm512_storeu_si512(dst + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
                }
            }
        }
    }
}

// Heads [h0, h1) of one row of L tokens starting at qkv.
template <int D>
void row(const uint16_t *qkv, uint16_t *out, int L, int H, int h0, int h1, float scale, Scratch &w) {
    const int HD = H * D, P = HD / 2, Lp = (L + 63) & ~63;
    const int p0 = h0 * D / 2, np = (h1 - h0) * D / 2;  // this call's pairs of dims
    const u32 *pairs = reinterpret_cast<const u32 *>(qkv);  // [L][3P]
    const int stride = 3 * P;
    w.kt.resize((size_t)np * Lp);
    w.v2.resize((size_t)(h1 - h0) * (Lp / 2) * D);
    w.s.resize((size_t)12 * Lp);
    w.pb.resize((size_t)12 * Lp / 2);
    for (int j0 = 0; j0 < Lp; j0 += 16) {  // kt: K's pairs transposed, 16 x 16 at a time
        for (int c0 = 0; c0 < np; c0 += 16) {
            __m512i r[16];
            for (int t = 0; t < 16; t++)
                r[t] = j0 + t < L ? _mm512_loadu_si512(pairs + (size_t)(j0 + t) * stride + P + p0 + c0) : _mm512_setzero_si512();
            transpose16(r);
            for (int t = 0; t < 16; t++) _mm512_storeu_si512(w.kt.data() + (size_t)(c0 + t) * Lp + j0, r[t]);
        }
    }
    // v2: V's rows 2m and 2m + 1 interleaved, dim by dim
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                        55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    for (int m = 0; m < Lp / 2; m++) {
        const uint16_t *a = qkv + (size_t)(2 * m) * 3 * HD + 2 * HD + h0 * D;
        for (int c = 0; c < (h1 - h0) * D; c += 32) {
            __m512i ra = 2 * m < L ? _mm512_loadu_si512(a + c) : _mm512_setzero_si512();
            __m512i rb = 2 * m + 1 < L ? _mm512_loadu_si512(a + 3 * HD + c) : _mm512_setzero_si512();
            u32 *dst = w.v2.data() + ((size_t)(c / D) * (Lp / 2) + m) * D + c % D;
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(ra, lo, rb));
            _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(ra, hi, rb));
        }
    }
    for (int h = h0; h < h1; h++)
        head<D>(w.kt.data() + (size_t)(h - h0) * (D / 2) * Lp, w.v2.data() + (size_t)(h - h0) * (Lp / 2) * D,
                pairs + h * (D / 2), stride, out + h * D, HD, L, Lp, scale, w);
}

}  // namespace

// 0 on success; -1 for a head dim other than 32, 64 or 128. `scale` multiplies q k^T (dim^-0.5 by default).
extern "C" int bei_attention_bf16(const uint16_t *qkv, uint16_t *out, const int32_t *cu, int rows, int heads, int dim,
                                  int h0, int h1, float scale) {
    static thread_local Scratch w;
    const float log2_scale = scale * 1.4426950408889634f;  // softmax in base 2
    for (int i = 0; i < rows; i++) {
        const int a = cu[i], L = cu[i + 1] - a;
        if (L <= 0) continue;
        const uint16_t *x = qkv + (size_t)a * 3 * heads * dim;
        uint16_t *o = out + (size_t)a * heads * dim;
        switch (dim) {
            case 32: row<32>(x, o, L, heads, h0, h1, log2_scale, w); break;
            case 64: row<64>(x, o, L, heads, h0, h1, log2_scale, w); break;
            case 128: row<128>(x, o, L, heads, h0, h1, log2_scale, w); break;
            default: return -1;
        }
    }
    return 0;
}
