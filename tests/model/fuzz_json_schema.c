// Fuzz target: a JSON Schema from a client (the bytes before the first NUL) and an output
// (the bytes after it), as the router and the workers take them in SamplingParams.json_schema.
// The compile succeeds or fails with a reason, never a crash or a leak; with a compiled schema,
// the output is fed byte by byte: a refused byte leaves the state as it was, feeding the taken
// prefix at once gives the same state, and whatever the recognizer takes as a whole document
// is valid JSON (cJSON parses it, lone surrogate escapes aside), whose top level is an object
// or an array.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "model.h"

#define FAIL(...) (fprintf(stderr, "fuzz_json_schema: " __VA_ARGS__), fputc('\n', stderr), abort())

static size_t state_bytes(const mdl_schema_state_t *st)
{
    return offsetof(mdl_schema_state_t, frame) + st->depth * sizeof(st->frame[0]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    const uint8_t *nul = memchr(data, 0, size);
    const size_t n_schema = nul != NULL ? (size_t)(nul - data) : size;
    const uint8_t *doc = nul != NULL ? nul + 1 : data + size;
    const size_t n_doc = size - n_schema - (nul != NULL);
    char err[200] = "";
    mdl_schema_t *s = NULL;
    fy_status_t st = mdl_schema_compile((const char *)data, n_schema, &s, err, sizeof(err));
    if (st != FY_OK) {
        if (s != NULL || err[0] == '\0')
            FAIL("a refused schema without a reason, or with an object");
        return 0;
    }
    mdl_schema_state_t a, b;
    mdl_schema_start(s, &a);
    size_t taken = 0;
    for (; taken < n_doc && !mdl_schema_complete(&a); taken++) {
        mdl_schema_state_t before;
        memcpy(&before, &a, sizeof(a));
        if (!mdl_schema_feed(s, &a, doc + taken, 1)) {
            if (memcmp(&before, &a, state_bytes(&before)) != 0)
                FAIL("a refused byte changed the state");
            break;
        }
    }
    mdl_schema_start(s, &b);
    if (!mdl_schema_feed(s, &b, doc, taken) || memcmp(&a, &b, state_bytes(&a)) != 0)
        FAIL("%zu bytes at once differ from byte by byte", taken);
    if (mdl_schema_complete(&a)) {
        // cJSON refuses \u escapes of lone surrogates, which RFC 8259's grammar (and JSON
        // mode, for values a schema leaves free) allows: each escape becomes \u0041 first.
        char *copy = malloc(taken + 1);
        if (copy == NULL)
            abort();
        memcpy(copy, doc, taken);
        for (size_t i = 0; i + 6 <= taken; i++)
            if (copy[i] == '\\' && copy[i + 1] == 'u')
                memcpy(copy + i + 2, "0041", 4);
            else if (copy[i] == '\\')
                i++; // an escaped character: not the start of an escape
        cJSON *j = cJSON_ParseWithLength(copy, taken);
        free(copy);
        if (j == NULL || !(cJSON_IsObject(j) || cJSON_IsArray(j)))
            FAIL("took \"%.*s\", which is not a JSON object or array", (int)taken, doc);
        cJSON_Delete(j);
        if (taken < n_doc && mdl_schema_feed(s, &a, doc + taken, 1))
            FAIL("took a byte after a whole document");
    }
    mdl_schema_destroy(s);
    return 0;
}
