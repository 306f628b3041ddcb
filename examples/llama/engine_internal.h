/* engine_internal.h - helpers shared by engine.c and tokenizer.c; never installed. */
#ifndef LLAMA_ENGINE_INTERNAL_H
#define LLAMA_ENGINE_INTERNAL_H

#include <stddef.h>

#if defined(__GNUC__) || defined(__clang__)
#define LLAMA_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define LLAMA_PRINTF(a, b)
#endif

/* Records the thread's last error message and returns code, so callers can write
 * `return llama_fail(LLAMA_EFORMAT, "%s: ...", path);`. */
int llama_fail(int code, const char *fmt, ...) LLAMA_PRINTF(2, 3);

/* Clears the thread's last error message. */
void llama_clear_error(void);

/* Reads a whole file into a malloc'd buffer; sets *size. Returns LLAMA_OK or an error. */
int llama_read_file(const char *path, unsigned char **data, size_t *size);

#endif
