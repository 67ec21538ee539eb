/* The fan-out of one serialized message to a lobby's members on the ordinary
 * ASGI send path (see fanout.c). */
#ifndef WSM_FANOUT_H
#define WSM_FANOUT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "registry.h"

/* What the fan-out reads of a websocket, all strong references held by the
 * caller for the whole call (Python hands them in: wsmanager/servers.py
 * defines every read of a server's private state). */
typedef struct wsm_fanout_spec {
    PyTypeObject *cls;      /* only exact instances take the inline path */
    PyObject *state_name;   /* attribute: the application-side state */
    PyObject *connected;    /* ... compared by identity with this sentinel */
    PyObject *send_name;    /* attribute: the raw ASGI send */
    PyObject *k_type;       /* the message: {k_type: v_send, k_text: data} */
    PyObject *v_send;
    PyObject *k_text;
    PyObject *outboxes;     /* dict: a member in it goes to `slow` (kind 0) */
    PyObject *slow;         /* slow(websocket, kind, a, b) -> truthy if sent */
} wsm_fanout_spec;

/* Kinds of the slow(websocket, kind, a, b) callback. */
enum {
    WSM_FANOUT_POST = 0,      /* not for the inline path: a the text, b None */
    WSM_FANOUT_SUSPENDED = 1, /* a: the send's __await__() iterator, b: what it yielded */
    WSM_FANOUT_FAILED = 2,    /* a: the exception (an Exception), b None */
};

/* Send `data` to each websocket of `targets` (a list the caller owns and
 * shares with no one: its items are the strong references walked) that is
 * still a committed member of `lobby` (exact str) and not of the user
 * `exclude` (exact str or NULL) when its turn comes. `mark`: r->removals
 * before `targets` was taken. Returns how many got it (or have it queued),
 * or -1 with an exception set (one that is not an Exception, or one the
 * slow callback raised). */
Py_ssize_t wsm_fanout(wsm_registry *r, PyObject *targets, PyObject *lobby,
                      PyObject *exclude, uint64_t mark, PyObject *data,
                      const wsm_fanout_spec *spec);

#endif
