/*
 * auth.c: checking a bearer token (the API key a router may require of its clients).
 */
#include <string.h>
#include <strings.h>

#include "common.h"

bool fy_bearer_ok(const char *authorization, size_t len, const char *key)
{
    if (key == NULL || key[0] == '\0')
        return true;
    if (authorization == NULL || len < 7 || strncasecmp(authorization, "Bearer ", 7) != 0)
        return false;
    // Every byte of the key is compared whatever the first difference, so the time says
    // nothing about how much of a guess was right.
    const char *got = authorization + 7;
    size_t n = len - 7, kl = strlen(key);
    unsigned diff = n != kl;
    for (size_t i = 0; i < kl; i++)
        diff |= (unsigned char)key[i] ^ (unsigned char)(i < n ? got[i] : 0);
    return diff == 0;
}
