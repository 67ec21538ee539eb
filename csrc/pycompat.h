/* Small CPython-version shims shared by the C files (no state, header only). */
#ifndef WSM_PYCOMPAT_H
#define WSM_PYCOMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

#endif /* WSM_PYCOMPAT_H */
