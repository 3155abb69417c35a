/* The merge's elementwise step in one pass: out = round(float(W) + delta * s), and a count of the non-finite
 * values written.
 *
 * The torch sequence it replaces (merging/variants.py) makes five passes over a block: delta *= s, W widened to
 * float32, the add, the rounding copy and a sum for the value check. Each is memory-bound, so one pass is about
 * three times faster. The arithmetic is the same, operation for operation: a float32 product, a float32 sum,
 * one round-to-nearest-even into the output type. Two things would change bits and are ruled out by the build
 * flags (setup.py): contracting the product and the sum into one fused multiply-add (-ffp-contract=off), and
 * any fast-math reassociation. merging/fused.py checks the result against torch on first use and falls back to
 * torch where it differs; tests/test_fused.py holds it to torch over ties, NaN, infinities, subnormals and
 * overflow.
 *
 * Plain C, no Python headers: loaded with ctypes (which releases the GIL during the call). Built with the
 * package as an optional extension: without a C compiler the install still succeeds and the merge runs the
 * torch sequence. On x86-64 with GCC or Clang each loop is compiled for AVX-512, AVX2 and baseline, and the
 * loader picks one for the CPU at hand.
 */

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QM_NO_CLONES)
#define QM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QM_CLONES
#endif

#define QM_EXPORT __attribute__((visibility("default")))

static inline uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* bfloat16 <-> float32, as c10::BFloat16 does it: round to nearest, ties to even; any NaN becomes 0x7FC0. */
static inline float from_bf16(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline uint16_t to_bf16(float x) {
    uint32_t u = bits_of(x);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : rounded;
}

static inline int bf16_nonfinite(uint16_t h) { return (h & 0x7F80u) == 0x7F80u; }

/* float16 <-> float32: IEEE binary16, round to nearest, ties to even, subnormals kept; by bits, so that the
 * result does not depend on the compiler's _Float16 support. */
static inline float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return float_of(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0) return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    /* zero or subnormal: mantissa * 2^-24, exact in float32 */
    float magnitude = (float)mantissa * 5.9604644775390625e-8f;
    return float_of(sign | bits_of(magnitude));
}

static inline uint16_t to_f16(float x) {
    uint32_t u = bits_of(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  /* NaN, quiet */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* rounds past 65504: infinity */
    if (a >= 0x38800000u) {  /* normal in float16 */
        uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
        return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
    }
    /* subnormal or zero in float16: round |x| * 2^24 to an integer, ties to even, with the float32 adder
     * (adding 0.5 * 2^24 = 2^23 puts the units in the last place: exact RNE for |x| < 2^-14) */
    float scaled = float_of(a) + 0.5f;
    return (uint16_t)(sign | (uint16_t)(bits_of(scaled) - 0x3F000000u));
}

static inline int f16_nonfinite(uint16_t h) { return (h & 0x7C00u) == 0x7C00u; }

static inline int f32_nonfinite(float x) { return (bits_of(x) & 0x7F800000u) == 0x7F800000u; }

#define QM_KERNEL(NAME, WTYPE, WIDEN, OTYPE, ROUND, NONFINITE)                                                  \
    QM_EXPORT QM_CLONES int64_t NAME(const WTYPE *restrict weight, const float *restrict delta, float scale,   \
                                     OTYPE *restrict out, int64_t n) {                                          \
        int64_t nonfinite = 0;                                                                                  \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            float product = delta[i] * scale;                                                                   \
            float sum = WIDEN(weight[i]) + product;                                                             \
            OTYPE value = ROUND(sum);                                                                           \
            out[i] = value;                                                                                     \
            nonfinite += NONFINITE(value);                                                                      \
        }                                                                                                       \
        return nonfinite;                                                                                       \
    }

#define QM_SAME(x) (x)

QM_KERNEL(qm_merge_bf16_bf16, uint16_t, from_bf16, uint16_t, to_bf16, bf16_nonfinite)
QM_KERNEL(qm_merge_bf16_f16, uint16_t, from_bf16, uint16_t, to_f16, f16_nonfinite)
QM_KERNEL(qm_merge_bf16_f32, uint16_t, from_bf16, float, QM_SAME, f32_nonfinite)
QM_KERNEL(qm_merge_f16_bf16, uint16_t, from_f16, uint16_t, to_bf16, bf16_nonfinite)
QM_KERNEL(qm_merge_f16_f16, uint16_t, from_f16, uint16_t, to_f16, f16_nonfinite)
QM_KERNEL(qm_merge_f16_f32, uint16_t, from_f16, float, QM_SAME, f32_nonfinite)
QM_KERNEL(qm_merge_f32_bf16, float, QM_SAME, uint16_t, to_bf16, bf16_nonfinite)
QM_KERNEL(qm_merge_f32_f16, float, QM_SAME, uint16_t, to_f16, f16_nonfinite)
QM_KERNEL(qm_merge_f32_f32, float, QM_SAME, float, QM_SAME, f32_nonfinite)

/* The version of this file's interface; the loader refuses a library built from another. */
QM_EXPORT int qm_version(void) { return 1; }
