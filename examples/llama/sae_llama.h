/*
 * sae_llama.h - what the sae-llama subcommands share: the run folder they read and write,
 * option parsing, and the per-feature statistics that browse and steer both start from.
 *
 * A run folder holds one experiment:
 *   info.txt        "model DIR" and "layer L": the llama2.c model folder and the hooked layer
 *   acts.npy        float32 [N][dim]: the residual stream entering layer L, one row per token
 *   tokens.npy      int32 [N]: the token fed at each row; every story starts with BOS (1), so
 *                   a BOS row is position 0 of a new story
 *   stories.txt     the stories, one a line (newline written as \n, backslash as \\)
 *   sae.safetensors the SAE `train` wrote
 *   browser/        the pages `browse` wrote
 */
#ifndef SAE_LLAMA_H
#define SAE_LLAMA_H

#include "engine.h"

#include <sae.h>
#include <stddef.h>
#include <stdint.h>

/* ---- subcommands (argv[0] is the subcommand's name) -------------------------------------- */

int cmd_collect(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_browse(int argc, char **argv);
int cmd_steer(int argc, char **argv);
int cmd_planted(int argc, char **argv);

/* ---- options ------------------------------------------------------------------------------- */

/* One --name VALUE option: a number in [lo, hi] (whole if `whole`) into *num, or a string into
 * *str (num NULL); whole = OPTION_FLAG makes it a --name flag without a value that sets *num = 1. */
#define OPTION_FLAG (-1)
typedef struct {
    const char *name;
    double *num;
    const char **str;
    double lo, hi;
    int whole;
} option;

/* Parses argv[1..argc-1] into opts and the positional arguments (at least n_min, at most
 * n_max, into pos[]). Prints what is wrong and returns -1 on a bad command line. */
int parse_options(int argc, char **argv, const option *opts, const char **pos, int n_min,
                  int n_max);

/* ---- errors -------------------------------------------------------------------------------- */

/* Print "sae-llama CMD: WHAT: <library message>" and return 1 (main's exit status). */
int fail_sae(const char *cmd, const char *what, int rc);
int fail_llama(const char *cmd, const char *what);
int fail_msg(const char *cmd, const char *fmt, ...);

/* ---- files --------------------------------------------------------------------------------- */

/* "dir/name" in a static buffer that holds the last four results. */
const char *path_in(const char *dir, const char *name);
int make_dir(const char *path); /* mkdir -p for one level; 0 if it exists */

/* A 1-D int32 .npy file (numpy's '<i4'), which libsae's float readers do not cover. */
int npy_write_i32(const char *path, const int32_t *v, size_t n);
int npy_read_i32(const char *path, int32_t **v, size_t *n); /* *v is malloc'd */

/* Loads model.bin and tok512.bin (or tokenizer.bin) from a llama2.c model folder. Prints the
 * error and returns nonzero on failure. */
int open_llama(const char *cmd, const char *dir, llama_model **m, llama_tokenizer **t);

/* ---- the run folder ------------------------------------------------------------------------ */

typedef struct {
    char model_dir[4200];
    int layer;
    size_t n, dim;   /* rows of acts.npy and tokens.npy */
    float *acts;     /* [n][dim], NULL unless asked for */
    int32_t *tokens; /* [n] */
    size_t *story;   /* [n]: the row where each row's story starts (its BOS row) */
} corpus;

int corpus_write_info(const char *run, const char *model_dir, int layer);
/* Reads info.txt, tokens.npy and, if with_acts, acts.npy. Prints errors; returns 0 on success. */
int corpus_load(const char *cmd, const char *run, int with_acts, corpus *c);
void corpus_free(corpus *c);

/* ---- feature statistics over a corpus ------------------------------------------------------ */

enum { TOP_CONTEXTS = 16 };

/* The SAE's sparse codes of every row of a corpus and their statistics (sae_stats, BOS rows
 * left out: the SAE never trained on them). Row r's codes are slots [r*k, r*k+k). */
typedef struct {
    size_t k;
    uint32_t *idx, *count;
    float *val;
    sae_stats *stats; /* top examples' ids are row numbers */
} feature_codes;

int codes_compute(const char *cmd, const sae_model *m, const corpus *c, feature_codes *fc);
void codes_free(feature_codes *fc);
/* Feature f's value at row r (0 if it is not among the row's codes). */
float codes_value(const feature_codes *fc, size_t row, uint32_t f);

/* The word a token belongs to (in its story), lowercased into buf: the token's piece joined
 * with the neighbouring pieces that continue the same run of letters (" p" "ar" "k" -> "park").
 * A token that is not part of a word gives its own piece ("." or ","). */
void token_word(const corpus *c, const llama_tokenizer *t, size_t row, char *buf, size_t cap);

/* The row where that word starts, and a row's piece as it reads in the text (its bytes, not
 * NUL-terminated; a byte token is its byte). */
size_t word_first_row(const corpus *c, const llama_tokenizer *t, size_t row);
const char *row_text(const corpus *c, const llama_tokenizer *t, size_t row, size_t *len);

/* True for a word of at least 3 ASCII letters. */
int is_word(const char *w);

enum { WORD_CAP = 64 };

/* The words on which a feature's top contexts sit: distinct words, most frequent first, with
 * how many of the top contexts each accounts for. Returns how many were written (at most max);
 * *n_top receives the number of top contexts. */
size_t feature_top_words(const feature_codes *fc, const corpus *c, const llama_tokenizer *t,
                         uint32_t f, char (*word)[WORD_CAP], size_t *cnt, size_t max,
                         size_t *n_top);

/* ---- small helpers -------------------------------------------------------------------------- */

/* xorshift64*: the example's reproducible random numbers. */
uint64_t rng_next(uint64_t *s);
double rng_uniform(uint64_t *s); /* [0, 1) */
double rng_normal(uint64_t *s);

double seconds_now(void);

#endif /* SAE_LLAMA_H */
