/*
 * The generation engine of sae-server: one llama.cpp context with a fixed number of sequence
 * slots, driven by one worker thread. Requests become jobs; each step the worker decodes one
 * batch holding every admitted job's next tokens (a new job's whole prompt, a running job's last
 * token), so concurrent requests share each forward pass. Steering is per job: the hooks carry a
 * plan per sequence slot (sae_llama_entry.seq_plans), so jobs with different plans in one batch
 * never see each other's plan.
 *
 * Threads: engine_submit, engine_wait, engine_cancel and reading a job's fields under
 * engine_lock are safe from any thread; everything else in a job belongs to the worker between
 * engine_submit and job->done.
 */
#ifndef SAE_SERVER_ENGINE_H
#define SAE_SERVER_ENGINE_H

#include "llama.h"
#include "sae.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *hook;   /* "blocks.L.hook_X" */
    const sae_model *dict;
} engine_dict;

typedef struct {
    int slots;          /* parallel sequences (n_seq_max) */
    int n_ctx_seq;      /* tokens per sequence: prompt + generation */
    int threads;        /* llama.cpp threads */
    int queue_max;      /* jobs waiting for a slot before engine_submit refuses */
    bool steer_bos;     /* plans steer the BOS row too (by default it is left as computed) */
} engine_params;

typedef enum { JOB_GENERATE = 0, JOB_FEATURES = 1 } job_kind;

typedef enum {
    JOB_OK = 0,          /* finished: finish_reason says why */
    JOB_TIMEOUT = 1,     /* its deadline passed */
    JOB_CANCELLED = 2,   /* engine_cancel (the client went away) */
    JOB_FAILED = 3       /* llama.cpp or libsae refused: err */
} job_status;

typedef struct job {
    /* set by the caller before engine_submit */
    job_kind kind;
    llama_token *prompt;   /* owned by the job (job_free) */
    int n_prompt;
    int max_tokens;
    float temperature;     /* <= 0: greedy */
    float top_p;           /* 1: off */
    uint32_t seed;
    char **stop;           /* stop strings, owned */
    int n_stop;
    sae_steer **plans;     /* [n_dicts], each NULL or a plan on that dictionary, owned */
    double deadline;       /* engine_now() seconds; 0 = none */

    /* written by the worker, read under engine_lock */
    char *text;            /* generated text (stop string removed), NUL-terminated */
    size_t len, cap;
    size_t stable;         /* bytes of text that no later token can change (stop-string
                              prefixes and incomplete UTF-8 held back) */
    int n_gen;             /* tokens generated */
    bool done;
    job_status status;
    const char *finish;    /* "stop" or "length" */
    char err[256];
    float **acts;          /* JOB_FEATURES: [n_dicts][n_prompt][d] the hooks' rows, before any
                              plan; allocated by engine_submit */
    double t_admit, t_first, t_done;   /* engine_now(): admitted to a slot, first token, done */

    /* engine private */
    bool cancel;
    int slot;
    struct llama_sampler *smpl;
    struct job *next;
} job;

typedef struct engine engine;

/* Creates the context and starts the worker. dicts (and their models) must outlive the engine.
 * Returns 0, or -1 with a message in err. */
int engine_new(engine **out, struct llama_model *model, const engine_dict *dicts, size_t n_dicts,
               const engine_params *p, char *err, size_t errlen);
/* Stops admitting jobs; jobs already admitted or queued run to their end; then joins the worker
 * and frees everything. */
void engine_free(engine *e);

double engine_now(void);

/* Queues j. Returns 0; -1 if the queue is full, -2 if the engine is stopping, -3 for a prompt
 * that does not fit a sequence or no memory (j untouched but for acts; err says why). */
int engine_submit(engine *e, job *j, char *err, size_t errlen);
/* Blocks until j->stable > seen or j->done or until `timeout` seconds passed. */
void engine_wait(engine *e, job *j, size_t seen, double timeout);
/* Asks the worker to end j; returns once it is done (at most one decode later). */
void engine_cancel(engine *e, job *j);
void engine_lock(engine *e);
void engine_unlock(engine *e);

/* Frees what the job owns (after j->done, or a job never submitted), not j itself. */
void job_clear(job *j, size_t n_dicts);

/* Since start: decode steps, tokens decoded, seconds in llama_decode (hooks included), in the
 * hooks' callback and, of that, inside libsae (the plans; sae_llama_hooks_times). */
void engine_stats(engine *e, uint64_t *steps, uint64_t *tokens, double *decode_s,
                  double *hook_s, double *libsae_s);

#endif
