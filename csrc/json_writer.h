/* Compact JSON encoder used by every send of wsmanager.
 *
 * Contract (module.c relies on it):
 *   wsm_json_dumps(obj, default_fn, types, wrap_errors)
 *     obj         borrowed: the value to encode
 *     default_fn  borrowed, may be NULL: called with an object the encoder
 *                 does not handle natively, its result is encoded in its
 *                 place (like json.dumps(default=...))
 *     types       borrowed, not NULL: the module state's wsm_json_types
 *     wrap_errors 0: an exception raised by Python code the encoder calls
 *                 (default_fn, model_dump(), isoformat(), utcoffset(), ...)
 *                 propagates as it is (json.dumps does the same); 1 (the
 *                 sends): an Exception other than TypeError, RecursionError
 *                 or MemoryError becomes a TypeError naming the hook and the
 *                 object's type, chained to the original (__cause__)
 *   returns a new reference to a str holding compact JSON (no spaces, UTF-8
 *   kept as is), or NULL with an exception set:
 *     ValueError     NaN / +-Infinity, float or Decimal (browsers cannot
 *                    parse them)
 *     TypeError      unsupported type without default_fn, unsupported dict key
 *     RecursionError nesting too deep (guarded by Py_EnterRecursiveCall)
 *     MemoryError    out of memory
 *
 * Natively encoded beyond JSON's own types: datetime / date / time (ISO 8601,
 * the text of .isoformat()), uuid.UUID (str()), decimal.Decimal (a number),
 * enum.Enum (its value), dataclass instances (an object of their fields) and
 * pydantic v2 models (model_dump(mode="json")).
 */
#ifndef WSM_JSON_WRITER_H
#define WSM_JSON_WRITER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The classes the encoder recognises and the names it uses, owned by the
 * module state (strong references; visited and cleared with it). A class is
 * looked up in sys.modules only once its module was imported by the app:
 * the encoder never imports uuid, decimal, enum, dataclasses or pydantic. */
typedef struct {
    PyObject *uuid_type;     /* uuid.UUID, or NULL until seen in sys.modules */
    PyObject *decimal_type;  /* decimal.Decimal */
    PyObject *enum_type;     /* enum.Enum */
    PyObject *field_marker;  /* dataclasses._FIELD: a real field's _field_type */
    PyObject *model_type;    /* pydantic.main.BaseModel (v2 only) */
    PyObject *s_isoformat;
    PyObject *s_utcoffset;
    PyObject *s_value;       /* "_value_" */
    PyObject *s_int;
    PyObject *s_dataclass_fields;
    PyObject *s_field_type;
    PyObject *s_model_dump;
    PyObject *s_json;
    PyObject *kw_mode;       /* ("mode",) */
    PyObject *m_uuid;        /* module names */
    PyObject *m_decimal;
    PyObject *m_enum;
    PyObject *m_dataclasses;
    PyObject *m_pydantic_main;
} wsm_json_types;

int wsm_json_types_init(wsm_json_types *t);   /* 0, or -1 with an exception */
int wsm_json_types_traverse(wsm_json_types *t, visitproc visit, void *arg);
void wsm_json_types_clear(wsm_json_types *t);

PyObject *wsm_json_dumps(PyObject *obj, PyObject *default_fn, wsm_json_types *types,
                         int wrap_errors); /* new ref */

#endif
