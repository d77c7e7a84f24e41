// DFloat11's decoder on the CPU (workbench/compression/dfloat11.py holds the format; cpu_dfloat11.py binds this).
//
// A bf16 weight is held as its sign+mantissa bytes and its exponents Huffman-coded into a stream of 32-bit
// words (most significant bit first), cut into blocks whose starting bit offsets are recorded, so blocks
// decode independently: OpenMP spreads them over the cores, each walking its codes through a 4096-entry
// lookup table (every 12-bit window -> symbol | code length << 8) and writing the bf16 bits at once.
// One block's decode is a chain of dependent loads (a code's length gives the next code's position), so each
// thread walks LANES blocks side by side to keep several chains in flight.
// Plain C, no instruction-set extensions: it builds and runs on any CPU with a C compiler.
#include <omp.h>
#include <stdint.h>

#define LANES 4

static inline uint16_t step(const uint32_t *words, const int16_t *lut, uint64_t *pos, uint8_t s) {
    const uint64_t w = *pos >> 5;
    const uint64_t pair = ((uint64_t)words[w] << 32) | words[w + 1];  // a code never spans more
    const uint16_t entry = (uint16_t)lut[(pair >> (52 - (*pos & 31))) & 0xFFF];
    *pos += entry >> 8;
    return (uint16_t)(((s & 0x80) << 8) | ((entry & 0xFF) << 7) | (s & 0x7F));
}

// first [n_codes]: each code left-justified to 12 bits, in canonical order; entry: its symbol | length << 8.
void workbench_dfloat11_decode(const uint32_t *words, const int32_t *offsets, int64_t n_blocks, int64_t block,
                               const int32_t *first, const int16_t *entry, int64_t n_codes,
                               const uint8_t *sign_mantissa, uint16_t *out, int threads) {
    int16_t lut[4096];  // every 12-bit window -> the code it starts with (built here: a few microseconds)
    for (int64_t w = 0, c = 0; w < 4096; w++) {
        while (c + 1 < n_codes && first[c + 1] <= w) c++;
        lut[w] = entry[c];
    }
    const int64_t groups = (n_blocks + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_blocks > 64)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * LANES, lanes = n_blocks - first < LANES ? n_blocks - first : LANES;
        uint64_t pos[LANES];
        for (int l = 0; l < lanes; l++) pos[l] = (uint32_t)offsets[first + l];  // int32 stored, read unsigned
        const uint8_t *sm = sign_mantissa + first * block;
        uint16_t *o = out + first * block;
        if (lanes == LANES) {
            for (int64_t i = 0; i < block; i++)
                for (int l = 0; l < LANES; l++) o[l * block + i] = step(words, lut, &pos[l], sm[l * block + i]);
        } else {
            for (int l = 0; l < lanes; l++)
                for (int64_t i = 0; i < block; i++) o[l * block + i] = step(words, lut, &pos[l], sm[l * block + i]);
        }
    }
}
