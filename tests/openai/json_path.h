/*
 * json_path.h: the OpenAI tests' lookup of a value in an answer by a dotted path of member
 * names and array indices ("choices.0.delta.content"); NULL when a step is missing.
 */
#ifndef FERRY_TESTS_JSON_PATH_H
#define FERRY_TESTS_JSON_PATH_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static inline const cJSON *json_path(const cJSON *j, const char *path)
{
    char buf[128];
    snprintf(buf, sizeof(buf), "%s", path);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ".", &save); tok && j; tok = strtok_r(NULL, ".", &save))
        j = (tok[0] >= '0' && tok[0] <= '9') ? cJSON_GetArrayItem(j, atoi(tok))
                                             : cJSON_GetObjectItemCaseSensitive(j, tok);
    return j;
}

#endif /* FERRY_TESTS_JSON_PATH_H */
