/* Small CPython-version shims shared by the C files (no state, header only). */
#ifndef WSM_PYCOMPAT_H
#define WSM_PYCOMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* The exception being raised, normalized, with its traceback attached: a
 * new reference, and no exception is set afterwards (NULL if none was). */
static inline PyObject *
wsm_fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Equality of two exact, ready str objects, as str.__eq__ decides it,
 * without calling it (no Python code runs): identity first (ids are usually
 * the very objects that were registered), then length, kind and the code
 * units. The registry's and the history's lookups by id use it. */
static inline int
wsm_str_same(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    if (n != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b)) {
        return 0;
    }
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b),
                  (size_t)n * PyUnicode_KIND(a)) == 0;
}

#endif /* WSM_PYCOMPAT_H */
