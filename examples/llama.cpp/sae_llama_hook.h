/*
 * sae_llama_hook: SAEs and transcoders at named hook points of an unmodified llama.cpp, through
 * its public eval callback (cb_eval). C, llama.h / ggml-backend.h / sae.h only.
 *
 * A table of entries, each (hook, dictionary, steering plan or none, reader callback), is
 * attached to a context; any number of layers and hook points at once. Hooks are named as
 * TransformerLens and SAELens name them, "blocks.L.hook_resid_pre", "hook_attn_out",
 * "hook_resid_mid", "hook_mlp_in" (the MLP's normalized input), "hook_mlp_out",
 * "hook_resid_post", and map to llama.cpp's graph tensors:
 *
 *   blocks.0.hook_resid_pre    get_rows(token_embd.weight, inp_tokens)  (unnamed)
 *   blocks.L.hook_resid_pre    l_out-<L-1>  (L >= 1)
 *   blocks.L.hook_attn_out     attn_out-L        blocks.L.hook_resid_mid   ffn_inp-L
 *   blocks.L.hook_mlp_in       ffn_norm-L        blocks.L.hook_mlp_out     ffn_out-L (the MLP's)
 *   blocks.L.hook_resid_post   l_out-L
 *
 * The use (every llama_decode goes through sae_llama_decode, which tells the rows' positions
 * and sequence ids to the callback and checks every hook was seen on every token):
 *
 *     sae_llama_entry e[] = {{.hook = "blocks.2.hook_resid_pre", .dict = sae, .plan = plan}};
 *     sae_llama_hooks *h;  sae_llama_hooks_new(&h, model, e, 1);
 *     struct llama_context_params cp = llama_context_default_params();
 *     sae_llama_hooks_params(h, &cp);                  // cb_eval, its user data
 *     struct llama_context *ctx = llama_init_from_model(model, cp);
 *     sae_llama_decode(h, ctx, batch);                 // instead of llama_decode
 *
 * Per entry, what is written back into the graph:
 *   - plan != NULL: the plan (sae_steer_apply on the hook's rows; a transcoder's plan reads its
 *     input hook and steers its output hook, sae_steer_apply_to); with seq_plans, each
 *     sequence's rows get that sequence's plan (several plans in one batch, as sae-server does);
 *   - splice: an SAE's rows are replaced by sae_reconstruct; a transcoder's output hook by its
 *     prediction from the input hook;
 *   - zero: the rows are replaced by zeros (zero ablation);
 *   - otherwise nothing: the entry only reads (dict may be NULL).
 * The reader, if any, sees each ubatch's rows as llama.cpp computed them, and what was written.
 */
#ifndef SAE_LLAMA_HOOK_H
#define SAE_LLAMA_HOOK_H

#include "llama.h"
#include "sae.h"

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The hook points, in the order a forward pass meets them. */
typedef enum {
    SAE_LLAMA_RESID_PRE = 0,
    SAE_LLAMA_ATTN_OUT = 1,
    SAE_LLAMA_RESID_MID = 2,
    SAE_LLAMA_MLP_IN = 3,
    SAE_LLAMA_MLP_OUT = 4,
    SAE_LLAMA_RESID_POST = 5,
    SAE_LLAMA_POINTS = 6
} sae_llama_point;

/* "hook_resid_pre", ...; NULL out of range. */
const char *sae_llama_point_name(sae_llama_point p);
/* Parses "blocks.L.hook_X" (L a decimal number). Returns 0, or -1 with a message in err. */
int sae_llama_hook_parse(const char *name, int *layer, sae_llama_point *p, char *err, size_t cap);
/* The graph tensor llama.cpp names for (layer, point): "l_out-1", "inp_embd", ... */
void sae_llama_tensor_name(int layer, sae_llama_point p, char *buf, size_t cap);

/* One ubatch of rows, as handed to a reader. */
typedef struct {
    size_t entry;             /* index in the table */
    int layer;
    sae_llama_point point;    /* the hook the entry reads */
    size_t n;                 /* rows (tokens) */
    size_t d;                 /* width of x (the model's n_embd) */
    const float *x;           /* [n][d]: the hook's rows as llama.cpp computed them */
    const float *y;           /* transcoder entries: [n][d] the output hook's rows as computed;
                                 else NULL */
    const float *out;         /* [n][d] what was written back (at the output hook for a
                                 transcoder), NULL if nothing was */
    const llama_pos *pos;     /* [n] each row's position */
    const llama_seq_id *seq;  /* [n] each row's sequence id (its first, if it has several) */
    size_t row0;              /* index of the first row in the batch given to sae_llama_decode */
} sae_llama_rows;

/* Returns 0, or non-zero to cancel the decode (sae_llama_decode then fails). */
typedef int (*sae_llama_reader)(void *user, const sae_llama_rows *rows);

typedef enum {
    SAE_LLAMA_READ = 0,   /* write nothing (unless plan is set) */
    SAE_LLAMA_SPLICE = 1, /* replace by the dictionary's output */
    SAE_LLAMA_ZERO = 2    /* replace by zeros */
} sae_llama_edit;

typedef struct {
    const char *hook;          /* "blocks.L.hook_X": what the entry reads */
    const sae_model *dict;     /* SAE or transcoder (d_in must be n_embd), or NULL */
    const sae_steer *plan;     /* steering plan on dict, or NULL */
    sae_llama_edit edit;       /* SPLICE needs dict; ZERO zeroes the output hook (a transcoder's
                                  output hook, else the hook itself) */
    const char *out_hook;      /* transcoders: the hook it writes; NULL = the same block's
                                  hook_mlp_out (a transcoder must read hook_mlp_in then) */
    sae_llama_reader reader;   /* or NULL */
    void *user;
    const llama_token *keep;   /* rows of these tokens are left as computed by every edit but
                                  ZERO (SAELens's exclude_special_tokens: BOS is not spliced) */
    size_t n_keep;
    /* Per-sequence plans (parallel sequences with different plans in one batch), or NULL: rows
     * of sequence s < n_seq_plans get seq_plans[s] instead of plan (plan when it is NULL), each
     * sequence's run of rows applied apart. The array's elements are read at every decode, so
     * the caller may change them between decodes (never during one); it must outlive the hooks.
     * A plan set here needs dict, as plan does. */
    const sae_steer *const *seq_plans;
    size_t n_seq_plans;
} sae_llama_entry;

typedef struct sae_llama_hooks sae_llama_hooks;

/* Checks the table against the model (hook names, layers 0..n_layer-1, dictionary widths) and
 * builds the hook set; the entries' dictionaries, plans and strings must outlive it. Returns 0,
 * or -1 with the reason in *err (a static message buffer owned by the caller, may be NULL; the
 * message is also printed by nothing: the caller decides). */
int sae_llama_hooks_new(sae_llama_hooks **out, const struct llama_model *model,
                        const sae_llama_entry *entries, size_t n, char *err, size_t err_cap);
void sae_llama_hooks_free(sae_llama_hooks *h);

/* Sets cp->cb_eval and cp->cb_eval_user_data; and kv_unified, so that a batch of several
 * sequences reaches the callback in batch order (llama.cpp splits it "simple" then).
 * A context of one sequence (n_seq_max 1) may set kv_unified back to false after this call: it
 * has one KV stream, which llama.cpp splits "simple" either way, and kv_unified costs every
 * llama_decode a pass over LLAMA_MAX_SEQ^2 sequence pairs (about 75 us a step on stories260K,
 * measured by sae-llama-cpp --bench, which does this). */
void sae_llama_hooks_params(sae_llama_hooks *h, struct llama_context_params *cp);

/* llama_decode(ctx, batch) with the hooks told the batch's positions and sequence ids (a batch
 * without pos gets positions from llama_memory_seq_pos_max + 1 of sequence 0, as llama.cpp
 * does). Fails (non-zero) if llama_decode fails, the callback failed (libsae refused, a reader
 * cancelled), or a hook was not seen on every token of the batch (the architecture fuses or
 * lacks that tensor, or the last block's rows were cut to the outputs: a hook after the last
 * block's attention needs batch.logits set on every token). The reason is in
 * sae_llama_hooks_error. */
int sae_llama_decode(sae_llama_hooks *h, struct llama_context *ctx, struct llama_batch batch);

/* Why the last call failed ("" if it did not). */
const char *sae_llama_hooks_error(const sae_llama_hooks *h);

/* Seconds spent inside the callback, and inside libsae, since creation. */
void sae_llama_hooks_times(const sae_llama_hooks *h, double *in_callback, double *in_libsae);

/* For the example programs, once, before any other llama.cpp call: llama.cpp's log goes to stderr
 * (only its errors unless verbose), llama_backend_init, then the model at path is loaded with
 * every layer on the CPU, without the loading progress dots unless verbose. Returns the model,
 * or NULL if it cannot be loaded (llama.cpp's error is on stderr). */
struct llama_model *sae_llama_load_model(const char *path, bool verbose);

#ifdef __cplusplus
}
#endif
#endif
