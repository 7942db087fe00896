/*
 * unicode.c: the Unicode classes the pre-tokenizer regexes use (\p{L}, \p{N}, \s), by binary
 * search over generated range tables (unicode_data.h).
 */
#include "model_int.h"
#include "unicode_data.h"

static bool in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0])
            hi = mid;
        else if (cp > r[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

bool mdl_uni_is_letter(uint32_t cp)
{
    if (cp < 0x80)
        return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(k_letter_ranges, FY_ARRAY_SIZE(k_letter_ranges), cp);
}

bool mdl_uni_is_number(uint32_t cp)
{
    if (cp < 0x80)
        return cp >= '0' && cp <= '9';
    return in_ranges(k_number_ranges, FY_ARRAY_SIZE(k_number_ranges), cp);
}

/* The Unicode White_Space property (what \s matches in the tokenizers' regex engines). */
bool mdl_uni_is_space(uint32_t cp)
{
    return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202f || cp == 0x205f || cp == 0x3000;
}
