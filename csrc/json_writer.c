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
 * Ownership: every PyObject* parameter below is borrowed unless noted.
 */
#include "json_writer.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#  define WSM_LIKELY(x) __builtin_expect(!!(x), 1)
#  define WSM_UNLIKELY(x) __builtin_expect(!!(x), 0)
#  define WSM_NOINLINE __attribute__((noinline))
#else
#  define WSM_LIKELY(x) (x)
#  define WSM_UNLIKELY(x) (x)
#  define WSM_NOINLINE
#endif

#define WSM_STACK_BUF 4096
/* Non-ASCII strings are written in chunks of this many code points, each
 * preceded by one reservation of the chunk's worst case (6 bytes a point). */
#define WSM_STR_CHUNK 1024
#define WSM_RECURSION_WHERE " while encoding a JSON object"

typedef struct {
    char *buf;            /* small, or a PyMem block owned by the writer */
    Py_ssize_t len;
    Py_ssize_t cap;
    PyObject *default_fn; /* borrowed, NULL when there is none */
    int nonascii;         /* some byte >= 0x80 may have been written */
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

static inline int
writer_reserve(Writer *w, Py_ssize_t need)
{
    if (WSM_LIKELY(w->cap - w->len >= need)) {
        return 0;
    }
    return writer_grow(w, need);
}

static inline int
writer_raw(Writer *w, const char *s, Py_ssize_t n)
{
    if (writer_reserve(w, n) < 0) {
        return -1;
    }
    memcpy(w->buf + w->len, s, (size_t)n);
    w->len += n;
    return 0;
}

static inline int
writer_char(Writer *w, char c)
{
    if (writer_reserve(w, 1) < 0) {
        return -1;
    }
    w->buf[w->len++] = c;
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

/* Index of the first byte of ASCII text s[0:n] that needs an escape, or n.
 * Eight bytes at a time: a word needs a look when some byte is < 0x20, '"'
 * or '\\' (the classic "has less than" / "has zero byte" bit tricks, exact
 * for bytes < 0x80). */
static inline Py_ssize_t
ascii_scan(const unsigned char *s, Py_ssize_t n)
{
    const uint64_t ones = 0x0101010101010101ULL;
    const uint64_t highs = 0x8080808080808080ULL;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, q, b;
        memcpy(&x, s + i, 8);
        q = x ^ (ones * '"');
        b = x ^ (ones * '\\');
        uint64_t hit = ((x - ones * 0x20) & ~x)
                       | ((q - ones) & ~q)
                       | ((b - ones) & ~b);
        if (hit & highs) {
            break;
        }
    }
    for (; i < n; i++) {
        if (ESCAPE[s[i]]) {
            return i;
        }
    }
    return n;
}

static int
write_ascii(Writer *w, const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = ascii_scan(s, n);
    if (n > PY_SSIZE_T_MAX - 2) {
        PyErr_NoMemory();
        return -1;
    }
    if (writer_reserve(w, n + 2) < 0) {
        return -1;
    }
    char *p = w->buf + w->len;
    *p++ = '"';
    memcpy(p, s, (size_t)i);
    p += i;
    if (WSM_LIKELY(i == n)) {
        *p++ = '"';
        w->len = p - w->buf;
        return 0;
    }
    /* Slow path: the rest byte by byte, each needing at most 6 bytes. */
    w->len = p - w->buf;
    for (; i < n; i++) {
        if (writer_reserve(w, 6 + 1) < 0) {
            return -1;
        }
        unsigned char c = s[i];
        p = w->buf + w->len;
        if (ESCAPE[c]) {
            p = put_escape(p, c);
        }
        else {
            *p++ = (char)c;
        }
        w->len = p - w->buf;
    }
    w->buf[w->len++] = '"';  /* room kept by the last reserve (or the first) */
    return 0;
}

/* One loop per storage kind; T is the code unit type. UTF-8 is produced
 * directly from the code points, so no UTF-8 copy is cached on the str and
 * lone surrogates are caught in the same pass. */
#define WSM_WRITE_KIND(NAME, T, WIDE)                                        \
    static int NAME(Writer *w, const T *s, Py_ssize_t n)                     \
    {                                                                        \
        if (writer_char(w, '"') < 0) {                                       \
            return -1;                                                       \
        }                                                                    \
        Py_ssize_t i = 0;                                                    \
        while (i < n) {                                                      \
            Py_ssize_t end = (n - i > WSM_STR_CHUNK) ? i + WSM_STR_CHUNK : n; \
            if (writer_reserve(w, 6 * (end - i) + 1) < 0) {                  \
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
        w->buf[w->len++] = '"'; /* the +1 above, or the first reserve */     \
        return 0;                                                            \
    }

/* UCS1 never reaches 0x800. */
#define WSM_WIDE_NONE { (void)0; }
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

WSM_WRITE_KIND(write_ucs1, Py_UCS1, WSM_WIDE_NONE)
WSM_WRITE_KIND(write_ucs2, Py_UCS2, WSM_WIDE_UCS2)
WSM_WRITE_KIND(write_ucs4, Py_UCS4, WSM_WIDE_UCS4)

/* obj: a str or str subclass. */
static int
write_str(Writer *w, PyObject *obj)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0) {
        return -1;
    }
#endif
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    const void *data = PyUnicode_DATA(obj);
    if (PyUnicode_IS_ASCII(obj)) {
        return write_ascii(w, (const unsigned char *)data, n);
    }
    w->nonascii = 1;
    switch (PyUnicode_KIND(obj)) {
    case PyUnicode_1BYTE_KIND:
        return write_ucs1(w, (const Py_UCS1 *)data, n);
    case PyUnicode_2BYTE_KIND:
        return write_ucs2(w, (const Py_UCS2 *)data, n);
    default:
        return write_ucs4(w, (const Py_UCS4 *)data, n);
    }
}

/* --------------------------------------------------------------- numbers */

static const char DIGITS2[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* Writes the decimal digits of u so that they end just before `end`;
 * returns where they start (at most 20 bytes). */
static inline char *
fmt_u64(char *end, unsigned long long u)
{
    char *p = end;
    while (u >= 100) {
        unsigned r = (unsigned)(u % 100);
        u /= 100;
        p -= 2;
        memcpy(p, DIGITS2 + 2 * r, 2);
    }
    if (u >= 10) {
        p -= 2;
        memcpy(p, DIGITS2 + 2 * u, 2);
    }
    else {
        *--p = (char)('0' + u);
    }
    return p;
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
write_big_int(Writer *w, PyObject *obj, int quoted)
{
    PyObject *s = PyLong_Type.tp_repr(obj); /* new ref */
    if (s == NULL) {
        return -1;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    int rc = -1;
    if (u != NULL && n <= PY_SSIZE_T_MAX - 2 && writer_reserve(w, n + 2) == 0) {
        char *p = w->buf + w->len;
        if (quoted) {
            *p++ = '"';
        }
        memcpy(p, u, (size_t)n);
        p += n;
        if (quoted) {
            *p++ = '"';
        }
        w->len = p - w->buf;
        rc = 0;
    }
    else if (u != NULL && !PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    Py_DECREF(s);
    return rc;
}

/* obj: an int or int subclass (not bool). */
static int
write_int(Writer *w, PyObject *obj, int quoted)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (WSM_UNLIKELY(overflow)) {
        return write_big_int(w, obj, quoted);
    }
    if (WSM_UNLIKELY(v == -1 && PyErr_Occurred())) {
        return -1;
    }
    char tmp[24];
    char *end = tmp + sizeof(tmp);
    char *q = end;
    if (quoted) {
        *--q = '"';
    }
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    q = fmt_u64(q, u);
    if (v < 0) {
        *--q = '-';
    }
    if (quoted) {
        *--q = '"';
    }
    return writer_raw(w, q, end - q);
}

static const double POW10[23] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

#define WSM_TWO53 9007199254740992.0

/* float.__repr__ of a finite, nonzero a = |v| in [1e-4, 2**53), without
 * dtoa, for the common "few decimals" floats; writes the digits at out and
 * returns their count, or 0 when the caller must fall back to
 * PyOS_double_to_string.
 *
 * repr is the shortest decimal that reads back as a, the closest one if there
 * are several. For k = 0, 1, 2 ... fractional digits, the nearest k-digit
 * decimal c / 10**k is tested with an exact check: c < 2**53 and 10**k
 * (k <= 22) are exact doubles, so c / 10**k is the correctly rounded value of
 * the decimal, i.e. what float() of its text gives (Clinger's fast path).
 * Doubles in this range below 2**53 leave no shorter candidate with fewer
 * integer digits, and in [1e-4, 1e16) repr uses fixed notation, so the first k
 * that reads back gives repr's digits. x = a * 10**k is within half an ulp
 * of the exact product, so the nearest integer to the exact product is one
 * of m-1, m, m+1 (m = the nearest to x); the readable candidates form a run
 * of integers around it, so when exactly one of those three reads back it is
 * the closest; when two do (ties, near-ties) dtoa decides. Values of x
 * farther than x * 2**-50 from an integer cannot read back (the interval of
 * a has half-width <= a * 2**-53): those k are skipped without a division. */
static int
fast_repr(double a, char *out)
{
    if (!(a >= 1e-4 && a < WSM_TWO53)) {
        return 0;
    }
    for (int k = 0; k <= 22; k++) {
        double x = a * POW10[k];
        if (x >= WSM_TWO53) {
            return 0;
        }
        long long t = (long long)x;
        double frac = x - (double)t; /* exact */
        long long m;
        double d;
        if (frac >= 0.5) {
            m = t + 1;
            d = 1.0 - frac; /* exact (Sterbenz) */
        }
        else {
            m = t;
            d = frac;
        }
        if (d > x * 0x1p-50) {
            continue;
        }
        int count = 0;
        long long found = 0;
        for (long long c = m - 1; c <= m + 1; c++) {
            if (c > 0 && (double)c / POW10[k] == a) {
                count++;
                found = c;
            }
        }
        if (count == 0) {
            continue;
        }
        if (count > 1) {
            return 0;
        }
        char tmp[24];
        char *end = tmp + sizeof(tmp);
        char *digits = fmt_u64(end, (unsigned long long)found);
        int nd = (int)(end - digits);
        char *p = out;
        if (k == 0) {
            memcpy(p, digits, (size_t)nd);
            p += nd;
            *p++ = '.';
            *p++ = '0';
        }
        else if (nd > k) {
            memcpy(p, digits, (size_t)(nd - k));
            p += nd - k;
            *p++ = '.';
            memcpy(p, digits + (nd - k), (size_t)k);
            p += k;
        }
        else {
            *p++ = '0';
            *p++ = '.';
            for (int z = nd; z < k; z++) {
                *p++ = '0';
            }
            memcpy(p, digits, (size_t)nd);
            p += nd;
        }
        return (int)(p - out);
    }
    return 0;
}

static WSM_NOINLINE int
float_not_finite(double v)
{
    PyErr_Format(PyExc_ValueError,
                 "Out of range float values are not JSON compliant: %s",
                 isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf"));
    return -1;
}

static WSM_NOINLINE int
write_double_slow(Writer *w, double v, int quoted)
{
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL) {
        return -1;
    }
    int rc = -1;
    size_t n = strlen(s);
    if (writer_reserve(w, (Py_ssize_t)n + 2) == 0) {
        char *p = w->buf + w->len;
        if (quoted) {
            *p++ = '"';
        }
        memcpy(p, s, n);
        p += n;
        if (quoted) {
            *p++ = '"';
        }
        w->len = p - w->buf;
        rc = 0;
    }
    PyMem_Free(s);
    return rc;
}

static int
write_double(Writer *w, double v, int quoted)
{
    if (WSM_UNLIKELY(!isfinite(v))) {
        return float_not_finite(v);
    }
    /* sign + 16 digits + "0." + 3 zeros + ".0" + quotes fits in 32 */
    if (writer_reserve(w, 32) < 0) {
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
        n = fast_repr(fabs(v), p);
        if (n == 0) {
            return write_double_slow(w, v, quoted);
        }
    }
    p += n;
    if (quoted) {
        *p++ = '"';
    }
    w->len = p - w->buf;
    return 0;
}

/* ------------------------------------------------------------ containers */

static int encode(Writer *w, PyObject *obj);

static int
write_key(Writer *w, PyObject *key)
{
    if (WSM_LIKELY(PyUnicode_Check(key))) {
        return write_str(w, key);
    }
    if (key == Py_True) {
        return writer_raw(w, "\"true\"", 6);
    }
    if (key == Py_False) {
        return writer_raw(w, "\"false\"", 7);
    }
    if (key == Py_None) {
        return writer_raw(w, "\"null\"", 6);
    }
    if (PyLong_Check(key)) {
        return write_int(w, key, 1);
    }
    if (PyFloat_Check(key)) {
        return write_double(w, PyFloat_AS_DOUBLE(key), 1);
    }
    PyErr_Format(PyExc_TypeError,
                 "keys must be str, int, float, bool or None, not %.200s",
                 type_name(key));
    return -1;
}

/* obj: exactly a dict. Items come from PyDict_Next; the value is held while
 * it is encoded, since default_fn may run code that mutates the dict (the
 * iteration itself stays memory-safe then, only its result is undefined). */
static int
write_dict(Writer *w, PyObject *obj)
{
    if (PyDict_GET_SIZE(obj) == 0) {
        return writer_raw(w, "{}", 2);
    }
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    Py_ssize_t pos = 0;
    PyObject *key, *value; /* borrowed */
    if (writer_char(w, '{') < 0) {
        goto done;
    }
    while (PyDict_Next(obj, &pos, &key, &value)) {
        /* Writing the key runs no Python code, so it needs no reference. */
        if (write_key(w, key) < 0 || writer_char(w, ':') < 0) {
            goto done;
        }
        Py_INCREF(value);
        int r = encode(w, value);
        Py_DECREF(value);
        if (r < 0 || writer_char(w, ',') < 0) {
            goto done;
        }
    }
    w->buf[w->len - 1] = '}'; /* replaces the last ',' */
    rc = 0;
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
    if (items == NULL || writer_char(w, '{') < 0) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i); /* borrowed; items is ours */
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "items must return 2-tuples");
            goto done;
        }
        if ((i > 0 && writer_char(w, ',') < 0)
            || write_key(w, PyTuple_GET_ITEM(item, 0)) < 0
            || writer_char(w, ':') < 0
            || encode(w, PyTuple_GET_ITEM(item, 1)) < 0) {
            goto done;
        }
    }
    rc = writer_char(w, '}');
done:
    Py_XDECREF(items);
    Py_LeaveRecursiveCall();
    return rc;
}

/* obj: a list (or subclass). Indexes are re-checked against the current size
 * and each item is held while encoded: default_fn may mutate the list. */
static int
write_list(Writer *w, PyObject *obj)
{
    if (PyList_GET_SIZE(obj) == 0) {
        return writer_raw(w, "[]", 2);
    }
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    if (writer_char(w, '[') < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(obj); i++) {
        PyObject *item = PyList_GET_ITEM(obj, i);
        Py_INCREF(item);
        int r = encode(w, item);
        Py_DECREF(item);
        if (r < 0 || writer_char(w, ',') < 0) {
            goto done;
        }
    }
    if (w->buf[w->len - 1] == ',') {
        w->buf[w->len - 1] = ']';
    }
    else {
        /* the list was emptied by default_fn before any item was written */
        rc = writer_char(w, ']');
        goto done;
    }
    rc = 0;
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
        return writer_raw(w, "[]", 2);
    }
    if (Py_EnterRecursiveCall(WSM_RECURSION_WHERE)) {
        return -1;
    }
    int rc = -1;
    if (writer_char(w, '[') < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (encode(w, PyTuple_GET_ITEM(obj, i)) < 0 || writer_char(w, ',') < 0) {
            goto done;
        }
    }
    w->buf[w->len - 1] = ']';
    rc = 0;
done:
    Py_LeaveRecursiveCall();
    return rc;
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
    Py_LeaveRecursiveCall();
    return rc;
}

static int
encode(Writer *w, PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    /* Exact types first: one pointer comparison each. */
    if (tp == &PyUnicode_Type) {
        return write_str(w, obj);
    }
    if (tp == &PyLong_Type) {
        return write_int(w, obj, 0);
    }
    if (tp == &PyFloat_Type) {
        return write_double(w, PyFloat_AS_DOUBLE(obj), 0);
    }
    if (tp == &PyDict_Type) {
        return write_dict(w, obj);
    }
    if (tp == &PyList_Type) {
        return write_list(w, obj);
    }
    /* bool before int: bool is an int subclass. */
    if (obj == Py_True) {
        return writer_raw(w, "true", 4);
    }
    if (obj == Py_False) {
        return writer_raw(w, "false", 5);
    }
    if (obj == Py_None) {
        return writer_raw(w, "null", 4);
    }
    if (tp == &PyTuple_Type) {
        return write_tuple(w, obj);
    }
    /* Subclasses are encoded as their base type (IntEnum -> its value). */
    if (PyUnicode_Check(obj)) {
        return write_str(w, obj);
    }
    if (PyLong_Check(obj)) {
        return write_int(w, obj, 0);
    }
    if (PyFloat_Check(obj)) {
        return write_double(w, PyFloat_AS_DOUBLE(obj), 0);
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
    return write_default(w, obj);
}

/* ------------------------------------------------------------------ entry */

PyObject * /* new ref */
wsm_json_dumps(PyObject *obj, PyObject *default_fn)
{
    Writer w;
    w.buf = w.small;
    w.len = 0;
    w.cap = WSM_STACK_BUF;
    w.default_fn = (default_fn == Py_None) ? NULL : default_fn;
    w.nonascii = 0;

    PyObject *res = NULL;
    if (encode(&w, obj) == 0) {
        if (!w.nonascii) {
            res = PyUnicode_New(w.len, 127);
            if (res != NULL) {
                memcpy(PyUnicode_1BYTE_DATA(res), w.buf, (size_t)w.len);
            }
        }
        else {
            res = PyUnicode_DecodeUTF8(w.buf, w.len, "strict");
        }
    }
    if (w.buf != w.small) {
        PyMem_Free(w.buf);
    }
    return res;
}
