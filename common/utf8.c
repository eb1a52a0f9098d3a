/* common/utf8.c: see utf8.h. */
#include <stdint.h>
#include <string.h>

#include "common/utf8.h"

size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    size_t len;
    uint32_t c;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2, c = s[0] & 0x1f;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        len = 3, c = s[0] & 0x0f;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4, c = s[0] & 0x07;
    else
        return 0;
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && (c < 0x800 || (c >= 0xd800 && c <= 0xdfff))) ||
        (len == 4 && (c < 0x10000 || c > 0x10ffff)))
        return 0;
    return len;
}

size_t utf8_copy_valid(char *dst, size_t size, const char *src)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t n = strlen(src), o = 0;

    for (size_t i = 0; i < n;) {
        size_t len = utf8_seq_len(s + i, n - i);
        const char *from = len ? (const char *)s + i : UTF8_REPLACEMENT;
        size_t put = len ? len : sizeof(UTF8_REPLACEMENT) - 1;

        if (o + put >= size)
            break;
        memcpy(dst + o, from, put);
        o += put;
        i += len ? len : 1;
    }
    dst[o] = '\0';
    return o;
}
