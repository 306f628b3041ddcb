/* steer - clamp one SAE feature in the residual stream while the model writes, next to the same
 * sampling without it, and measure the effect: how often the feature's top words appear in N
 * steered stories against N unsteered ones (story i of both sets uses the same seed). */
#include "sae_llama.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: sae-llama steer RUN_DIR [options]\n"
    "  --feature F      the feature to clamp (default: chosen automatically, see below)\n"
    "  --multiple M     clamp it to M times its largest activation (default 2)\n"
    "  --stories N      stories in each arm of the measurement (default 50)\n"
    "  --tokens T       new tokens per story (default 200)\n"
    "  --temperature T  sampling temperature (default 1)\n"
    "  --seed S         story i uses seed S + i in both arms (default 1000)\n"
    "  --prompt P       how every story starts (default \"Once upon a time\")\n"
    "The automatic choice: the candidates are the features for a character's name (all their\n"
    "top contexts on one capitalised word, twice in mid-sentence), or if there are none\n"
    "the features for one word (3 in 4 of their top contexts); of the 12 that fire most often,\n"
    "the one whose clamp raises its word the most in 8 calibration stories (seeds 1..8, apart\n"
    "from the measured ones).\n";

enum { MAX_TOP_WORDS = 3, MAX_CANDIDATES = 12, CAL_STORIES = 8, CAL_SEED = 1 };

/* ---- generating and counting ------------------------------------------------------------ */

/* The hook: every token entering the SAE's layer goes through the steering plan. Position 0
 * (BOS) is left alone: the SAE never saw it in training. */
typedef struct {
    const sae_steer *plan;
    int rc;
} steer_hook_ctx;

static void steer_hook(int layer, int pos, float *x, int dim, void *user)
{
    (void)layer;
    (void)dim;
    steer_hook_ctx *ctx = user;
    if (pos > 0 && ctx->rc == SAE_OK)
        ctx->rc = sae_steer_apply(ctx->plan, x, 1);
}

/* What every story of a measurement shares. */
typedef struct {
    llama_state *state;
    const llama_tokenizer *tok;
    int vocab_size, layer, n_prompt, max_new, seq_len;
    const int *prompt;
    float temperature;
    int *ids;   /* [seq_len] */
    char *text; /* [text_cap] */
    size_t text_cap;
} generator;

typedef struct {
    size_t hits, words, stories_with;
} tally;

/* Counts the words of text (runs of ASCII letters, compared lowercased) that are one of
 * words[0..n_words); *total receives the number of words. */
static size_t count_words(const char *text, char (*words)[WORD_CAP], size_t n_words,
                          size_t *total)
{
    size_t hits = 0;
    *total = 0;
    for (const char *p = text; *p;) {
        if (!isalpha((unsigned char)*p) || (unsigned char)*p >= 128) {
            p++;
            continue;
        }
        char w[WORD_CAP];
        size_t n = 0;
        for (; isalpha((unsigned char)*p) && (unsigned char)*p < 128; p++)
            if (n + 1 < sizeof w)
                w[n++] = (char)tolower((unsigned char)*p);
        w[n] = '\0';
        (*total)++;
        for (size_t j = 0; j < n_words; j++)
            hits += strcmp(w, words[j]) == 0;
    }
    return hits;
}

/* Samples n stories with seeds seed..seed+n-1, steered by plan (NULL: not steered), and tallies
 * the words in what the model wrote after the prompt. Prints the first story under `title` if
 * that is not NULL. Returns 0, or prints the error and returns 1. */
static int run_stories(generator *g, const sae_steer *plan, uint64_t seed, size_t n,
                       char (*words)[WORD_CAP], size_t n_words, tally *out, const char *title)
{
    steer_hook_ctx ctx = {plan, SAE_OK};
    memset(out, 0, sizeof *out);
    if (llama_state_set_hook(g->state, g->layer, plan ? steer_hook : NULL, &ctx))
        return fail_llama("steer", "installing the hook");
    for (size_t i = 0; i < n; i++) {
        llama_sampler *smp;
        int n_ids;
        if (llama_sampler_create(g->vocab_size, g->temperature, 0.0f, seed + i, &smp))
            return fail_llama("steer", "creating the sampler");
        int bad = llama_generate(g->state, smp, g->prompt, g->n_prompt, g->max_new, g->ids,
                                 g->seq_len, &n_ids);
        llama_sampler_free(smp);
        if (bad)
            return fail_llama("steer", "generating");
        if (ctx.rc != SAE_OK)
            return fail_sae("steer", "steering", ctx.rc);
        /* text_cap holds 16 bytes per position, more than any piece of a llama2.c vocabulary */
        size_t prompt_len, total;
        llama_detokenize(g->tok, g->ids, g->n_prompt, g->text, g->text_cap, &prompt_len);
        llama_detokenize(g->tok, g->ids, n_ids, g->text, g->text_cap, NULL);
        size_t h = count_words(g->text + prompt_len, words, n_words, &total);
        out->hits += h;
        out->words += total;
        out->stories_with += h > 0;
        if (i == 0 && title)
            printf("\n--- %s (seed %llu) ---\n%s\n", title, (unsigned long long)seed, g->text);
    }
    return 0;
}

static double per_1000(const tally *t)
{
    return t->words ? 1000.0 * (double)t->hits / (double)t->words : 0.0;
}

/* ---- choosing the feature ------------------------------------------------------------------ */

/* A character's name: every top context on the same capitalised word, and at least two of them
 * in mid-sentence (after a letter or a comma), where English capitalises only names. */
static int is_name_feature(const feature_codes *fc, const corpus *c, const llama_tokenizer *t,
                           uint32_t f)
{
    char word[1][WORD_CAP];
    size_t cnt, n_top;
    if (feature_top_words(fc, c, t, f, word, &cnt, 1, &n_top) == 0 || n_top < TOP_CONTEXTS ||
        cnt < n_top || !is_word(word[0]))
        return 0;
    uint64_t ids[TOP_CONTEXTS];
    sae_stats_top(fc->stats, f, NULL, ids, &n_top);
    int mid_sentence = 0;
    for (size_t i = 0; i < n_top; i++) {
        size_t first = word_first_row(c, t, (size_t)ids[i]), len, prev_len;
        const char *p = row_text(c, t, first, &len);
        while (len > 0 && *p == ' ') {
            p++;
            len--;
        }
        if (len == 0 || !isupper((unsigned char)*p))
            return 0;
        if (c->story[first] == first - 1)
            continue; /* the story's first word */
        const char *prev = row_text(c, t, first - 1, &prev_len);
        while (prev_len > 0 && prev[prev_len - 1] == ' ')
            prev_len--;
        if (prev_len > 0 && (isalpha((unsigned char)prev[prev_len - 1]) ||
                             prev[prev_len - 1] == ','))
            mid_sentence++;
    }
    return mid_sentence >= 2;
}

static int is_word_feature(const feature_codes *fc, const corpus *c, const llama_tokenizer *t,
                           uint32_t f)
{
    char word[1][WORD_CAP];
    size_t cnt, n_top;
    return feature_top_words(fc, c, t, f, word, &cnt, 1, &n_top) > 0 &&
           n_top == TOP_CONTEXTS && 4 * cnt >= 3 * n_top && is_word(word[0]);
}

static const uint64_t *sort_counts;
static int by_count(const void *a, const void *b)
{
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    if (sort_counts[i] != sort_counts[j])
        return sort_counts[i] > sort_counts[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

/* The rule in the usage text. Returns the feature, or -1 with a message printed. */
static long choose_feature(generator *g, const sae_model *m, const feature_codes *fc,
                           const corpus *c, const uint64_t *count, float multiple)
{
    size_t d_sae = sae_model_d_sae(m), n = 0;
    uint32_t *cand = malloc(d_sae * sizeof *cand);
    if (!cand) {
        fail_msg("steer", "out of memory");
        return -1;
    }
    const char *kind = "a character's name";
    for (uint32_t f = 0; f < d_sae; f++)
        if (is_name_feature(fc, c, g->tok, f))
            cand[n++] = f;
    if (n == 0) {
        kind = "one word";
        for (uint32_t f = 0; f < d_sae; f++)
            if (is_word_feature(fc, c, g->tok, f))
                cand[n++] = f;
    }
    if (n == 0) {
        free(cand);
        fail_msg("steer", "no feature's top contexts sit on one word; pick one with --feature "
                          "(see the browser)");
        return -1;
    }
    sort_counts = count;
    qsort(cand, n, sizeof *cand, by_count);
    if (n > MAX_CANDIDATES)
        n = MAX_CANDIDATES;
    printf("steer: %zu candidate features for %s; clamping each to %g x its max in %d "
           "calibration stories:\n",
           n, kind, multiple, CAL_STORIES);
    long best = -1;
    double best_gain = 0;
    for (size_t i = 0; i < n; i++) {
        char word[MAX_TOP_WORDS][WORD_CAP];
        size_t cnt[MAX_TOP_WORDS], n_top;
        feature_top_words(fc, c, g->tok, cand[i], word, cnt, 1, &n_top);
        sae_steer *plan = NULL;
        tally plain, steered;
        int rc = sae_steer_new(&plan, m);
        if (rc == SAE_OK)
            rc = sae_steer_clamp_relative(plan, cand[i], multiple, fc->stats, NULL);
        if (rc != SAE_OK) {
            sae_steer_free(plan);
            free(cand);
            fail_sae("steer", "making a steering plan", rc);
            return -1;
        }
        int bad = run_stories(g, NULL, CAL_SEED, CAL_STORIES, word, 1, &plain, NULL) ||
                  run_stories(g, plan, CAL_SEED, CAL_STORIES, word, 1, &steered, NULL);
        sae_steer_free(plan);
        if (bad) {
            free(cand);
            return -1;
        }
        double gain = per_1000(&steered) - per_1000(&plain);
        printf("steer:   feature %5u \"%s\": %6.1f -> %6.1f per 1000 words\n", cand[i], word[0],
               per_1000(&plain), per_1000(&steered));
        if (best < 0 || gain > best_gain) {
            best = cand[i];
            best_gain = gain;
        }
    }
    free(cand);
    return best;
}

/* ---- the command ----------------------------------------------------------------------------- */

int cmd_steer(int argc, char **argv)
{
    double feature = -1, multiple = 2, n_stories = 50, n_tokens = 200, temperature = 1,
           seed = 1000;
    const char *prompt = "Once upon a time", *pos[1];
    const option opts[] = {
        {"feature", &feature, NULL, 0, 4294967295.0, 1},
        {"multiple", &multiple, NULL, -1e6, 1e6, 0},
        {"stories", &n_stories, NULL, 1, 1e6, 1},
        {"tokens", &n_tokens, NULL, 1, 1e6, 1},
        {"temperature", &temperature, NULL, 0, 100, 0},
        {"seed", &seed, NULL, 0, 1e15, 1},
        {"prompt", NULL, &prompt, 0, 0, 0},
        {NULL, NULL, NULL, 0, 0, 0},
    };
    if (parse_options(argc, argv, opts, pos, 1, 1) < 0) {
        fputs(usage, stderr);
        return 2;
    }
    const char *run = pos[0];

    corpus c;
    if (corpus_load("steer", run, 1, &c))
        return 1;
    sae_model *m = NULL;
    sae_steer *plan = NULL;
    llama_model *lm = NULL;
    llama_tokenizer *tok = NULL;
    feature_codes fc = {0};
    generator g = {0};
    uint64_t *count = NULL;
    float *max = NULL;
    int *prompt_ids = NULL;
    int status = 1, rc;
    if ((rc = sae_model_load(&m, path_in(run, "sae.safetensors"))) != SAE_OK) {
        fail_sae("steer", "loading the SAE (run `sae-llama train` first)", rc);
        goto done;
    }
    if (open_llama("steer", c.model_dir, &lm, &tok) || codes_compute("steer", m, &c, &fc))
        goto done;
    const llama_config *cfg = llama_model_config(lm);
    size_t d_sae = sae_model_d_sae(m), prompt_cap = strlen(prompt) + 3;
    count = malloc(d_sae * sizeof *count);
    max = malloc(d_sae * sizeof *max);
    prompt_ids = malloc(prompt_cap * sizeof *prompt_ids);
    g = (generator){.tok = tok, .vocab_size = cfg->vocab_size, .layer = c.layer,
                    .seq_len = cfg->seq_len, .prompt = prompt_ids,
                    .temperature = (float)temperature,
                    .ids = malloc((size_t)cfg->seq_len * sizeof *g.ids),
                    .text_cap = 16 * (size_t)cfg->seq_len + 1};
    g.text = malloc(g.text_cap);
    if (!count || !max || !prompt_ids || !g.ids || !g.text) {
        fail_msg("steer", "out of memory");
        goto done;
    }
    sae_stats_counts(fc.stats, count);
    sae_stats_max(fc.stats, max);
    if (llama_tokenize(tok, prompt, 1, 0, prompt_ids, (int)prompt_cap, &g.n_prompt) ||
        llama_state_create(lm, &g.state)) {
        fail_llama("steer", "preparing the prompt");
        goto done;
    }
    if (g.n_prompt >= cfg->seq_len) {
        fail_msg("steer", "the prompt fills the model's %d positions", cfg->seq_len);
        goto done;
    }
    g.max_new = (int)n_tokens < cfg->seq_len - g.n_prompt ? (int)n_tokens
                                                          : cfg->seq_len - g.n_prompt;

    /* which feature, and which words measure it */
    uint32_t feat;
    if (feature >= 0) {
        if (feature >= (double)d_sae) {
            fail_msg("steer", "--feature %.0f: the SAE has features 0..%zu", feature, d_sae - 1);
            goto done;
        }
        feat = (uint32_t)feature;
    } else {
        long f = choose_feature(&g, m, &fc, &c, count, (float)multiple);
        if (f < 0)
            goto done;
        feat = (uint32_t)f;
    }
    char words[MAX_TOP_WORDS][WORD_CAP];
    size_t word_cnt[MAX_TOP_WORDS], n_ctx;
    size_t n_words = feature_top_words(&fc, &c, tok, feat, words, word_cnt, MAX_TOP_WORDS, &n_ctx);
    if (n_words == 0) {
        fail_msg("steer", "feature %u never fired on the collected tokens: it has no top words "
                          "and no activation scale",
                 feat);
        goto done;
    }
    while (n_words > 1 && word_cnt[n_words - 1] < 2) /* a word of one context alone is noise */
        n_words--;
    printf("steer: feature %u%s, on %.2f%% of tokens; its top words:", feat,
           feature < 0 ? " (it raised its word the most)" : "",
           100.0 * (double)count[feat] / (double)sae_stats_tokens(fc.stats));
    for (size_t i = 0; i < n_words; i++)
        printf(" \"%s\" (%zu of %zu top contexts)", words[i], word_cnt[i], n_ctx);
    printf("\nsteer: clamped to %g x its largest activation %.3f = %.3f, entering layer %d, at "
           "every position after BOS\n",
           multiple, max[feat], multiple * max[feat], c.layer);

    if ((rc = sae_steer_new(&plan, m)) != SAE_OK ||
        (rc = sae_steer_clamp_relative(plan, feat, (float)multiple, fc.stats, NULL)) != SAE_OK) {
        fail_sae("steer", "making the steering plan", rc);
        goto done;
    }
    tally arm[2];
    if (run_stories(&g, NULL, (uint64_t)seed, (size_t)n_stories, words, n_words, &arm[0],
                    "unsteered") ||
        run_stories(&g, plan, (uint64_t)seed, (size_t)n_stories, words, n_words, &arm[1],
                    "steered"))
        goto done;

    printf("\nsteer: its top words in %.0f stories of up to %d new tokens, seeds %.0f..%.0f:\n",
           n_stories, g.max_new, seed, seed + n_stories - 1);
    const char *arm_name[2] = {"unsteered", "steered"};
    for (int a = 0; a < 2; a++)
        printf("steer:   %-9s %5zu times in %6zu words = %7.2f per 1000 words, in %3zu of "
               "%.0f stories\n",
               arm_name[a], arm[a].hits, arm[a].words, per_1000(&arm[a]), arm[a].stories_with,
               n_stories);
    if (arm[0].hits > 0)
        printf("steer: effect: %.1fx as frequent\n", per_1000(&arm[1]) / per_1000(&arm[0]));
    else
        printf("steer: effect: from none to %.2f per 1000 words\n", per_1000(&arm[1]));
    status = 0;
done:
    free(prompt_ids);
    free(g.ids);
    free(g.text);
    free(count);
    free(max);
    llama_state_free(g.state);
    sae_steer_free(plan);
    codes_free(&fc);
    llama_tokenizer_free(tok);
    llama_model_free(lm);
    sae_model_free(m);
    corpus_free(&c);
    return status;
}
