/* The fan-out of one serialized message to a lobby's members on the ordinary
 * ASGI send path: what wsmanager/delivery.py's Python loop did per recipient
 * (a state check, the raw ASGI send called with a fresh message dict, the
 * send's coroutine stepped once), without a Python frame per recipient.
 *
 * Memory safety: every send runs arbitrary Python code (the server's, a
 * middleware's, GC finalizers), which may connect, disconnect or move
 * anyone, or drop the last other reference to a websocket. So:
 *  - the recipients are the items of a list the caller built and shares
 *    with no one: strong references, taken before the first call;
 *  - no wsm_conn * or wsm_group * is kept across a call: membership is
 *    checked when a recipient's turn comes, from the registry's removal
 *    counter (unchanged: every recipient is still a member) or, once it
 *    moved, by fresh lookups (identity and exact-str keys: no Python code);
 *  - every object a step needs is a reference this function owns.
 */
#include "fanout.h"
#include "pycompat.h"

/* Whether `ws` is no longer a recipient: not a committed member of
 * `lobby`, or a connection of `exclude`. Runs no Python code. */
static int
left_lobby(wsm_registry *r, PyObject *ws, PyObject *lobby, PyObject *exclude)
{
    wsm_conn *c = wsm_find_conn(r, ws);
    if (c == NULL || !wsm_is_member(r, c, wsm_find_lobby(r, lobby))) {
        return 1;
    }
    return exclude != NULL && c->user == wsm_find_user(r, exclude);
}

/* slow(ws, kind, a, b): truthy -> 1, falsy -> 0, raised -> -1. */
static int
call_slow(const wsm_fanout_spec *spec, PyObject *ws, int kind, PyObject *a,
          PyObject *b)
{
    PyObject *k = PyLong_FromLong(kind); /* small int: cached */
    if (k == NULL) {
        return -1;
    }
    PyObject *args[4] = {ws, k, a ? a : Py_None, b ? b : Py_None};
    PyObject *res = PyObject_Vectorcall(spec->slow, args, 4, NULL); /* new ref */
    Py_DECREF(k);
    if (res == NULL) {
        return -1;
    }
    int ok = PyObject_IsTrue(res);
    Py_DECREF(res);
    return ok;
}

/* The exception being raised, if it is an Exception: taken (new reference,
 * traceback attached) and cleared; else NULL with it still set. */
static PyObject *
take_exception(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return NULL;
    }
    return wsm_fetch_exception();
}

/* One recipient on the inline path: returns 1 (sent or queued), 0 (not),
 * -1 (error set). `send` borrowed. */
static int
send_one(const wsm_fanout_spec *spec, PyObject *ws, PyObject *send,
         PyObject *data)
{
    PyObject *msg = PyDict_New(); /* new ref; holds only str: never GC-tracked */
    if (msg == NULL) {
        return -1;
    }
    if (PyDict_SetItem(msg, spec->k_type, spec->v_send) < 0 ||
        PyDict_SetItem(msg, spec->k_text, data) < 0) {
        Py_DECREF(msg);
        return -1;
    }
    PyObject *awaitable = PyObject_CallOneArg(send, msg); /* new ref */
    Py_DECREF(msg);
    PyObject *it = NULL, *step = NULL, *exc = NULL;
    int rc;
    if (awaitable == NULL) {
        goto failed;
    }
    if (PyCoro_CheckExact(awaitable)) {
        it = awaitable; /* stepped as is; its __await__() only if it suspends */
    }
    else {
        /* any other awaitable: what `await` would iterate */
        it = PyObject_CallMethod(awaitable, "__await__", NULL); /* new ref */
        Py_DECREF(awaitable);
        if (it == NULL) {
            goto failed;
        }
    }
    switch (PyIter_Send(it, Py_None, &step)) { /* step: new ref, or NULL */
    case PYGEN_RETURN:
        Py_XDECREF(step);
        Py_DECREF(it);
        return 1;
    case PYGEN_NEXT:
        if (PyCoro_CheckExact(it)) {
            PyObject *wrapper = PyObject_CallMethod(it, "__await__", NULL);
            Py_DECREF(it);
            if (wrapper == NULL) {
                Py_DECREF(step);
                return -1;
            }
            it = wrapper;
        }
        rc = call_slow(spec, ws, WSM_FANOUT_SUSPENDED, it, step);
        Py_DECREF(it);
        Py_DECREF(step);
        return rc;
    default: /* PYGEN_ERROR */
        Py_DECREF(it);
        goto failed;
    }
failed:
    exc = take_exception(); /* new ref */
    if (exc == NULL) {
        return -1; /* not an Exception (or no memory): propagate */
    }
    rc = call_slow(spec, ws, WSM_FANOUT_FAILED, exc, NULL);
    Py_DECREF(exc);
    return rc < 0 ? -1 : 0;
}

Py_ssize_t
wsm_fanout(wsm_registry *r, PyObject *targets, PyObject *lobby,
           PyObject *exclude, uint64_t mark, PyObject *data,
           const wsm_fanout_spec *spec)
{
    Py_ssize_t sent = 0;
    /* `targets` is ours alone: nothing resizes it while we walk */
    Py_ssize_t n = PyList_GET_SIZE(targets);
#if defined(__GNUC__)
    /* the members are scattered over the heap: ask for all their headers
     * at once rather than miss on each in turn (a hint: no access) */
    for (Py_ssize_t i = 0; i < n; i++) {
        __builtin_prefetch(PyList_GET_ITEM(targets, i));
    }
#endif
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ws = PyList_GET_ITEM(targets, i); /* borrowed from our list */
        if (r->removals != mark && left_lobby(r, ws, lobby, exclude)) {
            continue;
        }
        int rc;
        PyObject *state = NULL, *send = NULL;
        if (Py_TYPE(ws) != spec->cls) {
            goto slow;
        }
        state = PyObject_GetAttr(ws, spec->state_name); /* new ref */
        if (state == NULL) {
            return -1;
        }
        int connected = state == spec->connected; /* identity, as `is` */
        Py_DECREF(state);
        if (!connected) {
            goto slow;
        }
        if (PyDict_GET_SIZE(spec->outboxes)) {
            /* a backlog keeps its order: through the outbox */
            rc = PyDict_Contains(spec->outboxes, ws);
            if (rc < 0) {
                return -1;
            }
            if (rc) {
                goto slow;
            }
        }
        send = PyObject_GetAttr(ws, spec->send_name); /* new ref */
        if (send == NULL) {
            return -1;
        }
        rc = send_one(spec, ws, send, data);
        Py_DECREF(send);
        if (rc < 0) {
            return -1;
        }
        sent += rc;
        continue;
    slow:
        rc = call_slow(spec, ws, WSM_FANOUT_POST, data, NULL);
        if (rc < 0) {
            return -1;
        }
        sent += rc;
    }
    return sent;
}
