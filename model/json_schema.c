/*
 * json_schema.c: structured output for the sampler (OpenAI's response_format json_schema).
 *
 * mdl_schema_compile turns a JSON Schema into a table of nodes: an object's properties in
 * order, an array's item node, a string's length bounds, a number, a set of literal texts
 * (enum, const, true/false, null), a free value (JSON mode's recognizer), a choice among
 * branches that start with different bytes, or a union of objects told apart by their first
 * property's literal. The state is a stack of frames, one per value open in the text, plus
 * the scratch of the value at the top (a string's escape, a number's state, the candidates of
 * a key or a literal); copying a state copies only the frames in use, so that trying every
 * token of a vocabulary on a copy stays cheap.
 *
 * Two values end only when the next byte comes: a number, and a literal that is a prefix of
 * another (enum [1, 12]). Such a byte closes the value and is stepped again in its parent
 * (R_AGAIN). The top level is an object or an array, so a document always ends on a byte
 * that belongs to it.
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "model_int.h"

#define MAX_NODES    4096
#define MAX_REFS     16384
#define MAX_LITS     64   /* an enum's values, an object's properties */
#define MAX_LIT_LEN  1024 /* bytes of one literal's JSON text or one property name */
#define MAX_REF_HOPS 32   /* $ref resolved within one path of the schema */
#define NO_LIMIT     UINT32_MAX
#define NO_NODE      UINT32_MAX

typedef enum {
    S_ANY,     // a free value (any: the kinds allowed)
    S_OBJECT,  // properties refs[first .. first + n), required; or a map (n 0, child values)
    S_UNION,   // an object whose first property (refs[first]) picks the branch
    S_ARRAY,   // items child, min..max of them
    S_STRING,  // min..max characters
    S_NUMBER,  //
    S_INTEGER, // a number without fraction or exponent, within lo..hi
    S_LITS,    // one of the JSON texts refs[first .. first + n)
    S_CHOICE,  // one of the nodes refs[first .. first + n), told apart by the first byte
} sc_kind_t;

enum { K_OBJECT = 1, K_ARRAY = 2, K_STRING = 4, K_NUMBER = 8, K_BOOL = 16, K_NULL = 32 };

typedef struct {
    uint8_t kind;
    uint8_t any;       // S_ANY: K_* bits
    uint16_t n;        // refs of the node
    uint32_t first;    // its first ref
    uint32_t min, max; // string characters, array items
    uint32_t child;    // array items, map values (NO_NODE: none)
    uint64_t required; // object: bit i = property i
    uint8_t start[32]; // the bytes a value of this node may start with (a bit set)
    uint8_t depth;     // frames the deepest value of this node opens
    bool bounded;      // integer: lo..hi narrower than any
    int64_t lo, hi;    // integer: the values allowed
} sc_node_t;

/* A property (name text[off..off+len], value node), a literal (its JSON text; node: the
 * branch it picks in a union, else NO_NODE) or a branch of a choice (node). */
typedef struct {
    uint32_t off, len, node;
} sc_ref_t;

struct mdl_schema {
    sc_node_t *node;
    uint32_t n_node, cap_node;
    sc_ref_t *ref;
    uint32_t n_ref, cap_ref;
    char *text;
    size_t n_text, cap_text;
    uint32_t root;
};

/* ---- Compiling ------------------------------------------------------------------------------- */

typedef struct {
    mdl_schema_t *s;
    const cJSON *doc; // the whole schema, for $ref
    char *err;
    size_t err_len;
    int hops;
} sc_compiler_t;

static uint32_t fail(sc_compiler_t *c, const char *fmt, const char *what)
{
    if (c->err[0] == '\0')
        snprintf(c->err, c->err_len, fmt, what);
    return NO_NODE;
}

static void set_bit(uint8_t *set, uint8_t b)
{
    set[b / 8] |= (uint8_t)(1u << (b % 8));
}

static bool has_bit(const uint8_t *set, uint8_t b)
{
    return (set[b / 8] >> (b % 8)) & 1;
}

static uint32_t new_node(sc_compiler_t *c, sc_kind_t kind)
{
    mdl_schema_t *s = c->s;
    if (s->n_node >= MAX_NODES)
        return fail(c, "%s", "schema too large (more than 4096 nodes once $refs are expanded)");
    if (s->n_node == s->cap_node) {
        uint32_t cap = s->cap_node ? 2 * s->cap_node : 32;
        sc_node_t *p = realloc(s->node, cap * sizeof(*p));
        if (p == NULL)
            return fail(c, "%s", "out of memory");
        s->node = p;
        s->cap_node = cap;
    }
    sc_node_t *n = &s->node[s->n_node];
    memset(n, 0, sizeof(*n));
    n->kind = (uint8_t)kind;
    n->max = NO_LIMIT;
    n->child = NO_NODE;
    n->depth = 1;
    n->lo = INT64_MIN;
    n->hi = INT64_MAX;
    return s->n_node++;
}

static bool add_text(sc_compiler_t *c, const char *t, size_t len, uint32_t *off_p)
{
    mdl_schema_t *s = c->s;
    if (s->n_text + len > MDL_SCHEMA_MAX_TEXT * 4) {
        fail(c, "%s", "schema too large (names and literals)");
        return false;
    }
    if (s->n_text + len > s->cap_text) {
        size_t cap = FY_MAX(s->cap_text * 2, s->n_text + len + 256);
        char *p = realloc(s->text, cap);
        if (p == NULL) {
            fail(c, "%s", "out of memory");
            return false;
        }
        s->text = p;
        s->cap_text = cap;
    }
    memcpy(s->text + s->n_text, t, len);
    *off_p = (uint32_t)s->n_text;
    s->n_text += len;
    return true;
}

/* Appends refs r[n] contiguously; returns the first's index (NO_NODE on failure). */
static uint32_t add_refs(sc_compiler_t *c, const sc_ref_t *r, uint32_t n)
{
    mdl_schema_t *s = c->s;
    if (s->n_ref + n > MAX_REFS)
        return fail(c, "%s", "schema too large (properties, literals and branches)");
    if (s->n_ref + n > s->cap_ref) {
        uint32_t cap = FY_MAX(s->cap_ref * 2, s->n_ref + n + 32);
        sc_ref_t *p = realloc(s->ref, cap * sizeof(*p));
        if (p == NULL)
            return fail(c, "%s", "out of memory");
        s->ref = p;
        s->cap_ref = cap;
    }
    if (n > 0)
        memcpy(s->ref + s->n_ref, r, n * sizeof(*r));
    uint32_t first = s->n_ref;
    s->n_ref += n;
    return first;
}

/* A new node of kind with refs r[n]; NO_NODE on failure. */
static uint32_t new_node_refs(sc_compiler_t *c, sc_kind_t kind, const sc_ref_t *r, uint32_t n)
{
    uint32_t id = new_node(c, kind);
    uint32_t first = id == NO_NODE ? NO_NODE : add_refs(c, r, n);
    if (first == NO_NODE)
        return NO_NODE;
    c->s->node[id].first = first;
    c->s->node[id].n = (uint16_t)n;
    return id;
}

/* A literal node of the texts r[n] (each its node's start bytes); NO_NODE on failure. */
static uint32_t new_lits(sc_compiler_t *c, const sc_ref_t *r, uint32_t n)
{
    uint32_t id = new_node_refs(c, S_LITS, r, n);
    for (uint32_t i = 0; id != NO_NODE && i < n; i++)
        set_bit(c->s->node[id].start, (uint8_t)c->s->text[r[i].off]);
    return id;
}

static void start_kinds(uint8_t *set, unsigned kinds)
{
    if (kinds & K_OBJECT)
        set_bit(set, '{');
    if (kinds & K_ARRAY)
        set_bit(set, '[');
    if (kinds & K_STRING)
        set_bit(set, '"');
    if (kinds & K_NUMBER) {
        set_bit(set, '-');
        for (uint8_t d = '0'; d <= '9'; d++)
            set_bit(set, d);
    }
    if (kinds & K_BOOL) {
        set_bit(set, 't');
        set_bit(set, 'f');
    }
    if (kinds & K_NULL)
        set_bit(set, 'n');
}

static uint32_t compile(sc_compiler_t *c, const cJSON *j, int depth);

/* A literal node of the values' JSON texts (an enum, a const, true/false, null). */
static uint32_t compile_lits(sc_compiler_t *c, const cJSON *const *vals, int n, const char *what)
{
    if (n < 1 || n > MAX_LITS)
        return fail(c, "%s: between 1 and 64 values", what);
    sc_ref_t r[MAX_LITS];
    for (int i = 0; i < n; i++) {
        char *t = cJSON_PrintUnformatted(vals[i]);
        if (t == NULL)
            return fail(c, "%s", "out of memory");
        size_t len = strlen(t);
        bool ok = len > 0 && len <= MAX_LIT_LEN && add_text(c, t, len, &r[i].off);
        free(t);
        if (!ok)
            return fail(c, "%s: a value over 1024 bytes", what);
        r[i].len = (uint32_t)len;
        r[i].node = NO_NODE;
        for (int k = 0; k < i; k++)
            if (r[k].len == r[i].len &&
                memcmp(c->s->text + r[k].off, c->s->text + r[i].off, r[i].len) == 0)
                return fail(c, "%s: a value given twice", what);
    }
    return new_lits(c, r, (uint32_t)n);
}

/* A non-negative integer keyword, or def when absent. */
static bool count_kw(sc_compiler_t *c, const cJSON *j, const char *name, uint32_t def,
                     uint32_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, name);
    *out = def;
    if (v == NULL)
        return true;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 1e6 ||
        v->valuedouble != floor(v->valuedouble)) {
        fail(c, "%s: an integer in [0, 1000000]", name);
        return false;
    }
    *out = (uint32_t)v->valuedouble;
    return true;
}

static bool name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > MAX_LIT_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((uint8_t)s[i] < 0x20 || s[i] == '"' || s[i] == '\\')
            return false;
    return true;
}

static uint32_t compile_object(sc_compiler_t *c, const cJSON *j, int depth)
{
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(j, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(j, "required");
    const cJSON *add = cJSON_GetObjectItemCaseSensitive(j, "additionalProperties");
    if (props != NULL && !cJSON_IsObject(props))
        return fail(c, "%s: must be an object", "properties");
    if (req != NULL && !cJSON_IsArray(req))
        return fail(c, "%s: must be an array of names", "required");
    if (add != NULL && !cJSON_IsBool(add) && !cJSON_IsObject(add))
        return fail(c, "%s: must be a boolean or a schema", "additionalProperties");
    int n = props != NULL ? cJSON_GetArraySize(props) : 0;
    if (n > MAX_LITS)
        return fail(c, "%s: at most 64 in one object", "properties");
    sc_ref_t r[MAX_LITS];
    uint64_t required = 0;
    uint8_t deepest = 0;
    int i = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, props)
    {
        if (!name_ok(p->string))
            return fail(c,
                        "properties: the name \"%s\" (empty, over 1024 bytes, or with a quote, "
                        "backslash or control character) is not supported",
                        p->string);
        for (int k = 0; k < i; k++)
            if (r[k].len == strlen(p->string) &&
                memcmp(c->s->text + r[k].off, p->string, r[k].len) == 0)
                return fail(c, "properties: \"%s\" given twice", p->string);
        uint32_t child = compile(c, p, depth + 1);
        if (child == NO_NODE)
            return NO_NODE;
        deepest = FY_MAX(deepest, c->s->node[child].depth);
        r[i].len = (uint32_t)strlen(p->string);
        r[i].node = child;
        if (!add_text(c, p->string, r[i].len, &r[i].off))
            return NO_NODE;
        i++;
    }
    cJSON_ArrayForEach(p, req)
    {
        int k = 0;
        if (!cJSON_IsString(p))
            return fail(c, "%s: must be an array of names", "required");
        while (k < n && !(r[k].len == strlen(p->valuestring) &&
                          memcmp(c->s->text + r[k].off, p->valuestring, r[k].len) == 0))
            k++;
        if (k == n)
            return fail(c, "required: \"%s\" is not among the properties", p->valuestring);
        required |= 1ull << k;
    }
    uint32_t values = NO_NODE;
    if (n == 0 && !cJSON_IsFalse(add)) { // a map: any keys, values of one schema
        values = compile(c, cJSON_IsObject(add) ? add : NULL, depth + 1);
        if (values == NO_NODE)
            return NO_NODE;
        deepest = c->s->node[values].depth;
    }
    uint32_t id = new_node_refs(c, S_OBJECT, r, (uint32_t)n);
    if (id == NO_NODE)
        return NO_NODE;
    sc_node_t *node = &c->s->node[id];
    node->required = required;
    node->child = values;
    node->depth = (uint8_t)(deepest + 1);
    set_bit(node->start, '{');
    return id;
}

static uint32_t compile_array(sc_compiler_t *c, const cJSON *j, int depth)
{
    uint32_t lo, hi;
    if (!count_kw(c, j, "minItems", 0, &lo) || !count_kw(c, j, "maxItems", NO_LIMIT, &hi))
        return NO_NODE;
    if (lo > hi)
        return fail(c, "%s: above maxItems", "minItems");
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(j, "items");
    if (items != NULL && !cJSON_IsObject(items) && !cJSON_IsBool(items))
        return fail(c, "%s: must be a schema", "items");
    uint32_t child = compile(c, items, depth + 1);
    if (child == NO_NODE)
        return NO_NODE;
    uint8_t d = c->s->node[child].depth;
    uint32_t id = new_node(c, S_ARRAY);
    if (id == NO_NODE)
        return NO_NODE;
    sc_node_t *node = &c->s->node[id];
    node->child = child;
    node->min = lo;
    node->max = hi;
    node->depth = (uint8_t)(d + 1);
    set_bit(node->start, '[');
    return id;
}

static const char *const k_bounds[] = {"minimum", "maximum", "exclusiveMinimum",
                                       "exclusiveMaximum"};
#define MAX_BOUND 1e15 /* |bounds|: well inside 16 digits and int64 */

static bool has_bounds(const cJSON *j)
{
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_bounds); i++)
        if (cJSON_HasObjectItem(j, k_bounds[i]))
            return true;
    return false;
}

/* An integer's minimum, maximum, exclusiveMinimum and exclusiveMaximum as lo..hi. */
static bool int_bounds(sc_compiler_t *c, const cJSON *j, int64_t *lo, int64_t *hi)
{
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_bounds); i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k_bounds[i]);
        if (v == NULL)
            continue;
        if (!cJSON_IsNumber(v) || !(fabs(v->valuedouble) <= MAX_BOUND)) {
            fail(c, "%s: a number within +-1e15", k_bounds[i]);
            return false;
        }
        const double x = v->valuedouble;
        const int64_t b = i % 2 == 0 ? (int64_t)(i == 0 ? ceil(x) : floor(x) + 1)
                                     : (int64_t)(i == 1 ? floor(x) : ceil(x) - 1);
        if (i % 2 == 0)
            *lo = FY_MAX(*lo, b);
        else
            *hi = FY_MIN(*hi, b);
    }
    if (*lo > *hi) {
        fail(c, "%s: no integer lies within the bounds", "minimum");
        return false;
    }
    return true;
}

/* A node for one type name, from the keywords of j that apply to it. */
static uint32_t compile_type(sc_compiler_t *c, const cJSON *j, const char *type, int depth)
{
    if (strcmp(type, "object") == 0)
        return compile_object(c, j, depth);
    if (strcmp(type, "array") == 0)
        return compile_array(c, j, depth);
    if (strcmp(type, "string") == 0) {
        uint32_t lo, hi;
        if (!count_kw(c, j, "minLength", 0, &lo) || !count_kw(c, j, "maxLength", NO_LIMIT, &hi))
            return NO_NODE;
        if (lo > hi)
            return fail(c, "%s: above maxLength", "minLength");
        uint32_t id = new_node(c, S_STRING);
        if (id == NO_NODE)
            return NO_NODE;
        c->s->node[id].min = lo;
        c->s->node[id].max = hi;
        set_bit(c->s->node[id].start, '"');
        return id;
    }
    if (strcmp(type, "number") == 0 || strcmp(type, "integer") == 0) {
        int64_t lo = INT64_MIN, hi = INT64_MAX;
        if (type[0] == 'n' && has_bounds(j))
            return fail(c, "%s", "minimum and maximum: for integers only (not numbers)");
        if (type[0] == 'i' && !int_bounds(c, j, &lo, &hi))
            return NO_NODE;
        uint32_t id = new_node(c, type[0] == 'n' ? S_NUMBER : S_INTEGER);
        if (id != NO_NODE) {
            start_kinds(c->s->node[id].start, K_NUMBER);
            c->s->node[id].lo = lo;
            c->s->node[id].hi = hi;
            c->s->node[id].bounded = lo != INT64_MIN || hi != INT64_MAX;
        }
        return id;
    }
    if (strcmp(type, "boolean") == 0 || strcmp(type, "null") == 0) {
        cJSON *t = cJSON_CreateTrue(), *f = cJSON_CreateFalse(), *z = cJSON_CreateNull();
        const cJSON *bools[2] = {t, f};
        uint32_t id = t && f && z ? (type[0] == 'b' ? compile_lits(c, bools, 2, type)
                                                    : compile_lits(c, (const cJSON **)&z, 1, type))
                                  : fail(c, "%s", "out of memory");
        cJSON_Delete(t);
        cJSON_Delete(f);
        cJSON_Delete(z);
        return id;
    }
    return fail(c, "type: \"%s\" is not a JSON Schema type", type);
}

/* A union of objects whose first property, required, has the same name in every branch and
 * literal values no two branches share: the value read for it picks the branch. */
static uint32_t compile_union(sc_compiler_t *c, const uint32_t *branch, int n)
{
    mdl_schema_t *s = c->s;
    sc_ref_t lits[MAX_LITS];
    int n_lits = 0;
    uint8_t deepest = 0;
    for (int b = 0; b < n; b++) {
        const sc_node_t *o = &s->node[branch[b]];
        if (o->kind != S_OBJECT || o->n == 0 || !(o->required & 1))
            return NO_NODE;
        const sc_ref_t *p0 = &s->ref[o->first], *q0 = &s->ref[s->node[branch[0]].first];
        const sc_node_t *v = &s->node[p0->node];
        if (v->kind != S_LITS || p0->len != q0->len ||
            memcmp(s->text + p0->off, s->text + q0->off, p0->len) != 0 || n_lits + v->n > MAX_LITS)
            return NO_NODE;
        for (int k = 0; k < v->n; k++) {
            sc_ref_t l = s->ref[v->first + (uint32_t)k];
            for (int m = 0; m < n_lits; m++)
                if (lits[m].len == l.len &&
                    memcmp(s->text + lits[m].off, s->text + l.off, l.len) == 0)
                    return NO_NODE;
            l.node = branch[b];
            lits[n_lits++] = l;
        }
        deepest = FY_MAX(deepest, o->depth);
    }
    uint32_t lit_node = new_lits(c, lits, (uint32_t)n_lits);
    if (lit_node == NO_NODE)
        return NO_NODE;
    sc_ref_t p = s->ref[s->node[branch[0]].first];
    p.node = lit_node;
    uint32_t id = new_node_refs(c, S_UNION, &p, 1);
    if (id == NO_NODE)
        return NO_NODE;
    s->node[id].required = 1;
    s->node[id].depth = deepest;
    set_bit(s->node[id].start, '{');
    return id;
}

/* One of branch[n]: by the first byte when no two branches start alike, else a union. */
static uint32_t compile_choice(sc_compiler_t *c, const uint32_t *branch, int n, const char *what)
{
    mdl_schema_t *s = c->s;
    if (n == 1)
        return branch[0];
    uint8_t seen[32] = {0};
    bool disjoint = true;
    uint8_t deepest = 0;
    for (int b = 0; b < n; b++) {
        const sc_node_t *o = &s->node[branch[b]];
        for (int k = 0; k < 32; k++) {
            disjoint &= (seen[k] & o->start[k]) == 0;
            seen[k] |= o->start[k];
        }
        deepest = FY_MAX(deepest, o->depth);
    }
    if (!disjoint) {
        uint32_t u = compile_union(c, branch, n);
        if (u == NO_NODE)
            return fail(c,
                        "%s: branches must start differently (different types) or be objects "
                        "told apart by a first required property of distinct const values",
                        what);
        return u;
    }
    sc_ref_t r[MAX_LITS];
    for (int b = 0; b < n; b++)
        r[b] = (sc_ref_t){0, 0, branch[b]};
    uint32_t id = new_node_refs(c, S_CHOICE, r, (uint32_t)n);
    if (id == NO_NODE)
        return NO_NODE;
    s->node[id].depth = deepest;
    memcpy(s->node[id].start, seen, 32);
    return id;
}

static const char *const k_annotations[] = {
    "title",       "description",     "default",          "examples",      "$schema",   "$id",
    "$comment",    "format",          "deprecated",       "readOnly",      "writeOnly", "$defs",
    "definitions", "contentEncoding", "contentMediaType", "discriminator",
};

static const char *const k_handled[] = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
};

static bool in_list(const char *s, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(s, list[i]) == 0)
            return true;
    return false;
}

/* The schema a local $ref points to, or NULL. */
static const cJSON *resolve(sc_compiler_t *c, const char *ref)
{
    const char *name = NULL;
    const cJSON *defs = NULL;
    if (strncmp(ref, "#/$defs/", 8) == 0) {
        defs = cJSON_GetObjectItemCaseSensitive(c->doc, "$defs");
        name = ref + 8;
    } else if (strncmp(ref, "#/definitions/", 14) == 0) {
        defs = cJSON_GetObjectItemCaseSensitive(c->doc, "definitions");
        name = ref + 14;
    }
    if (defs == NULL || strchr(name, '/') != NULL || strchr(name, '~') != NULL)
        return NULL;
    return cJSON_GetObjectItemCaseSensitive(defs, name);
}

/* Branches of anyOf / oneOf / a type list. */
static uint32_t compile_branches(sc_compiler_t *c, const cJSON *list, const cJSON *j, int depth,
                                 const char *what)
{
    int n = cJSON_GetArraySize(list);
    if (n < 1 || n > MAX_LITS)
        return fail(c, "%s: between 1 and 64 branches", what);
    uint32_t branch[MAX_LITS];
    int i = 0;
    const cJSON *b;
    cJSON_ArrayForEach(b, list)
    {
        if (j != NULL) { // a type list: each type with j's other keywords
            if (!cJSON_IsString(b))
                return fail(c, "%s: must be a type name or a list of them", "type");
            branch[i] = compile_type(c, j, b->valuestring, depth);
        } else {
            branch[i] = compile(c, b, depth);
        }
        if (branch[i++] == NO_NODE)
            return NO_NODE;
    }
    return compile_choice(c, branch, n, what);
}

static uint32_t compile(sc_compiler_t *c, const cJSON *j, int depth)
{
    if (depth > MDL_SCHEMA_MAX_DEPTH)
        return fail(c, "%s", "schema nested too deep (more than 32 levels)");
    if (j == NULL || cJSON_IsTrue(j)) { // anything
        uint32_t id = new_node(c, S_ANY);
        if (id != NO_NODE) {
            c->s->node[id].any = 0x3f;
            start_kinds(c->s->node[id].start, 0x3f);
        }
        return id;
    }
    if (cJSON_IsFalse(j))
        return fail(c, "%s", "a schema of false allows nothing");
    if (!cJSON_IsObject(j))
        return fail(c, "%s", "a schema must be an object or a boolean");
    const cJSON *k;
    cJSON_ArrayForEach(k, j)
    {
        if (!in_list(k->string, k_annotations, FY_ARRAY_SIZE(k_annotations)) &&
            !in_list(k->string, k_handled, FY_ARRAY_SIZE(k_handled)))
            return fail(c, "the keyword \"%s\" is not supported", k->string);
    }
    const cJSON *v;
    if ((v = cJSON_GetObjectItemCaseSensitive(j, "$ref")) != NULL) {
        if (!cJSON_IsString(v))
            return fail(c, "%s: must be a string", "$ref");
        const cJSON *target = resolve(c, v->valuestring);
        if (target == NULL)
            return fail(c, "$ref: \"%s\" (only #/$defs/NAME and #/definitions/NAME)",
                        v->valuestring);
        if (++c->hops > MAX_REF_HOPS)
            return fail(c, "$ref: \"%s\" nests too deep (a recursive schema?)", v->valuestring);
        uint32_t id = compile(c, target, depth);
        c->hops--;
        return id;
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(j, "const")) != NULL)
        return compile_lits(c, &v, 1, "const");
    if ((v = cJSON_GetObjectItemCaseSensitive(j, "enum")) != NULL) {
        if (!cJSON_IsArray(v))
            return fail(c, "%s: must be an array", "enum");
        const cJSON *vals[MAX_LITS];
        int n = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (n == MAX_LITS)
                return fail(c, "%s: between 1 and 64 values", "enum");
            vals[n++] = e;
        }
        return compile_lits(c, vals, n, "enum");
    }
    const char *combo = cJSON_HasObjectItem(j, "anyOf")   ? "anyOf"
                        : cJSON_HasObjectItem(j, "oneOf") ? "oneOf"
                        : cJSON_HasObjectItem(j, "allOf") ? "allOf"
                                                          : NULL;
    if (combo != NULL) {
        v = cJSON_GetObjectItemCaseSensitive(j, combo);
        if (!cJSON_IsArray(v))
            return fail(c, "%s: must be an array of schemas", combo);
        if (combo[1] == 'l') { // allOf: of one schema only (as generators wrap a $ref)
            if (cJSON_GetArraySize(v) != 1)
                return fail(c, "%s: only of one schema", "allOf");
            return compile(c, cJSON_GetArrayItem(v, 0), depth);
        }
        return compile_branches(c, v, NULL, depth, combo);
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(j, "type")) != NULL) {
        if (cJSON_IsString(v))
            return compile_type(c, j, v->valuestring, depth);
        if (cJSON_IsArray(v))
            return compile_branches(c, v, j, depth, "type");
        return fail(c, "%s: must be a type name or a list of them", "type");
    }
    // No type: the keywords say which.
    if (has_bounds(j))
        return fail(c, "%s", "minimum and maximum: give \"type\": \"integer\"");
    if (cJSON_HasObjectItem(j, "properties") || cJSON_HasObjectItem(j, "required") ||
        cJSON_HasObjectItem(j, "additionalProperties"))
        return compile_object(c, j, depth);
    if (cJSON_HasObjectItem(j, "items") || cJSON_HasObjectItem(j, "minItems") ||
        cJSON_HasObjectItem(j, "maxItems"))
        return compile_array(c, j, depth);
    if (cJSON_HasObjectItem(j, "minLength") || cJSON_HasObjectItem(j, "maxLength"))
        return compile_type(c, j, "string", depth);
    return compile(c, NULL, depth);
}

fy_status_t mdl_schema_compile(const char *text, size_t len, mdl_schema_t **s_p, char *err,
                               size_t err_len)
{
    char dummy[8];
    if (err == NULL || err_len == 0) {
        err = dummy;
        err_len = sizeof(dummy);
    }
    err[0] = '\0';
    if (text == NULL || len == 0 || len > MDL_SCHEMA_MAX_TEXT) {
        snprintf(err, err_len, "schema: between 1 and %d bytes of JSON", MDL_SCHEMA_MAX_TEXT);
        return FY_ERR_INVALID_ARG;
    }
    cJSON *doc = cJSON_ParseWithLength(text, len);
    if (doc == NULL) {
        snprintf(err, err_len, "schema: not valid JSON");
        return FY_ERR_INVALID_ARG;
    }
    mdl_schema_t *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        cJSON_Delete(doc);
        return FY_ERR_NO_MEMORY;
    }
    sc_compiler_t c = {.s = s, .doc = doc, .err = err, .err_len = err_len};
    s->root = compile(&c, doc, 1);
    cJSON_Delete(doc);
    if (s->root != NO_NODE) {
        const sc_node_t *r = &s->node[s->root];
        bool container = true;
        for (int b = 0; b < 256; b++)
            container &= !has_bit(r->start, (uint8_t)b) || b == '{' || b == '[';
        if (r->kind == S_ANY) { // a free document: an object or an array
            s->node[s->root].any = K_OBJECT | K_ARRAY;
            memset(s->node[s->root].start, 0, 32);
            start_kinds(s->node[s->root].start, K_OBJECT | K_ARRAY);
        } else if (!container || r->kind == S_LITS)
            fail(&c, "%s", "schema: the top level must be an object or an array");
        else if (r->depth > MDL_SCHEMA_MAX_DEPTH)
            fail(&c, "%s", "schema nested too deep (more than 32 levels)");
    }
    if (err[0] != '\0') {
        mdl_schema_destroy(s);
        return strstr(err, "out of memory") != NULL ? FY_ERR_NO_MEMORY : FY_ERR_INVALID_ARG;
    }
    *s_p = s;
    return FY_OK;
}

void mdl_schema_destroy(mdl_schema_t *s)
{
    if (s == NULL)
        return;
    free(s->node);
    free(s->ref);
    free(s->text);
    free(s);
}

/* ---- Recognizing ----------------------------------------------------------------------------- */

enum {
    P_OBJ_OPEN,  // '{'
    P_OBJ_FIRST, // after '{': a key or '}'
    P_OBJ_KEYQ,  // after ',': a key's quote
    P_OBJ_KEY,   // in a declared property's name (cand, lit_pos)
    P_OBJ_FKEY,  // in a map's key (str)
    P_OBJ_COLON, // after the key
    P_OBJ_VALUE, // its value is open above
    P_OBJ_AFTER, // ',' or '}'
    P_ARR_OPEN,  // '['
    P_ARR_FIRST, // after '[': an item or ']'
    P_ARR_NEXT,  // after ',': an item
    P_ARR_VALUE, // an item is open above
    P_ARR_AFTER, // ',' or ']'
    P_STR_OPEN,  // '"'
    P_STR_IN,    // inside (str, chars)
    P_NUM,       // a number (num)
    P_LIT,       // a literal (cand, lit_pos; lit_pos 0: not begun)
    P_ANY_OPEN,  // a free value, not begun
    P_ANY_IN,    // inside it (any)
    P_CHOICE,    // a choice, before its first byte
};

enum { N_START, N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP };

typedef enum { R_FAIL, R_OK, R_AGAIN } sc_result_t;

static uint8_t start_phase(const sc_node_t *n)
{
    switch (n->kind) {
    case S_OBJECT:
    case S_UNION:
        return P_OBJ_OPEN;
    case S_ARRAY:
        return P_ARR_OPEN;
    case S_STRING:
        return P_STR_OPEN;
    case S_NUMBER:
    case S_INTEGER:
        return P_NUM;
    case S_LITS:
        return P_LIT;
    case S_ANY:
        return P_ANY_OPEN;
    default:
        return P_CHOICE;
    }
}

/* Opens a value of node id on top of the stack. */
static bool push(const mdl_schema_t *s, mdl_schema_state_t *st, uint32_t id)
{
    if (st->depth >= MDL_SCHEMA_MAX_DEPTH)
        return false;
    mdl_schema_frame_t *f = &st->frame[st->depth++];
    f->node = (uint16_t)id;
    f->phase = start_phase(&s->node[id]);
    f->prop = 0;
    f->count = 0;
    st->str = 0;
    st->num = N_START;
    st->lit_pos = 0;
    st->chars = 0;
    return true;
}

/* The top value is complete: its parent goes on. */
static void value_done(const mdl_schema_t *s, mdl_schema_state_t *st)
{
    if (--st->depth == 0) {
        st->done = 1;
        return;
    }
    mdl_schema_frame_t *p = &st->frame[st->depth - 1];
    if (p->phase == P_OBJ_VALUE) {
        if (s->node[p->node].kind == S_UNION) { // the first property picked the branch
            p->node = (uint16_t)s->ref[st->lit_done].node;
            p->prop = 1;
        }
        p->phase = P_OBJ_AFTER;
    } else { // P_ARR_VALUE
        p->count++;
        p->phase = P_ARR_AFTER;
    }
}

/* Properties the next key may name: from prop on, up to the first required one. */
static uint64_t key_candidates(const sc_node_t *n, unsigned prop)
{
    uint64_t cand = 0;
    for (unsigned i = prop; i < n->n; i++) {
        cand |= 1ull << i;
        if ((n->required >> i) & 1)
            break;
    }
    return cand;
}

static bool required_left(const sc_node_t *n, unsigned prop)
{
    return prop < 64 && (n->required >> prop) != 0;
}

/* A string byte: 0 refused, 1 taken, 2 the closing quote. chars counts characters (an
 * escape is one), within max; the close needs min. */
static int string_byte(mdl_schema_state_t *st, uint8_t c, uint32_t min, uint32_t max)
{
    if (st->str == 0) {
        if (c == '"')
            return st->chars >= min ? 2 : 0;
        if (c < 0x20)
            return 0;
        if ((c & 0xc0) != 0x80) { // a character starts (not a UTF-8 continuation byte)
            if (st->chars >= max)
                return 0;
            st->chars++;
        }
        if (c == '\\')
            st->str = 1;
        return 1;
    }
    if (st->str == 1) {
        if (c == 'u') {
            st->str = 2;
            return 1;
        }
        st->str = 0;
        return c != 0 && strchr("\"\\/bfnrt", c) != NULL;
    }
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
        return 0;
    st->str = st->str == 5 ? 0 : (uint8_t)(st->str + 1);
    return 1;
}

/* A number byte; R_AGAIN when c ends the number. Like llama.cpp's grammars from schemas, at
 * most MAX_DIGITS digits before the point and after it, MAX_EXP_DIGITS in the exponent:
 * a small model could otherwise write digits until max_tokens. st->chars counts the digits of
 * the part being read. */
#define MAX_DIGITS     16
#define MAX_EXP_DIGITS 3

/* Whether an integer that starts with these digits (mag, digits of them; a leading zero ends
 * it) and sign can still land in lo..hi: some value with up to MAX_DIGITS digits does. */
static bool int_viable(const sc_node_t *n, bool neg, int64_t mag, uint32_t digits)
{
    if (digits == 0) // "-" alone: any value <= 0 may follow
        return n->lo <= 0;
    int64_t scale = 1; // 10^j: the values mag * 10^j .. mag * 10^j + 10^j - 1
    for (uint32_t j = 0; digits + j <= MAX_DIGITS; j++, scale *= 10) {
        const int64_t a = mag * scale, b = a + scale - 1;
        const int64_t lo = neg ? -b : a, hi = neg ? -a : b;
        if (lo <= n->hi && hi >= n->lo)
            return true;
        if (mag == 0 || a > (int64_t)MAX_BOUND) // no more digits, or past every bound
            break;
    }
    return false;
}

static sc_result_t number_byte(const mdl_schema_t *s, mdl_schema_state_t *st, uint8_t c,
                               const sc_node_t *n)
{
    const bool digit = c >= '0' && c <= '9', integer = n->kind == S_INTEGER;
    if (integer && n->bounded) {
        // Bounds: a digit only where some value in range can still come of it, and the end
        // only at a value in range.
        const bool neg = st->num == N_MINUS || (st->num != N_START && st->neg);
        if (st->num == N_START && c == '-') {
            st->neg = 1;
            st->mag = 0;
            if (!int_viable(n, true, 0, 0))
                return R_FAIL;
        } else if (digit && (st->num == N_START || st->num == N_MINUS || st->num == N_INT)) {
            if (st->num == N_START)
                st->neg = 0;
            const int64_t mag = (st->num == N_INT ? st->mag * 10 : 0) + (c - '0');
            const uint32_t digits = st->num == N_INT ? st->chars + 1 : 1;
            if (digits > MAX_DIGITS || !int_viable(n, neg, mag, digits))
                return R_FAIL;
            st->mag = mag;
        } else if (!digit && (st->num == N_INT || st->num == N_ZERO)) {
            const int64_t v = neg ? -st->mag : st->mag;
            if (v < n->lo || v > n->hi)
                return R_FAIL; // the value so far is out of range: it may not end here
        }
    }
    switch (st->num) {
    case N_START:
        st->num = c == '-' ? N_MINUS : c == '0' ? N_ZERO : digit ? N_INT : N_START;
        st->chars = digit;
        return st->num != N_START ? R_OK : R_FAIL;
    case N_MINUS:
        st->num = c == '0' ? N_ZERO : digit ? N_INT : N_MINUS;
        st->chars = 1;
        return st->num != N_MINUS ? R_OK : R_FAIL;
    case N_INT:
        if (digit)
            return ++st->chars <= MAX_DIGITS ? R_OK : R_FAIL;
        // fall through
    case N_ZERO:
        if (!integer && c == '.') {
            st->num = N_DOT;
            st->chars = 0;
            return R_OK;
        }
        if (!integer && (c == 'e' || c == 'E')) {
            st->num = N_E;
            st->chars = 0;
            return R_OK;
        }
        break;
    case N_DOT:
        if (!digit)
            return R_FAIL;
        st->num = N_FRAC;
        st->chars = 1;
        return R_OK;
    case N_FRAC:
        if (digit)
            return ++st->chars <= MAX_DIGITS ? R_OK : R_FAIL;
        if (c == 'e' || c == 'E') {
            st->num = N_E;
            st->chars = 0;
            return R_OK;
        }
        break;
    case N_E:
        if (c == '+' || c == '-') {
            st->num = N_ESIGN;
            return R_OK;
        }
        // fall through
    case N_ESIGN:
        if (!digit)
            return R_FAIL;
        st->num = N_EXP;
        st->chars = 1;
        return R_OK;
    default: // N_EXP
        if (digit)
            return ++st->chars <= MAX_EXP_DIGITS ? R_OK : R_FAIL;
        break;
    }
    if (digit) // a digit after a leading zero
        return R_FAIL;
    value_done(s, st);
    return R_AGAIN;
}

/* One byte c against the texts refs[first + i] still matching (bits of st->cand, lit_pos
 * bytes matched): the candidates c continues; *whole_p the first that ended before c, or 0. */
static uint64_t cand_step(const mdl_schema_t *s, uint32_t first, const mdl_schema_state_t *st,
                          uint8_t c, uint64_t *whole_p)
{
    uint64_t next = 0, whole = 0;
    for (uint64_t m = st->cand; m != 0; m &= m - 1) {
        const unsigned i = (unsigned)__builtin_ctzll(m);
        const sc_ref_t *r = &s->ref[first + i];
        if (r->len > st->lit_pos && (uint8_t)s->text[r->off + st->lit_pos] == c)
            next |= 1ull << i;
        else if (r->len == st->lit_pos && whole == 0)
            whole = 1ull << i;
    }
    *whole_p = whole;
    return next;
}

static sc_result_t literal_byte(const mdl_schema_t *s, mdl_schema_state_t *st, const sc_node_t *n,
                                uint8_t c)
{
    if (st->lit_pos == 0)
        st->cand = n->n == 64 ? ~0ull : (1ull << n->n) - 1;
    uint64_t whole;
    const uint64_t next = cand_step(s, n->first, st, c, &whole);
    if (next != 0) {
        st->cand = next;
        st->lit_pos++;
        return R_OK;
    }
    if (whole == 0)
        return R_FAIL;
    st->lit_done = (uint16_t)(n->first + (uint32_t)__builtin_ctzll(whole));
    value_done(s, st);
    return R_AGAIN;
}

/* White space between tokens, as llama.cpp's grammars from schemas allow it: one space, or a
 * line break and up to MAX_INDENT spaces or tabs; so a small model cannot wander off into
 * blank lines. st->ws: 0 none yet, 1 the space, 2 + k a break and k indent bytes. */
#define MAX_INDENT 20

static bool ws_between(mdl_schema_state_t *st, uint8_t c)
{
    if (st->ws == 0 && (c == ' ' || c == '\n')) {
        st->ws = c == ' ' ? 1 : 2;
        return true;
    }
    if (st->ws >= 2 && st->ws < 2 + MAX_INDENT && (c == ' ' || c == '\t')) {
        st->ws++;
        return true;
    }
    return false;
}

static sc_result_t step_object(const mdl_schema_t *s, mdl_schema_state_t *st, mdl_schema_frame_t *f,
                               const sc_node_t *n, uint8_t c, bool ws)
{
    switch (f->phase) {
    case P_OBJ_OPEN:
    case P_OBJ_FIRST:
    case P_OBJ_KEYQ:
    case P_OBJ_COLON:
    case P_OBJ_AFTER:
        if (ws)
            return ws_between(st, c) ? R_OK : R_FAIL;
        st->ws = 0;
        break;
    default:
        break;
    }
    switch (f->phase) {
    case P_OBJ_OPEN:
        f->phase = P_OBJ_FIRST;
        return c == '{' ? R_OK : R_FAIL;
    case P_OBJ_FIRST:
    case P_OBJ_KEYQ:
        if (c == '}' && f->phase == P_OBJ_FIRST) {
            if (required_left(n, f->prop))
                return R_FAIL;
            value_done(s, st);
            return R_OK;
        }
        if (c != '"')
            return R_FAIL;
        if (n->n > 0) {
            st->cand = key_candidates(n, f->prop);
            st->lit_pos = 0;
            f->phase = P_OBJ_KEY;
            return st->cand != 0 ? R_OK : R_FAIL;
        }
        if (n->child == NO_NODE) // {} only
            return R_FAIL;
        st->str = 0;
        st->chars = 0;
        f->phase = P_OBJ_FKEY;
        return R_OK;
    case P_OBJ_KEY: { // names hold no quote: a quote ends the one matched whole, if any
        uint64_t whole;
        const uint64_t next = cand_step(s, n->first, st, c, &whole);
        if (c == '"' && whole != 0) {
            f->prop = (uint8_t)(__builtin_ctzll(whole) + 1);
            f->phase = P_OBJ_COLON;
            return R_OK;
        }
        st->cand = next;
        st->lit_pos++;
        return next != 0 ? R_OK : R_FAIL;
    }
    case P_OBJ_FKEY: {
        int r = string_byte(st, c, 0, NO_LIMIT);
        if (r == 2)
            f->phase = P_OBJ_COLON;
        return r ? R_OK : R_FAIL;
    }
    case P_OBJ_COLON:
        if (c != ':')
            return R_FAIL;
        f->phase = P_OBJ_VALUE;
        return push(s, st, n->n > 0 ? s->ref[n->first + f->prop - 1u].node : n->child) ? R_OK
                                                                                       : R_FAIL;
    case P_OBJ_AFTER:
        if (c == ',') {
            f->phase = P_OBJ_KEYQ;
            return n->n == 0 || key_candidates(n, f->prop) != 0 ? R_OK : R_FAIL;
        }
        if (c != '}' || required_left(n, f->prop))
            return R_FAIL;
        value_done(s, st);
        return R_OK;
    default: // P_OBJ_VALUE: the value above takes the bytes
        return R_FAIL;
    }
}

static sc_result_t step_array(const mdl_schema_t *s, mdl_schema_state_t *st, mdl_schema_frame_t *f,
                              const sc_node_t *n, uint8_t c, bool ws)
{
    if (ws)
        return ws_between(st, c) ? R_OK : R_FAIL;
    st->ws = 0;
    switch (f->phase) {
    case P_ARR_OPEN:
        f->phase = P_ARR_FIRST;
        return c == '[' ? R_OK : R_FAIL;
    case P_ARR_FIRST:
        if (c == ']') {
            if (n->min > 0)
                return R_FAIL;
            value_done(s, st);
            return R_OK;
        }
        if (n->max == 0)
            return R_FAIL;
        // fall through
    case P_ARR_NEXT:
        f->phase = P_ARR_VALUE;
        return push(s, st, n->child) ? R_AGAIN : R_FAIL;
    case P_ARR_AFTER:
        if (c == ',') {
            f->phase = P_ARR_NEXT;
            return f->count < n->max ? R_OK : R_FAIL;
        }
        if (c != ']' || f->count < n->min)
            return R_FAIL;
        value_done(s, st);
        return R_OK;
    default:
        return R_FAIL;
    }
}

static sc_result_t step_top(const mdl_schema_t *s, mdl_schema_state_t *st, uint8_t c)
{
    mdl_schema_frame_t *f = &st->frame[st->depth - 1];
    const sc_node_t *n = &s->node[f->node];
    const bool ws = c == ' ' || c == '\t' || c == '\n' || c == '\r';
    if (ws && st->depth == 1 &&
        (f->phase == P_OBJ_OPEN || f->phase == P_ARR_OPEN || f->phase == P_ANY_OPEN ||
         f->phase == P_CHOICE))
        return R_FAIL; // the document starts at once
    switch (f->phase) {
    case P_STR_OPEN:
        if (ws)
            return ws_between(st, c) ? R_OK : R_FAIL;
        st->ws = 0;
        f->phase = P_STR_IN;
        return c == '"' ? R_OK : R_FAIL;
    case P_STR_IN: {
        int r = string_byte(st, c, n->min, n->max);
        if (r == 2)
            value_done(s, st);
        return r ? R_OK : R_FAIL;
    }
    case P_NUM:
        if (st->num == N_START && ws)
            return ws_between(st, c) ? R_OK : R_FAIL;
        st->ws = 0;
        return number_byte(s, st, c, n);
    case P_LIT:
        if (st->lit_pos == 0 && ws)
            return ws_between(st, c) ? R_OK : R_FAIL;
        st->ws = 0;
        return literal_byte(s, st, n, c);
    case P_ANY_OPEN: {
        if (ws)
            return ws_between(st, c) ? R_OK : R_FAIL;
        st->ws = 0;
        if (!has_bit(n->start, c))
            return R_FAIL;
        mdl_json_init_value(&st->any);
        f->phase = P_ANY_IN;
        return R_AGAIN;
    }
    case P_ANY_IN:
        if (mdl_json_feed(&st->any, &c, 1)) {
            if (mdl_json_complete(&st->any))
                value_done(s, st);
            return R_OK;
        }
        if (!mdl_json_number_open(&st->any))
            return R_FAIL;
        value_done(s, st);
        return R_AGAIN;
    case P_CHOICE:
        if (ws)
            return ws_between(st, c) ? R_OK : R_FAIL;
        for (unsigned i = 0; i < n->n; i++) {
            const uint32_t b = s->ref[n->first + i].node;
            if (has_bit(s->node[b].start, c)) {
                f->node = (uint16_t)b;
                f->phase = start_phase(&s->node[b]);
                return R_AGAIN;
            }
        }
        return R_FAIL;
    default:
        if (f->phase <= P_OBJ_AFTER)
            return step_object(s, st, f, n, c, ws);
        return step_array(s, st, f, n, c, ws);
    }
}

static bool step(const mdl_schema_t *s, mdl_schema_state_t *st, uint8_t c)
{
    for (;;) {
        if (st->done)
            return false;
        sc_result_t r = step_top(s, st, c);
        if (r != R_AGAIN)
            return r == R_OK;
    }
}

/* Copies what is in use of a state. */
static void copy_state(mdl_schema_state_t *dst, const mdl_schema_state_t *src)
{
    memcpy(dst, src, offsetof(mdl_schema_state_t, frame) + src->depth * sizeof(src->frame[0]));
}

void mdl_schema_start(const mdl_schema_t *s, mdl_schema_state_t *st)
{
    memset(st, 0, offsetof(mdl_schema_state_t, frame));
    push(s, st, s->root);
}

bool mdl_schema_complete(const mdl_schema_state_t *st)
{
    return st->done;
}

bool mdl_schema_feed(const mdl_schema_t *s, mdl_schema_state_t *st, const uint8_t *bytes, size_t n)
{
    mdl_schema_state_t t;
    copy_state(&t, st);
    for (size_t i = 0; i < n; i++)
        if (!step(s, &t, bytes[i]))
            return false;
    copy_state(st, &t);
    return true;
}

bool mdl_schema_accept(const mdl_schema_t *s, const mdl_json_vocab_t *v, mdl_schema_state_t *st,
                       int32_t token)
{
    if (token < 0 || token >= v->n_vocab || v->len[token] == 0)
        return false;
    return mdl_schema_feed(s, st, v->text + v->off[token], v->len[token]);
}

/* The bytes that can follow byte b (which can come first) from st: second[b], worked out on
 * first use (have[b]). */
static const uint8_t *second_bytes(const mdl_schema_t *s, const mdl_schema_state_t *st, uint8_t b,
                                   bool *have, uint8_t (*second)[32])
{
    if (!have[b]) {
        mdl_schema_state_t t, u;
        copy_state(&t, st);
        step(s, &t, b);
        memset(second[b], 0, 32);
        for (int c = 0; c < 256; c++) {
            copy_state(&u, &t);
            if (step(s, &u, (uint8_t)c))
                set_bit(second[b], (uint8_t)c);
        }
        have[b] = true;
    }
    return second[b];
}

int mdl_schema_mask(const mdl_schema_t *s, const mdl_json_vocab_t *v, const mdl_schema_state_t *st,
                    const int32_t *stops, int n_stops, float *logits)
{
    if (st->done) // the document is whole: only a stop token may follow
        return mdl_json_mask_stops(v, stops, n_stops, logits);
    int allowed = 0;
    // Most tokens fail on their first or second byte: which bytes can come first, and (when
    // a token first needs it) which can follow each of those.
    bool first[256], have_second[256] = {false};
    uint8_t second[256][32];
    for (int b = 0; b < 256; b++) {
        mdl_schema_state_t t;
        copy_state(&t, st);
        first[b] = step(s, &t, (uint8_t)b);
    }
    // Inside a string, a token without quote, backslash or control byte only extends it, by
    // its characters.
    const mdl_schema_frame_t *top = &st->frame[st->depth - 1];
    const bool in_string = top->phase == P_STR_IN && st->str == 0;
    const uint32_t room = in_string ? s->node[top->node].max - st->chars : 0;
    mdl_schema_state_t t;
    for (int tok = 0; tok < v->n_vocab; tok++) {
        const uint32_t n = v->len[tok];
        const uint8_t *b = v->text + v->off[tok];
        bool ok;
        if (in_string && v->plain[tok])
            ok = v->chars[tok] <= room;
        else if (n == 0 || !first[b[0]])
            ok = false;
        else if (n > 1 && !has_bit(second_bytes(s, st, b[0], have_second, second), b[1]))
            ok = false;
        else if (n <= 2)
            ok = true;
        else {
            copy_state(&t, st);
            ok = true;
            for (uint32_t i = 0; i < n && ok; i++)
                ok = step(s, &t, b[i]);
        }
        if (ok)
            allowed++;
        else
            logits[tok] = -INFINITY;
    }
    return allowed;
}
