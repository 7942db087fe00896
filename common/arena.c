/*
 * arena.c: a bump allocator over a chain of blocks, for per-request scratch that is freed all
 * at once. Allocation is a pointer bump; a request larger than the block size gets a block of
 * its own.
 */
#include "common.h"

#include <stdlib.h>
#include <string.h>

struct fy_arena_block {
    fy_arena_block_t *next;
    size_t size; // usable bytes after the header
    size_t used;
    max_align_t data[]; // payload
};

void fy_arena_init(fy_arena_t *arena, size_t block_size)
{
    memset(arena, 0, sizeof(*arena));
    arena->block_size = block_size != 0 ? block_size : 64 * 1024;
}

void fy_arena_cleanup(fy_arena_t *arena)
{
    if (arena == NULL)
        return;
    fy_arena_block_t *b = arena->head;
    while (b != NULL) {
        fy_arena_block_t *next = b->next;
        free(b);
        b = next;
    }
    arena->head = NULL;
    arena->used_total = 0;
    arena->capacity_total = 0;
}

void *fy_arena_alloc(fy_arena_t *arena, size_t size, size_t align)
{
    if (align == 0)
        align = 1;
    if ((align & (align - 1)) != 0 || align > 4096)
        return NULL;
    if (size == 0)
        size = 1;
    fy_arena_block_t *b = arena->head;
    if (b != NULL) {
        uintptr_t base = (uintptr_t)b->data;
        uintptr_t p = (base + b->used + align - 1) & ~(uintptr_t)(align - 1);
        size_t off = (size_t)(p - base);
        if (off <= b->size && size <= b->size - off) {
            b->used = off + size;
            arena->used_total += size;
            return (void *)p;
        }
    }
    size_t need;
    if (!fy_size_add(size, align, &need))
        return NULL;
    size_t bsize = FY_MAX(need, arena->block_size);
    size_t total;
    if (!fy_size_add(bsize, sizeof(fy_arena_block_t), &total))
        return NULL;
    fy_arena_block_t *nb = malloc(total);
    if (nb == NULL)
        return NULL;
    nb->size = bsize;
    nb->next = arena->head;
    arena->head = nb;
    arena->capacity_total += bsize;
    uintptr_t base = (uintptr_t)nb->data;
    uintptr_t p = (base + align - 1) & ~(uintptr_t)(align - 1);
    nb->used = (size_t)(p - base) + size;
    arena->used_total += size;
    return (void *)p;
}

void *fy_arena_calloc(fy_arena_t *arena, size_t count, size_t size, size_t align)
{
    size_t bytes;
    if (!fy_size_mul(count, size, &bytes))
        return NULL;
    void *p = fy_arena_alloc(arena, bytes, align);
    if (p != NULL)
        memset(p, 0, bytes);
    return p;
}

void fy_arena_reset(fy_arena_t *arena)
{
    // Keep the largest block so a steady workload stops calling malloc.
    fy_arena_block_t *keep = NULL;
    fy_arena_block_t *b = arena->head;
    while (b != NULL) {
        fy_arena_block_t *next = b->next;
        if (keep == NULL || b->size > keep->size) {
            free(keep);
            keep = b;
        } else {
            free(b);
        }
        b = next;
    }
    if (keep != NULL) {
        keep->next = NULL;
        keep->used = 0;
    }
    arena->head = keep;
    arena->used_total = 0;
    arena->capacity_total = keep != NULL ? keep->size : 0;
}
