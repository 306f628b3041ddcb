/*
 * engine.h - a small Llama inference engine for llama2.c checkpoints.
 *
 * What it is: a plain-C forward pass (RMSNorm, rotary embeddings, grouped-query attention
 * with a KV cache, SwiGLU) over llama2.c's "legacy" checkpoint format (model.bin) and its
 * tokenizer format (tok512.bin / tokenizer.bin), with greedy, temperature and top-p sampling.
 * Its reason to exist in libsae is the residual-stream hook: a callback that sees, and may
 * change, the activations of every token entering a chosen layer. That is where an SAE plugs
 * in, to collect activations or to steer generation.
 *
 * Example (error checks left out):
 *
 *     llama_model *m;      llama_model_load("model.bin", &m);
 *     llama_tokenizer *t;  llama_tokenizer_load("tok512.bin", llama_model_config(m)->vocab_size, &t);
 *     llama_state *s;      llama_state_create(m, &s);
 *     llama_sampler *smp;  llama_sampler_create(llama_model_config(m)->vocab_size, 0.0f, 0.0f, 1, &smp);
 *     int toks[512], n;    llama_tokenize(t, "Once upon a time", 1, 0, toks, 512, &n);
 *     int out[512], n_out; llama_generate(s, smp, toks, n, 100, out, 512, &n_out);
 *     char text[4096];     llama_detokenize(t, out, n_out, text, sizeof text, NULL);
 *     ... llama_sampler_free(smp); llama_state_free(s); llama_tokenizer_free(t); llama_model_free(m);
 *
 * Conventions: functions returning int return LLAMA_OK (0) or a negative LLAMA_E* code, and
 * then llama_last_error() (thread-local) says what went wrong: which file, which field or
 * tensor, what was expected. Every *_free accepts NULL. A model is read-only once loaded and
 * may be shared by many states (one state per thread); a state, a sampler and a tokenizer's
 * outputs belong to their caller.
 */
#ifndef LLAMA_ENGINE_H
#define LLAMA_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ---------------------------------------------------------------------------- */

enum {
    LLAMA_OK = 0,
    LLAMA_EIO = -1,     /* a file could not be opened or read */
    LLAMA_EFORMAT = -2, /* a file is not what it claims: bad header, wrong length, NaN weight */
    LLAMA_ENOMEM = -3,  /* an allocation failed */
    LLAMA_EINVAL = -4,  /* a bad argument: NULL, token id out of range, position out of range */
    LLAMA_ERANGE = -5   /* a caller's buffer is too small; the needed size is reported */
};

/* The message of the last failed call on this thread ("" if none). Valid until the next call
 * into the engine on the same thread. */
const char *llama_last_error(void);

/* ---- model ----------------------------------------------------------------------------- */

typedef struct llama_model llama_model;

/* The 7 int32 of a llama2.c checkpoint header, after validation. */
typedef struct llama_config {
    int dim;               /* width of the residual stream */
    int hidden_dim;        /* width of the SwiGLU hidden layer */
    int n_layers;
    int n_heads;           /* query heads; head_size = dim / n_heads */
    int n_kv_heads;        /* key/value heads; n_heads is a multiple of it */
    int vocab_size;        /* absolute value of the header's field */
    int seq_len;           /* longest sequence the KV cache holds */
    int shared_classifier; /* 1 if the classifier is the token embedding (header vocab > 0) */
} llama_config;

/* Reads a llama2.c legacy checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 * vocab_size - negative for an unshared classifier -, seq_len), then float32 weights in the
 * order token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final,
 * freq_cis_real and _imag (ignored: rotations are recomputed), and the classifier if unshared.
 * The file's length must equal the length these values imply and every weight must be finite.
 * On success *out owns the weights; free with llama_model_free. */
int llama_model_load(const char *path, llama_model **out);
void llama_model_free(llama_model *m);
const llama_config *llama_model_config(const llama_model *m);

/* ---- inference state, forward pass, residual-stream hook ---------------------------------- */

typedef struct llama_state llama_state;

/* A KV cache of seq_len positions and the scratch buffers of one forward pass. The model must
 * outlive the state. A new sequence simply starts again at position 0: position p overwrites
 * cache row p and attention reads rows 0..p only. */
int llama_state_create(const llama_model *m, llama_state **out);
void llama_state_free(llama_state *s);

/* The residual-stream hook.
 *
 * Where: "entering layer L" - the residual stream x just before layer L's attention RMSNorm,
 * i.e. the token embedding plus the outputs of layers 0..L-1. This is SAELens's
 * blocks.L.hook_resid_pre and what the data sets' resid_mid.npy / resid_layer2.npy hold.
 * L = n_layers means after the last layer, just before the final RMSNorm.
 *
 * How: hook(layer, pos, x, dim, user) is called once per forward pass (so once per token) at
 * each hooked layer, with x the live residual stream of length dim. The hook may modify x in
 * place (steering); later layers see the change. It must not keep x after returning. */
typedef void (*llama_resid_hook)(int layer, int pos, float *x, int dim, void *user);

/* Every layer hooked at once, in increasing order (0..n_layers). */
#define LLAMA_HOOK_ALL_LAYERS (-1)

/* Installs hook at `layer` (0..n_layers, or LLAMA_HOOK_ALL_LAYERS); a NULL hook removes it.
 * One hook per state: a new call replaces the previous one. */
int llama_state_set_hook(llama_state *s, int layer, llama_resid_hook hook, void *user);

/* Hook points inside a layer, by the names TransformerLens and SAELens give them
 * (blocks.L.hook_*), in the order a forward pass meets them:
 *   RESID_PRE   the stream entering layer L (what llama_state_set_hook sees)
 *   ATTN_OUT    the attention block's output (after wo), before it is added to the stream
 *   RESID_MID   the stream after attention was added, before the feed-forward RMSNorm
 *   MLP_IN      the feed-forward block's normalized input, rmsnorm(x) * rms_ffn
 *   MLP_OUT     the feed-forward block's output (after w2), before it is added
 *   RESID_POST  the stream after the feed-forward block (the next layer's RESID_PRE)
 * A transcoder reads MLP_IN and replaces or steers MLP_OUT. */
typedef enum {
    LLAMA_HOOK_RESID_PRE = 0,
    LLAMA_HOOK_ATTN_OUT = 1,
    LLAMA_HOOK_RESID_MID = 2,
    LLAMA_HOOK_MLP_IN = 3,
    LLAMA_HOOK_MLP_OUT = 4,
    LLAMA_HOOK_RESID_POST = 5,
    LLAMA_HOOK_POINTS = 6
} llama_hook_point;

/* "hook_resid_pre", ... ("hook_mlp_out"); NULL for a value out of range. */
const char *llama_hook_point_name(llama_hook_point point);
/* Parses those names, with or without the "blocks.L." prefix of TransformerLens (then *layer
 * gets L; else it is left alone). Returns LLAMA_OK or LLAMA_EINVAL. */
int llama_hook_point_parse(const char *name, llama_hook_point *point, int *layer);

/* Called at every hook point of every layer (layers 0..n_layers-1) of every forward pass, with v
 * the live vector of length dim (the model width for every point): the hook may read it, and
 * may change it in place (later computation sees the change: a changed MLP_IN feeds the MLP, a
 * changed MLP_OUT is what is added to the stream). It must not keep v after returning. It runs
 * besides the residual hook of llama_state_set_hook, after it at RESID_PRE. A NULL hook removes
 * it. One point hook per state. */
typedef void (*llama_point_hook)(llama_hook_point point, int layer, int pos, float *v, int dim,
                                 void *user);
int llama_state_set_point_hook(llama_state *s, llama_point_hook hook, void *user);

/* Runs token `token` at position `pos` (0 <= pos < seq_len; positions 0..pos-1 must have been
 * run before in this sequence) and computes the next-token logits, read with llama_logits. */
int llama_forward(llama_state *s, int token, int pos);

/* The vocab_size logits of the last llama_forward (or llama_forward_tokens). Owned by the
 * state, overwritten by the next forward pass; the caller may modify them. */
float *llama_logits(llama_state *s);

/* Batch-friendly: runs tokens[0..n-1] at positions pos0..pos0+n-1, one after the other, hook
 * included. Logits are computed for the last position only (read with llama_logits).
 * If resid_out is not NULL, it receives n rows of dim floats: the residual stream entering
 * layer `resid_layer` (0..n_layers) at each position, as the model used it, that is after the
 * hook (if one is installed there) has run. resid_layer is ignored when resid_out is NULL. */
int llama_forward_tokens(llama_state *s, const int *tokens, int n, int pos0, int resid_layer,
                         float *resid_out);

/* ---- sampling ---------------------------------------------------------------------------- */

typedef struct llama_sampler llama_sampler;

/* temperature == 0: greedy (argmax, lowest id on ties). temperature > 0: sample from
 * softmax(logits / temperature), restricted to the smallest top-probability set whose mass
 * exceeds topp when 0 < topp < 1 (nucleus sampling; topp <= 0 or >= 1 means no restriction).
 *
 * The random numbers: xorshift64* (Marsaglia's xorshift with shifts 12, 25, 27 and Vigna's
 * multiplier 0x2545F4914F6CDD1D), one uniform float in [0,1) per sampled token, taken from the
 * top 24 bits of the upper 32 bits of the product. The state starts at `seed`; seed 0 is
 * replaced by 0x9E3779B97F4A7C15 because an all-zero xorshift state never changes. With the
 * same seed, temperature and topp this matches llama2.c's run.c token for token. */
int llama_sampler_create(int vocab_size, float temperature, float topp, uint64_t seed,
                         llama_sampler **out);
void llama_sampler_free(llama_sampler *smp);

/* Picks the next token from n == vocab_size logits (not modified). Returns the id (>= 0) or a
 * negative LLAMA_E* code. */
int llama_sample(llama_sampler *smp, const float *logits, int n);

/* Feeds prompt[0..n_prompt-1] (n_prompt >= 1; normally it starts with BOS = 1) from position 0,
 * then samples up to max_new tokens, feeding each back, and stops early when BOS (1) is
 * sampled (llama2.c's end of a story; it is not stored) or seq_len positions are used.
 * out receives the prompt followed by the new tokens; *n_out their count. out_cap must hold
 * n_prompt + max_new (or seq_len, if smaller) tokens; the hook runs at every position. */
int llama_generate(llama_state *s, llama_sampler *smp, const int *prompt, int n_prompt,
                   int max_new, int *out, int out_cap, int *n_out);

/* ---- tokenizer --------------------------------------------------------------------------- */

typedef struct llama_tokenizer llama_tokenizer;

#define LLAMA_TOKEN_UNK 0
#define LLAMA_TOKEN_BOS 1
#define LLAMA_TOKEN_EOS 2

/* Reads a llama2.c tokenizer file: int32 max_token_length, then vocab_size times (float32
 * score, int32 length, that many bytes). vocab_size comes from the model (at least 259: ids
 * 3..258 are the byte-fallback tokens <0x00>..<0xFF>). The file must end after the last token. */
int llama_tokenizer_load(const char *path, int vocab_size, llama_tokenizer **out);
void llama_tokenizer_free(llama_tokenizer *t);

/* Encodes UTF-8 text as llama2.c does: BOS if bos, then for non-empty text the " " piece (the
 * SentencePiece dummy prefix), one token per UTF-8 character (or its bytes as byte-fallback
 * tokens 3 + byte when the character is not a piece), then merges, repeatedly, the adjacent
 * pair whose concatenation is a piece with the highest score (the leftmost on ties), and EOS
 * if eos. Writes at most cap ids to tokens and the count to *n_tokens; if cap is too small,
 * returns LLAMA_ERANGE with *n_tokens the count needed (strlen(text) + 3 always suffices). */
int llama_tokenize(const llama_tokenizer *t, const char *text, int bos, int eos, int *tokens,
                   int cap, int *n_tokens);

/* The bytes token `token` stands for when it follows `prev`: byte tokens decode to their byte,
 * and a piece that follows BOS loses its leading space (as SentencePiece's decoder does).
 * Returns a pointer owned by the tokenizer (not necessarily NUL-terminated at *len: a <0x00>
 * token is one zero byte) and sets *len; NULL with an error for an out-of-range id. */
const char *llama_token_piece(const llama_tokenizer *t, int prev, int token, size_t *len);

/* Decodes tokens[0..n-1] to text, skipping BOS and EOS tokens, into buf (always
 * NUL-terminated when cap > 0). *len (if not NULL) receives the full text length, without the
 * NUL; returns LLAMA_ERANGE if cap <= that length (buf then holds a truncated prefix). */
int llama_detokenize(const llama_tokenizer *t, const int *tokens, int n, char *buf, size_t cap,
                     size_t *len);

/* Number of tokens of the tokenizer (its vocab_size), and the raw piece of an id. */
int llama_tokenizer_vocab_size(const llama_tokenizer *t);
const char *llama_tokenizer_raw_piece(const llama_tokenizer *t, int token);

#ifdef __cplusplus
}
#endif

#endif /* LLAMA_ENGINE_H */
