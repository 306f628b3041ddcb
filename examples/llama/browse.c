/* browse - write a static feature browser: index.html (every feature by firing frequency, with a
 * log-scale frequency histogram) and one page per feature (its top-activating contexts with each
 * token shaded by the feature's activation, its statistics and its nearest features by decoder
 * cosine). Plain HTML and inline SVG and CSS: the folder opens from disk, with no network. */
#define _XOPEN_SOURCE 700

#include "sae_llama.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: sae-llama browse RUN_DIR [--out DIR]\n"
    "  reads RUN_DIR/sae.safetensors and the collected tokens, writes DIR/index.html\n"
    "  (default RUN_DIR/browser) and a page per feature\n";

enum { CTX_BEFORE = 14, CTX_AFTER = 4, NEIGHBORS = 8, LABEL_WORDS = 3 };

static const char style[] =
    "<style>\n"
    "body{font:15px/1.45 system-ui,sans-serif;color:#222;max-width:1000px;margin:1.5em auto;"
    "padding:0 1em}\n"
    "h1{font-size:1.45em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.6em}\n"
    "a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}\n"
    ".muted{color:#666}\n"
    "table{border-collapse:collapse;width:100%}\n"
    "th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}\n"
    "th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}\n"
    "code,.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}\n"
    "code{background:#f3f3f3;padding:0 3px;border-radius:3px;white-space:pre}\n"
    ".ctx{white-space:pre-wrap;line-height:1.9}\n"
    ".ctx span{border-radius:2px}\n"
    ".ctx .peak{outline:1.5px solid #b3461b}\n"
    ".ctx td.num{width:4.5em;color:#666}\n"
    "svg text{font:11px system-ui,sans-serif;fill:#444}\n"
    "</style>\n";

/* Writes s[0..len) as HTML text: markup characters escaped, a newline shown as a return
 * arrow, control characters and invalid UTF-8 (a byte-fallback token alone can be half a
 * character) replaced by U+FFFD, so whatever the model wrote cannot break the page. */
static void html_text(FILE *f, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    while (p < end) {
        unsigned c = *p;
        if (c == '&') fputs("&amp;", f);
        else if (c == '<') fputs("&lt;", f);
        else if (c == '>') fputs("&gt;", f);
        else if (c == '"') fputs("&quot;", f);
        else if (c == '\'') fputs("&#39;", f);
        else if (c == '\n') fputs("\xe2\x86\xb5", f); /* U+21B5 */
        else if (c >= 0x20 && c < 0x7f) fputc((int)c, f);
        else {
            /* a complete, shortest-form UTF-8 sequence passes; anything else is U+FFFD */
            size_t n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
                     : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
            int ok = n > 0 && (size_t)(end - p) >= n;
            for (size_t i = 1; ok && i < n; i++)
                ok = (p[i] & 0xc0) == 0x80;
            if (ok && n == 3)
                ok = !(c == 0xe0 && p[1] < 0xa0) && !(c == 0xed && p[1] >= 0xa0);
            if (ok && n == 4)
                ok = !(c == 0xf0 && p[1] < 0x90) && !(c == 0xf4 && p[1] >= 0x90);
            if (ok) {
                fwrite(p, 1, n, f);
                p += n;
                continue;
            }
            fputs("\xef\xbf\xbd", f);
        }
        p++;
    }
}

static void html_cstr(FILE *f, const char *s) { html_text(f, s, strlen(s)); }

static void feature_file(char *buf, size_t cap, uint32_t f)
{
    snprintf(buf, cap, "feature-%u.html", f);
}

/* Everything the pages need. */
typedef struct {
    const corpus *c;
    const llama_tokenizer *tok;
    const sae_model *m;
    const feature_codes *fc;
    uint64_t *count;
    double *sum;
    float *max;
    uint64_t tokens;
} browser;

/* "lily 14/16, tim 2/16": the words in which a feature's top contexts sit. */
static void write_label(FILE *f, const browser *b, uint32_t feat)
{
    char word[LABEL_WORDS][WORD_CAP];
    size_t cnt[LABEL_WORDS], n_top;
    size_t n = feature_top_words(b->fc, b->c, b->tok, feat, word, cnt, LABEL_WORDS, &n_top);
    for (size_t i = 0; i < n; i++) {
        if (i)
            fputs(", ", f);
        fputs("<code>", f);
        html_cstr(f, word[i]);
        fprintf(f, "</code> <span class=\"muted\">%zu/%zu</span>", cnt[i], n_top);
    }
}

/* The histogram of log10 firing frequencies, as inline SVG. */
static void write_histogram(FILE *f, const browser *b, size_t d_sae)
{
    const double bin = 0.25; /* decades per bar */
    double lo = 0;
    size_t dead = 0;
    for (size_t i = 0; i < d_sae; i++) {
        if (b->count[i] == 0) {
            dead++;
            continue;
        }
        double l = log10((double)b->count[i] / (double)b->tokens);
        if (l < lo)
            lo = l;
    }
    lo = floor(lo);
    if (lo > -1)
        lo = -1;
    size_t n_bins = (size_t)lround(-lo / bin);
    size_t *h = calloc(n_bins, sizeof *h), top = 1;
    if (!h)
        return;
    for (size_t i = 0; i < d_sae; i++) {
        if (b->count[i] == 0)
            continue;
        double l = log10((double)b->count[i] / (double)b->tokens);
        size_t j = (size_t)((l - lo) / bin);
        if (j >= n_bins)
            j = n_bins - 1;
        if (++h[j] > top)
            top = h[j];
    }
    const double W = 640, H = 180, left = 40, bottom = 30, top_pad = 10;
    double bar_w = (W - left - 10) / (double)n_bins, plot_h = H - bottom - top_pad;
    fprintf(f,
            "<svg width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" role=\"img\" "
            "aria-label=\"histogram of feature firing frequencies\">\n",
            W, H, W, H);
    for (size_t j = 0; j < n_bins; j++) {
        double hh = plot_h * (double)h[j] / (double)top;
        fprintf(f,
                "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#e8743b\">"
                "<title>%zu features fire on 10^%.2f to 10^%.2f of tokens</title></rect>\n",
                left + (double)j * bar_w + 1, top_pad + plot_h - hh, bar_w - 2, hh, h[j],
                lo + (double)j * bin, lo + (double)(j + 1) * bin);
    }
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#999\"/>\n", left,
            H - bottom, W - 10, H - bottom);
    for (int d = (int)lo; d <= 0; d++) {
        double x = left + ((double)d - lo) / bin * bar_w;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.0f\" x2=\"%.1f\" y2=\"%.0f\" stroke=\"#999\"/>"
                "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n",
                x, H - bottom, x, H - bottom + 4, x, H - bottom + 16,
                d == 0 ? "1" : d == -1 ? "0.1" : d == -2 ? "0.01" : "");
        if (d < -2)
            fprintf(f, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">1e%d</text>\n", x,
                    H - bottom + 16, d);
    }
    fprintf(f,
            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">fraction of tokens on which a "
            "feature fires (log scale)</text>\n"
            "<text x=\"12\" y=\"%.0f\" transform=\"rotate(-90 12 %.0f)\" "
            "text-anchor=\"middle\">features</text>\n"
            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\">%zu</text>\n</svg>\n",
            (W + left) / 2, H - 2, top_pad + plot_h / 2, top_pad + plot_h / 2, left - 4,
            top_pad + 9, top);
    if (dead)
        fprintf(f, "<p class=\"muted\">%zu features never fired and are not in the histogram.</p>\n",
                dead);
    free(h);
}

/* One context: the tokens around `row` in its story, each shaded by the feature's value there
 * (relative to the feature's largest value), the value in a tooltip. */
static void write_context(FILE *f, const browser *b, uint32_t feat, size_t row)
{
    const corpus *c = b->c;
    size_t story = c->story[row], first = row - CTX_BEFORE, last = row + CTX_AFTER;
    if (row < CTX_BEFORE || first <= story)
        first = story + 1;
    while (last >= c->n || c->story[last] != story)
        last--;
    float peak = b->max[feat] > 0 ? b->max[feat] : 1;
    for (size_t r = first; r <= last; r++) {
        float v = codes_value(b->fc, r, feat);
        size_t len;
        const char *piece = llama_token_piece(b->tok, c->tokens[r - 1], c->tokens[r], &len);
        if (!piece) {
            piece = "?";
            len = 1;
        }
        fprintf(f, "<span%s title=\"%.3f\"", r == row ? " class=\"peak\"" : "", v);
        if (v > 0)
            fprintf(f, " style=\"background:rgba(232,116,59,%.2f)\"",
                    0.12 + 0.88 * fmin(1.0, v / peak));
        fputc('>', f);
        html_text(f, piece, len);
        fputs("</span>", f);
    }
}

static int write_feature_page(const char *dir, const browser *b, uint32_t feat, size_t d_sae,
                              size_t rank)
{
    char name[64];
    feature_file(name, sizeof name, feat);
    const char *path = path_in(dir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "sae-llama browse: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    fprintf(f, "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
               "<title>Feature %u</title>\n%s</head><body>\n",
            feat, style);
    fprintf(f, "<p><a href=\"index.html\">&larr; all features</a></p>\n<h1>Feature %u</h1>\n",
            feat);
    if (b->count[feat] == 0) {
        fputs("<p>This feature never fired on the collected tokens.</p>\n", f);
    } else {
        fputs("<p>Words of its top contexts: ", f);
        write_label(f, b, feat);
        fprintf(f,
                "</p>\n<p>Fires on %" PRIu64 " of %" PRIu64 " tokens (%.3g%%, rank %zu by "
                "frequency); largest activation %.3f, mean when firing %.3f.</p>\n",
                b->count[feat], b->tokens, 100.0 * (double)b->count[feat] / (double)b->tokens,
                rank, b->max[feat], b->sum[feat] / (double)b->count[feat]);
    }

    size_t n_nb = d_sae - 1 < NEIGHBORS ? d_sae - 1 : NEIGHBORS;
    uint32_t nb[NEIGHBORS];
    float cos[NEIGHBORS];
    if (n_nb > 0 && sae_feature_neighbors(b->m, feat, n_nb, nb, cos) == SAE_OK) {
        fputs("<h2>Nearest features by decoder cosine</h2>\n<table>\n"
              "<tr><th>feature</th><th>cosine</th><th>words of its top contexts</th></tr>\n",
              f);
        for (size_t i = 0; i < n_nb; i++) {
            char other[64];
            feature_file(other, sizeof other, nb[i]);
            fprintf(f, "<tr><td><a href=\"%s\">%u</a></td><td class=\"num\">%.3f</td><td>", other,
                    nb[i], cos[i]);
            write_label(f, b, nb[i]);
            fputs("</td></tr>\n", f);
        }
        fputs("</table>\n", f);
    }

    float val[TOP_CONTEXTS];
    uint64_t ids[TOP_CONTEXTS];
    size_t n_top = 0;
    sae_stats_top(b->fc->stats, feat, val, ids, &n_top);
    if (n_top > 0) {
        fprintf(f,
                "<h2>Top %zu contexts</h2>\n<p class=\"muted\">Each token is shaded by the "
                "feature's activation on it (hover for the value); the outlined token is the "
                "one the row is ranked by.</p>\n<table class=\"ctx\">\n",
                n_top);
        for (size_t i = 0; i < n_top; i++) {
            fprintf(f, "<tr><td class=\"num\">%.2f</td><td>", val[i]);
            write_context(f, b, feat, (size_t)ids[i]);
            fputs("</td></tr>\n", f);
        }
        fputs("</table>\n", f);
    }
    fputs("</body></html>\n", f);
    if (ferror(f) | fclose(f)) {
        fprintf(stderr, "sae-llama browse: error writing %s\n", path);
        return -1;
    }
    return 0;
}

static const uint64_t *sort_counts;
static int by_frequency(const void *a, const void *b)
{
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    if (sort_counts[i] != sort_counts[j])
        return sort_counts[i] > sort_counts[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

static int write_index(const char *dir, const browser *b, const uint32_t *order, size_t d_sae,
                       const char *title)
{
    const char *path = path_in(dir, "index.html");
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "sae-llama browse: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t alive = 0;
    double l0 = 0;
    for (size_t i = 0; i < d_sae; i++) {
        alive += b->count[i] > 0;
        l0 += (double)b->count[i];
    }
    fprintf(f, "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>");
    html_cstr(f, title);
    fprintf(f, "</title>\n%s</head><body>\n<h1>", style);
    html_cstr(f, title);
    fprintf(f,
            "</h1>\n<p>%s SAE, %zu &rarr; %zu features, on the residual stream entering layer "
            "%d. %" PRIu64 " tokens (BOS left out); %zu features fired, on average %.1f per "
            "token.</p>\n",
            sae_arch_name(sae_model_arch(b->m)), sae_model_d_in(b->m), d_sae, b->c->layer,
            b->tokens, alive, l0 / (double)b->tokens);
    fputs("<h2>Firing frequencies</h2>\n", f);
    write_histogram(f, b, d_sae);
    fputs("<h2>Features, most frequent first</h2>\n<table>\n<tr><th>feature</th>"
          "<th>frequency</th><th>max</th><th>words of its top contexts</th></tr>\n",
          f);
    for (size_t i = 0; i < d_sae; i++) {
        uint32_t feat = order[i];
        char name[64];
        feature_file(name, sizeof name, feat);
        fprintf(f, "<tr><td><a href=\"%s\">%u</a></td><td class=\"num\">%.3g%%</td>"
                   "<td class=\"num\">%.2f</td><td>",
                name, feat, 100.0 * (double)b->count[feat] / (double)b->tokens, b->max[feat]);
        if (b->count[feat])
            write_label(f, b, feat);
        else
            fputs("<span class=\"muted\">never fired</span>", f);
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n</body></html>\n", f);
    if (ferror(f) | fclose(f)) {
        fprintf(stderr, "sae-llama browse: error writing %s\n", path);
        return -1;
    }
    return 0;
}

int cmd_browse(int argc, char **argv)
{
    const char *out = NULL, *pos[1];
    const option opts[] = {{"out", NULL, &out, 0, 0, 0}, {NULL, NULL, NULL, 0, 0, 0}};
    if (parse_options(argc, argv, opts, pos, 1, 1) < 0) {
        fputs(usage, stderr);
        return 2;
    }
    const char *run = pos[0];
    char out_dir[PATH_MAX];
    snprintf(out_dir, sizeof out_dir, "%s", out ? out : path_in(run, "browser"));

    corpus c;
    if (corpus_load("browse", run, 1, &c))
        return 1;
    sae_model *m = NULL;
    llama_model *lm = NULL;
    llama_tokenizer *tok = NULL;
    feature_codes fc = {0};
    browser b = {0};
    uint32_t *order = NULL;
    int status = 1, rc;
    if ((rc = sae_model_load(&m, path_in(run, "sae.safetensors"))) != SAE_OK) {
        fail_sae("browse", "loading the SAE (run `sae-llama train` first)", rc);
        goto done;
    }
    if (sae_model_d_in(m) != c.dim) {
        fail_msg("browse", "the SAE reads %zu values per token but acts.npy has %zu",
                 sae_model_d_in(m), c.dim);
        goto done;
    }
    if (open_llama("browse", c.model_dir, &lm, &tok) || codes_compute("browse", m, &c, &fc))
        goto done;
    size_t d_sae = sae_model_d_sae(m);
    b = (browser){.c = &c, .tok = tok, .m = m, .fc = &fc,
                  .count = malloc(d_sae * sizeof *b.count),
                  .sum = malloc(d_sae * sizeof *b.sum),
                  .max = malloc(d_sae * sizeof *b.max),
                  .tokens = sae_stats_tokens(fc.stats)};
    order = malloc(d_sae * sizeof *order);
    if (!b.count || !b.sum || !b.max || !order) {
        fail_msg("browse", "out of memory");
        goto done;
    }
    sae_stats_counts(fc.stats, b.count);
    sae_stats_sums(fc.stats, b.sum);
    sae_stats_max(fc.stats, b.max);
    for (uint32_t i = 0; i < d_sae; i++)
        order[i] = i;
    sort_counts = b.count;
    qsort(order, d_sae, sizeof *order, by_frequency);

    if (make_dir(out_dir))
        goto done;
    const char *slash = strrchr(c.model_dir, '/');
    char title[300];
    snprintf(title, sizeof title, "Features of %.200s, layer %d", slash ? slash + 1 : c.model_dir,
             c.layer);
    for (size_t i = 0; i < d_sae; i++)
        if (write_feature_page(out_dir, &b, order[i], d_sae, i + 1))
            goto done;
    if (write_index(out_dir, &b, order, d_sae, title))
        goto done;
    char abs[PATH_MAX];
    if (!realpath(path_in(out_dir, "index.html"), abs))
        snprintf(abs, sizeof abs, "%s", path_in(out_dir, "index.html"));
    printf("browse: %zu feature pages; open file://%s\n", d_sae, abs);
    status = 0;
done:
    free(order);
    free(b.count);
    free(b.sum);
    free(b.max);
    codes_free(&fc);
    llama_tokenizer_free(tok);
    llama_model_free(lm);
    sae_model_free(m);
    corpus_free(&c);
    return status;
}
