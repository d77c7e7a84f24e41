// Attention for a few query rows over a bf16 KV cache, included by cpu_gemm.c (which holds the helpers it uses:
// load_bf16x16, store_bf16, the AMX switch and tile configuration type).

// ---- Attention for a few query rows over a bf16 KV cache ----
//
// out[t, h] = softmax(scale * q[t, h] . k[g, :] + mask[t, :]) @ v[g, :] with g = h / (H / KVH) (grouped
// kv heads). One task per (query row, head); scores, softmax and the weighted sum in float32, output rounded
// once to bf16. mask: [T, S] bytes (1 = visible) or 0 for all visible. Rows of k and v are contiguous
// (D values); heads and rows may have any stride, as a cache's view of its preallocated buffer has.

// exp(x) (attention's scores minus their maximum, SwiGLU's -gate): 2^n * p(r) with r = x - n ln2 in
// [-ln2/2, ln2/2] and a degree-6 polynomial, relative error about 2e-7; below -87 it returns 0, above 88 inf.
TARGET INLINE __m512 exp_ps(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    p = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(~underflow, p);
}

#define MAX_HEAD_DIM 256
#define MAX_SHARED 16 // zmm registers of a task's query heads: heads x (D / 16) at most this many share k and v

// Up to 32 bf16 values (a pair chunk of a head), zeros past n: AVX512-BF16's dot product consumes them as pairs.
TARGET INLINE __m512bh load_pairs(const uint16_t *p, int64_t n) {
    return (__m512bh)(n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p));
}

// Scores of 16 keys (rows key0 .. key0 + 15 of k, row indices clamped to `last`) for one query head: each key's
// dot product as bf16 pairs (exact products, float32 sums) into 16 lanes, then the lanes of the 16 vectors
// added in a tree. Each tree step adds lane l to lane l + half of both its inputs alike, so every key's lanes
// are summed in one fixed order whatever its slot: a key's score does not depend on the other keys of its
// block. Feeding key KEY_LANE[i] as input i puts key i's score in lane i.
static const int KEY_LANE[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
TARGET INLINE __m512 key_dots(const __m512bh *qp, const int64_t pair_chunks, const int64_t D, const uint16_t *k,
                              int64_t k_row, int64_t key0, int64_t last) {
#define DOT(i) ({                                                                                              \
        const uint16_t *row_ = k + (key0 + KEY_LANE[i] < last ? key0 + KEY_LANE[i] : last) * k_row;             \
        __m512 acc_ = _mm512_setzero_ps();                                                                     \
        for (int64_t c = 0; c < pair_chunks; c++) acc_ = _mm512_dpbf16_ps(acc_, qp[c], load_pairs(row_ + c * 32, D - c * 32)); \
        acc_; })
    __m512 w[8];
    for (int i = 0; i < 8; i++) { // halves of 256 bits: input i in the low half, input i + 8 in the high one
        __m512 a = DOT(i), b = DOT(i + 8);
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
#undef DOT
    for (int i = 0; i < 4; i++) // quarters of 128 bits
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
    for (int i = 0; i < 2; i++) // pairs of lanes two apart
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(w[i], w[i + 2], 0x44), _mm512_shuffle_ps(w[i], w[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

// One query row t against kv head g for `heads` query heads h0 .. h0 + heads - 1 of its group. Scores: 16 keys
// at a time (key_dots); masked keys and those past S score -inf. The weighted sum of values loads and widens each value row
// once for all the heads. scores: heads x S floats of scratch.
TARGET INLINE void attend_rows(const uint16_t *q, int64_t q_row, int64_t q_head, const uint16_t *kg, int64_t k_row,
                               const uint16_t *vg, int64_t v_row, const uint8_t *visible, uint16_t *out, int64_t H,
                               int64_t t, int64_t h0, const int64_t heads, int64_t S, const int64_t chunks,
                               float scale, float *scores) {
    const int64_t D = chunks * 16, pair_chunks = (chunks + 1) / 2;
    const int64_t stride = (S + 15) / 16 * 16;
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    __m512bh qp[MAX_HEAD_DIM / 32];
    __m512 top[MAX_SHARED];
    for (int64_t j = 0; j < heads; j++) top[j] = minus_inf;
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
        const int64_t n = S - s0 < 16 ? S - s0 : 16;
        __mmask16 live = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
        if (visible) live &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(live, visible + s0), _mm_set1_epi8(1));
        for (int64_t j = 0; j < heads; j++) {
            const uint16_t *qj = q + t * q_row + (h0 + j) * q_head;
            for (int64_t c = 0; c < pair_chunks; c++) qp[c] = load_pairs(qj + c * 32, D - c * 32);
            __m512 block = _mm512_mask_mov_ps(minus_inf, live,
                                              _mm512_mul_ps(key_dots(qp, pair_chunks, D, kg, k_row, s0, S - 1), _mm512_set1_ps(scale)));
            _mm512_storeu_ps(scores + j * stride + s0, block);
            top[j] = _mm512_max_ps(top[j], block);
        }
    }
    for (int64_t j = 0; j < heads; j++) { // softmax numerators in place
        float *row = scores + j * stride;
        __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top[j]));
        for (int64_t s = 0; s < S; s += 16) {
            __mmask16 live = S - s >= 16 ? 0xFFFF : (__mmask16)((1u << (S - s)) - 1);
            _mm512_mask_storeu_ps(row + s, live, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + s), max)));
        }
    }
    // The weighted sum of values and the softmax denominator, both added in key order over the visible keys
    // only: a drafted token's row then gets the bits its one-token step would, wherever its keys sit.
    __m512 acc[MAX_HEAD_DIM / 16 > MAX_SHARED ? MAX_HEAD_DIM / 16 : MAX_SHARED];
    float total[MAX_SHARED];
    for (int64_t i = 0; i < heads * chunks; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < heads; j++) total[j] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        if (visible && !visible[s]) continue;
        __m512 value[MAX_HEAD_DIM / 16];
        if (chunks % 2 == 0) // 32 values widened by unpacking: one load and two operations, lanes in an order
            for (int64_t c = 0; c < chunks; c += 2) { // that the stores below undo
                __m512i pair = _mm512_loadu_si512(vg + s * v_row + c * 16);
                value[c] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), pair));
                value[c + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), pair));
            }
        else
            for (int64_t c = 0; c < chunks; c++) value[c] = load_bf16x16(vg + s * v_row + c * 16);
        for (int64_t j = 0; j < heads; j++) {
            float e = scores[j * stride + s];
            total[j] += e;
            __m512 p = _mm512_set1_ps(e);
            for (int64_t c = 0; c < chunks; c++) acc[j * chunks + c] = _mm512_fmadd_ps(p, value[c], acc[j * chunks + c]);
        }
    }
    float inv[MAX_SHARED];
    for (int64_t j = 0; j < heads; j++) inv[j] = 1.0f / total[j];
    for (int64_t j = 0; j < heads; j++) {
        uint16_t *o = out + (t * H + h0 + j) * D;
        const __m512 scale_j = _mm512_set1_ps(inv[j]);
        if (chunks % 2 == 0)
            for (int64_t c = 0; c < chunks; c += 2) {
                // unpacked lanes: 128-bit quarter q of the low half holds values 8q .. 8q + 3, of the high 8q + 4 ..
                const __m512 lo = acc[j * chunks + c], hi = acc[j * chunks + c + 1];
                const __m512 first = _mm512_shuffle_f32x4(lo, hi, 0x44), second = _mm512_shuffle_f32x4(lo, hi, 0xEE);
                store_bf16(o + c * 16, _mm512_mul_ps(_mm512_shuffle_f32x4(first, first, 0xD8), scale_j), 0, 0);
                store_bf16(o + c * 16 + 16, _mm512_mul_ps(_mm512_shuffle_f32x4(second, second, 0xD8), scale_j), 0, 0);
            }
        else
            for (int64_t c = 0; c < chunks; c++) store_bf16(o + c * 16, _mm512_mul_ps(acc[j * chunks + c], scale_j), 0, 0);
    }
}

// Tasks are (query row, kv head) with the whole group of query heads sharing its k and v loads when there
// are enough of them to keep every thread busy and the group's registers fit; otherwise (query row, head).
// Rows are the inner index: a thread takes the rows of one head in turn, so that head's keys and values stay
// in its core's cache from one row to the next (a draft tree's rows over a long cache would otherwise read the
// whole cache again per row). The order of tasks changes no arithmetic: every row's bits are the same.
TARGET static void avx512_attention(const uint16_t *q, int64_t q_row, int64_t q_head, const uint16_t *k,
                              int64_t k_head, int64_t k_row, const uint16_t *v, int64_t v_head,
                              int64_t v_row, const uint8_t *mask, uint16_t *out, int64_t H, int64_t KVH,
                              int64_t T, int64_t S, int64_t D, float scale, float *scratch, int threads) {
    const int64_t group = H / KVH;
    const int64_t per_task = (T * KVH >= 2 * threads && group * (D / 16) <= MAX_SHARED) ? group : 1;
    const int64_t tasks = T * H / per_task;
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + (int64_t)omp_get_thread_num() * per_task * ((S + 15) / 16 * 16);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t t = task % T, h0 = task / T * per_task, g = h0 / group;
            const uint16_t *kg = k + g * k_head, *vg = v + g * v_head;
            const uint8_t *visible = mask ? mask + t * S : 0;
            // constant head counts and sizes for the common shapes, so the loops unroll into registers
#define ATTEND(HEADS, CHUNKS) attend_rows(q, q_row, q_head, kg, k_row, vg, v_row, visible, out, H, t, h0, HEADS, S, \
                                          CHUNKS, scale, scores)
            if (D == 64 && per_task == 1) ATTEND(1, 4);
            else if (D == 64 && per_task == 2) ATTEND(2, 4);
            else if (D == 64 && per_task == 3) ATTEND(3, 4);
            else if (D == 64 && per_task == 4) ATTEND(4, 4);
            else if (D == 128 && per_task == 1) ATTEND(1, 8);
            else if (D == 128 && per_task == 2) ATTEND(2, 8);
            else ATTEND(per_task, D / 16);
#undef ATTEND
        }
    }
}


// ---- The same attention on AMX tiles (where the bf16 products run on them) ----
//
// Why: the AVX-512 kernel above costs a dot product per key, head and row, so over a long cache every extra
// query row costs about what the first did (9 rows over 7,168 keys: 4.7 times one row). On the tiles one
// TDPBF16PS scores 16 keys against up to 16 query rows, and another adds 32 keys' values into 16 rows' sums,
// so a draft's rows cost about one row's memory traffic.
//
// How, per kv head: its query rows (heads x rows, up to 16 to a tile) meet the keys in chunks of AMX_CHUNK.
// Keys are transposed into the tile layout (16 x 16 pairs of dimensions) and values paired key by key, once
// per chunk; the scores of the chunk, its maximum, exp(score - maximum) split into two bf16 halves (high and
// low: float32 precision from two products) and their weighted sums of values give the chunk's partial:
// (maximum, sum of weights, sums of values). The partials of a row are combined in chunk order at the end.
//
// Bits: a row's output depends only on its own visible keys, in order, as if they stood side by side from
// slot 0 (a draft token's ancestors among the new rows then count as the cache slots they take once accepted),
// cut into chunks and blocks at fixed positions of that sequence; one tile row's sums do not depend on the
// other rows or on the row's place in the tile. So a verified draft token gets the bits of its one-token step,
// as with the AVX-512 kernel, but not the same bits as that kernel: one unit per process (workbench_use_amx).
// The chunks every row sees whole go through tiles of many rows; each row's last chunks (its own visible keys,
// gathered) through a tile of its query heads.

#define AMX_CHUNK 256 // keys per partial: a multiple of 32; the scores, weights and repacked keys and values fit in L2
#define AMX_HEAD_DIM 64

// Tiles, all 16 rows of 64 bytes: 0-3 sums of values (16 dims each), 0-1 the queries' two halves while scoring,
// 4-5 keys or values, 6-7 scores, then the weights' high and low halves.
AMX_TARGET static void amx_attention_configure(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.bytes_per_row[t] = 64;
    _tile_loadconfig(&c);
}

// 16 x 16 32-bit transpose: r[i] holds row i; afterwards r[c] holds column c.
AMX_TARGET INLINE void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { // u[i + k]: column 4L + k of rows i .. i + 3 in 128-bit lane L
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        __m512i a0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), a1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
        __m512i b0 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88), b1 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
        t[k] = _mm512_shuffle_i32x4(a0, b0, 0x88);
        t[8 + k] = _mm512_shuffle_i32x4(a0, b0, 0xDD);
        t[4 + k] = _mm512_shuffle_i32x4(a1, b1, 0x88);
        t[12 + k] = _mm512_shuffle_i32x4(a1, b1, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

// The keys and values of one chunk of `count` keys (<= AMX_CHUNK; key i is keys[i], or first + i without a
// list) in the tiles' layouts: keys transposed (per 16 keys, per half of the dims: 16 pairs of dims x 16 keys),
// values paired (per 32 keys, per 16 dims: 16 pairs of keys x 16 dims). Past `count`, zero keys and values.
typedef struct {
    uint32_t keys[AMX_CHUNK / 16][2][16][16];
    uint16_t values[AMX_CHUNK / 32][4][16][32];
} AmxChunk;

AMX_TARGET static void amx_pack_chunk(AmxChunk *chunk, const uint16_t *kg, int64_t k_row, const uint16_t *vg,
                                      int64_t v_row, int64_t first, const int32_t *keys, int64_t count) {
    const int64_t blocks = (count + 31) / 32;
#define ROW_OF(i) ((keys ? (int64_t)keys[i] : first + (i)))
    for (int64_t b = 0; b < 2 * blocks; b++) {
        __m512i lo[16], hi[16];
        for (int n = 0; n < 16; n++) {
            const int64_t i = b * 16 + n;
            const uint16_t *row = i < count ? kg + ROW_OF(i) * k_row : 0;
            lo[n] = row ? _mm512_loadu_si512(row) : _mm512_setzero_si512();
            hi[n] = row ? _mm512_loadu_si512(row + 32) : _mm512_setzero_si512();
        }
        transpose16_epi32(lo);
        transpose16_epi32(hi);
        for (int c = 0; c < 16; c++) {
            _mm512_store_si512(chunk->keys[b][0][c], lo[c]);
            _mm512_store_si512(chunk->keys[b][1][c], hi[c]);
        }
    }
    const __m512i first_half = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i second_half = _mm512_add_epi16(first_half, _mm512_set1_epi16(16));
    for (int64_t b = 0; b < blocks; b++)
        for (int r = 0; r < 16; r++) { // keys 2r and 2r + 1 of the block, dimension by dimension
            const int64_t i = b * 32 + 2 * r;
            const uint16_t *even = i < count ? vg + ROW_OF(i) * v_row : 0;
            const uint16_t *odd = i + 1 < count ? vg + ROW_OF(i + 1) * v_row : 0;
            for (int h = 0; h < 2; h++) {
                __m512i e = even ? _mm512_loadu_si512(even + 32 * h) : _mm512_setzero_si512();
                __m512i o = odd ? _mm512_loadu_si512(odd + 32 * h) : _mm512_setzero_si512();
                _mm512_store_si512(chunk->values[b][2 * h][r], _mm512_permutex2var_epi16(e, first_half, o));
                _mm512_store_si512(chunk->values[b][2 * h + 1][r], _mm512_permutex2var_epi16(e, second_half, o));
            }
        }
#undef ROW_OF
}

// A packed chunk of `count` keys against `rows` (<= 16) query rows (queries: [16][64] bf16, the rows past `rows`
// only padding): row r's partial (maximum, sum of weights, 64 sums) goes to partial + r * stride. The tiles are
// always configured for 16 rows (a new configuration costs about what a chunk's products do), so a tile of
// fewer rows computes padding rows that are dropped.
AMX_TARGET static void amx_attend_chunk(const AmxChunk *chunk, const uint16_t *queries, int rows, int64_t count,
                                        float scale, float *partial, int64_t stride) {
    enum { CH = AMX_CHUNK };
    float scores[16][CH] __attribute__((aligned(64)));
    uint16_t high[16][CH] __attribute__((aligned(64))), low[16][CH] __attribute__((aligned(64)));
    const int64_t blocks = (count + 31) / 32;
    _tile_loadd(0, queries, 128);
    _tile_loadd(1, queries + 32, 128);
    for (int64_t b = 0; b < 2 * blocks; b += 2) { // scores of 32 keys: 16 in tile 6, 16 in tile 7
        _tile_zero(6);
        _tile_zero(7);
        _tile_loadd(4, chunk->keys[b][0], 64);
        _tile_loadd(5, chunk->keys[b + 1][0], 64);
        _tile_dpbf16ps(6, 0, 4);
        _tile_dpbf16ps(7, 0, 5);
        _tile_loadd(4, chunk->keys[b][1], 64);
        _tile_loadd(5, chunk->keys[b + 1][1], 64);
        _tile_dpbf16ps(6, 1, 4);
        _tile_dpbf16ps(7, 1, 5);
        _tile_stored(6, &scores[0][b * 16], CH * 4);
        _tile_stored(7, &scores[0][b * 16 + 16], CH * 4);
    }
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < rows; r++) {
        __m512 top = minus_inf;
        for (int64_t i = 0; i < blocks * 32; i += 16) {
            __mmask16 live = count - i >= 16 ? 0xFFFF : count > i ? (__mmask16)((1u << (count - i)) - 1) : 0;
            __m512 s = _mm512_mask_mov_ps(minus_inf, live, _mm512_mul_ps(_mm512_load_ps(&scores[r][i]), _mm512_set1_ps(scale)));
            _mm512_store_ps(&scores[r][i], s);
            top = _mm512_max_ps(top, s);
        }
        const float max = _mm512_reduce_max_ps(top);
        __m512 total = _mm512_setzero_ps();
        for (int64_t i = 0; i < blocks * 32; i += 16) {
            __m512 p = exp_ps(_mm512_sub_ps(_mm512_load_ps(&scores[r][i]), _mm512_set1_ps(max))); // 0 where -inf
            total = _mm512_add_ps(total, p);
            __m256i h = (__m256i)_mm512_cvtneps_pbh(p);
            __m512 rest = _mm512_sub_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
            _mm256_store_si256((__m256i *)&high[r][i], h);
            _mm256_store_si256((__m256i *)&low[r][i], (__m256i)_mm512_cvtneps_pbh(rest));
        }
        partial[r * stride] = max;
        partial[r * stride + 1] = _mm512_reduce_add_ps(total);
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t b = 0; b < blocks; b++) {
        _tile_loadd(6, &high[0][b * 32], CH * 2);
        _tile_loadd(7, &low[0][b * 32], CH * 2);
        _tile_loadd(4, chunk->values[b][0], 64);
        _tile_loadd(5, chunk->values[b][1], 64);
        _tile_dpbf16ps(0, 6, 4);
        _tile_dpbf16ps(0, 7, 4);
        _tile_dpbf16ps(1, 6, 5);
        _tile_dpbf16ps(1, 7, 5);
        _tile_loadd(4, chunk->values[b][2], 64);
        _tile_loadd(5, chunk->values[b][3], 64);
        _tile_dpbf16ps(2, 6, 4);
        _tile_dpbf16ps(2, 7, 4);
        _tile_dpbf16ps(3, 6, 5);
        _tile_dpbf16ps(3, 7, 5);
    }
    float sums[16][64] __attribute__((aligned(64)));
    _tile_stored(0, &sums[0][0], 256);
    _tile_stored(1, &sums[0][16], 256);
    _tile_stored(2, &sums[0][32], 256);
    _tile_stored(3, &sums[0][48], 256);
    for (int r = 0; r < rows; r++) memcpy(partial + r * stride + 2, sums[r], sizeof sums[r]);
}

// Scratch floats the AMX path needs: each row's partials, and each row's gathered keys.
static int64_t amx_attention_scratch(int64_t H, int64_t T, int64_t S) {
    return T * H * ((S + AMX_CHUNK - 1) / AMX_CHUNK) * (AMX_HEAD_DIM + 2) + T * S + T;
}

AMX_TARGET static void amx_attention(const uint16_t *q, int64_t q_row, int64_t q_head, const uint16_t *k,
                                     int64_t k_head, int64_t k_row, const uint16_t *v, int64_t v_head,
                                     int64_t v_row, const uint8_t *mask, uint16_t *out, int64_t H, int64_t KVH,
                                     int64_t T, int64_t S, float scale, float *scratch, int threads) {
    enum { CH = AMX_CHUNK, D = AMX_HEAD_DIM };
    const int64_t group = H / KVH, rows = T * group;
    const int64_t chunks = (S + CH - 1) / CH, slot = D + 2, stride = chunks * slot;
    float *partials = scratch; // [KVH][rows][chunks][slot], row r = t * group + j: query head g * group + j
    int32_t *gathered = (int32_t *)(partials + KVH * rows * stride), *counts = gathered + T * S;
    // Keys every row sees whole: those before the first hidden key of any row, in whole chunks.
    int64_t shared = S;
    for (int64_t t = 0; mask && t < T; t++) {
        const uint8_t *hidden = memchr(mask + t * S, 0, S);
        if (hidden && hidden - (mask + t * S) < shared) shared = hidden - (mask + t * S);
    }
    const int64_t shared_chunks = shared / CH;
    int64_t own_chunks = 0; // each row's remaining visible keys, gathered, in chunks that continue the shared ones
    for (int64_t t = 0; t < T; t++) {
        int32_t n = 0;
        for (int64_t s = shared_chunks * CH; s < S; s++)
            if (!mask || mask[t * S + s]) gathered[t * S + n++] = (int32_t)s;
        counts[t] = n;
        own_chunks += (n + CH - 1) / CH;
    }
    const int64_t shared_tasks = KVH * shared_chunks, tasks = shared_tasks + KVH * own_chunks;
#pragma omp parallel num_threads(threads)
    {
        AmxChunk chunk __attribute__((aligned(64)));
        uint16_t queries[16][D] __attribute__((aligned(64)));
        memset(queries, 0, sizeof queries);
        int configured = 0;
        TileConfig saved;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t g, r0, n, c, first = 0, count = CH;
            const int32_t *list = 0;
            if (task < shared_tasks) { // (kv head, chunk): every row of the group, in tiles of 16
                g = task / shared_chunks;
                c = task % shared_chunks;
                r0 = 0;
                n = rows;
                first = c * CH;
            } else { // (kv head, query row, one of its own chunks): that row's heads of the group
                int64_t rest = (task - shared_tasks) % own_chunks, t = 0;
                g = (task - shared_tasks) / own_chunks;
                while (rest >= (counts[t] + CH - 1) / CH) rest -= (counts[t++] + CH - 1) / CH;
                r0 = t * group;
                n = group;
                c = shared_chunks + rest;
                list = gathered + t * S + rest * CH;
                count = counts[t] - rest * CH < CH ? counts[t] - rest * CH : CH;
            }
            amx_pack_chunk(&chunk, k + g * k_head, k_row, v + g * v_head, v_row, first, list, count);
            for (int64_t r1 = r0; r1 < r0 + n; r1 += 16) {
                const int tile_rows = (int)(r0 + n - r1 < 16 ? r0 + n - r1 : 16);
                for (int64_t i = 0; i < tile_rows; i++) {
                    const int64_t r = r1 + i, t = r / group, h = g * group + r % group;
                    memcpy(queries[i], q + t * q_row + h * q_head, D * 2);
                }
                if (!configured) amx_save(&saved), amx_attention_configure(), configured = 1;
                amx_attend_chunk(&chunk, &queries[0][0], tile_rows, count, scale,
                                 partials + (g * rows + r1) * stride + c * slot, stride);
            }
        }
        if (configured) amx_restore(&saved);
        // Each row's partials, in chunk order: weights exp(chunk maximum - row maximum).
#pragma omp for schedule(static)
        for (int64_t gr = 0; gr < KVH * rows; gr++) {
            const int64_t g = gr / rows, r = gr % rows, t = r / group, h = g * group + r % group;
            const int64_t n = shared_chunks + (counts[t] + CH - 1) / CH;
            const float *p = partials + gr * stride;
            float max = -INFINITY, total = 0.0f;
            for (int64_t c = 0; c < n; c++) max = p[c * slot] > max ? p[c * slot] : max;
            __m512 sums[D / 16];
            for (int d = 0; d < D / 16; d++) sums[d] = _mm512_setzero_ps();
            for (int64_t c = 0; c < n; c++) {
                const __m512 w = exp_ps(_mm512_set1_ps(p[c * slot] - max));
                total += _mm512_cvtss_f32(w) * p[c * slot + 1];
                for (int d = 0; d < D / 16; d++) sums[d] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + c * slot + 2 + d * 16), sums[d]);
            }
            const __m512 inv = _mm512_set1_ps(n ? 1.0f / total : 0.0f);
            for (int d = 0; d < D / 16; d++) store_bf16(out + (t * H + h) * D + d * 16, _mm512_mul_ps(sums[d], inv), 0, 0);
        }
    }
}

// Scratch floats `workbench_attention_bf16` needs for these shapes, whichever unit runs it.
int64_t workbench_attention_scratch(int64_t H, int64_t KVH, int64_t T, int64_t S, int64_t D, int threads) {
    const int64_t avx512 = threads * (H / KVH) * ((S + 15) / 16 * 16);
    const int64_t amx = D == AMX_HEAD_DIM ? amx_attention_scratch(H, T, S) : 0;
    return avx512 > amx ? avx512 : amx;
}

// The attention of the process's unit: on AMX tiles where the bf16 products run on them (heads of 64 dims and
// at most 16 query heads to a kv head), else AVX-512.
TARGET void workbench_attention_bf16(const uint16_t *q, int64_t q_row, int64_t q_head, const uint16_t *k,
                                     int64_t k_head, int64_t k_row, const uint16_t *v, int64_t v_head,
                                     int64_t v_row, const uint8_t *mask, uint16_t *out, int64_t H, int64_t KVH,
                                     int64_t T, int64_t S, int64_t D, float scale, float *scratch, int threads) {
    if (use_amx && D == AMX_HEAD_DIM && H / KVH <= 16)
        amx_attention(q, q_row, q_head, k, k_head, k_row, v, v_head, v_row, mask, out, H, KVH, T, S, scale, scratch,
                      threads);
    else
        avx512_attention(q, q_row, q_head, k, k_head, k_row, v, v_head, v_row, mask, out, H, KVH, T, S, D, scale,
                         scratch, threads);
}
