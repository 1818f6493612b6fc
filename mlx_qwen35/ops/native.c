/* y[M, N] = x[M, K] · w[N, K]ᵀ for 1 <= M <= 8, streaming each weight row once.
 *
 * Decode multiplies a few activation rows (one sequence, a speculative draft,
 * a small batch) by each weight. A BLAS gemv reads the weight once per row and
 * an sgemm packs it first; here each weight row is read once from memory and
 * multiplied with all M rows of x, which stay in cache. Tiles of R weight rows
 * × up to 4 activation rows keep independent accumulators, enough to hide the
 * FMA latency. The weight is float32 or bfloat16 (its uint16 bits, widened by
 * a shift). Threads claim chunks of the N output rows.
 */

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

typedef __m256 vf;

static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vload_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#else
/* Portable: GCC / clang vector extensions, lowered to whatever SIMD the target has (NEON on arm64). */

typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));

static inline vf vzero(void) { return (vf){0}; }
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vload_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu wide = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &wide, sizeof v);
    return v;
}
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}
#endif

#define INLINE static inline __attribute__((always_inline))

static inline float widen(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Bytes ahead in each weight row to prefetch: the hardware's prefetchers alone left the output head well
 * below numpy's gemv (bench/NOTES.md). Prefetches past the end do not fault. */
#define PREFETCH 512

/* acc[r][m] += w[n + r, k0:k1] · x[m, k0:k1], for R weight rows and G <= 4 rows of x, k1 - k0 a multiple of 8.
 * R, G and BF16 are constants at every call, so the compiler unrolls the loop body and keeps the R·G
 * accumulators in registers. */
INLINE void steps(const float *x, const void *w, long K, long n, long k0, long k1, int R, int G, int BF16,
                  vf acc[4][4]) {
    vf a[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < G; m++) a[r][m] = acc[r][m];
    const float *wf = (const float *)w + n * K;
    const uint16_t *wh = (const uint16_t *)w + n * K;
    for (long k = k0; k < k1; k += 8) {
        for (int r = 0; r < R; r++) {
            __builtin_prefetch(BF16 ? (const void *)(wh + r * K + k + PREFETCH / 2)
                                    : (const void *)(wf + r * K + k + PREFETCH / 4));
            vf wv = BF16 ? vload_bf16(wh + r * K + k) : vload(wf + r * K + k);
            for (int m = 0; m < G; m++) a[r][m] = vfma(wv, vload(x + m * K + k), a[r][m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < G; m++) acc[r][m] = a[r][m];
}

/* y[m, n + r] = the lanes of acc[r][m] plus the scalar tail k8 .. K. */
INLINE void finish(const float *x, const void *w, float *y, long K, long N, long n, long k8, int R, int G,
                   int BF16, vf acc[4][4]) {
    const float *wf = (const float *)w + n * K;
    const uint16_t *wh = (const uint16_t *)w + n * K;
    for (int r = 0; r < R; r++) {
        for (int m = 0; m < G; m++) {
            float s = vsum(acc[r][m]);
            for (long j = k8; j < K; j++) s += (BF16 ? widen(wh[r * K + j]) : wf[r * K + j]) * x[m * K + j];
            y[m * N + n + r] = s;
        }
    }
}

/* Past 4 rows of x the accumulators no longer fit the registers, and x (M·K floats) no longer fits L1.
 * Two groups of rows then take turns on each K_BLOCK of the R weight rows, which the second group
 * reads from L1: each weight byte still comes from memory once, and x from L2 once per R weight rows. */
#define K_BLOCK 512

/* y[:, n : n + R] for R weight rows from n and all M rows of x. */
INLINE void tile(const float *x, const void *w, float *y, long K, long N, long n, int R, int M, int BF16) {
    long k8 = K / 8 * 8;
    vf lo[4][4], hi[4][4];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < 4; m++) lo[r][m] = hi[r][m] = vzero();
    if (M <= 4) {
        steps(x, w, K, n, 0, k8, R, M, BF16, lo);
        finish(x, w, y, K, N, n, k8, R, M, BF16, lo);
        return;
    }
    const int G = (M + 1) / 2;
    for (long k0 = 0; k0 < k8; k0 += K_BLOCK) {
        long k1 = k0 + K_BLOCK < k8 ? k0 + K_BLOCK : k8;
        steps(x, w, K, n, k0, k1, R, G, BF16, lo);
        steps(x + G * K, w, K, n, k0, k1, R, M - G, BF16, hi);
    }
    finish(x, w, y, K, N, n, k8, R, G, BF16, lo);
    finish(x + G * K, w, y + G * N, K, N, n, k8, R, M - G, BF16, hi);
}

/* Rows [n0, n1) in tiles of R(M) weight rows, at most 12 accumulators a group; leftovers one row at a time. */
#define ROWS(R, M, BF16)                                                                     \
    do {                                                                                     \
        long n = n0;                                                                         \
        for (; n + (R) <= n1; n += (R)) tile(x, w, y, K, N, n, (R), (M), (BF16));            \
        for (; n < n1; n++) tile(x, w, y, K, N, n, 1, (M), (BF16));                          \
    } while (0)

#define BY_M(BF16)                                                                           \
    switch (M) {                                                                             \
    case 1: ROWS(4, 1, BF16); break;                                                         \
    case 2: ROWS(4, 2, BF16); break;                                                         \
    case 3: ROWS(4, 3, BF16); break;                                                         \
    case 4: ROWS(3, 4, BF16); break;                                                         \
    case 5: ROWS(3, 5, BF16); break;                                                         \
    case 6: ROWS(3, 6, BF16); break;                                                         \
    case 7: ROWS(3, 7, BF16); break;                                                         \
    default: ROWS(3, 8, BF16); break;                                                        \
    }

static void rows(const float *x, const void *w, int bf16, float *y, long M, long K, long N, long n0, long n1) {
    if (bf16) BY_M(1) else BY_M(0)
}

#define MAX_THREADS 64
/* Below this many weight elements per thread, waking a thread costs more than its share of the product. */
#define MIN_ELEMS_PER_THREAD (1L << 20)
/* Rows claimed at a time: whole tiles of 3 or 4 rows, and whole 64-byte lines of y. */
#define CHUNK 48

/* A persistent pool: waking sleeping workers costs less than creating and joining threads at each of
 * decode's many calls (bench/NOTES.md). Workers sleep on a condition variable between calls. The rows
 * go in chunks to whoever claims them, so a worker that wakes late (its core busy with another
 * process) costs its share, not a wait: an even split waited for the slower thread. One call at a time. */
static struct {
    pthread_mutex_t call, lock; /* call: held for a whole product; lock: guards the fields below */
    pthread_cond_t go, done;
    int workers;                /* started */
    int seats, running;         /* workers the current call still admits; workers inside it */
    unsigned long generation;   /* bumped once per call */
    const float *x;             /* the current call's product */
    const void *w;
    float *y;
    long M, K, N;
    int bf16;
    atomic_long next;           /* its first row no one has claimed */
    unsigned long first_generation[MAX_THREADS];
} pool = {.call = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .go = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

static void claim_chunks(void) {
    for (long n0; (n0 = atomic_fetch_add(&pool.next, CHUNK)) < pool.N;) {
        long n1 = n0 + CHUNK < pool.N ? n0 + CHUNK : pool.N;
        rows(pool.x, pool.w, pool.bf16, pool.y, pool.M, pool.K, pool.N, n0, n1);
    }
}

static void *worker(void *arg) {
    long id = (long)arg;
    pthread_mutex_lock(&pool.lock);
    for (unsigned long seen = pool.first_generation[id];; seen = pool.generation) {
        while (pool.generation == seen) pthread_cond_wait(&pool.go, &pool.lock);
        if (pool.seats == 0) continue; /* the call is full, or over */
        pool.seats--;
        pool.running++;
        pthread_mutex_unlock(&pool.lock);
        claim_chunks();
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* A forked child has none of the workers, and may have inherited the locks held. */
static void forget_pool(void) {
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.go, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.workers = pool.seats = pool.running = 0;
}

__attribute__((constructor)) static void on_load(void) { pthread_atfork(NULL, NULL, forget_pool); }

/* Start workers up to `want` (as many as start), under pool.lock. */
static void grow(int want) {
    while (pool.workers < want && pool.workers < MAX_THREADS) {
        long id = pool.workers;
        pthread_t t;
        pool.first_generation[id] = pool.generation;
        if (pthread_create(&t, NULL, worker, (void *)id) != 0) return;
        pthread_detach(t);
        pool.workers++;
    }
}

/* The entry point: x [M, K] and y [M, N] float32, w [N, K] float32 (bf16 = 0) or bfloat16 bits (bf16 = 1),
 * all C-contiguous; 1 <= M <= 8; `threads` the CPUs to use. Returns 0, or -1 for an M out of range. */
int matmul_few_rows(const float *x, const void *w, int bf16, float *y, long M, long K, long N, int threads) {
    if (M < 1 || M > 8) return -1;
    long most = N * K / MIN_ELEMS_PER_THREAD;
    if (threads > most) threads = most < 1 ? 1 : (int)most;
    if (threads <= 1) {
        rows(x, w, bf16, y, M, K, N, 0, N);
        return 0;
    }
    pthread_mutex_lock(&pool.call);
    pthread_mutex_lock(&pool.lock);
    grow(threads - 1);
    pool.x = x, pool.w = w, pool.y = y, pool.M = M, pool.K = K, pool.N = N, pool.bf16 = bf16;
    atomic_store(&pool.next, 0);
    pool.seats = threads - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.go);
    pthread_mutex_unlock(&pool.lock);
    claim_chunks();
    pthread_mutex_lock(&pool.lock);
    pool.seats = 0; /* every row is claimed: a worker waking now stays out */
    while (pool.running > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call);
    return 0;
}
