#include "jsonutil.h"

#include <stdlib.h>

#include "testutil.h"

cJSON *tu_read_json(const char *path)
{
    size_t size;
    unsigned char *text = tu_read_file(path, &size);
    text[size] = '\0'; /* tu_read_file leaves room for it */
    cJSON *j = cJSON_Parse((const char *)text);
    ck_assert_msg(j != NULL, "%s does not parse", path);
    free(text);
    return j;
}
