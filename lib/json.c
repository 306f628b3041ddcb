/* Typed reads of the cfg.json files other tools write: every value's JSON type and range is
 * checked, and a wrong one is an SAE_EFORMAT naming the file and the key. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static const char *type_name(const cJSON *item)
{
    if (cJSON_IsBool(item))
        return "a boolean";
    if (cJSON_IsNumber(item))
        return "a number";
    if (cJSON_IsString(item))
        return "a string";
    if (cJSON_IsArray(item))
        return "an array";
    if (cJSON_IsObject(item))
        return "an object";
    return "something else";
}

/* The item, or NULL (with *found false) when absent or null. */
static const cJSON *lookup(const cJSON *obj, const char *key, bool *found)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    *found = item != NULL && !cJSON_IsNull(item);
    return *found ? item : NULL;
}

int sae__json_size(const cJSON *obj, const char *key, const char *path, size_t *out, bool *found)
{
    const cJSON *item = lookup(obj, key, found);
    if (item == NULL)
        return SAE_OK;
    if (!cJSON_IsNumber(item))
        return sae__fail(SAE_EFORMAT, "%s: '%s' must be a whole number, found %s", path, key,
                         type_name(item));
    double v = item->valuedouble;
    /* 2^53: every whole number up to it is exact in the double cJSON parsed into. */
    if (!(v >= 0.0 && v <= 9007199254740992.0) || v != floor(v))
        return sae__fail(SAE_EFORMAT, "%s: '%s' must be a whole number >= 0, found %.17g", path,
                         key, v);
    *out = (size_t)v;
    return SAE_OK;
}

int sae__json_bool(const cJSON *obj, const char *key, const char *path, bool *out, bool *found)
{
    const cJSON *item = lookup(obj, key, found);
    if (item == NULL)
        return SAE_OK;
    if (!cJSON_IsBool(item))
        return sae__fail(SAE_EFORMAT, "%s: '%s' must be true or false, found %s", path, key,
                         type_name(item));
    *out = cJSON_IsTrue(item);
    return SAE_OK;
}

int sae__json_string(const cJSON *obj, const char *key, const char *path, const char **out,
                     bool *found)
{
    const cJSON *item = lookup(obj, key, found);
    if (item == NULL)
        return SAE_OK;
    if (!cJSON_IsString(item))
        return sae__fail(SAE_EFORMAT, "%s: '%s' must be a string, found %s", path, key,
                         type_name(item));
    *out = item->valuestring;
    return SAE_OK;
}

int sae__json_number(const cJSON *obj, const char *key, const char *path, double *out, bool *found)
{
    const cJSON *item = lookup(obj, key, found);
    if (item == NULL)
        return SAE_OK;
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble))
        return sae__fail(SAE_EFORMAT, "%s: '%s' must be a finite number, found %s", path, key,
                         type_name(item));
    *out = item->valuedouble;
    return SAE_OK;
}

/* The one string in text[begin..) that is being reported: its raw spelling, cut to fit. */
static void quote_raw(const char *text, size_t len, size_t begin, char *buf, size_t size)
{
    size_t n = 0;
    for (size_t i = begin; i < len && n + 1 < size; i++) {
        if (text[i] == '"' && i > begin)
            break;
        buf[n++] = (unsigned char)text[i] >= 0x20 && (unsigned char)text[i] < 0x7f ? text[i] : '?';
    }
    buf[n] = '\0';
}

/* JSON number spelling (RFC 8259): -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?. cJSON also
 * takes "02", "1." and "+1", which Python's json (and serde_json) refuse. */
static bool json_number_spelling(const char *s, size_t n)
{
    size_t i = 0;
    if (i < n && s[i] == '-')
        i++;
    if (i < n && s[i] == '0')
        i++;
    else if (i < n && s[i] >= '1' && s[i] <= '9')
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    else
        return false;
    if (i < n && s[i] == '.') {
        size_t start = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t start = i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    return i == n;
}

/* What cJSON's parse cannot tell us afterwards, checked on the text it has just accepted (so
 * the structure is known to be valid JSON and only strings hold backslashes and quotes):
 * - a \u0000 escape: cJSON decodes it into its NUL-terminated C strings, which then end early,
 *   so "W_enc\u0000x" would be read as "W_enc" while Python sees another name;
 * - numbers spelled in ways Python's json refuses (cJSON accepts "02", "1.", "+1"). */
static int check_spelling(const char *text, size_t len, const char *path)
{
    size_t string_start = 0;
    bool in_string = false;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '"') {
                in_string = false;
            } else if (c == '\\' && i + 1 < len) {
                if (text[i + 1] == 'u' && i + 5 < len && memcmp(text + i + 2, "0000", 4) == 0) {
                    char raw[64];
                    quote_raw(text, len, string_start, raw, sizeof raw);
                    return sae__fail(SAE_EFORMAT,
                                     "%s: the string %s\" at byte %zu holds \\u0000 (a NUL "
                                     "character), which would cut it short",
                                     path, raw, string_start);
                }
                i += text[i + 1] == 'u' ? 5 : 1;
            }
        } else if (c == '"') {
            in_string = true;
            string_start = i;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t end = i;
            while (end < len && strchr("0123456789+-.eE", text[end]) != NULL && text[end] != '\0')
                end++;
            if (!json_number_spelling(text + i, end - i))
                return sae__fail(SAE_EFORMAT,
                                 "%s: the number '%.*s' at byte %zu is not spelled as JSON allows "
                                 "(Python's json refuses it)",
                                 path, (int)(end - i < 40 ? end - i : 40), text + i, i);
            i = end - 1;
        }
    }
    return SAE_OK;
}

static int by_key(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Refuses an object (at any depth) that names a key twice: cJSON's lookups return the first
 * value while Python's json keeps the last, so the two would read different files. Sorting the
 * keys keeps a header of a million tensors at n log n. */
static int check_unique_keys(const cJSON *item, const char *path, const char *where)
{
    if (!cJSON_IsObject(item) && !cJSON_IsArray(item))
        return SAE_OK;
    size_t n = 0;
    const cJSON *child;
    cJSON_ArrayForEach(child, item) n++;
    if (cJSON_IsObject(item) && n > 1) {
        const char **keys = malloc(n * sizeof *keys);
        if (keys == NULL)
            return sae__fail(SAE_ENOMEM, "%s: out of memory checking the JSON keys", path);
        size_t i = 0;
        cJSON_ArrayForEach(child, item) keys[i++] = child->string;
        qsort(keys, n, sizeof *keys, by_key);
        for (i = 1; i < n && strcmp(keys[i - 1], keys[i]) != 0; i++)
            ;
        int rc = SAE_OK;
        if (i < n)
            rc = sae__fail(SAE_EFORMAT,
                           "%s: key '%.80s' appears twice in %s%.80s%s (Python's json would keep "
                           "the last, cJSON the first: refused)",
                           path, keys[i], where ? "'" : "the top-level object", where ? where : "",
                           where ? "'" : "");
        free(keys);
        if (rc != SAE_OK)
            return rc;
    }
    cJSON_ArrayForEach(child, item) {
        int rc = check_unique_keys(child, path, cJSON_IsObject(item) ? child->string : where);
        if (rc != SAE_OK)
            return rc;
    }
    return SAE_OK;
}

int sae__json_parse_object(const char *text, size_t len, const char *path, cJSON **out)
{
    *out = NULL;
    /* JSON has no NUL, but cJSON would skip one as whitespace. */
    if (memchr(text, '\0', len) != NULL)
        return sae__fail(SAE_EFORMAT, "%s: not valid JSON (a NUL byte at %zu)", path,
                         (size_t)((const char *)memchr(text, '\0', len) - text));
    /* cJSON records every failure in a process-wide variable (what cJSON_GetErrorPtr reads);
     * one lock keeps concurrent loads from racing on it. The parse end comes back through
     * `end` instead. */
    static pthread_mutex_t cjson_lock = PTHREAD_MUTEX_INITIALIZER;
    const char *end = NULL;
    pthread_mutex_lock(&cjson_lock);
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    pthread_mutex_unlock(&cjson_lock);
    if (root == NULL)
        return sae__fail(SAE_EFORMAT, "%s: not valid JSON (near byte %zu)", path,
                         end != NULL && end >= text && end <= text + len ? (size_t)(end - text)
                                                                          : (size_t)0);
    /* Only whitespace may follow the value, as in Python's json.load. */
    size_t used = end != NULL && end >= text && end <= text + len ? (size_t)(end - text) : len;
    while (used < len && (text[used] == ' ' || text[used] == '\n' || text[used] == '\r' ||
                          text[used] == '\t'))
        used++;
    if (used != len) {
        cJSON_Delete(root);
        return sae__fail(SAE_EFORMAT, "%s: not valid JSON (text after the value at byte %zu)",
                         path, used);
    }
    if (!cJSON_IsObject(root)) {
        const char *what = type_name(root);
        cJSON_Delete(root);
        return sae__fail(SAE_EFORMAT, "%s: the top level must be a JSON object, found %s", path,
                         what);
    }
    int rc = check_spelling(text, len, path);
    if (rc == SAE_OK)
        rc = check_unique_keys(root, path, NULL);
    if (rc != SAE_OK) {
        cJSON_Delete(root);
        return rc;
    }
    *out = root;
    return SAE_OK;
}
