/* Error codes, the per-thread message, and the version. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define SAE_STR2(x) #x
#define SAE_STR(x) SAE_STR2(x)

/* Long enough for a path plus a sentence about a tensor. */
static _Thread_local char last_error[1024];

unsigned sae_version_number(void) { return SAE_VERSION_NUMBER; }

const char *sae_version_string(void)
{
    return SAE_STR(SAE_VERSION_MAJOR) "." SAE_STR(SAE_VERSION_MINOR) "." SAE_STR(SAE_VERSION_PATCH);
}

const char *sae_strerror(int code)
{
    switch (code) {
    case SAE_OK: return "success";
    case SAE_EINVAL: return "invalid argument";
    case SAE_ENOMEM: return "out of memory";
    case SAE_EIO: return "input/output error";
    case SAE_EFORMAT: return "malformed file";
    case SAE_EUNSUPPORTED: return "unsupported";
    case SAE_ERANGE: return "out of range";
    case SAE_ESTATE: return "wrong state";
    case SAE_ECALLBACK: return "callback failed";
    default: return "unknown error";
    }
}

const char *sae_last_error(void) { return last_error; }

int sae__fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

int sae__wrap(int code, const char *fmt, ...)
{
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    if (len <= 0)
        return code;
    size_t plen = (size_t)len < sizeof prefix ? (size_t)len : sizeof prefix - 1;
    size_t keep = strnlen(last_error, sizeof last_error - 1);
    if (plen + keep > sizeof last_error - 1)
        keep = sizeof last_error - 1 - plen; /* the end of the old message is what goes */
    memmove(last_error + plen, last_error, keep);
    memcpy(last_error, prefix, plen);
    last_error[plen + keep] = '\0';
    return code;
}
