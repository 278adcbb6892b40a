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
#include <pthread.h>
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

#define MAX_THREADS 64
#define MIN_PER_THREAD (1 << 15)

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline u32x8 mix32x8(u32x8 x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* The 16-bit uniform of one element (the tail of a range that does not fill a block). */
static inline uint32_t uniform16(int64_t i, uint32_t k0, uint32_t k1) {
    int64_t block_start = i & ~(int64_t)15;
    int r = (int)(i - block_start);
    uint32_t h = mix32(mix32(((uint32_t)(block_start >> 1) + (uint32_t)(r & 7)) ^ k0) ^ k1);
    return r < 8 ? (h & 0xFFFFu) : (h >> 16);
}

typedef struct {
    const float *in;   /* dropout: input values; NULL for a bare mask */
    void *out;         /* float output (dropout) or uint8 output (mask) */
    int64_t begin, end; /* begin is a multiple of 16 */
    uint32_t k0, k1, threshold;
    float scale;
} job_t;

VECTOR_CLONES static void run_range(const job_t *job) {
    const u32x8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    const u32x8 threshold = job->threshold - (u32x8){};
    const f32x8 scale = job->scale - (f32x8){};
    int64_t full_end = job->begin + ((job->end - job->begin) & ~(int64_t)15);
    for (int64_t start = job->begin; start < full_end; start += 16) {
        u32x8 h = mix32x8(mix32x8(((uint32_t)(start >> 1) + lanes) ^ job->k0) ^ job->k1);
        i32x8 keep_low = (i32x8)((h & 0xFFFFu) < threshold);
        i32x8 keep_high = (i32x8)((h >> 16) < threshold);
        if (job->in) {
            f32x8 a, b;
            memcpy(&a, job->in + start, sizeof a);
            memcpy(&b, job->in + start + 8, sizeof b);
            a = (f32x8)((i32x8)(a * scale) & keep_low);
            b = (f32x8)((i32x8)(b * scale) & keep_high);
            memcpy((float *)job->out + start, &a, sizeof a);
            memcpy((float *)job->out + start + 8, &b, sizeof b);
        } else {
            uint8_t *mask = (uint8_t *)job->out + start;
            for (int l = 0; l < 8; ++l) {
                mask[l] = (uint8_t)(keep_low[l] & 1);
                mask[8 + l] = (uint8_t)(keep_high[l] & 1);
            }
        }
    }
    for (int64_t i = full_end; i < job->end; ++i) {
        int keep = uniform16(i, job->k0, job->k1) < job->threshold;
        if (job->in)
            ((float *)job->out)[i] = keep ? job->in[i] * job->scale : 0.0f;
        else
            ((uint8_t *)job->out)[i] = (uint8_t)keep;
    }
}

static void *run_job(void *job) {
    run_range((const job_t *)job);
    return NULL;
}

/* Split [0, n) into block-aligned ranges, one per thread; the calling thread takes the first. */
static void run_parallel(const float *in, void *out, int64_t n, uint64_t seed, uint32_t threshold,
                         float scale, int threads) {
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / MIN_PER_THREAD) threads = (int)(n / MIN_PER_THREAD);
    if (threads < 1) threads = 1;
    int64_t per = ((n + threads - 1) / threads + 15) & ~(int64_t)15;
    int count = 0;
    for (int64_t begin = 0; begin < n; begin += per, ++count) {
        jobs[count] = (job_t){in, out, begin, begin + per < n ? begin + per : n,
                              (uint32_t)seed, (uint32_t)(seed >> 32), threshold, scale};
        if (count > 0)
            started[count] = pthread_create(&ids[count], NULL, run_job, &jobs[count]) == 0;
    }
    if (count > 0) run_range(&jobs[0]);
    for (int t = 1; t < count; ++t) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_range(&jobs[t]); /* no thread to be had: do its share here */
    }
}

/* out[i] = in[i] * scale where element i is kept, else 0 (float32, contiguous, may alias). */
void ember_dropout_f32(const float *in, float *out, int64_t n, uint64_t seed, uint32_t threshold,
                       float scale, int threads) {
    run_parallel(in, out, n, seed, threshold, scale, threads);
}

/* mask[i] = 1 where element i is kept, else 0. */
void ember_keep_mask(uint8_t *mask, int64_t n, uint64_t seed, uint32_t threshold, int threads) {
    run_parallel(NULL, mask, n, seed, threshold, 1.0f, threads);
}
