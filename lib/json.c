/* Typed reads of the cfg.json files other tools write: every value's JSON type and range is
 * checked, and a wrong one is an SAE_EFORMAT naming the file and the key. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
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
    *out = root;
    return SAE_OK;
}
