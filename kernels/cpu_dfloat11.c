// DFloat11's decoder on the CPU (workbench/compression/dfloat11.py holds the format; cpu_dfloat11.py binds this).
//
// A bf16 weight is held as its sign+mantissa bytes and its exponents Huffman-coded into a stream of 32-bit
// words (most significant bit first), cut into blocks whose starting bit offsets are recorded, so blocks
// decode independently: OpenMP spreads them over the cores, each walking its codes through a 4096-entry
// lookup table (every 12-bit window -> symbol | code length << 8) and writing the bf16 bits at once.
// Plain C, no instruction-set extensions: it builds and runs on any CPU with a C compiler.
#include <omp.h>
#include <stdint.h>

int workbench_dfloat11_version(void) { return 1; }

void workbench_dfloat11_decode(const uint32_t *words, const int32_t *offsets, int64_t n_blocks, int64_t block,
                               const int16_t *lut, const uint8_t *sign_mantissa, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n_blocks > 64)
    for (int64_t b = 0; b < n_blocks; b++) {
        uint64_t pos = (uint32_t)offsets[b];  // stored as int32; read unsigned so streams up to 2^32 bits work
        const uint8_t *sm = sign_mantissa + b * block;
        uint16_t *o = out + b * block;
        for (int64_t i = 0; i < block; i++) {
            const uint64_t w = pos >> 5;
            const uint64_t pair = ((uint64_t)words[w] << 32) | words[w + 1];  // a code never spans more
            const uint16_t entry = (uint16_t)lut[(pair >> (52 - (pos & 31))) & 0xFFF];
            pos += entry >> 8;
            const uint16_t s = sm[i];
            o[i] = (uint16_t)(((s & 0x80) << 8) | ((entry & 0xFF) << 7) | (s & 0x7F));
        }
    }
}
