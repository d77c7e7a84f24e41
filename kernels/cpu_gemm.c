// Matrix products for CPU decoding: y[M, N] = x[M, K] @ W[N, K]^T, made for few rows (M = 1 to ~16).
//
// Why: decoding one token streams every weight once, and verifying a draft tree of M tokens should cost
// about the same, since each weight byte loaded serves M rows. oneDNN's bf16 product instead slows with
// each extra row on this project's 2-core CPU (docs/performance.md), which makes speculative decoding pay
// less. These kernels load each block of weights once and apply it to all M rows from
// registers, so for a few rows they stay bound by memory bandwidth, not by arithmetic. Prefill-sized
// products run about as fast as oneDNN's, so one layout serves every call.
//
// Every output row is computed in the same order whatever M is, so verifying a draft gives bit-for-bit the
// products a one-token step gives.
//
// Layouts (packed once in Python, kernels/cpu.py):
//   bf16: W as [N/16][K/2][16][2]: for each block of 16 output rows, each pair of input columns holds
//         the 16 rows' two weights side by side, as AVX512-BF16's dot-product instruction consumes them.
//   int8: codes as [N/16][K][16], one int8 per weight, with a float32 scale per output row.
//   int4: codes as [N/16][K/8][64 bytes], two 4-bit codes per byte in the order int4_tile unpacks them, with a
//         bf16 scale and offset per output row and group of inputs as [N/16][K/group][2][16].
// N must be a multiple of 16 and K even (int4: K and the group multiples of 8).
// The int8 and int4 layouts also serve products over int8 activations (`*_a8`, below), which rearrange the
// bytes in registers, so a layer holds one layout whichever activations it multiplies.
// Built by kernels/cpu.py with gcc -O3 -fopenmp; the AVX-512 code runs only where the CPU reports it.

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_ROWS 12 // rows per pass over a weight block; more rows take several passes over the (cached) block
#define MAX_BLOCKS 8
#ifndef PREFETCH
#define PREFETCH 16 // how far ahead (in 64-byte lines of each weight stream) to prefetch (docs/performance.md)
#endif

int workbench_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } bits = {.u = (uint32_t)v << 16};
    return bits.f;
}

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))

// 16 bf16 values widened to float32 (exact: bf16 is float32's top half).
TARGET INLINE __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

// Stores 16 float32 sums as bf16 (round to nearest even, as torch rounds), scaled and biased if asked.
TARGET INLINE void store_bf16(uint16_t *out, __m512 acc, const float *scale, const uint16_t *bias) {
    if (scale) acc = _mm512_mul_ps(acc, _mm512_loadu_ps(scale));
    if (bias) {
        __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)bias)), 16);
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(b));
    }
    _mm256_storeu_si256((void *)out, (__m256i)_mm512_cvtneps_pbh(acc));
}

// The weights of one tile: BLOCKS consecutive blocks of 16 output rows. Each block is one contiguous stream.
typedef struct {
    const uint16_t *x;   // activations [M, K] bf16
    const void *w;       // packed weights
    const float *scales; // int8 row scales [N], or 0
    const uint16_t *params; // int4: per block and group, 16 bf16 scales then 16 bf16 offsets
    const float *x_sums; // int4: each row's sum of x over each group [M, K / group]
    int64_t group;       // int4: inputs per scale and offset
    const uint16_t *bias;
    uint16_t *y;         // [M, N] bf16
    int64_t M, N, K;
    const int8_t *xq;    // *_a8: the activations as int8 codes [M, K], a scale per block of 32 inputs [M, K / 32]
    const float *x_scale; //      and each block's sum of codes [M, K / 32]
    const int32_t *x_code_sums;
} Product;

// A tile's ROWS x BLOCKS float32 sums stored as bf16 rows of y, times the output rows' scales when given, plus the
// bias: every product's last step.
TARGET INLINE void store_tile(const Product *p, int64_t m0, int64_t nb, const int ROWS, const int BLOCKS,
                              __m512 sums[MAX_ROWS][MAX_BLOCKS], const float *scales) {
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) {
            int64_t col = (nb + b) * 16;
            store_bf16(p->y + (m0 + r) * p->N + col, sums[r][b], scales ? scales + col : 0, p->bias ? p->bias + col : 0);
        }
}

// Rows m0 .. m0 + ROWS - 1 against blocks nb .. nb + BLOCKS - 1. ROWS and BLOCKS are constants at each call
// site, so the ROWS x BLOCKS accumulators live in registers; several blocks give the float pipelines
// independent chains when there are few rows. Each output is summed in input order whatever the tile shape.
TARGET INLINE void bf16_tile(const Product *p, int64_t m0, int64_t nb, const int ROWS, const int BLOCKS) {
    const int64_t KP = p->K / 2;
    const int32_t *x_pairs = (const int32_t *)p->x;
    const __m512i *w = (const __m512i *)p->w + nb * KP;
    __m512 acc[MAX_ROWS][MAX_BLOCKS];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < KP; kp++) {
        __m512bh wb[MAX_BLOCKS];
        if (PREFETCH)
            for (int b = 0; b < BLOCKS; b++) _mm_prefetch((const char *)(w + b * KP + kp + PREFETCH), _MM_HINT_T0);
        for (int b = 0; b < BLOCKS; b++) wb[b] = (__m512bh)_mm512_loadu_si512(w + b * KP + kp);
        for (int r = 0; r < ROWS; r++) {
            __m512bh xr = (__m512bh)_mm512_set1_epi32(x_pairs[(m0 + r) * KP + kp]);
            for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xr, wb[b]);
        }
    }
    store_tile(p, m0, nb, ROWS, BLOCKS, acc, 0);
}

// int8 codes, float32 accumulation: each code is widened to float32 in registers and multiplied by the
// row's activation; the row scale is applied once to the sum.
TARGET INLINE void int8_tile(const Product *p, int64_t m0, int64_t nb, const int ROWS, const int BLOCKS) {
    const int64_t K = p->K;
    const int8_t *w = (const int8_t *)p->w + nb * K * 16;
    __m512 acc[MAX_ROWS][MAX_BLOCKS];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 wb[MAX_BLOCKS];
        if (PREFETCH && k % 4 == 0)
            for (int b = 0; b < BLOCKS; b++) _mm_prefetch((const char *)(w + (b * K + k) * 16 + PREFETCH * 64), _MM_HINT_T0);
        for (int b = 0; b < BLOCKS; b++)
            wb[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(w + (b * K + k) * 16))));
        for (int r = 0; r < ROWS; r++) {
            __m512 xr = _mm512_set1_ps(bf16_to_float(p->x[(m0 + r) * K + k]));
            for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_fmadd_ps(xr, wb[b], acc[r][b]);
        }
    }
    store_tile(p, m0, nb, ROWS, BLOCKS, acc, p->scales);
}

// int4 codes in `pack_int4`'s layout: each 64-byte chunk of a block holds 8 inputs of its 16 outputs, two codes
// per byte. A code c becomes the bf16 number 128 + c by interleaving its byte with 0x43 (the exponent of 128),
// so the codes feed AVX512-BF16 dot products straight from the nibbles. Per group the dot products sum
// x * (128 + c); the group then adds scale * dot + (offset - 128 * scale) * sum(x over the group), which is
// sum(x * (scale * c + offset)). Group sums go into `total` in group order, so each row's result is the same
// whatever the tile.
TARGET INLINE void int4_tile(const Product *p, int64_t m0, int64_t nb, const int ROWS, const int BLOCKS) {
    const int64_t KC = p->K / 8, KP = p->K / 2, G = p->K / p->group, per_group = p->group / 8;
    const __m512i *w = (const __m512i *)p->w + nb * KC;
    const uint16_t *params = p->params + nb * G * 32;
    const int32_t *x_pairs = (const int32_t *)p->x;
    const __m512i nibble = _mm512_set1_epi8(0x0F), exponent = _mm512_set1_epi8(0x43);
    __m512 total[MAX_ROWS][MAX_BLOCKS];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) total[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[MAX_ROWS][MAX_BLOCKS];
        for (int r = 0; r < ROWS; r++)
            for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_setzero_ps();
        for (int64_t kc = g * per_group; kc < (g + 1) * per_group; kc++)
            for (int b = 0; b < BLOCKS; b++) {
                if (PREFETCH) _mm_prefetch((const char *)(w + b * KC + kc + PREFETCH), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(w + b * KC + kc);
                const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                const __m512bh pairs[4] = {(__m512bh)_mm512_unpacklo_epi8(lo, exponent),
                                           (__m512bh)_mm512_unpackhi_epi8(lo, exponent),
                                           (__m512bh)_mm512_unpacklo_epi8(hi, exponent),
                                           (__m512bh)_mm512_unpackhi_epi8(hi, exponent)};
                for (int r = 0; r < ROWS; r++)
                    for (int z = 0; z < 4; z++)
                        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_set1_epi32(x_pairs[(m0 + r) * KP + kc * 4 + z]),
                                                     pairs[z]);
            }
        for (int b = 0; b < BLOCKS; b++) {
            const __m512 scale = load_bf16x16(params + (b * G + g) * 32);
            const __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), scale, load_bf16x16(params + (b * G + g) * 32 + 16));
            for (int r = 0; r < ROWS; r++)
                total[r][b] = _mm512_fmadd_ps(_mm512_set1_ps(p->x_sums[(m0 + r) * G + g]), shift,
                                              _mm512_fmadd_ps(acc[r][b], scale, total[r][b]));
        }
    }
    store_tile(p, m0, nb, ROWS, BLOCKS, total, 0);
}

// Few rows take more blocks at once: more weight streams in flight keep memory busy while the rows' dot
// products stay under the arithmetic limit (ROWS x BLOCKS accumulators plus BLOCKS weights in the 32 registers).
#ifndef BLOCKS_FOR
#define BLOCKS_FOR(rows) ((rows) == 1 ? 8 : (rows) <= 6 ? 4 : (rows) <= 8 ? 3 : 2)
#endif
// int4 tiles also hold each group's running totals: 5-8 rows take 2 blocks (with 4 the totals spill)
#define INT4_BLOCKS_FOR(rows) ((rows) == 1 ? 8 : (rows) <= 4 ? 4 : 2)

// Blocks nb .. nb + blocks - 1 for every row, in passes of at most MAX_ROWS rows split evenly (16 rows are two
// passes of 8): the blocks' weights are read from memory once and stay in cache for the later passes. Each
// pass works its blocks in the widest groups its row count allows.
#define TILE_CASE(tile, FOR, p, m0, nb, blocks, ROWS)                                                           \
    case ROWS: {                                                                                                \
        int64_t b_ = 0;                                                                                         \
        if (FOR(ROWS) >= 8) for (; b_ + 8 <= (blocks); b_ += 8) tile(p, m0, (nb) + b_, ROWS, 8);                \
        if (FOR(ROWS) >= 4) for (; b_ + 4 <= (blocks); b_ += 4) tile(p, m0, (nb) + b_, ROWS, 4);                \
        if (FOR(ROWS) == 3) for (; b_ + 3 <= (blocks); b_ += 3) tile(p, m0, (nb) + b_, ROWS, 3);                \
        for (; b_ + 2 <= (blocks); b_ += 2) tile(p, m0, (nb) + b_, ROWS, 2);                                    \
        for (; b_ < (blocks); b_++) tile(p, m0, (nb) + b_, ROWS, 1);                                            \
    } break;

#define ROW_TILES(tile, FOR, p, nb, blocks)                                                                     \
    for (int64_t m0 = 0, per_pass = ((p)->M + MAX_ROWS - 1) / MAX_ROWS; m0 < (p)->M;) {                         \
        int64_t rows = ((p)->M - m0 + per_pass - 1) / per_pass;                                                 \
        switch (rows) {                                                                                         \
            TILE_CASE(tile, FOR, p, m0, nb, blocks, 1) TILE_CASE(tile, FOR, p, m0, nb, blocks, 2)               \
            TILE_CASE(tile, FOR, p, m0, nb, blocks, 3) TILE_CASE(tile, FOR, p, m0, nb, blocks, 4)               \
            TILE_CASE(tile, FOR, p, m0, nb, blocks, 5) TILE_CASE(tile, FOR, p, m0, nb, blocks, 6)               \
            TILE_CASE(tile, FOR, p, m0, nb, blocks, 7) TILE_CASE(tile, FOR, p, m0, nb, blocks, 8)               \
            TILE_CASE(tile, FOR, p, m0, nb, blocks, 9) TILE_CASE(tile, FOR, p, m0, nb, blocks, 10)              \
            TILE_CASE(tile, FOR, p, m0, nb, blocks, 11) TILE_CASE(tile, FOR, p, m0, nb, blocks, 12)             \
        }                                                                                                       \
        m0 += rows;                                                                                             \
        per_pass--;                                                                                             \
    }

// Each thread takes an equal, contiguous range of blocks (its own weight streams) and every row for them.
#define PRODUCT(tile, FOR, p, threads)                                                                          \
    _Pragma("omp parallel num_threads(threads)") {                                                              \
        int t = omp_get_thread_num(), n = omp_get_num_threads();                                                \
        int64_t blocks = (p)->N / 16, first = blocks * t / n, last = blocks * (t + 1) / n;                      \
        int64_t step = 8;                                                                                       \
        for (int64_t nb = first; nb < last; nb += step) {                                                       \
            int64_t count = last - nb < step ? last - nb : step;                                                \
            ROW_TILES(tile, FOR, p, nb, count)                                                                  \
        }                                                                                                       \
    }

// ---- bf16 products on AMX tiles ----
//
// Where the CPU has AMX-BF16 (Xeon Sapphire Rapids and later) and Linux grants the process the tile state, bf16
// products run on the tile unit: one TDPBF16PS multiplies up to 16 rows by 32 inputs of 16 outputs. The
// AVX-512 tile above does one row per instruction, so its cost grows with the rows past about 4 (8 rows of
// the model's products take twice one row's time); on the tiles 16 rows cost about what one does, since the
// weights are still read once (docs/kernels.md). Each row is summed over the same 32-input chunks in the same
// order whatever the row count, so a row keeps its bits across counts. The tile unit's bits differ from the
// dot-product instruction's in about one output in 10^4 (its sums are not the instruction's pairwise ones), so
// one unit serves every bf16 product of a process: chosen once by `workbench_use_amx`, never mixed. It takes
// the bf16 layout as packed: a block's 16 pairs of inputs are one 16 x 64-byte tile of weights.
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define AMX_BLOCKS 6   // tiles 0-5 hold the sums of 6 blocks of outputs, tile 6 the rows' inputs, tile 7 weights
#define AMX_PREFETCH 2 // chunks of 32 inputs ahead to prefetch in each block's weight stream

static int use_amx = 0;

// Switches the tile unit on (when the CPU has it and Linux grants it) or off; returns whether it is on.
int workbench_use_amx(int on) {
    unsigned a, b, c, d;
    use_amx = 0;
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE; Linux must then grant the tile state
    if (on && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1))
        use_amx = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return use_amx;
}

int workbench_amx_in_use(void) { return use_amx; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

// Another library on the same threads (llama.cpp's ggml uses the tiles too, on the same OpenMP pool) may keep
// its tile configuration from call to call: a thread saves whatever configuration it finds before its first
// tile instruction and puts it back afterwards (released where there was none), or that library's next tile
// instruction faults.
AMX_TARGET static void amx_save(TileConfig *saved) { _tile_storeconfig(saved); }

AMX_TARGET static void amx_restore(const TileConfig *saved) {
    if (saved->palette) _tile_loadconfig(saved);
    else _tile_release();
}

AMX_TARGET static void amx_configure(int rows) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 7; t++) c.rows[t] = rows, c.bytes_per_row[t] = 64;
    c.rows[7] = 16, c.bytes_per_row[7] = 64;
    _tile_loadconfig(&c);
}

#define AMX_ZERO(b) if (BLOCKS > b) _tile_zero(b);
#define AMX_STEP(b) if (BLOCKS > b) { _tile_loadd(7, wk + b * KP * 32, 64); _tile_dpbf16ps(b, 6, 7); }
#define AMX_AHEAD(b) if (BLOCKS > b) for (int line = 0; line < 16; line++) \
                         _mm_prefetch((const char *)(wk + b * KP * 32 + AMX_PREFETCH * 512 + line * 32), _MM_HINT_T0);
#define AMX_SAVE(b) if (BLOCKS > b) _tile_stored(b, &sums[0][b * 16], sizeof sums[0]);

// Rows m0 .. m0 + rows - 1 (at most 16, as configured) against blocks nb .. nb + BLOCKS - 1.
AMX_TARGET INLINE void amx_blocks(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t m0,
                                  int rows, int64_t nb, int64_t N, int64_t K, const int BLOCKS) {
    const int64_t KP = K / 2, chunks = K / 32;
    float sums[16][AMX_BLOCKS * 16] __attribute__((aligned(64)));
    AMX_ZERO(0) AMX_ZERO(1) AMX_ZERO(2) AMX_ZERO(3) AMX_ZERO(4) AMX_ZERO(5)
    for (int64_t kc = 0; kc < chunks; kc++) {
        const uint16_t *wk = w + nb * KP * 32 + kc * 512;
        _tile_loadd(6, x + m0 * K + kc * 32, K * 2);
        if (kc + AMX_PREFETCH < chunks) { AMX_AHEAD(0) AMX_AHEAD(1) AMX_AHEAD(2) AMX_AHEAD(3) AMX_AHEAD(4) AMX_AHEAD(5) }
        AMX_STEP(0) AMX_STEP(1) AMX_STEP(2) AMX_STEP(3) AMX_STEP(4) AMX_STEP(5)
    }
    AMX_SAVE(0) AMX_SAVE(1) AMX_SAVE(2) AMX_SAVE(3) AMX_SAVE(4) AMX_SAVE(5)
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < BLOCKS; b++) {
            int64_t col = (nb + b) * 16;
            store_bf16(y + (m0 + r) * N + col, _mm512_load_ps(&sums[r][b * 16]), 0, bias ? bias + col : 0);
        }
}

// Each thread takes an equal, contiguous range of blocks, AMX_BLOCKS at a time, and every row for them in passes
// of 16 (the group's weights stay in cache between passes).
AMX_TARGET static void amx_gemm_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                                     int64_t M, int64_t N, int64_t K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads(), configured = 0;
        TileConfig saved;
        int64_t blocks = N / 16, first = blocks * t / n, last = blocks * (t + 1) / n;
        for (int64_t nb = first; nb < last; nb += AMX_BLOCKS) {
            int64_t count = last - nb < AMX_BLOCKS ? last - nb : AMX_BLOCKS;
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                int rows = M - m0 < 16 ? (int)(M - m0) : 16;
                if (!configured) amx_save(&saved);
                if (rows != configured) amx_configure(configured = rows);
                switch (count) {
                    case 6: amx_blocks(x, w, bias, y, m0, rows, nb, N, K, 6); break;
                    case 5: amx_blocks(x, w, bias, y, m0, rows, nb, N, K, 5); break;
                    case 4: amx_blocks(x, w, bias, y, m0, rows, nb, N, K, 4); break;
                    case 3: amx_blocks(x, w, bias, y, m0, rows, nb, N, K, 3); break;
                    case 2: amx_blocks(x, w, bias, y, m0, rows, nb, N, K, 2); break;
                    default: amx_blocks(x, w, bias, y, m0, rows, nb, N, K, 1); break;
                }
            }
        }
        if (configured) amx_restore(&saved);
    }
}

// Products whose inputs are not a multiple of 32 stay on the AVX-512 tile for every row count, so they too keep
// one unit.
TARGET void workbench_gemm_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                                int64_t M, int64_t N, int64_t K, int threads) {
    if (use_amx && K % 32 == 0) {
        amx_gemm_bf16(x, w, bias, y, M, N, K, threads);
        return;
    }
    Product p = {x, w, 0, 0, 0, 0, bias, y, M, N, K};
    PRODUCT(bf16_tile, BLOCKS_FOR, &p, threads)
}

TARGET void workbench_gemm_int8(const uint16_t *x, const int8_t *codes, const float *scales, const uint16_t *bias,
                                uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    Product p = {x, codes, scales, 0, 0, 0, bias, y, M, N, K};
    PRODUCT(int8_tile, BLOCKS_FOR, &p, threads)
}

TARGET void workbench_gemm_int4(const uint16_t *x, const uint8_t *codes, const uint16_t *params, int64_t group,
                                const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t G = K / group;
    float *x_sums = malloc(M * G * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float sum = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) sum += bf16_to_float(x[m * K + k]);
            x_sums[m * G + g] = sum;
        }
    Product p = {x, codes, 0, params, x_sums, group, bias, y, M, N, K};
    PRODUCT(int4_tile, INT4_BLOCKS_FOR, &p, threads)
    free(x_sums);
}

// ---- Products over int8 activations (W8A8 and W4A8, as llama.cpp's CPU path multiplies) ----
//
// Each row of x is quantized per block of 32 inputs to int8 codes with a float32 scale (amax / 127, rounded
// to nearest even), and the weights' integer codes meet them in AVX512-VNNI dot products (vpdpbusd: four
// unsigned-by-signed byte products summed into each int32 lane), which cost one instruction per 64 weight
// bytes and row, so these products stay bound by memory where the float paths are bound by widening. The
// integer sums are exact; each block's is scaled once in float32. Lossy (the activations' rounding), hence
// opt-in (`act=int8` on the int8 and int4 transforms); rows are still computed alike whatever M is.
// vpdpbusd wants the 16 outputs' 4 consecutive inputs side by side; one vpermb per 64 weight bytes moves the
// packed layouts' bytes there (QUADS_INT8, QUADS_INT4).

#define A8_BLOCK 32
static uint8_t QUADS_INT8[64], QUADS_INT4[64]; // byte 4 * o + j of the dot-product operand <- byte of the layout

__attribute__((constructor)) static void init_quads(void) { // once, when the library is loaded
    for (int o = 0; o < 16; o++)
        for (int j = 0; j < 4; j++) {
            QUADS_INT8[4 * o + j] = 16 * j + o; // int8: 64 bytes are 4 inputs x 16 outputs
            // int4: byte P's nibble holds output 4 (P / 16) + (P % 8) / 2, input 2 ((P % 16) / 8) + P % 2 (cpu.py)
            QUADS_INT4[4 * o + j] = 16 * (o / 4) + 8 * (j / 2) + 2 * (o % 4) + j % 2;
        }
}

int workbench_cpu_int8_dot_supported(void) {
    __builtin_cpu_init();
    return workbench_cpu_supported() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
}

#define TARGET_A8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx512vbmi")))

// x [M, K] bf16 -> codes, per-block scales and code sums. A block of zeros gets scale 0 and codes 0.
TARGET void workbench_quantize_rows_q8(const uint16_t *x, int64_t M, int64_t K, int8_t *codes, float *scales,
                                       int32_t *code_sums) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / A8_BLOCK; b++) {
            const uint16_t *at = x + m * K + b * A8_BLOCK;
            const __m512 lo = load_bf16x16(at), hi = load_bf16x16(at + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inverse)));
            const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inverse)));
            _mm_storeu_si128((void *)(codes + m * K + b * A8_BLOCK), _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128((void *)(codes + m * K + b * A8_BLOCK + 16), _mm512_cvtepi32_epi8(qhi));
            scales[m * (K / A8_BLOCK) + b] = amax / 127.0f;
            code_sums[m * (K / A8_BLOCK) + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        }
}

// int8 weights: codes +128 (a sign flip of the byte) are vpdpbusd's unsigned operand, the activations its
// signed one; each block's sum then drops 128 x its activation codes' sum, and is scaled by the block's scale.
TARGET_A8 INLINE void int8_a8_tile(const Product *p, int64_t m0, int64_t nb, const int ROWS, const int BLOCKS) {
    const int64_t K = p->K, KB = K / A8_BLOCK;
    const int8_t *w = (const int8_t *)p->w + nb * K * 16;
    const __m512i order = _mm512_loadu_si512(QUADS_INT8), flip = _mm512_set1_epi8((char)0x80);
    __m512 total[MAX_ROWS][MAX_BLOCKS];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) total[r][b] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < KB; kb++) {
        __m512i acc[MAX_ROWS][MAX_BLOCKS];
        for (int r = 0; r < ROWS; r++)
            for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_setzero_si512();
        for (int64_t k = kb * A8_BLOCK; k < (kb + 1) * A8_BLOCK; k += 4)
            for (int b = 0; b < BLOCKS; b++) {
                const int8_t *at = w + (b * K + k) * 16;
                if (PREFETCH) _mm_prefetch((const char *)(at + PREFETCH * 64), _MM_HINT_T0);
                const __m512i quads = _mm512_xor_si512(_mm512_permutexvar_epi8(order, _mm512_loadu_si512(at)), flip);
                for (int r = 0; r < ROWS; r++)
                    acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], quads,
                                                    _mm512_set1_epi32(*(const int32_t *)(p->xq + (m0 + r) * K + k)));
            }
        for (int r = 0; r < ROWS; r++) {
            const __m512i shift = _mm512_set1_epi32(128 * p->x_code_sums[(m0 + r) * KB + kb]);
            const __m512 scale = _mm512_set1_ps(p->x_scale[(m0 + r) * KB + kb]);
            for (int b = 0; b < BLOCKS; b++)
                total[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], shift)), scale, total[r][b]);
        }
    }
    store_tile(p, m0, nb, ROWS, BLOCKS, total, p->scales);
}

// int4 weights: the codes 0..15 are the unsigned operand as they are. Per block of 32 inputs, in its weight
// group g: sum(x * w) = x_scale * (scale_g * sum(code * x_code) + offset_g * sum(x_code)).
TARGET_A8 INLINE void int4_a8_tile(const Product *p, int64_t m0, int64_t nb, const int ROWS, const int BLOCKS) {
    const int64_t K = p->K, KC = K / 8, KB = K / A8_BLOCK, G = K / p->group;
    const __m512i *w = (const __m512i *)p->w + nb * KC;
    const uint16_t *params = p->params + nb * G * 32;
    const __m512i order = _mm512_loadu_si512(QUADS_INT4), nibble = _mm512_set1_epi8(0x0F);
    __m512 total[MAX_ROWS][MAX_BLOCKS];
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < BLOCKS; b++) total[r][b] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < KB; kb++) {
        const int64_t g = kb * A8_BLOCK / p->group;
        __m512i acc[MAX_ROWS][MAX_BLOCKS];
        for (int r = 0; r < ROWS; r++)
            for (int b = 0; b < BLOCKS; b++) acc[r][b] = _mm512_setzero_si512();
        for (int64_t kc = kb * (A8_BLOCK / 8); kc < (kb + 1) * (A8_BLOCK / 8); kc++)
            for (int b = 0; b < BLOCKS; b++) {
                if (PREFETCH) _mm_prefetch((const char *)(w + b * KC + kc + PREFETCH), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(w + b * KC + kc);
                const __m512i lo = _mm512_permutexvar_epi8(order, _mm512_and_si512(v, nibble)); // inputs 0..3
                const __m512i hi = _mm512_permutexvar_epi8(order, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
                for (int r = 0; r < ROWS; r++) {
                    const int32_t *xq = (const int32_t *)(p->xq + (m0 + r) * K + kc * 8);
                    acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], lo, _mm512_set1_epi32(xq[0]));
                    acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], hi, _mm512_set1_epi32(xq[1]));
                }
            }
        for (int b = 0; b < BLOCKS; b++) {
            const __m512 scale = load_bf16x16(params + (b * G + g) * 32), offset = load_bf16x16(params + (b * G + g) * 32 + 16);
            for (int r = 0; r < ROWS; r++) {
                const float x_scale = p->x_scale[(m0 + r) * KB + kb];
                const __m512 dot = _mm512_cvtepi32_ps(acc[r][b]);
                total[r][b] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(x_scale)), total[r][b]);
                total[r][b] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x_scale * (float)p->x_code_sums[(m0 + r) * KB + kb]),
                                              total[r][b]);
            }
        }
    }
    store_tile(p, m0, nb, ROWS, BLOCKS, total, 0);
}

// Rows hold an int32 and a float32 sum per block: one row takes 8 blocks, a few rows fewer
#define A8_BLOCKS_FOR(rows) ((rows) == 1 ? 8 : (rows) <= 2 ? 4 : (rows) <= 5 ? 2 : 1)

// The activations quantized once, in the calling thread, before the threads split the weights. A decoding
// step's few rows go in a buffer kept per calling thread (a step makes ~150 such calls); a prompt's many rows
// in memory of their own.
#define A8_KEPT (64 * 1024)
static _Thread_local uint8_t a8_kept[A8_KEPT] __attribute__((aligned(64)));

#define WITH_INT8_ACTIVATIONS(p, body)                                                                          \
    {                                                                                                           \
        const int64_t blocks_ = (p)->M * ((p)->K / A8_BLOCK), bytes_ = (p)->M * (p)->K + 8 * blocks_;           \
        uint8_t *memory_ = bytes_ <= A8_KEPT ? a8_kept : malloc(bytes_);                                        \
        float *scales_ = (float *)memory_;                                                                      \
        int32_t *sums_ = (int32_t *)(memory_ + 4 * blocks_);                                                    \
        int8_t *codes_ = (int8_t *)(memory_ + 8 * blocks_);                                                     \
        workbench_quantize_rows_q8((p)->x, (p)->M, (p)->K, codes_, scales_, sums_);                             \
        (p)->xq = codes_, (p)->x_scale = scales_, (p)->x_code_sums = sums_;                                     \
        body                                                                                                    \
        if (memory_ != a8_kept) free(memory_);                                                                  \
    }

// K a multiple of 32 (and the int4 group a multiple of 32).
TARGET_A8 void workbench_gemm_int8_a8(const uint16_t *x, const int8_t *codes, const float *scales,
                                      const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    Product p = {x, codes, scales, 0, 0, 0, bias, y, M, N, K};
    WITH_INT8_ACTIVATIONS(&p, PRODUCT(int8_a8_tile, A8_BLOCKS_FOR, &p, threads))
}

TARGET_A8 void workbench_gemm_int4_a8(const uint16_t *x, const uint8_t *codes, const uint16_t *params, int64_t group,
                                      const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    Product p = {x, codes, 0, params, 0, group, bias, y, M, N, K};
    WITH_INT8_ACTIVATIONS(&p, PRODUCT(int4_a8_tile, A8_BLOCKS_FOR, &p, threads))
}

// ---- A plain read of a buffer: the ceiling the products are measured against ----
//
// Sums n float32 values the way the products stream their weights: each thread one contiguous range, 64-byte
// AVX-512 loads, PREFETCH lines ahead, eight independent sums so the adds never wait on each other. It does no
// other work per byte, so its bytes per second are what these cores can read (workbench/eval/bandwidth.py).
// Returns the sum (a buffer of ones gives its length: the check that every value was read).
TARGET double workbench_read_f32(const float *x, int64_t n, int threads) {
    double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t chunks = n / 128, first = chunks * t / count, last = chunks * (t + 1) / count;
        __m512 sum[8];
        for (int i = 0; i < 8; i++) sum[i] = _mm512_setzero_ps();
        for (int64_t c = first; c < last; c++) {
            const float *at = x + c * 128;
            if (PREFETCH)
                for (int i = 0; i < 8; i++) _mm_prefetch((const char *)(at + PREFETCH * 128 + i * 16), _MM_HINT_T0);
            for (int i = 0; i < 8; i++) sum[i] = _mm512_add_ps(sum[i], _mm512_loadu_ps(at + i * 16));
        }
        float lanes[16];
        for (int i = 0; i < 8; i++) { // lanes added in double: each holds a count that float32 keeps exact
            _mm512_storeu_ps(lanes, sum[i]);
            for (int j = 0; j < 16; j++) total += lanes[j];
        }
        if (t == count - 1)
            for (int64_t i = chunks * 128; i < n; i++) total += x[i];
    }
    return total;
}

#include "cpu_attention.c" // exp_ps and attention (AVX-512 and AMX tiles)

// ---- The small per-layer work between the products, one call each instead of several torch calls ----

// RMSNorm of each row of x [T, D] (D a multiple of 16): y = x / sqrt(mean(x^2) + eps) * weight, in float32,
// rounded once to bf16. With `delta`, the row normalized is sum = x + delta (rounded to bf16 as torch's add
// rounds it), also written to `sum`: the residual add and the next norm in one pass.
TARGET void workbench_rms_norm_bf16(const uint16_t *x, const uint16_t *delta, uint16_t *sum, const uint16_t *weight,
                                    uint16_t *y, int64_t T, int64_t D, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *row = x + t * D;
        if (delta) {
            for (int64_t d = 0; d < D; d += 16)
                store_bf16(sum + t * D + d, _mm512_add_ps(load_bf16x16(row + d), load_bf16x16(delta + t * D + d)), 0, 0);
            row = sum + t * D;
        }
        __m512 squares = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m512 v = load_bf16x16(row + d);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16)
            store_bf16(y + t * D + d, _mm512_mul_ps(_mm512_mul_ps(load_bf16x16(row + d), inv),
                                                     load_bf16x16(weight + d)), 0, 0);
    }
}

// SwiGLU on the fused gate|up product [T, 2I] (I a multiple of 16): out [T, I] = silu(gate) * up in float32,
// rounded once to bf16.
TARGET void workbench_swiglu_bf16(const uint16_t *gate_up, uint16_t *out, int64_t T, int64_t I) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < I; i += 16) {
            __m512 g = load_bf16x16(gate_up + t * 2 * I + i), u = load_bf16x16(gate_up + t * 2 * I + I + i);
            __m512 sigmoid = _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store_bf16(out + t * I + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u), 0, 0);
        }
}

// RoPE in Hugging Face's half layout on x [T, heads, D] (rows `x_row` apart, heads contiguous; D a multiple of
// 32): out[d] = x[d] * cos[d] + x[(d + D/2) mod D] * signed_sin[d], with cos and signed_sin [T, D] as the model
// builds them (cos repeated, signed_sin = (-sin, sin)); float32 inside, one rounding; out [T, heads, D].
TARGET void workbench_rope_bf16(const uint16_t *x, int64_t x_row, const uint16_t *cos, const uint16_t *signed_sin,
                                uint16_t *out, int64_t T, int64_t heads, int64_t D) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *row = x + t * x_row + h * D;
            uint16_t *o = out + (t * heads + h) * D;
            for (int64_t d = 0; d < D; d += 16) {
                __m512 v = _mm512_mul_ps(load_bf16x16(row + d), load_bf16x16(cos + t * D + d));
                v = _mm512_fmadd_ps(load_bf16x16(row + (d + D / 2) % D), load_bf16x16(signed_sin + t * D + d), v);
                store_bf16(o + d, v, 0, 0);
            }
        }
}

// ---- A whole decoder layer in one call (a few rows, bf16, int8 or int4 weights, a dense bf16 cache) ----
//
// The same kernels as the layer's separate calls, in the same order on the same values, so its output is
// bit for bit what those calls give: RMSNorm, the fused q|k|v product, RoPE on q and k, the new k and v rows
// written into the cache's buffers at slots past .. past + T - 1, attention over the S = past + T keys, the
// output product with the residual add and the next RMSNorm, gate|up, SwiGLU, down, and the second residual
// add (rounded once to bf16, as torch's add rounds). It saves the ~15 Python-level calls of a layer.
// scratch: T * (2 * Dm + 3 * (H + KVH) * D + 3 * I) bf16 values; k_cache, v_cache: [KVH, capacity, D] buffers.
// One of the layer's products: int4 codes when it has a group (aux: their scales and offsets), int8 codes when
// it has only aux (float32 row scales), else bf16; `a8`: over int8 activations.
TARGET INLINE void layer_product(const uint16_t *x, const void *w, const void *aux, int64_t group, int64_t a8,
                                 uint16_t *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (group && a8) workbench_gemm_int4_a8(x, (const uint8_t *)w, (const uint16_t *)aux, group, 0, y, M, N, K, threads);
    else if (group) workbench_gemm_int4(x, (const uint8_t *)w, (const uint16_t *)aux, group, 0, y, M, N, K, threads);
    else if (aux && a8) workbench_gemm_int8_a8(x, (const int8_t *)w, (const float *)aux, 0, y, M, N, K, threads);
    else if (aux) workbench_gemm_int8(x, (const int8_t *)w, (const float *)aux, 0, y, M, N, K, threads);
    else workbench_gemm_bf16(x, (const uint16_t *)w, 0, y, M, N, K, threads);
}

TARGET void workbench_layer_bf16(const uint16_t *x, uint16_t *out, const uint16_t *attn_norm,
                                 const uint16_t *mlp_norm, float eps, const void *w_qkv, const void *w_o,
                                 const void *w_gate_up, const void *w_down, const void *a_qkv, const void *a_o,
                                 const void *a_gate_up, const void *a_down, int64_t g_qkv, int64_t g_o,
                                 int64_t g_gate_up, int64_t g_down, const int64_t *a8, int64_t T, int64_t Dm,
                                 int64_t H, int64_t KVH, int64_t D, int64_t I, const uint16_t *cos,
                                 const uint16_t *signed_sin, uint16_t *k_cache, uint16_t *v_cache, int64_t kv_head,
                                 int64_t kv_row, int64_t past, const uint8_t *mask, float scale, uint16_t *scratch,
                                 float *attention_scratch, int threads) {
    const int64_t qkv_width = (H + 2 * KVH) * D, S = past + T;
    uint16_t *h = scratch, *qkv = h + T * Dm, *qk = qkv + T * qkv_width, *attended = qk + T * (H + KVH) * D;
    uint16_t *o = attended + T * H * D, *gate_up = o + T * Dm, *act = gate_up + T * 2 * I;
    workbench_rms_norm_bf16(x, 0, 0, attn_norm, h, T, Dm, eps);
    layer_product(h, w_qkv, a_qkv, g_qkv, a8[0], qkv, T, qkv_width, Dm, threads);
    workbench_rope_bf16(qkv, qkv_width, cos, signed_sin, qk, T, H + KVH, D);
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < KVH; g++) {
            uint16_t *k_slot = k_cache + g * kv_head + (past + t) * kv_row, *v_slot = v_cache + g * kv_head + (past + t) * kv_row;
            for (int64_t d = 0; d < D; d++) {
                k_slot[d] = qk[(t * (H + KVH) + H + g) * D + d];
                v_slot[d] = qkv[t * qkv_width + (H + KVH + g) * D + d];
            }
        }
    workbench_attention_bf16(qk, (H + KVH) * D, D, k_cache, kv_head, kv_row, v_cache, kv_head, kv_row, mask, attended,
                             H, KVH, T, S, D, scale, attention_scratch, threads);
    layer_product(attended, w_o, a_o, g_o, a8[1], o, T, Dm, H * D, threads);
    workbench_rms_norm_bf16(x, o, out, mlp_norm, h, T, Dm, eps); // out = x + o; h = its norm
    layer_product(h, w_gate_up, a_gate_up, g_gate_up, a8[2], gate_up, T, 2 * I, Dm, threads);
    workbench_swiglu_bf16(gate_up, act, T, I);
    layer_product(act, w_down, a_down, g_down, a8[3], o, T, Dm, I, threads);
    for (int64_t i = 0; i < T * Dm; i += 16)
        store_bf16(out + i, _mm512_add_ps(load_bf16x16(out + i), load_bf16x16(o + i)), 0, 0);
}

// ---- Consecutive decoder layers in one call ----
//
// Row l of `layers` (LAYER_ARGS int64 values) holds layer l's own arguments to workbench_layer_bf16: its two
// norm weights; its four products' weights, aux pointers, groups and int8-activation flags (q|k|v, o, gate|up,
// down); its cache's
// k and v buffers, their head and row strides, the keys already cached (past) and its mask (or 0). Layers
// alternate between `out` and `spare` as output, the last one writing `out`: the same calls in the same
// order as calling the layers one by one, without a return to Python between them.
#define LAYER_ARGS 24
TARGET void workbench_layers_bf16(const uint16_t *x, uint16_t *out, uint16_t *spare, int64_t n_layers,
                                  const int64_t *layers, float eps, int64_t T, int64_t Dm, int64_t H, int64_t KVH,
                                  int64_t D, int64_t I, const uint16_t *cos, const uint16_t *signed_sin,
                                  float scale, uint16_t *scratch, float *attention_scratch, int threads) {
    const uint16_t *in = x;
    for (int64_t l = 0; l < n_layers; l++) {
        const int64_t *a = layers + l * LAYER_ARGS;
        uint16_t *dst = (n_layers - 1 - l) % 2 == 0 ? out : spare;
        workbench_layer_bf16(in, dst, (const uint16_t *)a[0], (const uint16_t *)a[1], eps, (const void *)a[2],
                             (const void *)a[3], (const void *)a[4], (const void *)a[5], (const void *)a[6],
                             (const void *)a[7], (const void *)a[8], (const void *)a[9], a[10], a[11], a[12], a[13],
                             a + 14, T, Dm, H, KVH, D, I, cos, signed_sin, (uint16_t *)a[18], (uint16_t *)a[19], a[20],
                             a[21], a[22], (const uint8_t *)a[23], scale, scratch, attention_scratch, threads);
        in = dst;
    }
}

// ---- Top-k of each row of float32 logits or probabilities -------------------------------------------------
// torch.topk and torch.argmax over a large vocabulary cost tens of microseconds per row; a decoding step
// runs several of them (the greedy choice, the views' alternatives, token recycling's candidates). This
// keeps the k best seen so far, sorted, and skips each 16-value vector with nothing above the k-th best, so a
// row costs about one read. Values come out descending; equal values keep index order, so k = 1 is
// torch.argmax's first maximum. Rows must hold no NaN.

TARGET static void topk_row(const float *x, int64_t n, int64_t k, float *values, int64_t *indices) {
    int64_t held = 0;
    for (int64_t i = 0; i < n; i += 16) {
        int64_t lanes = n - i < 16 ? n - i : 16;
        __mmask16 valid = lanes == 16 ? 0xFFFF : (__mmask16)((1u << lanes) - 1);
        __m512 v = _mm512_maskz_loadu_ps(valid, x + i);
        __mmask16 above = held < k ? valid
                                   : _mm512_mask_cmp_ps_mask(valid, v, _mm512_set1_ps(values[k - 1]), _CMP_GT_OQ);
        while (above) {
            int lane = __builtin_ctz(above);
            above &= above - 1;
            float value = x[i + lane];
            if (held == k && !(value > values[k - 1])) continue; // an earlier lane of this vector raised the bar
            int64_t at = held < k ? held++ : k - 1;
            while (at > 0 && values[at - 1] < value) { // after every equal value: index order among ties
                values[at] = values[at - 1];
                indices[at] = indices[at - 1];
                at--;
            }
            values[at] = value;
            indices[at] = i + lane;
        }
    }
}

TARGET void workbench_topk_f32(const float *x, int64_t rows, int64_t n, int64_t k, float *values, int64_t *indices) {
    #pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) topk_row(x + r * n, n, k, values + r * k, indices + r * k);
}
