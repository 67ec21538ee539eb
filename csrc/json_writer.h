/* Compact JSON encoder used by every send of wsmanager.
 *
 * Contract (module.c relies on it):
 *   wsm_json_dumps(obj, default_fn)
 *     obj        borrowed: the value to encode
 *     default_fn borrowed, may be NULL: called with an unsupported object, its
 *                result is encoded in its place (like json.dumps(default=...))
 *   returns a new reference to a str holding compact JSON (no spaces, UTF-8
 *   kept as is), or NULL with an exception set:
 *     ValueError     NaN / +-Infinity (browsers cannot parse them)
 *     TypeError      unsupported type without default_fn, unsupported dict key
 *     RecursionError nesting too deep (guarded by Py_EnterRecursiveCall)
 *     MemoryError    out of memory
 */
#ifndef WSM_JSON_WRITER_H
#define WSM_JSON_WRITER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyObject *wsm_json_dumps(PyObject *obj, PyObject *default_fn); /* new ref */

#endif
