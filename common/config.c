/*
 * config.c: options for daemons and commands. Precedence: the table's defaults, then a YAML
 * config file (--config FILE), then command-line flags. Values are kept as text and parsed on
 * validation and by the typed getters, so an error message can always quote what the user
 * wrote and where.
 */
#include "common.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

typedef struct {
    char *value;    // NULL = unset
    bool set;       // given by a file or a flag
    char origin[96]; // "flag", "file.yaml:12"
} fy_opt_value_t;

struct fy_config {
    const fy_opt_t *opts;
    size_t n_opts;
    fy_opt_value_t *values; // [n_opts]
    char **positional;
    size_t n_positional;
    bool help;
};

// Option names match with '-' and '_' treated as the same character.
static bool name_eq(const char *a, const char *b, size_t b_len)
{
    size_t i = 0;
    for (; a[i] != '\0' && i < b_len; i++) {
        char x = a[i] == '_' ? '-' : a[i];
        char y = b[i] == '_' ? '-' : b[i];
        if (x != y)
            return false;
    }
    return a[i] == '\0' && i == b_len;
}

static ssize_t opt_find(const fy_config_t *cfg, const char *name, size_t len)
{
    for (size_t i = 0; i < cfg->n_opts; i++)
        if (name_eq(cfg->opts[i].name, name, len))
            return (ssize_t)i;
    return -1;
}

fy_status_t fy_parse_bool(const char *s, bool *b_p)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    static const char *const no[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *b_p = true;
            return FY_OK;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *b_p = false;
            return FY_OK;
        }
    }
    return FY_ERR_INVALID_ARG;
}

// Parses a non-negative decimal with an optional fraction and returns the rest in *end_p.
static fy_status_t parse_number(const char *s, double *v_p, const char **end_p)
{
    while (*s == ' ')
        s++;
    if (*s == '-' || *s == '\0')
        return FY_ERR_INVALID_ARG;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !isfinite(v) || v < 0)
        return FY_ERR_INVALID_ARG;
    while (*end == ' ')
        end++;
    *v_p = v;
    *end_p = end;
    return FY_OK;
}

fy_status_t fy_parse_size(const char *s, uint64_t *bytes_p)
{
    double v;
    const char *unit;
    if (parse_number(s, &v, &unit) != FY_OK)
        return FY_ERR_INVALID_ARG;
    static const struct {
        const char *suffix;
        double mult;
    } units[] = {
        {"", 1},        {"b", 1},          {"k", 1024.0},         {"kib", 1024.0},
        {"kb", 1e3},    {"m", 1048576.0},  {"mib", 1048576.0},    {"mb", 1e6},
        {"g", 1073741824.0}, {"gib", 1073741824.0}, {"gb", 1e9},  {"t", 1099511627776.0},
        {"tib", 1099511627776.0}, {"tb", 1e12},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(units); i++) {
        if (strcasecmp(unit, units[i].suffix) == 0) {
            double b = v * units[i].mult;
            if (b >= 18446744073709551615.0)
                return FY_ERR_OUT_OF_RANGE;
            *bytes_p = (uint64_t)llround(b);
            return FY_OK;
        }
    }
    return FY_ERR_INVALID_ARG;
}

fy_status_t fy_parse_duration_ms(const char *s, uint64_t *ms_p)
{
    double v;
    const char *unit;
    if (parse_number(s, &v, &unit) != FY_OK)
        return FY_ERR_INVALID_ARG;
    double mult;
    if (*unit == '\0' || strcasecmp(unit, "ms") == 0)
        mult = 1;
    else if (strcasecmp(unit, "s") == 0)
        mult = 1e3;
    else if (strcasecmp(unit, "m") == 0 || strcasecmp(unit, "min") == 0)
        mult = 60e3;
    else if (strcasecmp(unit, "h") == 0)
        mult = 3600e3;
    else if (strcasecmp(unit, "us") == 0)
        mult = 1e-3;
    else
        return FY_ERR_INVALID_ARG;
    double ms = v * mult;
    if (ms >= 9.2e18)
        return FY_ERR_OUT_OF_RANGE;
    *ms_p = (uint64_t)llround(ms);
    return FY_OK;
}

static fy_status_t parse_int(const char *s, int64_t *v_p)
{
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 0);
    if (end == s || *end != '\0' || errno != 0)
        return FY_ERR_INVALID_ARG;
    *v_p = v;
    return FY_OK;
}

static fy_status_t parse_double(const char *s, double *v_p)
{
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0 || !isfinite(v))
        return FY_ERR_INVALID_ARG;
    *v_p = v;
    return FY_OK;
}

// Checks that text is a valid value for the option's type.
static fy_status_t value_check(const fy_opt_t *opt, const char *text)
{
    union {
        int64_t i;
        uint64_t u;
        double d;
        bool b;
    } v;
    switch (opt->type) {
    case FY_OPT_STRING:
        return FY_OK;
    case FY_OPT_INT:
        return parse_int(text, &v.i);
    case FY_OPT_SIZE:
        return fy_parse_size(text, &v.u);
    case FY_OPT_DOUBLE:
        return parse_double(text, &v.d);
    case FY_OPT_BOOL:
        return fy_parse_bool(text, &v.b);
    case FY_OPT_DURATION:
        return fy_parse_duration_ms(text, &v.u);
    }
    return FY_ERR_INVALID_ARG;
}

static const char *type_name(fy_opt_type_t t)
{
    static const char *const names[] = {"string", "integer", "size", "number", "bool",
                                        "duration"};
    return (unsigned)t < FY_ARRAY_SIZE(names) ? names[t] : "?";
}

static fy_status_t value_store(fy_config_t *cfg, size_t idx, const char *text, const char *origin,
                               char *err, size_t err_len)
{
    const fy_opt_t *opt = &cfg->opts[idx];
    if (value_check(opt, text) != FY_OK) {
        snprintf(err, err_len, "%s: invalid %s for '%s': '%s'", origin, type_name(opt->type),
                 opt->name, text);
        return FY_ERR_INVALID_ARG;
    }
    char *copy = strdup(text);
    if (copy == NULL)
        return FY_ERR_NO_MEMORY;
    free(cfg->values[idx].value);
    cfg->values[idx].value = copy;
    cfg->values[idx].set = true;
    snprintf(cfg->values[idx].origin, sizeof(cfg->values[idx].origin), "%s", origin);
    return FY_OK;
}

fy_status_t fy_config_create(const fy_opt_t *opts, size_t n_opts, fy_config_t **cfg_p)
{
    if (opts == NULL && n_opts > 0)
        return FY_ERR_INVALID_ARG;
    fy_config_t *cfg = calloc(1, sizeof(*cfg));
    if (cfg == NULL)
        return FY_ERR_NO_MEMORY;
    cfg->opts = opts;
    cfg->n_opts = n_opts;
    cfg->values = calloc(n_opts ? n_opts : 1, sizeof(*cfg->values));
    if (cfg->values == NULL) {
        free(cfg);
        return FY_ERR_NO_MEMORY;
    }
    for (size_t i = 0; i < n_opts; i++) {
        if (opts[i].def == NULL)
            continue;
        cfg->values[i].value = strdup(opts[i].def);
        if (cfg->values[i].value == NULL) {
            fy_config_destroy(cfg);
            return FY_ERR_NO_MEMORY;
        }
        snprintf(cfg->values[i].origin, sizeof(cfg->values[i].origin), "default");
    }
    *cfg_p = cfg;
    return FY_OK;
}

void fy_config_destroy(fy_config_t *cfg)
{
    if (cfg == NULL)
        return;
    for (size_t i = 0; i < cfg->n_opts && cfg->values != NULL; i++)
        free(cfg->values[i].value);
    free(cfg->values);
    for (size_t i = 0; i < cfg->n_positional; i++)
        free(cfg->positional[i]);
    free(cfg->positional);
    free(cfg);
}

fy_status_t fy_config_set(fy_config_t *cfg, const char *name, const char *value, char *err,
                          size_t err_len)
{
    ssize_t idx = opt_find(cfg, name, strlen(name));
    if (idx < 0) {
        snprintf(err, err_len, "unknown option '%s'", name);
        return FY_ERR_NOT_FOUND;
    }
    return value_store(cfg, (size_t)idx, value, "flag", err, err_len);
}

// Walks one YAML mapping, with `prefix` the dotted path of the enclosing keys.
static fy_status_t yaml_mapping(fy_config_t *cfg, yaml_document_t *doc, yaml_node_t *map,
                                const char *prefix, const char *path, char *err, size_t err_len)
{
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(doc, p->key);
        yaml_node_t *v = yaml_document_get_node(doc, p->value);
        if (k == NULL || v == NULL || k->type != YAML_SCALAR_NODE) {
            snprintf(err, err_len, "%s: keys must be plain names", path);
            return FY_ERR_FORMAT;
        }
        char key[256];
        int kl = snprintf(key, sizeof(key), "%s%s%s", prefix, prefix[0] ? "." : "",
                          (const char *)k->data.scalar.value);
        if (kl < 0 || (size_t)kl >= sizeof(key)) {
            snprintf(err, err_len, "%s:%zu: key too long", path, k->start_mark.line + 1);
            return FY_ERR_FORMAT;
        }
        if (v->type == YAML_MAPPING_NODE) {
            fy_status_t st = yaml_mapping(cfg, doc, v, key, path, err, err_len);
            if (st != FY_OK)
                return st;
            continue;
        }
        if (v->type != YAML_SCALAR_NODE) {
            snprintf(err, err_len, "%s:%zu: '%s' must be a single value", path,
                     v->start_mark.line + 1, key);
            return FY_ERR_FORMAT;
        }
        ssize_t idx = opt_find(cfg, key, strlen(key));
        if (idx < 0) {
            snprintf(err, err_len, "%s:%zu: unknown option '%s'", path, k->start_mark.line + 1,
                     key);
            return FY_ERR_NOT_FOUND;
        }
        char origin[96];
        snprintf(origin, sizeof(origin), "%.80s:%zu", path, v->start_mark.line + 1);
        fy_status_t st = value_store(cfg, (size_t)idx, (const char *)v->data.scalar.value,
                                     origin, err, err_len);
        if (st != FY_OK)
            return st;
    }
    return FY_OK;
}

fy_status_t fy_config_load_file(fy_config_t *cfg, const char *path, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, err_len, "%s: %s", path, strerror(errno));
        return fy_status_from_errno(errno);
    }
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_file(&parser, f);
    fy_status_t st = FY_OK;
    if (!yaml_parser_load(&parser, &doc)) {
        snprintf(err, err_len, "%s:%zu: %s", path, parser.problem_mark.line + 1,
                 parser.problem ? parser.problem : "YAML syntax error");
        st = FY_ERR_FORMAT;
        goto out_parser;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root == NULL) {
        // An empty file sets nothing.
    } else if (root->type != YAML_MAPPING_NODE) {
        snprintf(err, err_len, "%s: expected a mapping of option names to values", path);
        st = FY_ERR_FORMAT;
    } else {
        st = yaml_mapping(cfg, &doc, root, "", path, err, err_len);
    }
    yaml_document_delete(&doc);
out_parser: // undo: the parser and the file
    yaml_parser_delete(&parser);
    fclose(f);
    return st;
}

static fy_status_t positional_add(fy_config_t *cfg, const char *arg)
{
    char **grown = realloc(cfg->positional, (cfg->n_positional + 1) * sizeof(char *));
    if (grown == NULL)
        return FY_ERR_NO_MEMORY;
    cfg->positional = grown;
    cfg->positional[cfg->n_positional] = strdup(arg);
    if (cfg->positional[cfg->n_positional] == NULL)
        return FY_ERR_NO_MEMORY;
    cfg->n_positional++;
    return FY_OK;
}

fy_status_t fy_config_parse_args(fy_config_t *cfg, int argc, char **argv, char *err,
                                 size_t err_len)
{
    // The config file goes first so that flags override it wherever they appear.
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0)
            break;
        const char *file = NULL;
        if (strcmp(a, "--config") == 0) {
            if (i + 1 >= argc) {
                snprintf(err, err_len, "--config needs a file name");
                return FY_ERR_INVALID_ARG;
            }
            file = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            file = a + 9;
        }
        if (file != NULL) {
            fy_status_t st = fy_config_load_file(cfg, file, err, err_len);
            if (st != FY_OK)
                return st;
        }
    }
    bool only_positional = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_positional || a[0] != '-' || strcmp(a, "-") == 0) {
            fy_status_t st = positional_add(cfg, a);
            if (st != FY_OK)
                return st;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_positional = true;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            cfg->help = true;
            continue;
        }
        if (strcmp(a, "--config") == 0) {
            i++;
            continue;
        }
        if (strncmp(a, "--config=", 9) == 0)
            continue;
        if (strncmp(a, "--", 2) != 0) {
            snprintf(err, err_len, "unknown option '%s' (options are --name or --name=value)", a);
            return FY_ERR_INVALID_ARG;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        ssize_t idx = opt_find(cfg, name, name_len);
        bool negated = false;
        if (idx < 0 && eq == NULL && strncmp(name, "no-", 3) == 0) {
            idx = opt_find(cfg, name + 3, name_len - 3);
            negated = idx >= 0 && cfg->opts[idx].type == FY_OPT_BOOL;
            if (!negated)
                idx = -1;
        }
        if (idx < 0) {
            snprintf(err, err_len, "unknown option '--%.*s'", (int)name_len, name);
            return FY_ERR_NOT_FOUND;
        }
        const char *value;
        if (eq != NULL) {
            value = eq + 1;
        } else if (cfg->opts[idx].type == FY_OPT_BOOL) {
            value = negated ? "false" : "true";
        } else {
            if (i + 1 >= argc) {
                snprintf(err, err_len, "option '--%s' needs a value", cfg->opts[idx].name);
                return FY_ERR_INVALID_ARG;
            }
            value = argv[++i];
        }
        fy_status_t st = value_store(cfg, (size_t)idx, value, "flag", err, err_len);
        if (st != FY_OK)
            return st;
    }
    return FY_OK;
}

fy_status_t fy_config_validate(const fy_config_t *cfg, char *err, size_t err_len)
{
    for (size_t i = 0; i < cfg->n_opts; i++) {
        if (cfg->opts[i].required && cfg->values[i].value == NULL) {
            snprintf(err, err_len, "option '--%s' is required", cfg->opts[i].name);
            return FY_ERR_INVALID_ARG;
        }
        if (cfg->values[i].value != NULL && value_check(&cfg->opts[i], cfg->values[i].value)) {
            snprintf(err, err_len, "%s: invalid %s for '%s': '%s'", cfg->values[i].origin,
                     type_name(cfg->opts[i].type), cfg->opts[i].name, cfg->values[i].value);
            return FY_ERR_INVALID_ARG;
        }
    }
    return FY_OK;
}

bool fy_config_help_requested(const fy_config_t *cfg)
{
    return cfg->help;
}

size_t fy_config_n_positional(const fy_config_t *cfg)
{
    return cfg->n_positional;
}

const char *fy_config_positional(const fy_config_t *cfg, size_t i)
{
    return i < cfg->n_positional ? cfg->positional[i] : NULL;
}

static const char *value_of(const fy_config_t *cfg, const char *name, fy_opt_type_t type)
{
    ssize_t idx = opt_find(cfg, name, strlen(name));
    if (idx < 0 || cfg->opts[idx].type != type) {
        fy_log(FY_LOG_ERROR, "config", "no %s option named '%s'", type_name(type), name);
        return NULL;
    }
    return cfg->values[idx].value;
}

const char *fy_config_str(const fy_config_t *cfg, const char *name)
{
    return value_of(cfg, name, FY_OPT_STRING);
}

int64_t fy_config_int(const fy_config_t *cfg, const char *name)
{
    const char *s = value_of(cfg, name, FY_OPT_INT);
    int64_t v = 0;
    if (s != NULL)
        parse_int(s, &v);
    return v;
}

uint64_t fy_config_size(const fy_config_t *cfg, const char *name)
{
    const char *s = value_of(cfg, name, FY_OPT_SIZE);
    uint64_t v = 0;
    if (s != NULL)
        fy_parse_size(s, &v);
    return v;
}

double fy_config_double(const fy_config_t *cfg, const char *name)
{
    const char *s = value_of(cfg, name, FY_OPT_DOUBLE);
    double v = 0;
    if (s != NULL)
        parse_double(s, &v);
    return v;
}

bool fy_config_bool(const fy_config_t *cfg, const char *name)
{
    const char *s = value_of(cfg, name, FY_OPT_BOOL);
    bool v = false;
    if (s != NULL)
        fy_parse_bool(s, &v);
    return v;
}

uint64_t fy_config_duration_ms(const fy_config_t *cfg, const char *name)
{
    const char *s = value_of(cfg, name, FY_OPT_DURATION);
    uint64_t v = 0;
    if (s != NULL)
        fy_parse_duration_ms(s, &v);
    return v;
}

bool fy_config_is_set(const fy_config_t *cfg, const char *name)
{
    ssize_t idx = opt_find(cfg, name, strlen(name));
    return idx >= 0 && cfg->values[idx].set;
}

void fy_config_print_help(const fy_config_t *cfg, FILE *out, const char *usage_line,
                          const char *summary)
{
    fprintf(out, "usage: %s\n", usage_line);
    if (summary != NULL)
        fprintf(out, "\n%s\n", summary);
    fprintf(out, "\noptions (also settable as `name: value` in a --config YAML file):\n");
    fprintf(out, "  %-28s %s\n", "--config FILE", "read options from a YAML file first");
    for (size_t i = 0; i < cfg->n_opts; i++) {
        const fy_opt_t *o = &cfg->opts[i];
        char flag[64];
        if (o->type == FY_OPT_BOOL)
            snprintf(flag, sizeof(flag), "--%s", o->name);
        else
            snprintf(flag, sizeof(flag), "--%s %s", o->name, type_name(o->type));
        fprintf(out, "  %-28s %s", flag, o->help ? o->help : "");
        if (o->required)
            fprintf(out, " (required)");
        else if (o->def != NULL && o->def[0] != '\0')
            fprintf(out, " [default: %s]", o->def);
        fputc('\n', out);
    }
    fprintf(out, "  %-28s %s\n", "-h, --help", "show this help");
}
