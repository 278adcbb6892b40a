/* ember-train's CPU dropout in one pass: the mask is computed from (seed, element index), never stored.
 *
 * Compiled on first use by ember_train/encoder/dropout_kernel.py and called through ctypes, so the
 * package stays pure Python and needs no PyTorch headers (a C compiler is enough; without one the
 * NumPy implementation of the same masks in fast_dropout.py is used).
 *
 * The mask (element i of the flattened tensor, 64-bit seed with 32-bit halves k0, k1):
 *   block b = i / 16, r = i % 16, counter c = 8b + r % 8 (32 bits),
 *   h = mix32(mix32(c ^ k0) ^ k1)  (Chris Wellons' "lowbias32" integer hash, twice),
 *   u = the low 16 bits of h if r < 8, else its high 16 bits,
 *   element i is kept iff u < threshold (the keep probability times 65536).
 * Eight consecutive counters per block make one 8-lane vector of hashes: two 8-float halves of
 * output per vector, so the loop is plain SIMD (GCC/Clang vector extensions, any architecture).
 */
#include <stdint.h>
#include <string.h>

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline u32x8 mix32x8(u32x8 x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* The 16 elements' hashes of the block that starts at element `start` (a multiple of 16). */
static inline u32x8 block_hashes(int64_t start, uint32_t k0, uint32_t k1) {
    const u32x8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    return mix32x8(mix32x8(((uint32_t)(start >> 1) + lanes) ^ k0) ^ k1);
}

/* One thread: torch's OpenMP workers still spin on the other cores between operators, and threads of
 * our own competed with them (a MiniLM step's kernel time 0.63 s with one thread, 0.80-0.91 s with
 * two, over 8 steps on 2 cores; matmuls slowed too). in == NULL writes the mask itself as bytes. */
VECTOR_CLONES static void run(const float *in, void *out, int64_t n, uint64_t seed, uint32_t threshold,
                              float scale) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const u32x8 threshold8 = threshold - (u32x8){};
    const f32x8 scale8 = scale - (f32x8){};
    const int64_t full_end = n & ~(int64_t)15;
    for (int64_t start = 0; start < full_end; start += 16) {
        u32x8 h = block_hashes(start, k0, k1);
        i32x8 keep_low = (i32x8)((h & 0xFFFFu) < threshold8);
        i32x8 keep_high = (i32x8)((h >> 16) < threshold8);
        if (in) {
            f32x8 a, b;
            memcpy(&a, in + start, sizeof a);
            memcpy(&b, in + start + 8, sizeof b);
            /* Multiplied by 0, not replaced by it: NaN and inf stay NaN, as in PyTorch's dropout. */
            a *= (f32x8)((i32x8)scale8 & keep_low);
            b *= (f32x8)((i32x8)scale8 & keep_high);
            memcpy((float *)out + start, &a, sizeof a);
            memcpy((float *)out + start + 8, &b, sizeof b);
        } else {
            uint8_t *mask = (uint8_t *)out + start;
            for (int l = 0; l < 8; ++l) {
                mask[l] = (uint8_t)(keep_low[l] & 1);
                mask[8 + l] = (uint8_t)(keep_high[l] & 1);
            }
        }
    }
    u32x8 h = block_hashes(full_end, k0, k1); /* the last, partial block */
    for (int64_t i = full_end; i < n; ++i) {
        int r = (int)(i - full_end);
        int keep = (r < 8 ? (h[r] & 0xFFFFu) : (h[r - 8] >> 16)) < threshold;
        if (in)
            ((float *)out)[i] = in[i] * (keep ? scale : 0.0f);
        else
            ((uint8_t *)out)[i] = (uint8_t)keep;
    }
}

/* out[i] = in[i] * scale where element i is kept, else in[i] * 0 (float32, contiguous; in == out allowed). */
void ember_dropout_f32(const float *in, float *out, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
    run(in, out, n, seed, threshold, scale);
}

/* mask[i] = 1 where element i is kept, else 0. */
void ember_keep_mask(uint8_t *mask, int64_t n, uint64_t seed, uint32_t threshold) {
    run(NULL, mask, n, seed, threshold, 1.0f);
}
