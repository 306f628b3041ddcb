/* What every benchmark needs besides libsae: a monotonic clock and the machine's memory-read
 * bound (the speed a single-token encode, which streams all of W_enc, cannot beat). */
#ifndef SAE_BENCH_COMMON_H
#define SAE_BENCH_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Seconds on a monotonic clock. */
double bench_now(void);

/* Reads all bytes of buf with `threads` threads (at most 64), each streaming its share, and
 * returns an XOR fold of the words so the reads cannot be optimized away. */
uint64_t bench_read(const void *buf, size_t bytes, size_t threads);

#endif
