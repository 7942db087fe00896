/*
 * driver.c: a stand-in for libFuzzer's main so fuzz targets run in every build.
 *
 * Usage: fuzz_<name> [--iterations N] [--seed S] [FILE_OR_DIR...]
 * Replays every file given (directories are walked one level deep), then feeds N inputs made
 * by mutating those files (bit flips, byte sets, truncations, insertions) with a fixed seed, so
 * a failure reproduces. Exits non-zero only if the target crashes (ASan/UBSan abort).
 */
#include <dirent.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
    uint8_t *data;
    size_t size;
} blob_t;

static blob_t *g_seeds;
static size_t g_n_seeds, g_cap_seeds;

static void add_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (len < 0 || len > (64l << 20)) {
        fclose(f);
        return;
    }
    uint8_t *buf = malloc((size_t)len + 1);
    if (buf == NULL || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        fclose(f);
        return;
    }
    fclose(f);
    if (g_n_seeds == g_cap_seeds) {
        g_cap_seeds = g_cap_seeds ? g_cap_seeds * 2 : 16;
        g_seeds = realloc(g_seeds, g_cap_seeds * sizeof(*g_seeds));
    }
    g_seeds[g_n_seeds++] = (blob_t){buf, (size_t)len};
}

static void add_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return;
    if (!S_ISDIR(st.st_mode)) {
        add_file(path);
        return;
    }
    DIR *d = opendir(path);
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char full[4096];
        snprintf(full, sizeof(full), "%s/%s", path, e->d_name);
        if (stat(full, &st) == 0 && S_ISREG(st.st_mode))
            add_file(full);
    }
    closedir(d);
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

int main(int argc, char **argv)
{
    long iterations = 2000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--iterations") == 0 && i + 1 < argc)
            iterations = atol(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            g_rng = strtoull(argv[++i], NULL, 0) | 1;
        else
            add_path(argv[i]);
    }
    for (size_t i = 0; i < g_n_seeds; i++)
        LLVMFuzzerTestOneInput(g_seeds[i].data, g_seeds[i].size);
    LLVMFuzzerTestOneInput(NULL, 0);

    uint8_t *buf = malloc(1 << 20);
    for (long it = 0; it < iterations; it++) {
        size_t len;
        if (g_n_seeds > 0) {
            blob_t *s = &g_seeds[rnd() % g_n_seeds];
            len = s->size < (1u << 20) ? s->size : (1u << 20);
            memcpy(buf, s->data, len);
        } else {
            len = rnd() % 4096;
            for (size_t k = 0; k < len; k++)
                buf[k] = (uint8_t)rnd();
        }
        int n_mut = 1 + (int)(rnd() % 8);
        for (int m = 0; m < n_mut; m++) {
            switch (rnd() % 5) {
            case 0: // flip a bit
                if (len)
                    buf[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
                break;
            case 1: // set a byte to an interesting value
                if (len) {
                    static const uint8_t vals[] = {0, 1, 0x7f, 0x80, 0xff, 0xfe, 0x40};
                    buf[rnd() % len] = vals[rnd() % sizeof(vals)];
                }
                break;
            case 2: // truncate
                if (len)
                    len = rnd() % len;
                break;
            case 3: // overwrite 4 bytes with a random word (lengths, counts)
                if (len >= 4) {
                    uint32_t w = (uint32_t)rnd();
                    memcpy(buf + rnd() % (len - 3), &w, 4);
                }
                break;
            case 4: // append random bytes
                for (int k = 0; k < 16 && len < (1u << 20); k++)
                    buf[len++] = (uint8_t)rnd();
                break;
            }
        }
        // Copy to an exact-size allocation so ASan sees any read past the end.
        uint8_t *exact = malloc(len ? len : 1);
        memcpy(exact, buf, len);
        LLVMFuzzerTestOneInput(exact, len);
        free(exact);
    }
    free(buf);
    for (size_t i = 0; i < g_n_seeds; i++)
        free(g_seeds[i].data);
    free(g_seeds);
    printf("fuzz driver: %zu seeds, %ld mutated inputs, no crash\n", g_n_seeds, iterations);
    return 0;
}
