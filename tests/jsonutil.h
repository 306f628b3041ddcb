/* JSON fixtures for the suites that read them (cJSON; link sae_testjson). */
#ifndef SAE_JSONUTIL_H
#define SAE_JSONUTIL_H

#include <cjson/cJSON.h>

/* Parses a whole JSON file; fails the test when it cannot be read or parsed. Caller deletes. */
cJSON *tu_read_json(const char *path);

#endif
