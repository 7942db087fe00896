/*
 * quality_text.c: the texts of the quality harness (quality.h): the corpus (UTF-8 files,
 * tokenized, cut into context + continuation samples) and needle-in-a-haystack prompts, answers
 * and their exact-match scoring.
 */
#include <ctype.h>
#include <errno.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "quality.h"

/* ------------------------------------------------------------------------------------------ */
/* Corpus                                                                                      */
/* ------------------------------------------------------------------------------------------ */

enum { QUAL_MAX_FILE = 64 << 20 };

static fy_status_t read_all(const char *path, char **buf_p, size_t *len_p)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return fy_status_from_errno(errno);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    fy_status_t st = FY_OK;
    for (;;) {
        if (len + 65536 > cap) {
            cap = cap ? cap * 2 : 1 << 17;
            char *nb = cap <= QUAL_MAX_FILE * 2u ? realloc(buf, cap + 1) : NULL;
            if (nb == NULL) {
                st = cap > QUAL_MAX_FILE * 2u ? FY_ERR_OUT_OF_RANGE : FY_ERR_NO_MEMORY;
                break;
            }
            buf = nb;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (len > QUAL_MAX_FILE) {
            st = FY_ERR_OUT_OF_RANGE;
            break;
        }
        if (got == 0)
            break;
    }
    if (st == FY_OK && ferror(f))
        st = FY_ERR_IO;
    fclose(f);
    if (st != FY_OK) {
        free(buf);
        return st;
    }
    if (buf == NULL && (buf = malloc(1)) == NULL)
        return FY_ERR_NO_MEMORY;
    buf[len] = '\0';
    *buf_p = buf;
    *len_p = len;
    return FY_OK;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Expands a directory into its *.txt files (sorted), or keeps a file path. */
static fy_status_t expand_path(const char *path, char ***list_p, int *n_p, int *cap_p)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return fy_status_from_errno(errno);
    char **names = NULL;
    int n = 0;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (d == NULL)
            return fy_status_from_errno(errno);
        struct dirent *e;
        int cap = 0;
        while ((e = readdir(d)) != NULL) {
            size_t l = strlen(e->d_name);
            if (l < 5 || strcmp(e->d_name + l - 4, ".txt") != 0)
                continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 16;
                char **nn = realloc(names, sizeof(char *) * (size_t)cap);
                if (nn == NULL)
                    break;
                names = nn;
            }
            if (asprintf(&names[n], "%s/%s", path, e->d_name) < 0)
                break;
            n++;
        }
        closedir(d);
        qsort(names, (size_t)n, sizeof(char *), cmp_str);
    } else {
        names = malloc(sizeof(char *));
        if (names == NULL || (names[0] = strdup(path)) == NULL) {
            free(names);
            return FY_ERR_NO_MEMORY;
        }
        n = 1;
    }
    for (int i = 0; i < n; i++) {
        if (*n_p == *cap_p) {
            *cap_p = *cap_p ? *cap_p * 2 : 16;
            char **nl = realloc(*list_p, sizeof(char *) * (size_t)*cap_p);
            if (nl == NULL) {
                for (int j = i; j < n; j++)
                    free(names[j]);
                free(names);
                return FY_ERR_NO_MEMORY;
            }
            *list_p = nl;
        }
        (*list_p)[(*n_p)++] = names[i];
    }
    free(names);
    return FY_OK;
}

void qual_corpus_free(qual_corpus_t *c)
{
    if (c == NULL)
        return;
    for (int d = 0; d < c->n_docs; d++) {
        free(c->names != NULL ? c->names[d] : NULL);
        free(c->ids != NULL ? c->ids[d] : NULL);
    }
    free(c->names);
    free(c->ids);
    free(c->n_ids);
    memset(c, 0, sizeof(*c));
}

fy_status_t qual_corpus_load(const mdl_tokenizer_t *tok, const char *const *paths, int n_paths,
                             qual_corpus_t *c, char *err, size_t err_len)
{
    if (tok == NULL || paths == NULL || n_paths <= 0 || c == NULL)
        return FY_ERR_INVALID_ARG;
    memset(c, 0, sizeof(*c));
    char **files = NULL;
    int n_files = 0, cap = 0;
    fy_status_t st = FY_OK;
    for (int i = 0; i < n_paths && st == FY_OK; i++) {
        if ((st = expand_path(paths[i], &files, &n_files, &cap)) != FY_OK && err)
            snprintf(err, err_len, "%s: %s", paths[i], fy_status_str(st));
    }
    if (st == FY_OK && n_files == 0) {
        st = FY_ERR_NOT_FOUND;
        if (err)
            snprintf(err, err_len, "no .txt files in the corpus paths");
    }
    if (st == FY_OK) {
        c->names = calloc((size_t)n_files, sizeof(char *));
        c->ids = calloc((size_t)n_files, sizeof(int32_t *));
        c->n_ids = calloc((size_t)n_files, sizeof(size_t));
        if (!c->names || !c->ids || !c->n_ids)
            st = FY_ERR_NO_MEMORY;
    }
    for (int i = 0; i < n_files && st == FY_OK; i++) {
        char *text = NULL;
        size_t len = 0;
        if ((st = read_all(files[i], &text, &len)) != FY_OK) {
            if (err)
                snprintf(err, err_len, "%s: %s", files[i], fy_status_str(st));
            break;
        }
        if (memchr(text, '\0', len) != NULL) {
            st = FY_ERR_FORMAT;
            if (err)
                snprintf(err, err_len, "%s: not a text file (NUL byte)", files[i]);
            free(text);
            break;
        }
        size_t need = 0;
        // Special-token text in a document is plain text (parse_special false).
        st = mdl_tokenizer_encode(tok, text, len, false, NULL, 0, &need);
        int32_t *ids = NULL;
        if (st == FY_ERR_RESOURCE_EXHAUSTED || st == FY_OK) {
            ids = malloc(sizeof(int32_t) * FY_MAX(need, 1));
            st = ids != NULL ? mdl_tokenizer_encode(tok, text, len, false, ids, need, &need)
                             : FY_ERR_NO_MEMORY;
        }
        free(text);
        if (st != FY_OK) {
            free(ids);
            if (err)
                snprintf(err, err_len, "%s: tokenizing: %s", files[i], fy_status_str(st));
            break;
        }
        c->names[c->n_docs] = files[i];
        files[i] = NULL;
        c->ids[c->n_docs] = ids;
        c->n_ids[c->n_docs] = need;
        c->n_docs++;
    }
    for (int i = 0; i < n_files; i++)
        free(files[i]);
    free(files);
    if (st != FY_OK)
        qual_corpus_free(c);
    return st;
}

fy_status_t qual_corpus_sample(const qual_corpus_t *c, int len, int n_samples, int s,
                               const int32_t **ids_p, int *doc_p)
{
    if (c == NULL || len <= 0 || n_samples <= 0 || s < 0 || s >= n_samples || ids_p == NULL)
        return FY_ERR_INVALID_ARG;
    // Runs per document; samples go round-robin over the documents that still have a free run,
    // so a small sample set covers as many documents as it can.
    int total = 0, usable = 0;
    for (int d = 0; d < c->n_docs; d++) {
        int runs = (int)FY_MIN(c->n_ids[d] / (size_t)len, (size_t)1 << 20);
        total += runs;
        usable += runs > 0;
    }
    if (usable == 0)
        return FY_ERR_NOT_FOUND;
    if (total < n_samples)
        return FY_ERR_OUT_OF_RANGE;
    int k = 0;
    for (int round = 0;; round++) {
        for (int d = 0; d < c->n_docs; d++) {
            int runs = (int)(c->n_ids[d] / (size_t)len);
            if (round >= runs)
                continue;
            if (k == s) {
                // Runs spread evenly over the document, not packed at its start.
                size_t slack = c->n_ids[d] - (size_t)runs * len;
                size_t off = (size_t)round * len + slack * (size_t)round / (size_t)runs;
                *ids_p = c->ids[d] + off;
                if (doc_p != NULL)
                    *doc_p = d;
                return FY_OK;
            }
            k++;
        }
    }
}

fy_status_t qual_corpus_concat(const qual_corpus_t *c, int32_t **ids_p, size_t *n_p)
{
    if (c == NULL || ids_p == NULL || n_p == NULL)
        return FY_ERR_INVALID_ARG;
    size_t n = 0;
    for (int d = 0; d < c->n_docs; d++)
        n += c->n_ids[d];
    int32_t *ids = malloc(sizeof(int32_t) * FY_MAX(n, 1));
    if (ids == NULL)
        return FY_ERR_NO_MEMORY;
    n = 0;
    for (int d = 0; d < c->n_docs; d++) {
        memcpy(ids + n, c->ids[d], c->n_ids[d] * sizeof(int32_t));
        n += c->n_ids[d];
    }
    *ids_p = ids;
    *n_p = n;
    return FY_OK;
}

fy_status_t qual_load(const char *model_path, const char *const *corpus, int n_corpus,
                      mdl_model_t **model_p, qual_corpus_t *c, char *err, size_t err_len)
{
    if (model_path == NULL || model_p == NULL || c == NULL)
        return FY_ERR_INVALID_ARG;
    char merr[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = model_path;
    mdl_model_t *m = NULL;
    fy_status_t st = mdl_model_create(&mp, &m, merr, sizeof(merr));
    if (st != FY_OK) {
        if (err != NULL)
            snprintf(err, err_len, "cannot load %s: %s", model_path, merr);
        return st;
    }
    char cerr[256] = "";
    st = qual_corpus_load(mdl_model_tokenizer(m), corpus, n_corpus, c, cerr, sizeof(cerr));
    if (st != FY_OK) {
        if (err != NULL)
            snprintf(err, err_len, "corpus: %s (run scripts/build-corpus.sh, or pass --corpus)",
                     cerr);
        mdl_model_destroy(m);
        return st;
    }
    *model_p = m;
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Needle in a haystack                                                                        */
/* ------------------------------------------------------------------------------------------ */

#define NIAH_NEEDLE "The special magic number is %s. Remember it: the special magic number is %s."
#define NIAH_QUESTION                                                                          \
    "\n\nWhat is the special magic number mentioned in the text above? Answer with the number " \
    "only."
#define NIAH_MARK "\x01NIAH\x01"

void qual_niah_value(uint64_t seed, int i, char *out, size_t cap)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + (uint64_t)i * 0xbf58476d1ce4e5b9ull + 1;
    x ^= x >> 31;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 29;
    snprintf(out, cap, "%07u", (unsigned)(1000000 + x % 9000000));
}

void qual_niah_prompt_free(qual_niah_prompt_t *p)
{
    if (p == NULL)
        return;
    free(p->ids);
    p->ids = NULL;
    p->n = 0;
}

/* Tokenizes text into a freshly allocated array. */
static fy_status_t encode_alloc(const mdl_tokenizer_t *tok, const char *text, bool special,
                                int32_t **ids_p, size_t *n_p)
{
    size_t need = 0, len = strlen(text);
    fy_status_t st = mdl_tokenizer_encode(tok, text, len, special, NULL, 0, &need);
    if (st != FY_OK && st != FY_ERR_RESOURCE_EXHAUSTED)
        return st;
    int32_t *ids = malloc(sizeof(int32_t) * FY_MAX(need, 1));
    if (ids == NULL)
        return FY_ERR_NO_MEMORY;
    if ((st = mdl_tokenizer_encode(tok, text, len, special, ids, need, &need)) != FY_OK) {
        free(ids);
        return st;
    }
    *ids_p = ids;
    *n_p = need;
    return FY_OK;
}

/* Whether token id's text ends a sentence (". ", ".\n", ...). */
static bool ends_sentence(const mdl_tokenizer_t *tok, int32_t id)
{
    char buf[64];
    int n = mdl_tokenizer_token_bytes(tok, id, buf, sizeof(buf));
    if (n <= 0 || n > (int)sizeof(buf))
        return false;
    while (n > 0 && (buf[n - 1] == ' ' || buf[n - 1] == '\n'))
        n--;
    return n > 0 && (buf[n - 1] == '.' || buf[n - 1] == '!' || buf[n - 1] == '?');
}

fy_status_t qual_niah_build(const mdl_tokenizer_t *tok, const int32_t *filler, size_t n_filler,
                            int haystack, double depth, const char *value,
                            qual_niah_prompt_t *p)
{
    if (tok == NULL || filler == NULL || p == NULL || value == NULL || haystack <= 0 ||
        (size_t)haystack > n_filler || !(depth >= 0 && depth <= 1) || strlen(value) == 0 ||
        strlen(value) >= sizeof(p->value))
        return FY_ERR_INVALID_ARG;
    for (const char *v = value; *v; v++) {
        if (!isdigit((unsigned char)*v))
            return FY_ERR_INVALID_ARG;
    }
    memset(p, 0, sizeof(*p));
    snprintf(p->value, sizeof(p->value), "%s", value);

    // Template around a mark: prefix + haystack + suffix, each part tokenized on its own.
    char *rendered = NULL;
    mdl_chat_msg_t msg = {.role = "user", .content = NIAH_MARK NIAH_QUESTION};
    fy_status_t st = mdl_chat_render(tok, &msg, 1, true, &rendered);
    if (st == FY_ERR_UNSUPPORTED) {
        if (asprintf(&rendered, "%s%s\nAnswer:", NIAH_MARK, NIAH_QUESTION) < 0)
            return FY_ERR_NO_MEMORY;
        st = FY_OK;
    }
    if (st != FY_OK)
        return st;
    char *mark = strstr(rendered, NIAH_MARK);
    if (mark == NULL) {
        free(rendered);
        return FY_ERR_INTERNAL;
    }
    *mark = '\0';
    const char *suffix_text = mark + strlen(NIAH_MARK);
    char needle_text[160];
    snprintf(needle_text, sizeof(needle_text), " " NIAH_NEEDLE " ", value, value);
    int32_t *pre = NULL, *suf = NULL, *needle = NULL;
    size_t n_pre = 0, n_suf = 0, n_needle = 0;
    st = encode_alloc(tok, rendered, true, &pre, &n_pre);
    if (st == FY_OK)
        st = encode_alloc(tok, suffix_text, true, &suf, &n_suf);
    if (st == FY_OK)
        st = encode_alloc(tok, needle_text, false, &needle, &n_needle);
    free(rendered);
    bool bos = mdl_tokenizer_add_bos(tok);
    size_t total = (size_t)bos + n_pre + (size_t)haystack + n_needle + n_suf;
    if (st == FY_OK && total > INT32_MAX)
        st = FY_ERR_OUT_OF_RANGE;
    if (st == FY_OK && (p->ids = malloc(sizeof(int32_t) * total)) == NULL)
        st = FY_ERR_NO_MEMORY;
    if (st == FY_OK) {
        // The needle goes after the first sentence end at or past the depth (within 64
        // tokens; otherwise exactly at the depth).
        size_t at = (size_t)(depth * haystack + 0.5);
        for (size_t i = at; i < (size_t)haystack && i < at + 64; i++) {
            if (i > 0 && ends_sentence(tok, filler[i - 1])) {
                at = i;
                break;
            }
        }
        if (at > (size_t)haystack)
            at = (size_t)haystack;
        size_t k = 0;
        if (bos)
            p->ids[k++] = mdl_tokenizer_bos(tok);
        memcpy(p->ids + k, pre, n_pre * sizeof(int32_t));
        k += n_pre;
        memcpy(p->ids + k, filler, at * sizeof(int32_t));
        k += at;
        p->needle_pos = (int)k;
        memcpy(p->ids + k, needle, n_needle * sizeof(int32_t));
        k += n_needle;
        memcpy(p->ids + k, filler + at, ((size_t)haystack - at) * sizeof(int32_t));
        k += (size_t)haystack - at;
        memcpy(p->ids + k, suf, n_suf * sizeof(int32_t));
        k += n_suf;
        p->n = (int)k;
    }
    free(pre);
    free(suf);
    free(needle);
    if (st != FY_OK)
        qual_niah_prompt_free(p);
    return st;
}

bool qual_niah_match(const char *answer, const char *expected)
{
    if (answer == NULL || expected == NULL || *expected == '\0')
        return false;
    const char *s = answer;
    while (*s && !isdigit((unsigned char)*s))
        s++;
    size_t n = 0;
    while (isdigit((unsigned char)s[n]))
        n++;
    return n > 0 && n == strlen(expected) && memcmp(s, expected, n) == 0;
}

/* Index of the largest logit. */
static int32_t argmax(const float *l, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        best = l[i] > l[best] ? i : best;
    return best;
}

fy_status_t qual_niah_answer(qual_batch_t *b, const qual_niah_prompt_t *p, int max_new,
                             char *answers, size_t cap)
{
    if (b == NULL || p == NULL || p->ids == NULL || answers == NULL || cap < 2 || max_new < 1)
        return FY_ERR_INVALID_ARG;
    int nr = qual_batch_n_rows(b);
    const mdl_model_t *m = qual_batch_model(b);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    int nv = mdl_model_config(m)->n_vocab;
    int32_t eos = mdl_tokenizer_eos(tok), im_end = mdl_tokenizer_find(tok, "<|im_end|>");
    float *logits = malloc(sizeof(float) * (size_t)nr * nv);
    int32_t *tok_in = malloc(sizeof(int32_t) * (size_t)nr);
    bool *done = calloc((size_t)nr, sizeof(bool));
    mdl_detok_t *dt = malloc(sizeof(mdl_detok_t) * (size_t)nr);
    size_t *len = calloc((size_t)nr, sizeof(size_t));
    fy_status_t st = logits && tok_in && done && dt && len ? FY_OK : FY_ERR_NO_MEMORY;
    if (st == FY_OK)
        st = qual_batch_start(b, p->ids, p->n, max_new, logits);
    if (st == FY_OK) {
        // The first answer token comes from the prefill (the full cache), as in serving.
        int32_t first = argmax(logits, nv);
        for (int r = 0; r < nr; r++) {
            tok_in[r] = first;
            answers[(size_t)r * cap] = '\0';
            mdl_detok_init(&dt[r], tok, true);
        }
    }
    for (int step = 0; step < max_new && st == FY_OK; step++) {
        bool all_done = true;
        for (int r = 0; r < nr; r++) {
            if (done[r])
                continue;
            if (tok_in[r] == eos || tok_in[r] == im_end) {
                done[r] = true;
                continue;
            }
            char *out = answers + (size_t)r * cap;
            int w = mdl_detok_push(&dt[r], tok_in[r], out + len[r], cap - len[r]);
            if (w > 0)
                len[r] += (size_t)w;
            all_done = false;
        }
        if (all_done || step == max_new - 1)
            break;
        if ((st = qual_batch_step(b, tok_in, logits)) != FY_OK)
            break;
        for (int r = 0; r < nr; r++) {
            if (!done[r])
                tok_in[r] = argmax(logits + (size_t)r * nv, nv);
        }
    }
    free(logits);
    free(tok_in);
    free(done);
    free(dt);
    free(len);
    return st;
}
