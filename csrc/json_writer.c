/* Compact JSON encoder: see json_writer.h for the contract.
 *
 * Everything is written into one growing byte buffer (4 KiB on the C stack,
 * then a PyMem block), which is turned into a str once at the end.
 *
 * Output is what json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
 * allow_nan=False) produces, except that lone surrogates (which json.dumps
 * passes through, giving text that cannot be encoded as UTF-8) are written
 * as \udXXX escapes, so the result is always valid UTF-8.
 *
 * Layout convention: every value is written followed by a separator byte
 * (',' after a value, ':' after a key), in the same reservation as the value;
 * a container overwrites its last ',' with its closing bracket and the entry
 * point drops the final one. One buffer check per item instead of two.
 *
 * Ownership: every PyObject* parameter below is borrowed unless noted.
 */
#include "json_writer.h"
#include "pycompat.h"

#include <datetime.h> /* defines this file's own PyDateTimeAPI pointer */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#  include <emmintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define WSM_LIKELY(x) __builtin_expect(!!(x), 1)
#  define WSM_UNLIKELY(x) __builtin_expect(!!(x), 0)
#  define WSM_NOINLINE __attribute__((noinline))
#  define WSM_INLINE inline __attribute__((always_inline))
#else
#  define WSM_LIKELY(x) (x)
#  define WSM_UNLIKELY(x) (x)
#  define WSM_NOINLINE
#  define WSM_INLINE inline
#endif

#define WSM_STACK_BUF 4096
/* Strings that need escapes are written in chunks of this many bytes / code
 * points, each preceded by one reservation of its worst case (6 a unit). */
#define WSM_STR_CHUNK 1024
#define WSM_RECURSION_WHERE " while encoding a JSON object"

typedef struct {
    char *buf;            /* small, or a PyMem block owned by the writer */
    Py_ssize_t len;
    Py_ssize_t cap;
    PyObject *default_fn; /* borrowed, NULL when there is none */
    wsm_json_types *types; /* borrowed from the module state */
    int wrap_errors;      /* see json_writer.h */
    /* What the final str needs, tracked while writing so that the UTF-8 text
     * is converted in one pass into a str of the right size and kind: */
    Py_ssize_t extra;     /* UTF-8 bytes minus code points written so far */
    Py_UCS4 maxchar;      /* 127 while only ASCII was written */
    int unknown;          /* extra / maxchar not tracked: generic decoder */
    char small[WSM_STACK_BUF];
} Writer;

/* ---------------------------------------------------------------- buffer */

static WSM_NOINLINE int
writer_grow(Writer *w, Py_ssize_t need)
{
    if (need > PY_SSIZE_T_MAX - w->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t want = w->len + need;
    Py_ssize_t cap = w->cap;
    while (cap < want) {
        cap = (cap > PY_SSIZE_T_MAX / 2) ? PY_SSIZE_T_MAX : cap * 2;
    }
    char *p;
    if (w->buf == w->small) {
        p = PyMem_Malloc((size_t)cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(p, w->small, (size_t)w->len);
    }
    else {
        /* On failure w->buf is untouched and still freed by the caller. */
        p = PyMem_Realloc(w->buf, (size_t)cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    w->buf = p;
    w->cap = cap;
    return 0;
}

static WSM_INLINE int
writer_reserve(Writer *w, Py_ssize_t need)
{
    if (WSM_LIKELY(w->cap - w->len >= need)) {
        return 0;
    }
    return writer_grow(w, need);
}

/* Moves n <= 16 bytes with fixed-size loads and stores (no libc call);
 * all loads come before the stores, so src and dst may overlap. */
static WSM_INLINE void
move_small(char *dst, const char *src, size_t n)
{
    if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, src, 8);
        memcpy(&b, src + n - 8, 8);
        memcpy(dst, &a, 8);
        memcpy(dst + n - 8, &b, 8);
    }
    else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, src, 4);
        memcpy(&b, src + n - 4, 4);
        memcpy(dst, &a, 4);
        memcpy(dst + n - 4, &b, 4);
    }
    else if (n > 0) {
        char a = src[0], b = src[n / 2], c = src[n - 1];
        dst[0] = a;
        dst[n / 2] = b;
        dst[n - 1] = c;
    }
}

/* memcpy, inline for the short runs that dominate messages (keys, words,
 * numbers). */
static WSM_INLINE void
copy_bytes(char *dst, const char *src, size_t n)
{
    if (n <= 16) {
        move_small(dst, src, n);
    }
    else {
        memcpy(dst, src, n);
    }
}

/* Short constant text (literals with their separator). */
static WSM_INLINE int
writer_raw(Writer *w, const char *s, Py_ssize_t n)
{
    if (writer_reserve(w, n) < 0) {
        return -1;
    }
    memcpy(w->buf + w->len, s, (size_t)n);
    w->len += n;
    return 0;
}

/* --------------------------------------------------------------- strings */

/* 0: copied as is; 'u': \u00XX; anything else: backslash + that char. */
static const char ESCAPE[256] = {
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'b', 't', 'n', 'u', 'f', 'r', 'u', 'u',
    'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u',
    0, 0, '"', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\\', 0, 0, 0,
    /* 0x60 .. 0xff: all zero */
};

static const char HEX[16] = "0123456789abcdef";

/* Writes the escape of ASCII byte c (ESCAPE[c] != 0) at p: at most 6 bytes. */
static inline char *
put_escape(char *p, unsigned char c)
{
    char e = ESCAPE[c];
    *p++ = '\\';
    if (e == 'u') {
        *p++ = 'u';
        *p++ = '0';
        *p++ = '0';
        *p++ = HEX[c >> 4];
        *p++ = HEX[c & 0xF];
    }
    else {
        *p++ = e;
    }
    return p;
}

/* \uXXXX for a lone surrogate (6 bytes). */
static inline char *
put_u_escape(char *p, Py_UCS4 c)
{
    *p++ = '\\';
    *p++ = 'u';
    *p++ = HEX[(c >> 12) & 0xF];
    *p++ = HEX[(c >> 8) & 0xF];
    *p++ = HEX[(c >> 4) & 0xF];
    *p++ = HEX[c & 0xF];
    return p;
}

#define WSM_ONES 0x0101010101010101ULL
#define WSM_HIGHS 0x8080808080808080ULL

/* Nonzero when some byte of x is < 0x20, '"' or '\\' (the classic "has less
 * than" / "has zero byte" bit tricks: a borrow only starts at a byte that
 * matches, so "any byte matches" is exact for any bytes). */
static WSM_INLINE uint64_t
word_needs_escape(uint64_t x)
{
    uint64_t q = x ^ (WSM_ONES * '"');
    uint64_t b = x ^ (WSM_ONES * '\\');
    return (((x - WSM_ONES * 0x20) & ~x) | ((q - WSM_ONES) & ~q) | ((b - WSM_ONES) & ~b))
           & WSM_HIGHS;
}

static WSM_INLINE uint64_t
load64(const unsigned char *s)
{
    uint64_t x;
    memcpy(&x, s, 8);
    return x;
}

static WSM_INLINE uint32_t
load32(const unsigned char *s)
{
    uint32_t x;
    memcpy(&x, s, 4);
    return x;
}

/* Nonzero when some byte of s[0:n] needs an escape. Whole words only, no
 * branch per byte: short strings with two overlapping loads, long ones 16
 * bytes at a time (SSE2) ending with an overlapping block. */
static WSM_INLINE int
needs_escape(const unsigned char *s, Py_ssize_t n)
{
    if (n <= 16) {
        if (n >= 8) {
            return (word_needs_escape(load64(s)) | word_needs_escape(load64(s + n - 8))) != 0;
        }
        if (n >= 4) {
            return word_needs_escape(load32(s) | ((uint64_t)load32(s + n - 4) << 32)) != 0;
        }
        if (n > 0) {
            return (ESCAPE[s[0]] | ESCAPE[s[n / 2]] | ESCAPE[s[n - 1]]) != 0;
        }
        return 0;
    }
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"');
    const __m128i backslash = _mm_set1_epi8('\\');
    const __m128i ctrl = _mm_set1_epi8(0x1F);
    __m128i acc = _mm_setzero_si128();
    Py_ssize_t i = 0;
    for (;;) {
        if (i > n - 16) {
            i = n - 16; /* the last block overlaps the previous one */
        }
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(s + i));
        acc = _mm_or_si128(acc, _mm_or_si128(_mm_cmpeq_epi8(v, quote),
                                             _mm_cmpeq_epi8(v, backslash)));
        acc = _mm_or_si128(acc, _mm_cmpeq_epi8(_mm_min_epu8(v, ctrl), v)); /* <= 0x1F */
        i += 16;
        if (i >= n) {
            break;
        }
        if ((i & 255) == 0 && _mm_movemask_epi8(acc)) {
            return 1; /* early exit for long strings, every 256 bytes */
        }
    }
    return _mm_movemask_epi8(acc) != 0;
#else
    uint64_t acc = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        acc |= word_needs_escape(load64(s + i));
    }
    if (i < n) {
        acc |= word_needs_escape(load64(s + n - 8));
    }
    return acc != 0;
#endif
}

/* s: valid UTF-8 with some byte to escape; written as "...", then term. */
static WSM_NOINLINE int
write_utf8_escaped(Writer *w, const unsigned char *s, Py_ssize_t n, char term)
{
    if (writer_reserve(w, 1) < 0) {
        return -1;
    }
    w->buf[w->len++] = '"';
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t end = (n - i > WSM_STR_CHUNK) ? i + WSM_STR_CHUNK : n;
        if (writer_reserve(w, 6 * (end - i) + 2) < 0) {
            return -1;
        }
        char *p = w->buf + w->len;
        for (; i < end; i++) {
            unsigned char c = s[i];
            if (ESCAPE[c]) {
                p = put_escape(p, c);
            }
            else {
                *p++ = (char)c;
            }
        }
        w->len = p - w->buf;
    }
    if (writer_reserve(w, 2) < 0) {
        return -1;
    }
    w->buf[w->len++] = '"';
    w->buf[w->len++] = term;
    return 0;
}

/* s: valid UTF-8 (bytes >= 0x80 are copied as they are). */
static WSM_INLINE int
write_utf8(Writer *w, const unsigned char *s, Py_ssize_t n, char term)
{
    if (WSM_UNLIKELY(needs_escape(s, n))) {
        return write_utf8_escaped(w, s, n, term);
    }
    if (WSM_UNLIKELY(n > PY_SSIZE_T_MAX - 3)) {
        PyErr_NoMemory();
        return -1;
    }
    if (writer_reserve(w, n + 3) < 0) {
        return -1;
    }
    char *p = w->buf + w->len;
    p[0] = '"';
    copy_bytes(p + 1, (const char *)s, (size_t)n);
    p[n + 1] = '"';
    p[n + 2] = term;
    w->len += n + 3;
    return 0;
}

/* Strings holding lone surrogates have no UTF-8 form: one loop per storage
 * kind (T is the code unit type) writes UTF-8 from the code points and
 * escapes the surrogates. Latin-1 strings never hold one. */
#define WSM_WRITE_KIND(NAME, T, WIDE)                                        \
    static WSM_NOINLINE int NAME(Writer *w, const T *s, Py_ssize_t n, char term) \
    {                                                                        \
        if (writer_reserve(w, 1) < 0) {                                      \
            return -1;                                                       \
        }                                                                    \
        w->buf[w->len++] = '"';                                              \
        Py_ssize_t i = 0;                                                    \
        while (i < n) {                                                      \
            Py_ssize_t end = (n - i > WSM_STR_CHUNK) ? i + WSM_STR_CHUNK : n; \
            if (writer_reserve(w, 6 * (end - i)) < 0) {                      \
                return -1;                                                   \
            }                                                                \
            char *p = w->buf + w->len;                                       \
            for (; i < end; i++) {                                           \
                Py_UCS4 c = s[i];                                            \
                if (c < 0x80) {                                              \
                    if (WSM_UNLIKELY(ESCAPE[c])) {                           \
                        p = put_escape(p, (unsigned char)c);                 \
                    }                                                        \
                    else {                                                   \
                        *p++ = (char)c;                                      \
                    }                                                        \
                }                                                            \
                else if (c < 0x800) {                                        \
                    *p++ = (char)(0xC0 | (c >> 6));                          \
                    *p++ = (char)(0x80 | (c & 0x3F));                        \
                }                                                            \
                else WIDE                                                    \
            }                                                                \
            w->len = p - w->buf;                                             \
        }                                                                    \
        if (writer_reserve(w, 2) < 0) {                                      \
            return -1;                                                       \
        }                                                                    \
        w->buf[w->len++] = '"';                                              \
        w->buf[w->len++] = term;                                             \
        return 0;                                                            \
    }

#define WSM_WIDE_UCS2                                                        \
    if (WSM_UNLIKELY(c >= 0xD800 && c <= 0xDFFF)) {                          \
        p = put_u_escape(p, c);                                              \
    }                                                                        \
    else {                                                                   \
        *p++ = (char)(0xE0 | (c >> 12));                                     \
        *p++ = (char)(0x80 | ((c >> 6) & 0x3F));                             \
        *p++ = (char)(0x80 | (c & 0x3F));                                    \
    }
#define WSM_WIDE_UCS4                                                        \
    if (c >= 0x10000) {                                                      \
        *p++ = (char)(0xF0 | (c >> 18));                                     \
        *p++ = (char)(0x80 | ((c >> 12) & 0x3F));                            \
        *p++ = (char)(0x80 | ((c >> 6) & 0x3F));                             \
        *p++ = (char)(0x80 | (c & 0x3F));                                    \
    }                                                                        \
    else WSM_WIDE_UCS2

WSM_WRITE_KIND(write_ucs2, Py_UCS2, WSM_WIDE_UCS2)
WSM_WRITE_KIND(write_ucs4, Py_UCS4, WSM_WIDE_UCS4)

/* obj: a str that is not pure ASCII (or not ready yet, before 3.12). */
static WSM_NOINLINE int
write_str_other(Writer *w, PyObject *obj, char term)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0) {
        return -1;
    }
#endif
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    const void *data = PyUnicode_DATA(obj);
    if (PyUnicode_IS_ASCII(obj)) {
        return write_utf8(w, (const unsigned char *)data, n, term);
    }
    /* CPython's UTF-8 form, made once and cached on the str. */
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(obj, &size);
    if (utf8 != NULL) {
        /* The kind of a ready str is the smallest that holds its largest
         * character, which its UTF-8 form holds too (escapes are ASCII). */
        Py_UCS4 maxchar = PyUnicode_MAX_CHAR_VALUE(obj);
        if (maxchar > w->maxchar) {
            w->maxchar = maxchar;
        }
        w->extra += size - n;
        return write_utf8(w, (const unsigned char *)utf8, size, term);
    }
    /* Lone surrogates (the only reason for a UnicodeEncodeError). */
    int kind = PyUnicode_KIND(obj);
    if (kind == PyUnicode_1BYTE_KIND || !PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        return -1;
    }
    PyErr_Clear();
    /* The escaped surrogates may have been the widest characters. */
    w->unknown = 1;
    if (kind == PyUnicode_2BYTE_KIND) {
        return write_ucs2(w, (const Py_UCS2 *)data, n, term);
    }
    return write_ucs4(w, (const Py_UCS4 *)data, n, term);
}

/* obj: a str or str subclass. Compact ASCII strs (nearly all keys and
 * values) are read in place; the rest in write_str_other. */
static WSM_INLINE int
write_str(Writer *w, PyObject *obj, char term)
{
    PyASCIIObject *a = (PyASCIIObject *)obj;
#if PY_VERSION_HEX < 0x030C0000
    if (WSM_LIKELY(a->state.ascii && a->state.compact && a->state.ready)) {
#else
    if (WSM_LIKELY(a->state.ascii && a->state.compact)) {
#endif
        return write_utf8(w, (const unsigned char *)(a + 1), a->length, term);
    }
    return write_str_other(w, obj, term);
}

/* ------------------------------------------------------------ to a str */

/* The text buf[0:len] (valid UTF-8) as a str of n code points, the largest
 * maxchar (exact), decoded in one pass without checks: the writer made the
 * text and counted it. Runs of 8 ASCII bytes (most of a JSON text) are
 * widened a word at a time. */
#define WSM_DECODE_KIND(NAME, T)                                             \
    static int NAME(const unsigned char *s, const unsigned char *end,        \
                    T *d, T *dend)                                           \
    {                                                                        \
        while (s < end) {                                                    \
            if (end - s >= 8 && dend - d >= 8 && !(load64(s) & WSM_HIGHS)) { \
                for (int j = 0; j < 8; j++) {                                \
                    d[j] = s[j];                                             \
                }                                                            \
                s += 8;                                                      \
                d += 8;                                                      \
                continue;                                                    \
            }                                                                \
            if (d >= dend) {                                                 \
                return -1;                                                   \
            }                                                                \
            Py_UCS4 c = *s;                                                  \
            if (c < 0x80) {                                                  \
                s += 1;                                                      \
            }                                                                \
            else if (c < 0xE0 && end - s >= 2) {                             \
                c = ((c & 0x1F) << 6) | (s[1] & 0x3F);                       \
                s += 2;                                                      \
            }                                                                \
            else if (c < 0xF0 && end - s >= 3) {                             \
                c = ((c & 0x0F) << 12) | ((Py_UCS4)(s[1] & 0x3F) << 6)       \
                    | (s[2] & 0x3F);                                         \
                s += 3;                                                      \
            }                                                                \
            else if (end - s >= 4) {                                         \
                c = ((c & 0x07) << 18) | ((Py_UCS4)(s[1] & 0x3F) << 12)      \
                    | ((Py_UCS4)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);         \
                s += 4;                                                      \
            }                                                                \
            else {                                                           \
                return -1;                                                   \
            }                                                                \
            *d++ = (T)c;                                                     \
        }                                                                    \
        return d == dend ? 0 : -1;                                           \
    }

WSM_DECODE_KIND(decode_ucs1, Py_UCS1)
WSM_DECODE_KIND(decode_ucs2, Py_UCS2)
WSM_DECODE_KIND(decode_ucs4, Py_UCS4)

static PyObject * /* new ref */
writer_finish(Writer *w)
{
    if (WSM_UNLIKELY(w->unknown)) {
        return PyUnicode_DecodeUTF8(w->buf, w->len, "strict");
    }
    if (w->maxchar < 0x80) {
        PyObject *res = PyUnicode_New(w->len, 127);
        if (res != NULL) {
            memcpy(PyUnicode_1BYTE_DATA(res), w->buf, (size_t)w->len);
        }
        return res;
    }
    PyObject *res = PyUnicode_New(w->len - w->extra, w->maxchar);
    if (res == NULL) {
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)w->buf;
    const unsigned char *end = s + w->len;
    Py_ssize_t n = PyUnicode_GET_LENGTH(res);
    void *data = PyUnicode_DATA(res);
    int rc;
    switch (PyUnicode_KIND(res)) {
    case PyUnicode_1BYTE_KIND:
        rc = decode_ucs1(s, end, (Py_UCS1 *)data, (Py_UCS1 *)data + n);
        break;
    case PyUnicode_2BYTE_KIND:
        rc = decode_ucs2(s, end, (Py_UCS2 *)data, (Py_UCS2 *)data + n);
        break;
    default:
        rc = decode_ucs4(s, end, (Py_UCS4 *)data, (Py_UCS4 *)data + n);
        break;
    }
    if (rc < 0) { /* the counts disagree with the text: a bug here */
        Py_DECREF(res);
        PyErr_SetString(PyExc_SystemError, "wsmanager.dumps: inconsistent output length");
        return NULL;
    }
    return res;
}

/* --------------------------------------------------------------- numbers */

static const char DIGITS2[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* Decimal writers: two digits per table lookup, and numbers cut into
 * blocks of 8 / 4 digits whose halves are independent (no long chain of
 * divisions). Each returns the end of what it wrote. */
static inline char *
put2(char *p, uint32_t v) /* v < 100, exactly 2 digits */
{
    memcpy(p, DIGITS2 + 2 * v, 2);
    return p + 2;
}

static inline char *
put4(char *p, uint32_t v) /* v < 10**4, exactly 4 digits */
{
    put2(p, v / 100);
    return put2(p + 2, v % 100);
}

static inline char *
put8(char *p, uint32_t v) /* v < 10**8, exactly 8 digits */
{
    put4(p, v / 10000);
    return put4(p + 4, v % 10000);
}

static inline char *
put_upto4(char *p, uint32_t v) /* v < 10**4, no leading zeros */
{
    if (v < 100) {
        if (v < 10) {
            *p = (char)('0' + v);
            return p + 1;
        }
        return put2(p, v);
    }
    if (v < 1000) {
        *p = (char)('0' + v / 100);
        return put2(p + 1, v % 100);
    }
    return put4(p, v);
}

static inline char *
put_upto8(char *p, uint32_t v) /* v < 10**8, no leading zeros */
{
    if (v < 10000) {
        return put_upto4(p, v);
    }
    return put4(put_upto4(p, v / 10000), v % 10000);
}

/* The digits of u (at most 20 bytes). */
static inline char *
put_u64(char *p, uint64_t u)
{
    if (u < 100000000u) {
        return put_upto8(p, (uint32_t)u);
    }
    uint64_t high = u / 100000000u;
    uint32_t low = (uint32_t)(u % 100000000u);
    if (high < 100000000u) {
        p = put_upto8(p, (uint32_t)high);
    }
    else {
        p = put_upto4(p, (uint32_t)(high / 100000000u)); /* < 1845 */
        p = put8(p, (uint32_t)(high % 100000000u));
    }
    return put8(p, low);
}

/* "000" "001" ... "999": three digits per lookup for ints. */
#define WSM_D10(p) p "0" p "1" p "2" p "3" p "4" p "5" p "6" p "7" p "8" p "9"
#define WSM_D100(p)                                                          \
    WSM_D10(p "0") WSM_D10(p "1") WSM_D10(p "2") WSM_D10(p "3")             \
    WSM_D10(p "4") WSM_D10(p "5") WSM_D10(p "6") WSM_D10(p "7")             \
    WSM_D10(p "8") WSM_D10(p "9")
static const char DIGITS3[3001] =
    WSM_D100("0") WSM_D100("1") WSM_D100("2") WSM_D100("3") WSM_D100("4")
    WSM_D100("5") WSM_D100("6") WSM_D100("7") WSM_D100("8") WSM_D100("9");
#undef WSM_D100
#undef WSM_D10

/* v < 1000 without leading zeros. Stores 4 bytes (the caller has the room):
 * one load and one store, whatever the length. */
static WSM_INLINE char *
put_upto3(char *p, uint32_t v)
{
    uint32_t n = 1 + (v >= 10) + (v >= 100);
    memcpy(p, DIGITS3 + 3 * v + 3 - n, 4); /* ends at most at the NUL */
    return p + n;
}

/* v < 1000 as exactly 3 digits; stores 4 bytes. */
static WSM_INLINE char *
put3(char *p, uint32_t v)
{
    memcpy(p, DIGITS3 + 3 * v, 4);
    return p + 3;
}

/* The digits of u, for ints: numbers below 10**9 in groups of three; stores
 * at most 21 bytes. */
static WSM_INLINE char *
put_int_digits(char *p, uint64_t u)
{
    if (u < 1000u) {
        return put_upto3(p, (uint32_t)u);
    }
    if (u < 1000000u) {
        uint32_t v = (uint32_t)u;
        return put3(put_upto3(p, v / 1000u), v % 1000u);
    }
    if (u < 1000000000u) {
        uint32_t v = (uint32_t)u;
        uint32_t low = v % 1000u;
        v /= 1000u;
        p = put_upto3(p, v / 1000u);
        p = put3(p, v % 1000u);
        return put3(p, low);
    }
    return put_u64(p, u);
}

static const char *
type_name(PyObject *obj)
{
    /* tp_name of a static type is "module.Name"; __name__ is the last part. */
    const char *name = Py_TYPE(obj)->tp_name;
    const char *dot = strrchr(name, '.');
    return dot ? dot + 1 : name;
}

/* Huge ints, written with int.__repr__ (also for subclasses, like
 * json.dumps). May raise ValueError past sys.get_int_max_str_digits(). */
static WSM_NOINLINE int
write_big_int(Writer *w, PyObject *obj, int quoted, char term)
{
    PyObject *s = PyLong_Type.tp_repr(obj); /* new ref */
    if (s == NULL) {
        return -1;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    int rc = -1;
    if (u != NULL && n <= PY_SSIZE_T_MAX - 3 && writer_reserve(w, n + 3) == 0) {
        char *p = w->buf + w->len;
        if (quoted) {
            *p++ = '"';
        }
        memcpy(p, u, (size_t)n);
        p += n;
        if (quoted) {
            *p++ = '"';
        }
        *p++ = term;
        w->len = p - w->buf;
        rc = 0;
    }
    else if (u != NULL && !PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    Py_DECREF(s);
    return rc;
}

/* v, quoted or not, then term. */
static WSM_INLINE int
write_ll(Writer *w, long long v, int quoted, char term)
{
    if (writer_reserve(w, 24) < 0) { /* quotes, sign, 19 digits, term */
        return -1;
    }
    char *p = w->buf + w->len;
    if (quoted) {
        *p++ = '"';
    }
    uint64_t u = (uint64_t)v;
    if (v < 0) {
        *p++ = '-';
        u = 0 - u;
    }
    p = put_int_digits(p, u);
    if (quoted) {
        *p++ = '"';
    }
    *p++ = term;
    w->len = p - w->buf;
    return 0;
}

/* Reads an int of at most two internal digits without a call; returns 0
 * when obj is bigger (or its layout is not the one known here). */
static WSM_INLINE int
small_int_value(PyObject *obj, long long *v)
{
#if PY_VERSION_HEX >= 0x030C0000
    /* |v| < 2**30 on 64-bit builds */
    if (PyUnstable_Long_IsCompact((PyLongObject *)obj)) {
        *v = (long long)PyUnstable_Long_CompactValue((PyLongObject *)obj);
        return 1;
    }
    return 0;
#else
    /* 3.10 / 3.11: ob_size is the signed digit count, ob_digit[0] always
     * exists (undefined when the int is 0). Two digits fit in 60 bits. */
    Py_ssize_t size = Py_SIZE(obj);
    const digit *d = ((PyLongObject *)obj)->ob_digit;
    if ((size_t)(size + 1) <= 2) { /* -1, 0, 1 */
        *v = size == 0 ? 0 : (long long)size * (long long)d[0];
        return 1;
    }
    switch (size) {
    case 2:
        *v = (long long)(((uint64_t)d[1] << PyLong_SHIFT) | d[0]);
        return 1;
    case -2:
        *v = -(long long)(((uint64_t)d[1] << PyLong_SHIFT) | d[0]);
        return 1;
    default:
        return 0;
    }
#endif
}

/* obj: an int or int subclass (not bool), not small. */
static WSM_NOINLINE int
write_int_other(Writer *w, PyObject *obj, int quoted, char term)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (WSM_UNLIKELY(overflow)) {
        return write_big_int(w, obj, quoted, term);
    }
    if (WSM_UNLIKELY(v == -1 && PyErr_Occurred())) {
        return -1;
    }
    return write_ll(w, v, quoted, term);
}

/* obj: an int or int subclass (not bool). */
static WSM_INLINE int
write_int(Writer *w, PyObject *obj, int quoted, char term)
{
    long long v;
    if (WSM_LIKELY(small_int_value(obj, &v))) {
        return write_ll(w, v, quoted, term);
    }
    return write_int_other(w, obj, quoted, term);
}

static const uint64_t POW10_U64[20] = {
    1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL,
    10000000ULL, 100000000ULL, 1000000000ULL, 10000000000ULL,
    100000000000ULL, 1000000000000ULL, 10000000000000ULL,
    100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
    100000000000000000ULL, 1000000000000000000ULL,
    10000000000000000000ULL,
};

/* Number of decimal digits of u >= 1. */
static inline int
count_digits(uint64_t u)
{
#if defined(__GNUC__) || defined(__clang__)
    int t = ((64 - __builtin_clzll(u)) * 1233) >> 12; /* 1233/4096 ~ log10 2 */
    return t + 1 - (u < POW10_U64[t]);
#else
    int n = 1;
    while (n < 20 && u >= POW10_U64[n]) {
        n++;
    }
    return n;
#endif
}

/* Writes n * 10**exp10 as float.__repr__ does in its fixed-notation range:
 * n has at most 17 digits and no trailing zero when exp10 < 0; the value is in
 * [1e-4, 1e16). Returns the length; out must have 48 bytes of room (the
 * runs of zeros are written with fixed 16- and 5-byte stores). */
static int
put_fixed(char *out, uint64_t n, int exp10)
{
    int point = count_digits(n) + exp10; /* digits before the point, >= -3 */
    char *o = out;
    if (exp10 >= 0) {                   /* 1200.0 */
        o = put_u64(o, n);
        memcpy(o, "0000000000000000", 16);
        o += exp10;                     /* <= 15 */
        *o++ = '.';
        *o++ = '0';
    }
    else if (point > 0) {               /* 12.34: digits, then the point */
        o = put_u64(out + 1, n);
        move_small(out, out + 1, (size_t)point); /* <= 16 bytes */
        out[point] = '.';
    }
    else {                              /* 0.0012 */
        memcpy(o, "0.000", 5);
        o = put_u64(o + 2 - point, n);  /* -point <= 3 zeros */
    }
    return (int)(o - out);
}

static const double POW10_F64[5] = {1e0, 1e1, 1e2, 1e3, 1e4};

#define WSM_TWO53 9007199254740992.0

/* float.__repr__ of a = |v| when it has at most 4 decimals (prices, game
 * coordinates, millisecond timestamps), in a few multiplications and one
 * division (three for each k when a * 10**4 >= 2**51); returns the length
 * written at out, or 0 (not settled here).
 *
 * repr is the shortest decimal that reads back as a, the closest one if
 * there are several. For k = 0 .. 4 decimals the k-digit decimals c / 10**k
 * near a are tested exactly: c < 2**53 and 10**k are exact doubles, so the
 * division is correctly rounded, i.e. gives what float() of the decimal
 * text gives (Clinger's fast path). Below 2**53 no decimal with fewer
 * integer digits can read back (those integers are doubles themselves), so
 * the first k that works gives repr's digits. x = a * 10**k is within half
 * an ulp of the exact product, so the integer nearest to that product is
 * m-1, m or m+1 (m = the one nearest to x); the decimals that read back form
 * a run of integers around it, so when exactly one of the three does it is
 * the closest; when two do, exact_repr decides. An x farther than
 * x * 2**-50 from every integer cannot read back (a reads back from within
 * a * 2**-53): that k is skipped without a division. */
static int
short_repr(double a, char *out)
{
    if (!(a >= 1e-4 && a < WSM_TWO53)) {
        return 0;
    }
    /* Any decimal with k <= 4 decimals is one with 4: one test rejects the
     * full-precision floats. */
    double x4 = a * 1e4;
    if (x4 < WSM_TWO53) {
        int64_t t4 = (int64_t)x4;
        double d4 = x4 - (double)t4;
        int64_t m4 = t4 + (d4 >= 0.5);
        d4 = d4 >= 0.5 ? 1.0 - d4 : d4;
        if (d4 > x4 * 0x1p-50) {
            return 0;
        }
        if (x4 < 0x1p51) {
            /* Below 2**51 only the integer m4 nearest to x4 can read back:
             * c / 10**4 reads back when |c - a * 10**4| <= 10**4 * ulp(a) / 2
             * <= x4 * 2**-53 + ... < 1/4 + 1/8 (x4 is within ulp(x4) / 2 <=
             * 1/8 of the exact product), closer to x4 than any integer but
             * m4 is. So one division settles every k <= 4: the k-decimal
             * decimals are the 4-decimal ones ending in zeros, and repr's
             * (fewest digits) is m4 without its trailing zeros. */
            if ((double)m4 / 1e4 != a) {
                return 0;
            }
            uint64_t c = (uint64_t)m4; /* >= 1: a >= 1e-4 */
            int k = 4;
            if (c % 10000u == 0) {
                c /= 10000u;
                k = 0;
            }
            else {
                if (c % 100u == 0) {
                    c /= 100u;
                    k = 2;
                }
                if (c % 10u == 0) {
                    c /= 10u;
                    k--;
                }
            }
            return put_fixed(out, c, -k);
        }
    }
    for (int k = 0; k <= 4; k++) {
        double x = a * POW10_F64[k];
        if (x >= WSM_TWO53) {
            return 0;
        }
        int64_t t = (int64_t)x;
        double frac = x - (double)t; /* exact */
        int64_t m = t;
        double d = frac;
        if (frac >= 0.5) {
            m = t + 1;
            d = 1.0 - frac;          /* exact */
        }
        if (d > x * 0x1p-50) {
            continue;
        }
        double scale = POW10_F64[k];
        int lower = m > 1 && (double)(m - 1) / scale == a;
        int mid = m > 0 && (double)m / scale == a;
        int upper = (double)(m + 1) / scale == a;
        if (lower + mid + upper == 1) {
            /* c has no trailing zero when k > 0: c / 10 would have been
             * found with k - 1 decimals */
            uint64_t c = (uint64_t)(lower ? m - 1 : (mid ? m : m + 1));
            return put_fixed(out, c, -k);
        }
        if (lower + mid + upper > 1) {
            return 0;
        }
    }
    return 0;
}

#ifdef __SIZEOF_INT128__
__extension__ typedef unsigned __int128 wsm_u128;

/* Drops d digits (pw = 10**d) from lo, hi and vr; the caller has checked
 * that a multiple of pw lies in [lo, hi]. */
#define WSM_DROP(d, pw)                                                      \
    {                                                                        \
        uint64_t q_ = vr / (pw);                                             \
        uint64_t rem_ = vr - q_ * (pw);                                      \
        below_nz = dropped_nz;                                               \
        cmp = (rem_ > (pw) / 2) - (rem_ < (pw) / 2);                         \
        dropped_nz |= rem_ != 0;                                             \
        vr = q_;                                                             \
        hi /= (pw);                                                          \
        lo = (lo + (pw) - 1) / (pw);                                         \
        r += (d);                                                            \
    }

/* float.__repr__ of a finite a = |v| in [1e-4, 1e16) without dtoa: writes
 * the text at out and returns its length (at most 22), or 0 when the caller
 * must fall back to PyOS_double_to_string (other magnitudes).
 *
 * repr gives the shortest decimal that reads back as a (what float() of it
 * returns), the closest to a if there are several, the even one on a tie;
 * in this range it uses fixed notation. Computed exactly in integers:
 * a = m2 * 2**e2; the decimals that read back are those inside
 * [a - gap_below/2, a + gap_above/2] (ends included when m2 is even, as
 * round-half-even reads them), scaled by 10**p (so a * 10**p >= 10**16, more
 * than the 17 digits any double needs) and by 2**(2 - e2) to make the ends
 * integers. [lo, hi] are the integer decimals (scale 10**-p) in that
 * interval; r digits are dropped while a multiple of 10**r remains in it
 * (fewest significant digits), then the multiple nearest to a is taken. */
static int
exact_repr(double a, char *out)
{
    if (!(a >= 1e-4 && a < 1e16)) {
        return 0;
    }
    uint64_t bits;
    memcpy(&bits, &a, sizeof(bits));
    uint64_t fraction = bits & ((1ULL << 52) - 1);
    int biased = (int)(bits >> 52); /* a > 0: no sign bit; normal here */
    uint64_t m2 = fraction | (1ULL << 52);
    int s = 2 - (biased - 1075);    /* a = 4*m2 / 2**s; 1 <= s <= 68 */

    /* e10 = floor(e * log10(2)) <= floor(log10(a)) <= e10 + 1, where
     * a in [2**e, 2**(e+1)); 78913 / 2**18 is log10(2) rounded down. */
    int e = biased - 1023; /* -14 .. 53 */
    int e10 = e >= 0 ? (e * 78913) >> 18 : -(((-e) * 78913 + (1 << 18) - 1) >> 18);
    int p = 16 - e10;      /* 1 .. 21; a * 10**p in [10**16, 10**18) */

    uint64_t mv = m2 << 2;
    /* At a power of two the gap below is half the gap above. */
    unsigned below = (fraction == 0 && biased > 1) ? 1 : 2;
    int even = (m2 & 1) == 0;

    wsm_u128 pow10 = p <= 19 ? (wsm_u128)POW10_U64[p]
                             : (wsm_u128)POW10_U64[19] * POW10_U64[p - 19];
    wsm_u128 mask = ((wsm_u128)1 << s) - 1;
    wsm_u128 pv = (wsm_u128)mv * pow10;  /* < 2**55 * 10**21 < 2**125 */
    wsm_u128 pm = pv - below * pow10;
    wsm_u128 pp = pv + 2 * pow10;
    uint64_t lo = (uint64_t)(pm >> s) + (((pm & mask) != 0) || !even);
    uint64_t hi = (uint64_t)(pp >> s) - (((pp & mask) == 0) && !even);
    uint64_t vr = (uint64_t)(pv >> s);           /* floor(a * 10**p) */
    wsm_u128 vr_rem = pv & mask;                 /* its fraction, / 2**s */
    wsm_u128 vr_half = (wsm_u128)1 << (s - 1);

    /* vr is divided along with lo and hi; what it loses decides the final
     * rounding: cmp compares the last dropped block with half its range,
     * below_nz says whether anything under that block was nonzero. */
    int cmp = (vr_rem > vr_half) - (vr_rem < vr_half);
    int below_nz = 0;
    int dropped_nz = vr_rem != 0;
    int r = 0;
    /* A multiple of pw lies in [lo, hi] when hi % pw <= hi - lo. */
    while (hi % 100000000u <= hi - lo) {
        WSM_DROP(8, 100000000u)
    }
    if (hi % 10000u <= hi - lo) {
        WSM_DROP(4, 10000u)
    }
    if (hi % 100u <= hi - lo) {
        WSM_DROP(2, 100u)
    }
    if (hi % 10u <= hi - lo) {
        WSM_DROP(1, 10u)
    }

    /* n = a * 10**(p - r) rounded half-even, then kept inside [lo, hi]. */
    uint64_t n = vr + (uint64_t)(cmp > 0 || (cmp == 0 && (below_nz || (vr & 1))));
    if (n < lo) {
        n = lo;
    }
    else if (n > hi) {
        n = hi;
    }

    /* The value is n * 10**(r - p); n has no trailing zero (<= 17 digits):
     * no multiple of 10 lies in [lo, hi] after the drops. */
    return put_fixed(out, n, r - p);
}
#undef WSM_DROP
#else
/* No 128-bit integers (e.g. MSVC): every float goes through dtoa. */
static int
exact_repr(double a, char *out)
{
    (void)a;
    (void)out;
    return 0;
}
#endif


static WSM_NOINLINE int
float_not_finite(double v)
{
    PyErr_Format(PyExc_ValueError,
                 "Out of range float values are not JSON compliant: %s",
                 isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf"));
    return -1;
}

static WSM_NOINLINE int
write_double_slow(Writer *w, double v, int quoted, char term)
{
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL) {
        return -1;
    }
    int rc = -1;
    size_t n = strlen(s);
    if (writer_reserve(w, (Py_ssize_t)n + 3) == 0) {
        char *p = w->buf + w->len;
        if (quoted) {
            *p++ = '"';
        }
        memcpy(p, s, n);
        p += n;
        if (quoted) {
            *p++ = '"';
        }
        *p++ = term;
        w->len = p - w->buf;
        rc = 0;
    }
    PyMem_Free(s);
    return rc;
}

static int
write_double(Writer *w, double v, int quoted, char term)
{
    if (WSM_UNLIKELY(!isfinite(v))) {
        return float_not_finite(v);
    }
    /* quote + sign + exact_repr's 48 (quote included) + term */
    if (writer_reserve(w, 51) < 0) {
        return -1;
    }
    char *p = w->buf + w->len;
    if (quoted) {
        *p++ = '"';
    }
    if (signbit(v)) {
        *p++ = '-';
    }
    int n;
    if (v == 0.0) {
        memcpy(p, "0.0", 3);
        n = 3;
    }
    else {
        double a = fabs(v);
        n = short_repr(a, p);
        if (n == 0) {
            n = exact_repr(a, p);
        }
        if (n == 0) {
            return write_double_slow(w, v, quoted, term);
        }
    }
    p += n;
    if (quoted) {
        *p++ = '"';
    }
    *p++ = term;
    w->len = p - w->buf;
    return 0;
}

/* ------------------------------------------------------------ containers */

static int encode_other(Writer *w, PyObject *obj);

/* The hot path, inlined into the container loops: exact scalar types are
 * one pointer comparison each; bool is tested before int (it is an int
 * subclass, and its own type). Writes the value and a ','; returns 1 when
 * obj is not one of them. Encoding these runs no Python code, so their
 * items need no reference. */
static WSM_INLINE int
encode_scalar(Writer *w, PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == &PyUnicode_Type) {
        return write_str(w, obj, ',');
    }
    if (tp == &PyLong_Type) {
        return write_int(w, obj, 0, ',');
    }
    if (tp == &PyFloat_Type) {
        return write_double(w, PyFloat_AS_DOUBLE(obj), 0, ',');
    }
    if (obj == Py_True) {
        return writer_raw(w, "true,", 5);
    }
    if (obj == Py_False) {
        return writer_raw(w, "false,", 6);
    }
    if (obj == Py_None) {
        return writer_raw(w, "null,", 5);
    }
    return 1;
}

/* obj, then ','. */
static inline int
encode(Writer *w, PyObject *obj)
{
    int r = encode_scalar(w, obj);
    return r == 1 ? encode_other(w, obj) : r;
}

/* key (converted like json.dumps), then ':'. */
static WSM_NOINLINE int
write_key_other(Writer *w, PyObject *key)
{
    if (PyUnicode_Check(key)) {
        return write_str_other(w, key, ':');
    }
    if (key == Py_True) {
        return writer_raw(w, "\"true\":", 7);
    }
    if (key == Py_False) {
        return writer_raw(w, "\"false\":", 8);
    }
    if (key == Py_None) {
        return writer_raw(w, "\"null\":", 7);
    }
    if (PyLong_Check(key)) {
        return write_int(w, key, 1, ':');
    }
    if (PyFloat_Check(key)) {
        return write_double(w, PyFloat_AS_DOUBLE(key), 1, ':');
    }
    PyErr_Format(PyExc_TypeError,
                 "keys must be str, int, float, bool or None, not %.200s",
                 type_name(key));
    return -1;
}

static WSM_INLINE int
write_key(Writer *w, PyObject *key)
{
    if (WSM_LIKELY(Py_TYPE(key) == &PyUnicode_Type)) {
        return write_str(w, key, ':');
    }
    return write_key_other(w, key);
}

/* The ',' after the last item becomes the closing bracket, followed by the
 * ',' of the container itself. */
static WSM_INLINE int
writer_close(Writer *w, char bracket)
{
    if (writer_reserve(w, 1) < 0) {
        return -1;
    }
    w->buf[w->len - 1] = bracket;
    w->buf[w->len++] = ',';
    return 0;
}

/* obj: exactly a dict. Items come from PyDict_Next; a value that is not a
 * plain scalar is held while it is encoded, since default_fn may run code
 * that mutates the dict (the iteration itself stays memory-safe then, only
 * its result is undefined). */
static int
write_dict(Writer *w, PyObject *obj)
{
    if (PyDict_GET_SIZE(obj) == 0) {
        return writer_raw(w, "{},", 3);
    }
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    Py_ssize_t pos = 0;
    PyObject *key, *value; /* borrowed */
    if (writer_raw(w, "{", 1) < 0) {
        goto done;
    }
    Py_ssize_t start = w->len;
    while (PyDict_Next(obj, &pos, &key, &value)) {
        /* Writing the key runs no Python code, so it needs no reference. */
        if (write_key(w, key) < 0) {
            goto done;
        }
        int r = encode_scalar(w, value);
        if (r == 1) {
            Py_INCREF(value);
            r = encode_other(w, value);
            Py_DECREF(value);
        }
        if (r < 0) {
            goto done;
        }
    }
    if (w->len == start) {
        /* default_fn emptied the dict before the first key was read */
        rc = writer_raw(w, "},", 2);
    }
    else {
        rc = writer_close(w, '}');
    }
done:
    Py_LeaveRecursiveCall();
    return rc;
}

/* obj: a dict subclass. Its items() is used (like json.dumps), so an
 * OrderedDict keeps its order. */
static WSM_NOINLINE int
write_dict_items(Writer *w, PyObject *obj)
{
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    PyObject *items = PyMapping_Items(obj); /* new ref */
    if (items == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (n == 0) {
        rc = writer_raw(w, "{},", 3);
        goto done;
    }
    if (writer_raw(w, "{", 1) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i); /* borrowed; items is ours */
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "items must return 2-tuples");
            goto done;
        }
        if (write_key(w, PyTuple_GET_ITEM(item, 0)) < 0
            || encode(w, PyTuple_GET_ITEM(item, 1)) < 0) {
            goto done;
        }
    }
    rc = writer_close(w, '}');
done:
    Py_XDECREF(items);
    Py_LeaveRecursiveCall();
    return rc;
}

/* obj: a list (or subclass). Indexes are re-checked against the current size
 * and items other than plain scalars are held while encoded: default_fn may
 * mutate the list. */
static int
write_list(Writer *w, PyObject *obj)
{
    if (PyList_GET_SIZE(obj) == 0) {
        return writer_raw(w, "[],", 3);
    }
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    if (writer_raw(w, "[", 1) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(obj); i++) {
        PyObject *item = PyList_GET_ITEM(obj, i); /* borrowed */
        int r = encode_scalar(w, item);
        if (r == 1) {
            Py_INCREF(item);
            r = encode_other(w, item);
            Py_DECREF(item);
        }
        if (r < 0) {
            goto done;
        }
    }
    /* The first item is written before any Python code can run, so the
     * buffer ends with ',' even if default_fn emptied the list. */
    rc = writer_close(w, ']');
done:
    Py_LeaveRecursiveCall();
    return rc;
}

/* obj: a tuple (or subclass): immutable, its items live as long as it does. */
static int
write_tuple(Writer *w, PyObject *obj)
{
    Py_ssize_t n = PyTuple_GET_SIZE(obj);
    if (n == 0) {
        return writer_raw(w, "[],", 3);
    }
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    if (writer_raw(w, "[", 1) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (encode(w, PyTuple_GET_ITEM(obj, i)) < 0) {
            goto done;
        }
    }
    rc = writer_close(w, ']');
done:
    Py_LeaveRecursiveCall();
    return rc;
}

/* ------------------------------------------------- Python code, safely
 *
 * Everything below may call Python code (default_fn, model_dump(),
 * isoformat(), a tzinfo's utcoffset(), a dataclass field's descriptor, a
 * module's __getattr__). Such code may mutate the container being encoded,
 * drop the last reference to anything it holds, or call dumps() itself. So
 * around every such call: the object it is made for is held by a caller
 * (write_dict / write_list hold their non-scalar items; tuples and the
 * items list of a dict subclass are owned), the call's result is a new
 * reference, no pointer into the writer's buffer is kept across it (the
 * buffer is reserved and written after the call), and a dict being walked
 * is only walked with PyDict_Next, which re-reads its table at each step. */

static void
restore_exception(PyObject *exc) /* steals exc */
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* A Python call made for obj (hook names it) failed. For the sends
 * (wrap_errors), an ordinary Exception becomes a TypeError naming the hook
 * and obj's type, chained to the original (__cause__): the caller of a send
 * catches one kind of error for "this message cannot be serialized".
 * TypeError (what a converter raises by convention), RecursionError,
 * MemoryError and what is not an Exception (KeyboardInterrupt,
 * asyncio.CancelledError) stay as they are. Returns -1. */
static WSM_NOINLINE int
hook_failed(Writer *w, PyObject *obj, const char *hook)
{
    if (!w->wrap_errors || !PyErr_ExceptionMatches(PyExc_Exception)
        || PyErr_ExceptionMatches(PyExc_TypeError)
        || PyErr_ExceptionMatches(PyExc_RecursionError)
        || PyErr_ExceptionMatches(PyExc_MemoryError)) {
        return -1;
    }
    PyObject *cause = wsm_fetch_exception(); /* new ref */
    if (cause == NULL) {
        return -1;
    }
    PyObject *text = PyObject_Str(cause); /* new ref; Python code, nothing held */
    if (text == NULL) {
        PyErr_Clear();
    }
    if (text != NULL && PyUnicode_GET_LENGTH(text) > 0) {
        PyErr_Format(PyExc_TypeError, "%s raised %.200s for an object of type %.200s: %.400U",
                     hook, type_name(cause), type_name(obj), text);
    }
    else {
        PyErr_Format(PyExc_TypeError, "%s raised %.200s for an object of type %.200s",
                     hook, type_name(cause), type_name(obj));
    }
    Py_XDECREF(text);
    PyObject *exc = wsm_fetch_exception(); /* new ref: the TypeError */
    if (exc == NULL) {
        Py_DECREF(cause);
        return -1;
    }
    PyException_SetContext(exc, Py_NewRef(cause)); /* steals */
    PyException_SetCause(exc, cause);              /* steals */
    restore_exception(exc);
    return -1;
}

static WSM_NOINLINE int
write_default(Writer *w, PyObject *obj)
{
    if (w->default_fn == NULL) {
        PyErr_Format(PyExc_TypeError,
                     "Object of type %.200s is not JSON serializable",
                     type_name(obj));
        return -1;
    }
    /* Guards a default that returns unsupported objects forever. */
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    PyObject *res = PyObject_CallOneArg(w->default_fn, obj); /* new ref */
    if (res != NULL) {
        rc = encode(w, res);
        Py_DECREF(res);
    }
    else {
        hook_failed(w, obj, "default()");
    }
    Py_LeaveRecursiveCall();
    return rc;
}

/* The result of calling obj.<method>() (a new ref, recursion-guarded, no
 * argument, or mode="json" for model_dump) encoded in obj's place. */
static int
write_method_result(Writer *w, PyObject *obj, PyObject *name, PyObject *kwnames, const char *hook)
{
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    PyObject *stack[3] = {NULL, obj, w->types->s_json}; /* [0]: room for the offset */
    PyObject *res = PyObject_VectorcallMethod(name, stack + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                              kwnames); /* new ref */
    if (res == NULL) {
        hook_failed(w, obj, hook);
    }
    else {
        rc = encode(w, res);
        Py_DECREF(res);
    }
    Py_LeaveRecursiveCall();
    return rc;
}

/* obj.isoformat() for a datetime / date / time subclass (it may override
 * it: pandas' Timestamp adds nanoseconds), or str(obj) for a UUID subclass;
 * the result must be a str. */
static WSM_NOINLINE int
write_text_of(Writer *w, PyObject *obj, PyObject *method)
{
    PyObject *text = method != NULL ? PyObject_CallMethodNoArgs(obj, method) /* new ref */
                                    : PyObject_Str(obj);
    if (text == NULL) {
        return hook_failed(w, obj, method != NULL ? "isoformat()" : "str()");
    }
    int rc;
    if (PyUnicode_Check(text)) {
        rc = write_str(w, text, ',');
    }
    else {
        PyErr_Format(PyExc_TypeError, "%s() of %.200s returned %.200s, not str",
                     method != NULL ? "isoformat" : "str", type_name(obj), type_name(text));
        rc = -1;
    }
    Py_DECREF(text);
    return rc;
}

/* ------------------------------------------------------- dates and times */

static inline char *
put6(char *p, uint32_t v) /* v < 10**6, exactly 6 digits */
{
    return put4(put2(p, v / 10000), v % 10000);
}

/* 2024-01-31 (years 1 .. 9999: always 4 digits, like isoformat). */
static inline char *
put_date(char *p, PyObject *obj)
{
    p = put4(p, (uint32_t)PyDateTime_GET_YEAR(obj));
    *p++ = '-';
    p = put2(p, (uint32_t)PyDateTime_GET_MONTH(obj));
    *p++ = '-';
    return put2(p, (uint32_t)PyDateTime_GET_DAY(obj));
}

/* 12:30:05, then .ffffff when the microseconds are not 0 (isoformat's
 * timespec="auto"). */
static inline char *
put_clock(char *p, int h, int m, int s, int us)
{
    p = put2(p, (uint32_t)h);
    *p++ = ':';
    p = put2(p, (uint32_t)m);
    *p++ = ':';
    p = put2(p, (uint32_t)s);
    if (us != 0) {
        *p++ = '.';
        p = put6(p, (uint32_t)us);
    }
    return p;
}

/* +HH:MM, +HH:MM:SS or +HH:MM:SS.ffffff, as isoformat writes an offset of
 * us microseconds (|us| < 24 h, checked by the caller). */
static inline char *
put_offset(char *p, long long us)
{
    char sign = '+';
    if (us < 0) {
        sign = '-';
        us = -us;
    }
    long long secs = us / 1000000;
    uint32_t micro = (uint32_t)(us % 1000000);
    *p++ = sign;
    p = put2(p, (uint32_t)(secs / 3600));
    *p++ = ':';
    p = put2(p, (uint32_t)(secs / 60 % 60));
    if (secs % 60 != 0 || micro != 0) {
        *p++ = ':';
        p = put2(p, (uint32_t)(secs % 60));
    }
    if (micro != 0) {
        *p++ = '.';
        p = put6(p, micro);
    }
    return p;
}

#define WSM_DAY_US (86400LL * 1000000LL)

/* The UTC offset of obj (an exact datetime or time) in microseconds, through
 * obj.utcoffset() (which calls tzinfo.utcoffset() with the datetime, fold
 * included, and checks the result), or *aware = 0 when it is naive. Called
 * before anything is reserved: the tzinfo may be Python code. */
static int
utc_offset(Writer *w, PyObject *obj, PyObject *tzinfo /* borrowed */, long long *us, int *aware)
{
    *aware = 0;
    *us = 0;
    if (tzinfo == Py_None) {
        return 0;
    }
    if (tzinfo == PyDateTime_TimeZone_UTC) {
        *aware = 1;
        return 0;
    }
    PyObject *off = PyObject_CallMethodNoArgs(obj, w->types->s_utcoffset); /* new ref */
    if (off == NULL) {
        return hook_failed(w, obj, "utcoffset()");
    }
    if (off == Py_None) {
        Py_DECREF(off);
        return 0;
    }
    int ok = PyDelta_Check(off);
    if (ok) {
        *us = ((long long)PyDateTime_DELTA_GET_DAYS(off) * 86400
               + PyDateTime_DELTA_GET_SECONDS(off)) * 1000000LL
              + PyDateTime_DELTA_GET_MICROSECONDS(off);
        ok = *us > -WSM_DAY_US && *us < WSM_DAY_US;
    }
    Py_DECREF(off);
    if (!ok) { /* datetime's own check makes this unreachable */
        PyErr_Format(PyExc_ValueError, "utcoffset() of %.200s is not a timedelta within a day",
                     type_name(obj));
        return -1;
    }
    *aware = 1;
    return 0;
}

/* obj: exactly a datetime. "YYYY-MM-DDTHH:MM:SS[.ffffff][+HH:MM[:SS[.ffffff]]]" */
static int
write_datetime(Writer *w, PyObject *obj)
{
    long long off;
    int aware;
    if (utc_offset(w, obj, PyDateTime_DATE_GET_TZINFO(obj), &off, &aware) < 0) {
        return -1;
    }
    if (writer_reserve(w, 48) < 0) { /* quotes, 26 + 16 bytes, ',' */
        return -1;
    }
    char *p = w->buf + w->len;
    *p++ = '"';
    p = put_date(p, obj);
    *p++ = 'T';
    p = put_clock(p, PyDateTime_DATE_GET_HOUR(obj), PyDateTime_DATE_GET_MINUTE(obj),
                  PyDateTime_DATE_GET_SECOND(obj), PyDateTime_DATE_GET_MICROSECOND(obj));
    if (aware) {
        p = put_offset(p, off);
    }
    *p++ = '"';
    *p++ = ',';
    w->len = p - w->buf;
    return 0;
}

/* obj: exactly a date. */
static int
write_date(Writer *w, PyObject *obj)
{
    if (writer_reserve(w, 13) < 0) {
        return -1;
    }
    char *p = w->buf + w->len;
    *p++ = '"';
    p = put_date(p, obj);
    *p++ = '"';
    *p++ = ',';
    w->len = p - w->buf;
    return 0;
}

/* obj: exactly a time. */
static int
write_time(Writer *w, PyObject *obj)
{
    long long off;
    int aware;
    if (utc_offset(w, obj, PyDateTime_TIME_GET_TZINFO(obj), &off, &aware) < 0) {
        return -1;
    }
    if (writer_reserve(w, 36) < 0) {
        return -1;
    }
    char *p = w->buf + w->len;
    *p++ = '"';
    p = put_clock(p, PyDateTime_TIME_GET_HOUR(obj), PyDateTime_TIME_GET_MINUTE(obj),
                  PyDateTime_TIME_GET_SECOND(obj), PyDateTime_TIME_GET_MICROSECOND(obj));
    if (aware) {
        p = put_offset(p, off);
    }
    *p++ = '"';
    *p++ = ',';
    w->len = p - w->buf;
    return 0;
}

/* ------------------------------------------- UUID, Decimal, Enum, models */

/* The 128-bit value of an int in b (big endian); -1 (no exception) when it
 * is negative or wider. */
static int
uuid_bytes(PyObject *v, unsigned char b[16])
{
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t n = PyLong_AsNativeBytes(v, b, 16,
                                        Py_ASNATIVEBYTES_BIG_ENDIAN
                                            | Py_ASNATIVEBYTES_UNSIGNED_BUFFER
                                            | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (n < 0 || n > 16) {
        PyErr_Clear();
        return -1;
    }
    return 0;
#else
    if (_PyLong_AsByteArray((PyLongObject *)v, b, 16, 0, 0) < 0) {
        PyErr_Clear();
        return -1;
    }
    return 0;
#endif
}

/* obj: exactly a uuid.UUID: "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" from its
 * int (a slot), as str(uuid) writes it. */
static int
write_uuid(Writer *w, PyObject *obj)
{
    unsigned char b[16];
    PyObject *v = PyObject_GetAttr(obj, w->types->s_int); /* new ref */
    if (v == NULL) {
        return hook_failed(w, obj, "UUID.int");
    }
    int ok = PyLong_CheckExact(v) && uuid_bytes(v, b) == 0;
    Py_DECREF(v);
    if (!ok) { /* someone replaced the slot: what str() makes of it */
        return write_text_of(w, obj, NULL);
    }
    if (writer_reserve(w, 39) < 0) {
        return -1;
    }
    char *p = w->buf + w->len;
    *p++ = '"';
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) {
            *p++ = '-';
        }
        *p++ = HEX[b[i] >> 4];
        *p++ = HEX[b[i] & 0xF];
    }
    *p++ = '"';
    *p++ = ',';
    w->len = p - w->buf;
    return 0;
}

/* 1: s[0:n] is a JSON number (RFC 8259 section 6); 0: Decimal's NaN, sNaN
 * or Infinity (signed or not); -1: anything else. */
static int
json_number_kind(const char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    if (i < n && s[i] == '-') {
        i++;
    }
    if (i < n && (s[i] == 'N' || s[i] == 's' || s[i] == 'I' || s[i] == 'n' || s[i] == 'i')) {
        return 0;
    }
#define WSM_DIGIT(c) ((c) >= '0' && (c) <= '9')
    if (i >= n || !WSM_DIGIT(s[i])) {
        return -1;
    }
    if (s[i] == '0') {
        i++;
    }
    else {
        while (i < n && WSM_DIGIT(s[i])) {
            i++;
        }
    }
    if (i < n && s[i] == '.') {
        i++;
        if (i >= n || !WSM_DIGIT(s[i])) {
            return -1;
        }
        while (i < n && WSM_DIGIT(s[i])) {
            i++;
        }
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) {
            i++;
        }
        if (i >= n || !WSM_DIGIT(s[i])) {
            return -1;
        }
        while (i < n && WSM_DIGIT(s[i])) {
            i++;
        }
    }
#undef WSM_DIGIT
    return i == n ? 1 : -1;
}

/* 1: the JSON number s[0:n] (json_number_kind() gave 1; NUL-terminated)
 * is finite but beyond the double range, so JSON.parse, json.loads (for a
 * number with a fraction or an exponent) and every reader that parses
 * numbers into doubles read it as an infinity; 0: it is not; -1: error set.
 * Numbers without an exponent and with at most 308 integer digits are below
 * 1e308 < DBL_MAX: no parse. Rounding is strtod's (PyOS_string_to_double),
 * i.e. what those readers do: a number that rounds down to DBL_MAX passes. */
static int
number_beyond_double(const char *s, Py_ssize_t n)
{
    Py_ssize_t int_digits = 0;
    int in_int = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] == 'e' || s[i] == 'E') {
            in_int = -1;
            break;
        }
        if (s[i] == '.') {
            in_int = 0;
        }
        else if (in_int && s[i] != '-') {
            int_digits++;
        }
    }
    if (in_int >= 0 && int_digits <= 308) {
        return 0;
    }
    /* no Python code runs here: dtoa allocates with PyMem_Malloc only */
    double d = PyOS_string_to_double(s, NULL, NULL);
    if (d == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    return isinf(d) ? 1 : 0;
}

/* obj: a decimal.Decimal: its exact str() as a JSON number ("12.50",
 * "1E+3", "-0.001"); NaN and infinities raise ValueError, as floats do, and
 * so does a finite Decimal beyond the double range (Decimal("1E+400")):
 * JSON.parse and json.loads would read it as an infinity, the value floats
 * refuse to send (see number_beyond_double()). */
static int
write_decimal(Writer *w, PyObject *obj)
{
    PyObject *text = PyObject_Str(obj); /* new ref */
    if (text == NULL) {
        return hook_failed(w, obj, "str()");
    }
    int rc = -1;
    Py_ssize_t n;
    const char *s = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &n) : NULL;
    if (s == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError, "str() of %.200s returned %.200s, not str",
                         type_name(obj), type_name(text));
        }
        goto done;
    }
    int kind = json_number_kind(s, n);
    if (kind == 1) {
        int beyond = number_beyond_double(s, n);
        if (beyond < 0) {
            goto done;
        }
        if (beyond) {
            kind = 0;
        }
    }
    switch (kind) {
    case 1:
        if (n <= PY_SSIZE_T_MAX - 1 && writer_reserve(w, n + 1) == 0) {
            memcpy(w->buf + w->len, s, (size_t)n); /* ASCII: the counts hold */
            w->len += n;
            w->buf[w->len++] = ',';
            rc = 0;
        }
        else if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        break;
    case 0:
        PyErr_Format(PyExc_ValueError, "Out of range Decimal values are not JSON compliant: %.50s",
                     s);
        break;
    default:
        PyErr_Format(PyExc_ValueError, "str() of %.200s is not a JSON number: %.50s",
                     type_name(obj), s);
        break;
    }
done:
    Py_DECREF(text);
    return rc;
}

/* obj: an enum.Enum member that is not an int / str / float: its value,
 * encoded like any other value. */
static int
write_enum(Writer *w, PyObject *obj)
{
    PyObject *value = PyObject_GetAttr(obj, w->types->s_value); /* new ref */
    if (value == NULL) {
        return hook_failed(w, obj, "Enum value");
    }
    int rc = -1;
    if (!Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        rc = encode(w, value);
        Py_LeaveRecursiveCall();
    }
    Py_DECREF(value);
    return rc;
}

/* obj: a dataclass instance; fields: its class's __dataclass_fields__ (new
 * ref, released here). An object of the fields, in definition order
 * (dataclasses.fields(): ClassVar and InitVar pseudo-fields are skipped);
 * each value read with getattr() (slots, properties and descriptors work).
 * A getattr may mutate fields: it is walked with PyDict_Next, holding the
 * current name and field. */
static int
write_dataclass(Writer *w, PyObject *obj, PyObject *fields, PyObject *marker /* borrowed */)
{
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        Py_DECREF(fields);
        return -1;
    }
    int rc = -1;
    Py_ssize_t pos = 0;
    PyObject *name, *field; /* borrowed, then held */
    if (writer_raw(w, "{", 1) < 0) {
        goto done;
    }
    Py_ssize_t start = w->len;
    while (PyDict_Next(fields, &pos, &name, &field)) {
        Py_INCREF(name);
        Py_INCREF(field);
        PyObject *kind = PyObject_GetAttr(field, w->types->s_field_type); /* new ref */
        Py_DECREF(field);
        if (kind == NULL) {
            Py_DECREF(name);
            hook_failed(w, obj, "a dataclass field");
            goto done;
        }
        int real = kind == marker;
        Py_DECREF(kind);
        if (!real) {
            Py_DECREF(name);
            continue;
        }
        PyObject *value = PyObject_GetAttr(obj, name); /* new ref */
        if (value == NULL) {
            Py_DECREF(name);
            hook_failed(w, obj, "a dataclass field");
            goto done;
        }
        int r = write_key(w, name);
        if (r == 0) {
            r = encode(w, value);
        }
        Py_DECREF(name);
        Py_DECREF(value);
        if (r < 0) {
            goto done;
        }
    }
    rc = w->len == start ? writer_raw(w, "},", 2) : writer_close(w, '}');
done:
    Py_LeaveRecursiveCall();
    Py_DECREF(fields);
    return rc;
}

/* *slot, or else attr of the module named mod_name if the app imported it
 * (this never imports anything), kept in *slot when it is a class (or, with
 * any, whatever it is). Borrowed; NULL without an exception when absent. */
static PyObject *
lazy_attr(PyObject **slot, PyObject *mod_name, const char *attr, int any)
{
    if (*slot != NULL) {
        return *slot;
    }
    PyObject *mod = PyImport_GetModule(mod_name); /* new ref */
    if (mod == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *value = PyObject_GetAttrString(mod, attr); /* new ref; may run Python */
    Py_DECREF(mod);
    if (value == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if ((!any && !PyType_Check(value)) || *slot != NULL) {
        Py_DECREF(value);
        return *slot;
    }
    *slot = value; /* owned by the module state */
    return value;
}

/* pydantic.main.BaseModel when pydantic v2 is in use (v1 models have no
 * model_dump: they go to default), else NULL. Borrowed. */
static PyObject *
model_class(wsm_json_types *t)
{
    PyObject *cls = lazy_attr(&t->model_type, t->m_pydantic_main, "BaseModel", 0);
    if (cls == NULL || cls == Py_None) {
        return NULL;
    }
    if (_PyType_Lookup((PyTypeObject *)cls, t->s_model_dump) == NULL) {
        Py_SETREF(t->model_type, Py_NewRef(Py_None)); /* v1: never again */
        return NULL;
    }
    return cls;
}

static WSM_INLINE int
is_subclass(PyTypeObject *tp, PyObject *cls /* borrowed, may be NULL */)
{
    return cls != NULL && PyType_IsSubtype(tp, (PyTypeObject *)cls);
}

/* Everything encode_other() does not know: dates and times, Enum, UUID,
 * Decimal, pydantic models, dataclasses, then default_fn. */
static WSM_NOINLINE int
write_extended(Writer *w, PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    wsm_json_types *t = w->types;
    if (PyDate_Check(obj)) { /* datetime is a date subclass */
        if (tp == PyDateTimeAPI->DateTimeType) {
            return write_datetime(w, obj);
        }
        if (tp == PyDateTimeAPI->DateType) {
            return write_date(w, obj);
        }
        return write_text_of(w, obj, t->s_isoformat);
    }
    if (PyTime_Check(obj)) {
        if (tp == PyDateTimeAPI->TimeType) {
            return write_time(w, obj);
        }
        return write_text_of(w, obj, t->s_isoformat);
    }
    /* Each lookup may run Python code (a module's __getattr__): only obj,
     * which the caller holds, is used across them. Its type is read again
     * after each one (Py_TYPE(obj), borrowed from obj): that code may set
     * obj.__class__, and a GC pass free the old class. */
    PyObject *cls = lazy_attr(&t->enum_type, t->m_enum, "Enum", 0); /* borrowed */
    if (is_subclass(Py_TYPE(obj), cls)) {
        return write_enum(w, obj);
    }
    cls = lazy_attr(&t->uuid_type, t->m_uuid, "UUID", 0);
    if (is_subclass(Py_TYPE(obj), cls)) {
        return (PyObject *)Py_TYPE(obj) == cls ? write_uuid(w, obj) : write_text_of(w, obj, NULL);
    }
    cls = lazy_attr(&t->decimal_type, t->m_decimal, "Decimal", 0);
    if (is_subclass(Py_TYPE(obj), cls)) {
        return write_decimal(w, obj);
    }
    cls = model_class(t);
    if (is_subclass(Py_TYPE(obj), cls)) {
        return write_method_result(w, obj, t->s_model_dump, t->kw_mode, "model_dump()");
    }
    tp = Py_TYPE(obj); /* no Python code runs from here to the lookup */
    PyObject *fields = _PyType_Lookup(tp, t->s_dataclass_fields); /* borrowed */
    if (fields != NULL && PyDict_Check(fields)) {
        Py_INCREF(fields);
        PyObject *marker = lazy_attr(&t->field_marker, t->m_dataclasses, "_FIELD", 1);
        if (marker != NULL) {
            return write_dataclass(w, obj, fields, marker);
        }
        Py_DECREF(fields);
    }
    return write_default(w, obj);
}

/* Everything but the exact scalar types that encode() handles inline;
 * writes obj, then ','. */
static int
encode_other(Writer *w, PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == &PyDict_Type) {
        return write_dict(w, obj);
    }
    if (tp == &PyList_Type) {
        return write_list(w, obj);
    }
    if (tp == &PyTuple_Type) {
        return write_tuple(w, obj);
    }
    /* Subclasses are encoded as their base type (IntEnum -> its value);
     * bool cannot be subclassed and was handled by encode(). */
    if (PyUnicode_Check(obj)) {
        return write_str_other(w, obj, ',');
    }
    if (PyLong_Check(obj)) {
        return write_int(w, obj, 0, ',');
    }
    if (PyFloat_Check(obj)) {
        return write_double(w, PyFloat_AS_DOUBLE(obj), 0, ',');
    }
    if (PyList_Check(obj)) {
        return write_list(w, obj);
    }
    if (PyTuple_Check(obj)) {
        return write_tuple(w, obj);
    }
    if (PyDict_Check(obj)) {
        return write_dict_items(w, obj);
    }
    return write_extended(w, obj);
}

/* ------------------------------------------------------------------ entry */

int
wsm_json_types_init(wsm_json_types *t)
{
    if (PyDateTimeAPI == NULL) {
        PyDateTime_IMPORT;
        if (PyDateTimeAPI == NULL) {
            return -1;
        }
    }
#define WSM_INTERN(field, text)                          \
    if ((t->field = PyUnicode_InternFromString(text)) == NULL) { \
        return -1;                                       \
    }
    WSM_INTERN(s_isoformat, "isoformat")
    WSM_INTERN(s_utcoffset, "utcoffset")
    WSM_INTERN(s_value, "_value_")
    WSM_INTERN(s_int, "int")
    WSM_INTERN(s_dataclass_fields, "__dataclass_fields__")
    WSM_INTERN(s_field_type, "_field_type")
    WSM_INTERN(s_model_dump, "model_dump")
    WSM_INTERN(s_json, "json")
    WSM_INTERN(m_uuid, "uuid")
    WSM_INTERN(m_decimal, "decimal")
    WSM_INTERN(m_enum, "enum")
    WSM_INTERN(m_dataclasses, "dataclasses")
    WSM_INTERN(m_pydantic_main, "pydantic.main")
#undef WSM_INTERN
    PyObject *mode = PyUnicode_InternFromString("mode"); /* new ref */
    if (mode == NULL) {
        return -1;
    }
    t->kw_mode = PyTuple_Pack(1, mode);
    Py_DECREF(mode);
    return t->kw_mode == NULL ? -1 : 0;
}

#define WSM_JSON_TYPES_FIELDS(X)                                             \
    X(uuid_type) X(decimal_type) X(enum_type) X(field_marker) X(model_type)  \
    X(s_isoformat) X(s_utcoffset) X(s_value) X(s_int) X(s_dataclass_fields)  \
    X(s_field_type) X(s_model_dump) X(s_json) X(kw_mode) X(m_uuid)           \
    X(m_decimal) X(m_enum) X(m_dataclasses) X(m_pydantic_main)

int
wsm_json_types_traverse(wsm_json_types *t, visitproc visit, void *arg)
{
#define WSM_VISIT(f) Py_VISIT(t->f);
    WSM_JSON_TYPES_FIELDS(WSM_VISIT)
#undef WSM_VISIT
    return 0;
}

void
wsm_json_types_clear(wsm_json_types *t)
{
#define WSM_CLEAR(f) Py_CLEAR(t->f);
    WSM_JSON_TYPES_FIELDS(WSM_CLEAR)
#undef WSM_CLEAR
}

PyObject * /* new ref */
wsm_json_dumps(PyObject *obj, PyObject *default_fn, wsm_json_types *types, int wrap_errors)
{
    Writer w;
    w.buf = w.small;
    w.len = 0;
    w.cap = WSM_STACK_BUF;
    w.default_fn = (default_fn == Py_None) ? NULL : default_fn;
    w.types = types;
    w.wrap_errors = wrap_errors;
    w.extra = 0;
    w.maxchar = 127;
    w.unknown = 0;

    PyObject *res = NULL;
    if (encode(&w, obj) == 0) {
        w.len--; /* the ',' after the value */
        res = writer_finish(&w);
    }
    if (w.buf != w.small) {
        PyMem_Free(w.buf);
    }
    return res;
}
