/* wsmanager._core: the only CPython glue.
 *
 * Multi-phase init (PEP 489), module state (PEP 630), one heap type `Core`
 * with GC support. The Python class wsmanager.ConnectionManager subclasses
 * Core: the synchronous methods of the seed's API are the C methods here.
 *
 * The data and its rules live in Python-free files next to this one:
 * registry.c (connections, lobbies, users, reservations), activity.c (the
 * heartbeat's idle / wait lists), ratelimit.c (token buckets), latency.c
 * (round-trip ring and percentiles), json_writer.c (the encoder). This file
 * parses arguments, reads the clock, builds the Python results and calls
 * hooks.
 *
 * Memory-safety rule (DESIGN.md, issue 9), enforced in every method below:
 * no pointer into a registry table or an intrusive list (wsm_conn *,
 * wsm_group *, wsm_list *) is held across a call that can run Python code:
 *   - hashing or comparing a key object: ids are taken as exact str with
 *     lookup_id() / checked_id() first (a str subclass is copied, so its
 *     __hash__ / __eq__ never run); websockets are keyed by identity
 *     (registry.c's ptr_hash), so theirs never run either;
 *   - allocating a GC-tracked object (list, tuple, set, dict): it may start
 *     a GC pass whose finalizers disconnect anyone. Results are allocated
 *     *before* the walk, the entry or group is looked up again after the
 *     allocation, and the walk only does what runs no Python: Py_INCREF,
 *     PyMem_*, PyList_Append / PyList_SetSlice on NULL items (a PyMem
 *     realloc), PySet_Add of exact str keys, untracked ints and floats;
 *   - hooks and callbacks (pong hook, drop hook, the injected clock): the
 *     clock is read before any lookup, hooks are called after the last use
 *     of every pointer, with references of our own to their arguments;
 *   - a Py_DECREF that may free the last reference (a websocket's finalizer
 *     runs): wsm_remove() drops the websocket last, once the registry is
 *     consistent, and its callers hold a reference of their own.
 * A snapshot never contains NULL slots. tests/test_c_safety.py covers each
 * method (run it under the ASan build).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <time.h>
#include <unistd.h>

#include "registry.h"
#include "activity.h"
#include "ratelimit.h"
#include "latency.h"
#include "json_writer.h"
#include "fanout.h"
#include "history.h"
#include "pycompat.h"

/* Keys of get_stats(), interned once in the module state. */
#define WSM_STAT_KEYS(X) \
    X(total_connections) \
    X(max_connections) \
    X(capacity_percent) \
    X(active_lobbies) \
    X(max_per_lobby) \
    X(pending_connections) \
    X(connected_users) \
    X(connects) \
    X(disconnects) \
    X(pings_sent) \
    X(pongs_received) \
    X(max_per_user) \
    X(shutting_down) \
    X(refused) \
    X(server_full) \
    X(lobby_full) \
    X(user_limit) \
    X(unauthorized) \
    X(forbidden_origin) \
    X(invalid_id) \
    X(latency_ms) \
    X(p50) \
    X(p95) \
    X(p99) \
    X(samples) \
    X(stale_closed) \
    X(no_pong) \
    X(send_failed) \
    X(handler_exited) \

typedef struct {
    PyTypeObject *core_type;
#define WSM_DECLARE_KEY(name) PyObject *k_##name;
    WSM_STAT_KEYS(WSM_DECLARE_KEY)
#undef WSM_DECLARE_KEY
    PyObject *str_empty;
    PyObject *str_server_full;
    PyObject *str_lobby_full;
    PyObject *str_user_limit;
    PyObject *str_shutting_down;
    PyObject *accept_ok;        /* (True, "") */
    PyObject *refuse_server;    /* (False, "server_full") */
    PyObject *refuse_lobby;     /* (False, "lobby_full") */
    PyObject *refuse_shutdown;  /* (False, "shutting_down") */
    wsm_json_types json;        /* classes and names the JSON encoder uses */
    /* get_stats() copies these (every key in its order, None values) and
     * fills in the values: one allocation of the right size per dict, no
     * growing, the keys' hashes already in place. Never handed out. */
    PyObject *tpl_stats;
    PyObject *tpl_refused;
    PyObject *tpl_latency;
    PyObject *tpl_stale;
} module_state;

typedef struct {
    PyObject_HEAD
    wsm_registry reg;
    Py_ssize_t max_connections;
    Py_ssize_t max_per_lobby;
    Py_ssize_t max_per_user;    /* -1: no limit */
    Py_ssize_t max_id_bytes;
    PyObject *clock;            /* callable returning monotonic seconds, or NULL */
    PyObject *pong_hook;        /* called with the user id after a pong, or NULL */
    PyObject *drop_hook;        /* called with a removed websocket that had an
                                   outbound backlog (any removed websocket if
                                   drop_hook_all), or NULL */
    int drop_hook_all;
    int shutting_down;
    int initialized;
    /* counters */
    unsigned long long n_connects;
    unsigned long long n_disconnects;
    unsigned long long n_refused_server;
    unsigned long long n_refused_lobby;
    unsigned long long n_refused_user;
    unsigned long long n_refused_shutdown;
    /* refusals decided in Python (serve()), counted here through
     * _count_refusal so that get_stats()["refused"] has one home */
    unsigned long long n_refused_unauthorized;
    unsigned long long n_refused_origin;
    unsigned long long n_refused_invalid;
    unsigned long long n_pings;
    unsigned long long n_pongs;
    wsm_ratelimit rl;           /* inbound rate limit; rl.rate <= 0: off */
    unsigned long long n_stale[WSM_STALE_NREASONS];
    wsm_rtt_ring rtt;           /* recent round-trip times */
    wsm_history hist;           /* per-lobby message history (history.c); size 0: off */
    PyObject *module;           /* strong ref: owner of the state below */
    module_state *st;           /* borrowed from module */
} CoreObject;

static struct PyModuleDef core_module;

static inline module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* PyType_GetModuleByDef() for every supported version (it is 3.11+):
 * the module that defined Core, found through the MRO of a subclass.
 * Returns a borrowed reference or NULL with an exception set. */
static PyObject *
find_module(PyTypeObject *tp)
{
    PyObject *mro = tp->tp_mro;
    Py_ssize_t n = mro ? PyTuple_GET_SIZE(mro) : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(base->tp_flags & Py_TPFLAGS_HEAPTYPE)) {
            continue;
        }
        PyObject *mod = PyType_GetModule(base);
        if (mod == NULL) {
            PyErr_Clear();
            continue;
        }
        if (PyModule_GetDef(mod) == &core_module) {
            return mod;
        }
    }
    PyErr_SetString(PyExc_TypeError, "not a wsmanager._core.Core subclass");
    return NULL;
}

/* ---- helpers ---------------------------------------------------------- */

/* Current time in monotonic seconds, from the injected clock if any.
 * Returns -1 with an exception set on failure. */
static double
core_now(CoreObject *self)
{
    if (self->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    PyObject *res = PyObject_CallNoArgs(self->clock); /* new ref */
    if (res == NULL) {
        return -1.0;
    }
    double v = PyFloat_AsDouble(res);
    Py_DECREF(res);
    if (v == -1.0 && PyErr_Occurred()) {
        return -1.0;
    }
    if (!isfinite(v) || v < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "clock() must return a finite, non-negative number");
        return -1.0;
    }
    return v;
}

/* The same, for activity timestamps: CLOCK_MONOTONIC_COARSE costs a fifth of
 * CLOCK_MONOTONIC here (its resolution, a few ms, is far below any ping
 * interval). Round-trip times use the precise clock. */
static double
core_now_coarse(CoreObject *self)
{
    if (self->clock == NULL) {
        struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
        clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    return core_now(self);
}

#define NOW_COARSE_OR_FAIL(var, self, fail)                            \
    double var = core_now_coarse(self);                                \
    if (var == -1.0 && PyErr_Occurred()) {                             \
        fail;                                                          \
    }

#define NOW_OR_FAIL(var, self, fail)                                   \
    double var = core_now(self);                                       \
    if (var == -1.0 && PyErr_Occurred()) {                             \
        fail;                                                          \
    }

/* Validate an id used to *register* a connection. Returns a new reference
 * to an exact str, or NULL with TypeError / ValueError set. */
static PyObject *
checked_id(CoreObject *self, PyObject *obj, const char *what)
{
    Py_ssize_t len;
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (PyUnicode_GET_LENGTH(obj) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be empty", what);
        return NULL;
    }
    if (PyUnicode_AsUTF8AndSize(obj, &len) == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be valid Unicode text "
                     "(no lone surrogates)", what);
        return NULL;
    }
    if (len > self->max_id_bytes) {
        PyErr_Format(PyExc_ValueError, "%s is %zd bytes long; the limit is "
                     "%zd bytes (UTF-8)", what, len, self->max_id_bytes);
        return NULL;
    }
    if (PyUnicode_CheckExact(obj)) {
        Py_INCREF(obj);
        return obj;
    }
    return PyUnicode_FromObject(obj);
}

/* An id used only to *look up*: a wrong type is a clear error, an unknown or
 * odd-looking id simply matches nothing. Returns a new reference to an exact
 * str (a subclass is copied: its __hash__ / __eq__ could run Python code in
 * the middle of a table lookup), or NULL with TypeError set. Runs no Python
 * code itself. */
static PyObject *
lookup_id(PyObject *obj, const char *what)
{
    if (PyUnicode_CheckExact(obj)) {
        return Py_NewRef(obj);
    }
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PyUnicode_FromObject(obj); /* new ref, an exact copy */
}

/* (lobby_code, user_id) of the committed connection of `ws`, or None.
 * The tuple is allocated first (a GC pass may run finalizers that
 * disconnect anyone), the entry is looked up after. New reference. */
static PyObject *
info_of(CoreObject *self, PyObject *ws /* borrowed */)
{
    PyObject *t = PyTuple_New(2); /* new ref; may run Python */
    if (t == NULL) {
        return NULL;
    }
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_DECREF(t); /* NULL items: runs no Python */
        Py_RETURN_NONE;
    }
    PyTuple_SET_ITEM(t, 0, Py_NewRef(c->lobby->key));
    PyTuple_SET_ITEM(t, 1, Py_NewRef(c->user->key));
    return t;
}

/* ---- type slots ------------------------------------------------------- */

static int
Core_init(CoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_connections", "max_per_lobby",
                             "max_per_user", "max_id_bytes", "clock", NULL};
    Py_ssize_t max_connections = 500, max_per_lobby = 10, max_id_bytes = 1024;
    PyObject *max_per_user = Py_None, *clock = Py_None;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nn$OnO:ConnectionManager",
                                     kwlist, &max_connections, &max_per_lobby,
                                     &max_per_user, &max_id_bytes, &clock)) {
        return -1;
    }
    if (self->initialized) {
        PyErr_SetString(PyExc_RuntimeError,
                        "ConnectionManager is already initialized");
        return -1;
    }
    if (max_connections < 0 || max_per_lobby < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "max_connections and max_per_lobby must be >= 0");
        return -1;
    }
    if (max_id_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "max_id_bytes must be >= 1");
        return -1;
    }
    self->max_per_user = -1;
    if (max_per_user != Py_None) {
        Py_ssize_t v = PyNumber_AsSsize_t(max_per_user, PyExc_OverflowError);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (v < 1) {
            PyErr_SetString(PyExc_ValueError,
                            "max_per_user must be None or >= 1");
            return -1;
        }
        self->max_per_user = v;
    }
    if (clock != Py_None && !PyCallable_Check(clock)) {
        PyErr_SetString(PyExc_TypeError, "clock must be callable or None");
        return -1;
    }
    PyObject *mod = find_module(Py_TYPE(self)); /* borrowed */
    if (mod == NULL) {
        return -1;
    }
    Py_INCREF(mod);
    self->module = mod;
    self->st = get_state(mod);
    self->max_connections = max_connections;
    self->max_per_lobby = max_per_lobby;
    self->max_id_bytes = max_id_bytes;
    if (clock != Py_None) {
        Py_INCREF(clock);
        self->clock = clock;
    }
    wsm_registry_init(&self->reg);
    {
        /* epochs differ across processes and restarts: seeded from the
         * wall clock, the pid and this object's address */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        wsm_history_clear(&self->hist);
        wsm_history_init(&self->hist,
                         ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^
                             ((uint64_t)getpid() << 40) ^ (uint64_t)(uintptr_t)self);
    }
    self->initialized = 1;
    return 0;
}

static int
Core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->clock);
    Py_VISIT(self->pong_hook);
    Py_VISIT(self->drop_hook);
    Py_VISIT(self->module);
    return wsm_registry_traverse(&self->reg, visit, arg);
}

static int
Core_clear(CoreObject *self)
{
    Py_CLEAR(self->clock);
    Py_CLEAR(self->pong_hook);
    Py_CLEAR(self->drop_hook);
    wsm_registry_clear(&self->reg);
    wsm_history_clear(&self->hist);
    self->st = NULL;
    self->initialized = 0;
    Py_CLEAR(self->module);
    return 0;
}

static void
Core_dealloc(CoreObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)Core_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static Py_ssize_t
Core_len(CoreObject *self)
{
    return self->reg.active;
}

static int
Core_contains(CoreObject *self, PyObject *ws)
{
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    return c != NULL && c->state == WSM_ACTIVE;
}


static int call_pong_hook(CoreObject *self, PyObject *user_key, PyObject *ws,
                          double rtt);

#define CHECK_INIT(self, ret)                                               \
    if (!(self)->initialized) {                                             \
        PyErr_SetString(PyExc_RuntimeError, "ConnectionManager.__init__() " \
                        "was not called");                                  \
        return ret;                                                         \
    }

/* ---- seed API: synchronous methods ------------------------------------ */

/* Capacity verdict without reserving; counts reserved handshakes too. */
static PyObject *
Core_can_accept_connection(CoreObject *self, PyObject *lobby_code)
{
    CHECK_INIT(self, NULL);
    PyObject *code = lookup_id(lobby_code, "lobby_code"); /* new ref */
    if (code == NULL) {
        return NULL;
    }
    module_state *st = self->st;
    PyObject *res;
    /* A False answer is a refusal and counts in get_stats()["refused"]:
     * the seed's endpoint closes the socket itself on it, so this is the
     * only place the manager learns of that refusal. connect() and serve()
     * never call this (they reserve), so one handshake counts once. */
    if (self->shutting_down) {
        res = st->refuse_shutdown;
        self->n_refused_shutdown++;
    }
    else if (self->reg.active + self->reg.pending >= self->max_connections) {
        res = st->refuse_server;
        self->n_refused_server++;
    }
    else {
        wsm_group *g = wsm_find_lobby(&self->reg, code);
        Py_ssize_t n = g ? wsm_lobby_count(g) + g->reserved : 0;
        if (n >= self->max_per_lobby) {
            res = st->refuse_lobby;
            self->n_refused_lobby++;
        }
        else {
            res = st->accept_ok;
        }
    }
    Py_DECREF(code);
    Py_INCREF(res);
    return res;
}

/* _count_refusal(reason): count a refusal decided outside the core (by
 * serve(), or by the backplane's cluster-wide reservation). reason is one
 * of the keys of get_stats()["refused"]; ValueError for any other. */
static PyObject *
Core_count_refusal(CoreObject *self, PyObject *reason)
{
    static const char *names[] = {"server_full", "lobby_full", "user_limit",
                                  "shutting_down", "unauthorized",
                                  "forbidden_origin", "invalid_id"};
    unsigned long long *counters[] = {
        &self->n_refused_server, &self->n_refused_lobby,
        &self->n_refused_user, &self->n_refused_shutdown,
        &self->n_refused_unauthorized, &self->n_refused_origin,
        &self->n_refused_invalid};
    CHECK_INIT(self, NULL);
    if (!PyUnicode_CheckExact(reason)) {
        PyErr_SetString(PyExc_TypeError, "reason must be a str");
        return NULL;
    }
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (PyUnicode_CompareWithASCIIString(reason, names[i]) == 0) {
            (*counters[i])++;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown refusal reason %R", reason);
    return NULL;
}

/* One entry removed by the "replace" policy. */
typedef struct {
    PyObject *ws;       /* new ref */
    int active;         /* it was committed (an open connection) */
    int notify;         /* its notify bits */
} replaced_conn;

/* Remove `need` of the user's entries, oldest first (see wsm_user_oldest),
 * into `out` (room for `need`). Runs no Python code: each websocket is
 * INCREF'd before wsm_remove drops the registry's reference, and the user
 * and lobby keys are exact str. Returns how many were removed. */
static Py_ssize_t
replace_oldest(CoreObject *self, PyObject *user, Py_ssize_t need,
               replaced_conn *out)
{
    Py_ssize_t n = 0;
    while (n < need) {
        wsm_conn *c = wsm_user_oldest(&self->reg, user); /* borrowed */
        if (c == NULL) {
            break;
        }
        Py_INCREF(c->ws);
        out[n].ws = c->ws;
        out[n].active = c->state == WSM_ACTIVE;
        out[n].notify = c->notify;
        if (out[n].active) {
            self->n_disconnects++;
        }
        wsm_remove(&self->reg, c);
        n++;
    }
    return n;
}

/* _reserve(websocket, lobby_code, user_id[, replace]) -> "" | refusal reason
 * Holds one unit of capacity for a handshake in progress.
 * With replace true (the on_user_limit="replace" policy) it returns
 * (reason, replaced_open, replaced_pending): when the user is at
 * max_per_user, its oldest entries are removed to make room, in the same
 * step as the reservation; replaced_open is a tuple of the removed open
 * websockets (the caller closes them), replaced_pending the number of
 * removed handshakes in progress (their _commit() then returns False). */
static PyObject *
Core_reserve(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *lobby = NULL, *user = NULL, *res = NULL;
    wsm_verdict verdict = WSM_OK;
    int replace = 0;
    replaced_conn *victims = NULL;
    Py_ssize_t n_victims = 0;

    CHECK_INIT(self, NULL);
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "_reserve(websocket, lobby_code, user_id[, replace])");
        return NULL;
    }
    if (nargs == 4) {
        if (!PyBool_Check(args[3])) {
            PyErr_SetString(PyExc_TypeError, "replace must be a bool");
            return NULL;
        }
        replace = args[3] == Py_True;
    }
    lobby = checked_id(self, args[1], "lobby_code");
    if (lobby == NULL) {
        goto error;
    }
    user = checked_id(self, args[2], "user_id");
    if (user == NULL) {
        goto error;
    }
    if (wsm_find_conn(&self->reg, args[0]) != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "this websocket is already connected to the manager");
        goto error;
    }
    if (self->shutting_down) {
        self->n_refused_shutdown++;
        res = self->st->str_shutting_down;
        Py_INCREF(res);
        goto done;
    }
    if (replace) {
        Py_ssize_t need = wsm_replace_count(
            &self->reg, lobby, user, self->max_connections,
            self->max_per_lobby, self->max_per_user);
        if (need > 0) {
            victims = PyMem_Calloc((size_t)need, sizeof(*victims));
            if (victims == NULL) {
                PyErr_NoMemory();
                goto error;
            }
            n_victims = replace_oldest(self, user, need, victims);
        }
    }
    if (wsm_reserve(&self->reg, args[0], lobby, user, self->max_connections,
                    self->max_per_lobby, self->max_per_user, 0.0,
                    &verdict) == NULL) {
        switch (verdict) {
        case WSM_SERVER_FULL:
            self->n_refused_server++;
            res = self->st->str_server_full;
            break;
        case WSM_LOBBY_FULL:
            self->n_refused_lobby++;
            res = self->st->str_lobby_full;
            break;
        case WSM_USER_FULL:
            self->n_refused_user++;
            res = self->st->str_user_limit;
            break;
        default:
            goto error;
        }
        Py_INCREF(res);
        goto done;
    }
    res = self->st->str_empty;
    Py_INCREF(res);
done:
    if (replace) {
        /* no registry pointer is held from here on: allocating may run Python */
        PyObject *reason = res, *open = NULL;
        Py_ssize_t n_open = 0, n_pending = 0;
        for (Py_ssize_t i = 0; i < n_victims; i++) {
            n_open += victims[i].active;
        }
        n_pending = n_victims - n_open;
        open = PyTuple_New(n_open); /* new ref */
        if (open != NULL) {
            for (Py_ssize_t i = 0, j = 0; i < n_victims; i++) {
                if (victims[i].active) {
                    Py_INCREF(victims[i].ws);
                    PyTuple_SET_ITEM(open, j++, victims[i].ws); /* steals */
                }
            }
            res = Py_BuildValue("(OOn)", reason, open, n_pending);
            Py_DECREF(open);
        }
        else {
            res = NULL;
        }
        Py_DECREF(reason);
        /* no hook may run with an exception set: keep it aside (new refs) */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = res == NULL ? PyErr_GetRaisedException() : NULL;
#else
        PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
        if (res == NULL) {
            PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        }
#endif
        /* as disconnect() does: tell the Python side of each removal */
        for (Py_ssize_t i = 0; i < n_victims; i++) {
            if ((victims[i].notify || self->drop_hook_all) &&
                self->drop_hook != NULL) {
                /* our own reference: the hook may replace itself, and the
                 * report of its failure still needs it */
                PyObject *hook = Py_NewRef(self->drop_hook);
                PyObject *r = PyObject_CallOneArg(hook, victims[i].ws);
                if (r == NULL) {
                    PyErr_WriteUnraisable(hook);
                }
                Py_XDECREF(r);
                Py_DECREF(hook); /* may be the last reference: after its use */
            }
        }
        if (res == NULL) { /* steals them back */
#if PY_VERSION_HEX >= 0x030C0000
            PyErr_SetRaisedException(exc);
#else
            PyErr_Restore(exc_type, exc_value, exc_tb);
#endif
        }
        if (res == NULL) { /* out of memory: do not leak the reservation */
            wsm_conn *c = wsm_find_conn(&self->reg, args[0]);
            if (c != NULL && c->state == WSM_PENDING) {
                wsm_remove(&self->reg, c); /* the caller holds args[0] */
            }
        }
    }
    for (Py_ssize_t i = 0; i < n_victims; i++) {
        Py_DECREF(victims[i].ws);
    }
    PyMem_Free(victims);
    Py_DECREF(lobby);
    Py_DECREF(user);
    return res;
error:
    for (Py_ssize_t i = 0; i < n_victims; i++) {
        Py_DECREF(victims[i].ws);
    }
    PyMem_Free(victims);
    Py_XDECREF(lobby);
    Py_XDECREF(user);
    return NULL;
}

/* _commit(websocket) -> bool: a reserved handshake completed. */
static PyObject *
Core_commit(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_COARSE_OR_FAIL(now, self, return NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_PENDING) {
        Py_RETURN_FALSE;
    }
    wsm_commit(&self->reg, c, now);
    self->n_connects++;
    Py_RETURN_TRUE;
}

/* _release(websocket) -> bool: a reserved handshake failed. */
static PyObject *
Core_release(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_PENDING) {
        Py_RETURN_FALSE;
    }
    wsm_remove(&self->reg, c);
    Py_RETURN_TRUE;
}

/* disconnect(websocket) -> (lobby_code, user_id) | None */
static PyObject *
Core_disconnect(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_RETURN_NONE;
    }
    PyObject *info = info_of(self, ws); /* new ref */
    if (info == NULL || info == Py_None) {
        return info;
    }
    /* info_of() found it after its allocation; nothing ran since */
    c = wsm_find_conn(&self->reg, ws);
    int notify = c->notify;
    wsm_remove(&self->reg, c);
    self->n_disconnects++;
    if ((notify || self->drop_hook_all) && self->drop_hook != NULL) {
        PyObject *hook = self->drop_hook;
        Py_INCREF(hook);
        PyObject *res = PyObject_CallOneArg(hook, ws); /* new ref */
        Py_DECREF(hook);
        if (res == NULL) {
            Py_DECREF(info);
            return NULL;
        }
        Py_DECREF(res);
    }
    return info;
}

/* _set_notify(websocket, bit, flag) -> bool: set or clear one reason
 * (bit 1: an outbound backlog; bit 2: a removal callback) for which
 * removing the connection must call the drop hook. False if the websocket
 * is not registered. */
static PyObject *
Core_set_notify(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_set_notify(websocket, bit, flag)");
        return NULL;
    }
    long bit = PyLong_AsLong(args[1]);
    if (bit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (bit < 1 || bit > 128 || (bit & (bit - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "bit must be a power of two <= 128");
        return NULL;
    }
    int flag = PyObject_IsTrue(args[2]);
    if (flag < 0) {
        return NULL;
    }
    wsm_conn *c = wsm_find_conn(&self->reg, args[0]);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_RETURN_FALSE;
    }
    if (flag) {
        c->notify |= (uint8_t)bit;
    }
    else {
        c->notify &= (uint8_t)~bit;
    }
    Py_RETURN_TRUE;
}

/* _set_drop_hook(callable | None, every=False): called by disconnect() with
 * the websocket it removed, if that connection had an outbound backlog, or
 * always with every=True (a backplane must hear of every removal). */
static PyObject *
Core_set_drop_hook(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "_set_drop_hook(hook, every=False)");
        return NULL;
    }
    PyObject *hook = args[0];
    int every = 0;
    if (nargs == 2 && (every = PyObject_IsTrue(args[1])) < 0) {
        return NULL;
    }
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "drop hook must be callable or None");
        return NULL;
    }
    PyObject *old = self->drop_hook;
    self->drop_hook = hook == Py_None ? NULL : Py_NewRef(hook);
    self->drop_hook_all = every;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* ---- rooms: a connection in several lobbies ---------------------------- */

/* _join(websocket, lobby_code, reserve=False) -> "" | "member" |
 * "lobby_full" | "not_connected": add the committed connection to another
 * lobby ("" added, "member" already in it). max_per_lobby counts
 * memberships and holds atomically (no Python code runs between the check
 * and the add). With reserve, "" means one unit of the lobby's capacity is
 * held until _join_settle (a clustered backend decides meanwhile). */
static PyObject *
Core_join(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    int reserve = 0, added = 0;
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError,
                        "_join(websocket, lobby_code, reserve=False)");
        return NULL;
    }
    /* both may run Python code: before any lookup */
    if (nargs == 3 && (reserve = PyObject_IsTrue(args[2])) < 0) {
        return NULL;
    }
    PyObject *lobby = checked_id(self, args[1], "lobby_code"); /* new ref, exact str */
    if (lobby == NULL) {
        return NULL;
    }
    if (self->shutting_down) { /* as _reserve refuses connect(): counted */
        Py_DECREF(lobby);
        self->n_refused_shutdown++;
        return Py_NewRef(self->st->str_shutting_down);
    }
    wsm_conn *c = wsm_find_conn(&self->reg, args[0]);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_DECREF(lobby);
        return PyUnicode_FromString("not_connected");
    }
    wsm_verdict v = wsm_join(&self->reg, c, lobby, self->max_per_lobby,
                             reserve, &added);
    Py_DECREF(lobby); /* the registry holds its own reference if it kept it */
    switch (v) {
    case WSM_OK:
        return PyUnicode_FromString(added ? "" : "member");
    case WSM_LOBBY_FULL:
        self->n_refused_lobby++;
        return Py_NewRef(self->st->str_lobby_full);
    default:
        return NULL;
    }
}

/* _join_settle(websocket | None, lobby_code) -> bool: end a reservation of
 * _join(..., reserve=True); with a websocket still connected, the
 * membership is added (True). */
static PyObject *
Core_join_settle(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_join_settle(websocket, lobby_code)");
        return NULL;
    }
    PyObject *lobby = lookup_id(args[1], "lobby_code"); /* new ref */
    if (lobby == NULL) {
        return NULL;
    }
    wsm_conn *c = args[0] == Py_None ? NULL : wsm_find_conn(&self->reg, args[0]);
    int rc = wsm_join_settle(&self->reg, c, lobby);
    Py_DECREF(lobby);
    if (rc < 0) {
        return NULL;
    }
    return PyBool_FromLong(rc);
}

/* leave(websocket, lobby_code) -> bool */
static PyObject *
Core_leave(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "leave(websocket, lobby_code)");
        return NULL;
    }
    PyObject *lobby = lookup_id(args[1], "lobby_code"); /* new ref */
    if (lobby == NULL) {
        return NULL;
    }
    wsm_conn *c = wsm_find_conn(&self->reg, args[0]);
    int left = c != NULL && wsm_leave(&self->reg, c, lobby);
    Py_DECREF(lobby); /* the group kept its own key (or was freed before) */
    return PyBool_FromLong(left);
}

/* _is_member(websocket, lobby_code) -> bool */
static PyObject *
Core_is_member(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_is_member(websocket, lobby_code)");
        return NULL;
    }
    PyObject *lobby = lookup_id(args[1], "lobby_code"); /* new ref */
    if (lobby == NULL) {
        return NULL;
    }
    wsm_conn *c = wsm_find_conn(&self->reg, args[0]);
    int in = c != NULL && wsm_is_member(&self->reg, c, wsm_find_lobby(&self->reg, lobby));
    Py_DECREF(lobby);
    return PyBool_FromLong(in);
}

/* lobbies_of(websocket) -> set[str] */
static PyObject *
Core_lobbies_of(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    PyObject *set = PySet_New(NULL); /* new ref; may run Python: before the lookup */
    if (set == NULL) {
        return NULL;
    }
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        return set;
    }
    /* PySet_Add of exact str keys runs no Python code */
    if (wsm_in_first(c) && PySet_Add(set, c->lobby->key) < 0) {
        Py_DECREF(set);
        return NULL;
    }
    for (wsm_member *m = wsm_conn_extras(&self->reg, c); m; m = m->cnext) {
        if (PySet_Add(set, m->lobby->key) < 0) {
            Py_DECREF(set);
            return NULL;
        }
    }
    return set;
}

/* _track_presence(flag): mark the lobbies whose membership changes (on) or
 * not (off, the default: one branch per change). */
static PyObject *
Core_track_presence(CoreObject *self, PyObject *flag)
{
    CHECK_INIT(self, NULL);
    int v = PyObject_IsTrue(flag);
    if (v < 0) {
        return NULL;
    }
    self->reg.track_dirty = v;
    if (!v) { /* drop the marks (and the empty lobbies they kept) */
        PyObject *keys[64];
        Py_ssize_t n;
        while ((n = wsm_take_dirty(&self->reg, keys, 64)) > 0) {
            for (Py_ssize_t i = 0; i < n; i++) {
                Py_DECREF(keys[i]); /* exact str: no finalizer */
            }
        }
    }
    Py_RETURN_NONE;
}

/* _take_dirty() -> list[str]: the lobbies whose membership changed since
 * the last call, oldest change first, each once. */
static PyObject *
Core_take_dirty(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    Py_ssize_t n = self->reg.ndirty;
    PyObject *out = PyList_New(n); /* new ref; may run Python (more marks) */
    if (out == NULL) {
        return NULL;
    }
    if (n == 0) {
        return out;
    }
    /* the list only grows meanwhile: take the n first; the items are new
     * references and the walk runs no Python code */
    Py_ssize_t got = wsm_take_dirty(&self->reg, ((PyListObject *)out)->ob_item, n);
    if (got < n && PyList_SetSlice(out, got, n, NULL) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* _info(websocket) -> (lobby_code, user_id) | None */
static PyObject *
Core_info(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_RETURN_NONE;
    }
    return info_of(self, ws);
}

static PyObject *
Core_update_last_message(CoreObject *self, PyObject *user_id)
{
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_COARSE_OR_FAIL(now, self, return NULL);
    PyObject *uid = lookup_id(user_id, "user_id"); /* new ref */
    if (uid == NULL) {
        return NULL;
    }
    wsm_group *g = wsm_find_user(&self->reg, uid);
    if (g != NULL && g->members.len) {
        /* touch() moves entries on the activity lists only, never the user
         * list being walked */
        for (wsm_conn *c = g->members.head; c; c = c->user_link.next) {
            wsm_touch(&self->reg, c, now);
        }
    }
    Py_DECREF(uid);
    Py_RETURN_NONE;
}

/* record_pong(user_id): every connection of the user is alive; returns the
 * round-trip time in ms of the ping answered, or None. */
static PyObject *
Core_record_pong(CoreObject *self, PyObject *user_id)
{
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_OR_FAIL(now, self, return NULL);
    PyObject *uid = lookup_id(user_id, "user_id"); /* new ref */
    if (uid == NULL) {
        return NULL;
    }
    double best = -1.0;
    wsm_group *g = wsm_find_user(&self->reg, uid);
    if (g != NULL && g->members.len) {
        self->n_pongs++;
        for (wsm_conn *c = g->members.head; c; c = c->user_link.next) {
            double rtt = wsm_pong(&self->reg, c, now);
            if (rtt >= 0 && (best < 0 || rtt < best)) {
                best = rtt;
            }
        }
        if (best >= 0) {
            wsm_rtt_record(&self->rtt, best);
        }
        /* g is not used past this point: the hook may disconnect anyone */
        if (self->pong_hook != NULL &&
            call_pong_hook(self, g->key, NULL, best) < 0) {
            Py_DECREF(uid);
            return NULL;
        }
    }
    Py_DECREF(uid);
    Py_RETURN_NONE; /* the seed's record_pong returns None */
}

/* Run the pong hook (set while a ping_user() waits or latency listeners
 * exist) as hook(user_id, websocket | None, latency_ms | None). It may run
 * any Python code, so it is called after every walk, with references of our
 * own to what it is given. */
static int
call_pong_hook(CoreObject *self, PyObject *user_key /* borrowed */,
               PyObject *ws /* borrowed, may be NULL */, double rtt)
{
    PyObject *hook = self->pong_hook, *latency = NULL, *res = NULL;
    /* our own references first: user_key may be a group's, freed by a
     * disconnect that anything running Python code could do */
    Py_INCREF(hook);
    Py_INCREF(user_key);
    Py_XINCREF(ws);
    if (rtt >= 0) {
        latency = PyFloat_FromDouble(rtt * 1000.0);
        if (latency == NULL) {
            Py_XDECREF(ws);
            Py_DECREF(user_key);
            Py_DECREF(hook);
            return -1;
        }
    }
    else {
        latency = Py_NewRef(Py_None);
    }
    res = PyObject_CallFunctionObjArgs(hook, user_key, ws ? ws : Py_None,
                                       latency, NULL); /* new ref */
    Py_XDECREF(ws);
    Py_DECREF(user_key);
    Py_DECREF(hook);
    Py_DECREF(latency);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* _set_pong_hook(callable | None) */
static PyObject *
Core_set_pong_hook(CoreObject *self, PyObject *hook)
{
    CHECK_INIT(self, NULL);
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "pong hook must be callable or None");
        return NULL;
    }
    PyObject *old = self->pong_hook;
    if (hook == Py_None) {
        self->pong_hook = NULL;
    }
    else {
        Py_INCREF(hook);
        self->pong_hook = hook;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* touch(websocket) -> bool: something was received on this connection. */
static PyObject *
Core_touch(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_COARSE_OR_FAIL(now, self, return NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_RETURN_FALSE;
    }
    wsm_touch(&self->reg, c, now);
    Py_RETURN_TRUE;
}

/* record_pong_ws(websocket) -> latency ms | None: a pong on this connection. */
static PyObject *
Core_record_pong_ws(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_OR_FAIL(now, self, return NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_RETURN_NONE;
    }
    self->n_pongs++;
    double rtt = wsm_pong(&self->reg, c, now);
    if (rtt >= 0) {
        wsm_rtt_record(&self->rtt, rtt);
    }
    if (self->pong_hook != NULL &&
        call_pong_hook(self, c->user->key, ws, rtt) < 0) {
        return NULL;
    }
    if (rtt < 0) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(rtt * 1000.0);
}

/* latency_ms(websocket) -> float | None: the round-trip time in ms of the
 * last ping this connection answered; None before its first answered ping,
 * or for a websocket that is not registered. */
static PyObject *
Core_latency_ms(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws); /* borrowed */
    if (c == NULL || c->state != WSM_ACTIVE || c->last_rtt < 0) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(c->last_rtt * 1000.0);
}

/* _note_ping(websocket, timeout=inf) -> bool: a ping was sent outside the
 * sweep (ping_user); a pong within timeout seconds yields a round-trip time.
 * While an earlier ping is still awaited, the round trip is measured from
 * that one, and the pong may come until the later of the two deadlines. */
static PyObject *
Core_note_ping(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double timeout = Py_HUGE_VAL;
    CHECK_INIT(self, NULL);
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "_note_ping(websocket, timeout=inf)");
        return NULL;
    }
    if (nargs == 2) {
        timeout = PyFloat_AsDouble(args[1]);
        if (timeout == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (!(timeout >= 0)) {
            PyErr_SetString(PyExc_ValueError, "timeout must be >= 0");
            return NULL;
        }
    }
    /* the clock may run Python code: read it before any lookup */
    NOW_OR_FAIL(now, self, return NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, args[0]); /* borrowed */
    if (c == NULL || c->state != WSM_ACTIVE) {
        Py_RETURN_FALSE;
    }
    wsm_note_ping(c, now, timeout);
    self->n_pings++;
    Py_RETURN_TRUE;
}

/* _pong_due(websocket) -> bool: a ping to this connection awaits its pong
 * (sent less than its timeout ago). False for an unknown websocket. */
static PyObject *
Core_pong_due(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_OR_FAIL(now, self, return NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws); /* borrowed */
    return PyBool_FromLong(c != NULL && c->state == WSM_ACTIVE &&
                           wsm_pong_due(c, now));
}

static PyObject *
Core_is_user_connected_impl(CoreObject *self, PyObject *user_id)
{
    CHECK_INIT(self, NULL);
    PyObject *uid = lookup_id(user_id, "user_id"); /* new ref */
    if (uid == NULL) {
        return NULL;
    }
    wsm_group *g = wsm_find_user(&self->reg, uid);
    int found = g != NULL && g->members.len > 0;
    Py_DECREF(uid);
    return PyBool_FromLong(found);
}

static PyObject *
Core_get_lobby_users_impl(CoreObject *self, PyObject *lobby_code)
{
    CHECK_INIT(self, NULL);
    PyObject *code = lookup_id(lobby_code, "lobby_code"); /* new ref */
    if (code == NULL) {
        return NULL;
    }
    PyObject *set = PySet_New(NULL); /* may run Python: before the lookup */
    if (set == NULL) {
        Py_DECREF(code);
        return NULL;
    }
    wsm_group *g = wsm_find_lobby(&self->reg, code);
    Py_DECREF(code);
    if (g != NULL) {
        /* PySet_Add of exact str keys runs no Python code (str hash/eq are
         * C; growing the table is a PyMem allocation) */
        for (wsm_conn *c = g->members.head; c; c = c->lobby_link.next) {
            if (PySet_Add(set, c->user->key) < 0) {
                Py_DECREF(set);
                return NULL;
            }
        }
        for (wsm_member *m = g->guests; m; m = m->next) {
            if (PySet_Add(set, m->conn->user->key) < 0) {
                Py_DECREF(set);
                return NULL;
            }
        }
    }
    return set;
}

/* One positional id and an optional keyword `local`, accepted (and moot:
 * the core is always this process) so that code written for a clustered
 * manager runs on the in-memory one. */
static PyObject *
one_id_local(const char *name, PyObject *const *args, Py_ssize_t nargs,
             PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly one positional "
                     "argument (%zd given)", name, nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(kw, "local") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "%s() got an unexpected keyword argument '%U'", name, kw);
            return NULL;
        }
    }
    return args[0];
}

static PyObject *
Core_is_user_connected(CoreObject *self, PyObject *const *args,
                       Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *id = kwnames == NULL && nargs == 1
        ? args[0] : one_id_local("is_user_connected", args, nargs, kwnames);
    return id == NULL ? NULL : Core_is_user_connected_impl(self, id);
}

static PyObject *
Core_get_lobby_users(CoreObject *self, PyObject *const *args,
                     Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *id = kwnames == NULL && nargs == 1
        ? args[0] : one_id_local("get_lobby_users", args, nargs, kwnames);
    return id == NULL ? NULL : Core_get_lobby_users_impl(self, id);
}

/* The websockets of a group's members (a lobby's if by_lobby, else a
 * user's), oldest first, as a new list; members of the user `exclude`
 * (exact str or NULL) are left out. The list is allocated first, sized by
 * the group as it is then (a GC pass in the allocation may disconnect
 * anyone); the group is looked up again after, and the walk runs no Python
 * code: it fills the slots, appends past them (a PyMem realloc) and drops
 * the unused ones. The result has no NULL slot. */
static PyObject *
group_targets(CoreObject *self, PyObject *key /* exact str */, int by_lobby,
              PyObject *exclude /* exact str or NULL */)
{
    wsm_registry *r = &self->reg;
    wsm_group *g = by_lobby ? wsm_find_lobby(r, key) : wsm_find_user(r, key);
    Py_ssize_t n = by_lobby ? wsm_lobby_count(g) : wsm_group_count(g);
    PyObject *out = PyList_New(n); /* new ref; may run Python */
    if (out == NULL) {
        return NULL;
    }
    g = by_lobby ? wsm_find_lobby(r, key) : wsm_find_user(r, key);
    wsm_group *ex = exclude ? wsm_find_user(r, exclude) : NULL;
    Py_ssize_t i = 0;
    /* a lobby: its first-lobby members, then its guests (join()); each
     * connection is on one of the two at most once */
    wsm_member *m = by_lobby && g ? g->guests : NULL;
    for (wsm_conn *c = g ? g->members.head : NULL; c != NULL || m != NULL;) {
        wsm_conn *cur = c;
        if (cur != NULL) {
            c = by_lobby ? c->lobby_link.next : c->user_link.next;
        }
        else {
            cur = m->conn;
            m = m->next;
        }
        if (ex != NULL && cur->user == ex) {
            continue;
        }
        if (i < n) {
            PyList_SET_ITEM(out, i, Py_NewRef(cur->ws));
        }
        else if (PyList_Append(out, cur->ws) < 0) { /* every slot is set */
            Py_DECREF(out);
            return NULL;
        }
        i++;
    }
    /* removing NULL slots runs no Python code either */
    if (i < n && PyList_SetSlice(out, i, n, NULL) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* _lobby_targets(lobby_code, exclude_user_id=None) -> list[websocket] */
static PyObject *
Core_lobby_targets(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *code = NULL, *exclude = NULL, *out = NULL;
    CHECK_INIT(self, NULL);
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError,
                        "_lobby_targets(lobby_code, exclude_user_id=None)");
        return NULL;
    }
    code = lookup_id(args[0], "lobby_code"); /* new ref */
    if (code == NULL) {
        return NULL;
    }
    if (nargs == 2 && args[1] != Py_None &&
        (exclude = lookup_id(args[1], "exclude_user_id")) == NULL) {
        Py_DECREF(code);
        return NULL;
    }
    out = group_targets(self, code, 1, exclude);
    Py_DECREF(code);
    Py_XDECREF(exclude);
    return out;
}

/* _fanout_lobby(lobby_code, exclude_user_id, data, spec, outboxes, slow)
 * -> int: send `data` to the lobby's members on the ordinary ASGI send path
 * (fanout.c). spec: (cls, state_attr, connected, send_attr, "type",
 * "websocket.send", "text"); slow(websocket, kind, a, b) -> bool takes every
 * recipient that is not for the inline path, whose send suspended or
 * raised (kinds in fanout.h). */
static PyObject *
Core_fanout_lobby(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs != 6 || !PyTuple_CheckExact(args[3]) ||
        PyTuple_GET_SIZE(args[3]) != 7 || !PyDict_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "_fanout_lobby(lobby_code, exclude_user_id, data, "
                        "spec: 7-tuple, outboxes: dict, slow)");
        return NULL;
    }
    PyObject *const *sp = &PyTuple_GET_ITEM(args[3], 0); /* the tuple is immutable */
    if (!PyType_Check(sp[0]) || !PyUnicode_CheckExact(sp[1]) ||
        !PyUnicode_CheckExact(sp[3]) || !PyUnicode_CheckExact(sp[4]) ||
        !PyUnicode_CheckExact(sp[6])) {
        PyErr_SetString(PyExc_TypeError, "_fanout_lobby: bad spec");
        return NULL;
    }
    /* borrowed: args and the spec tuple outlive the call */
    wsm_fanout_spec spec = {
        .cls = (PyTypeObject *)sp[0], .state_name = sp[1],
        .connected = sp[2], .send_name = sp[3], .k_type = sp[4],
        .v_send = sp[5], .k_text = sp[6], .outboxes = args[4],
        .slow = args[5],
    };
    PyObject *code = lookup_id(args[0], "lobby_code"); /* new ref */
    if (code == NULL) {
        return NULL;
    }
    PyObject *exclude = NULL;
    if (args[1] != Py_None &&
        (exclude = lookup_id(args[1], "exclude_user_id")) == NULL) {
        Py_DECREF(code);
        return NULL;
    }
    uint64_t mark = self->reg.removals; /* before the snapshot */
    PyObject *targets = group_targets(self, code, 1, exclude); /* new ref, ours alone */
    Py_ssize_t sent = -1;
    if (targets != NULL) {
        sent = wsm_fanout(&self->reg, targets, code, exclude, mark, args[2],
                          &spec);
        Py_DECREF(targets);
    }
    Py_DECREF(code);
    Py_XDECREF(exclude);
    return sent < 0 ? NULL : PyLong_FromSsize_t(sent);
}

/* _lobby_count(lobby_code) -> committed connections in the lobby, O(1) */
static PyObject *
Core_lobby_count(CoreObject *self, PyObject *lobby_code)
{
    CHECK_INIT(self, NULL);
    PyObject *code = lookup_id(lobby_code, "lobby_code"); /* new ref */
    if (code == NULL) {
        return NULL;
    }
    Py_ssize_t n = wsm_lobby_count(wsm_find_lobby(&self->reg, code));
    Py_DECREF(code);
    return PyLong_FromSsize_t(n);
}

/* _user_targets(user_id) -> list[websocket], oldest connection first */
static PyObject *
Core_user_targets(CoreObject *self, PyObject *user_id)
{
    CHECK_INIT(self, NULL);
    PyObject *uid = lookup_id(user_id, "user_id"); /* new ref */
    if (uid == NULL) {
        return NULL;
    }
    PyObject *out = group_targets(self, uid, 0, NULL);
    Py_DECREF(uid);
    return out;
}

/* _snapshot() -> list[(websocket, lobby_code, user_id)] of committed
 * connections, in connection order per lobby. O(connections): for the
 * read-only compatibility views only.
 * Every tuple is allocated (filled with None) before the walk, until there
 * are as many as committed connections with no Python code run since the
 * count was read: the walk itself only swaps references in. */
static PyObject *
Core_snapshot(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    PyObject *out = PyList_New(0); /* new ref */
    if (out == NULL) {
        return NULL;
    }
    while (PyList_GET_SIZE(out) < self->reg.active) {
        PyObject *t = PyTuple_Pack(3, Py_None, Py_None, Py_None); /* may run Python */
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    Py_ssize_t i = 0, n = PyList_GET_SIZE(out);
    wsm_group *g;
    size_t pos = 0;
    while (wsm_next_lobby(&self->reg, &pos, &g)) {
        for (wsm_conn *c = g->members.head; c && i < n; c = c->lobby_link.next) {
            PyObject *t = PyList_GET_ITEM(out, i); /* borrowed */
            PyObject *item[3] = {c->ws, g->key, c->user->key};
            for (int k = 0; k < 3; k++) {
                Py_DECREF(Py_None); /* never the last reference: no Python */
                PyTuple_SET_ITEM(t, k, Py_NewRef(item[k]));
            }
            /* a GC pass may have untracked the all-None tuple */
            if (!PyObject_GC_IsTracked(t)) {
                PyObject_GC_Track(t);
            }
            i++;
        }
    }
    /* connections that left their first lobby (rooms): the key is still
     * their connect() lobby, as disconnect() reports it */
    void *item;
    pos = 0;
    while (self->reg.detached > 0 && i < n &&
           wsm_table_next(&self->reg.conns, &pos, &item)) {
        wsm_conn *c = item;
        if (c->state != WSM_ACTIVE || wsm_in_first(c)) {
            continue;
        }
        PyObject *t = PyList_GET_ITEM(out, i); /* borrowed */
        PyObject *it3[3] = {c->ws, c->lobby->key, c->user->key};
        for (int k = 0; k < 3; k++) {
            Py_DECREF(Py_None);
            PyTuple_SET_ITEM(t, k, Py_NewRef(it3[k]));
        }
        if (!PyObject_GC_IsTracked(t)) {
            PyObject_GC_Track(t);
        }
        i++;
    }
    /* dropping the unused tuples (all None) runs no Python code */
    if (i < n && PyList_SetSlice(out, i, n, NULL) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Parse the (ping_interval, ping_timeout) pair shared by the sweep methods.
 * Both must be >= 0; infinity is accepted (never due). */
static int
parse_periods(PyObject *const *args, double *interval, double *timeout)
{
    *interval = PyFloat_AsDouble(args[0]);
    if (*interval == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    *timeout = PyFloat_AsDouble(args[1]);
    if (*timeout == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (!(*interval >= 0) || !(*timeout >= 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "ping_interval and ping_timeout must be >= 0");
        return -1;
    }
    return 0;
}

/* _sweep(ping_interval, ping_timeout, limit=-1) -> (to_ping, expired)
 * expired: (websocket, lobby, user) tuples of connections pinged at least
 * ping_timeout ago and silent since; they are removed from the registry here
 * (counted as stale "no_pong"), the caller closes them. Handled first, so a
 * connection pinged by this sweep cannot expire in it.
 * to_ping: websockets silent (nothing received) for at least ping_interval,
 * now moved to the wait list; the caller sends them a ping.
 * limit >= 0 caps each list; the caller sweeps again at once while a list
 * came back full.
 * Cost: O(connections due): both lists are ordered by time and each walk
 * stops at the first entry not due. */
static PyObject *
Core_sweep(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *to_ping = NULL, *expired = NULL, *t = NULL, *res = NULL;
    double interval, timeout;
    Py_ssize_t limit = -1;
    CHECK_INIT(self, NULL);
    /* the clock may run Python code: read it before any lookup */
    NOW_OR_FAIL(now, self, return NULL);
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError,
                        "_sweep(ping_interval, ping_timeout, limit=-1)");
        return NULL;
    }
    if (parse_periods(args, &interval, &timeout) < 0) {
        return NULL;
    }
    if (nargs == 3) {
        limit = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
        if (limit == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    to_ping = PyList_New(0);
    expired = PyList_New(0);
    if (to_ping == NULL || expired == NULL) {
        goto error;
    }
    /* The result is allocated before the walks: after the idle walk
     * nothing may run Python code, or a finalizer could disconnect a
     * connection this sweep returns as to be pinged. */
    res = PyTuple_Pack(2, to_ping, expired); /* new ref */
    if (res == NULL) {
        goto error;
    }
    wsm_conn *c;
    while ((limit < 0 || PyList_GET_SIZE(expired) < limit) &&
           (c = wsm_expired_head(&self->reg, now, timeout)) != NULL) {
        PyObject *ws = c->ws, *lobby = c->lobby->key, *user = c->user->key;
        /* Unlink before allocating: a GC pass triggered by the allocation
         * may run finalizers, which must find a consistent registry. */
        Py_INCREF(ws);
        Py_INCREF(lobby);
        Py_INCREF(user);
        wsm_remove(&self->reg, c);
        self->n_disconnects++;
        self->n_stale[WSM_STALE_NO_PONG]++;
        t = PyTuple_New(3); /* steals the three references below */
        if (t == NULL) {
            Py_DECREF(ws);
            Py_DECREF(lobby);
            Py_DECREF(user);
            goto error;
        }
        PyTuple_SET_ITEM(t, 0, ws);
        PyTuple_SET_ITEM(t, 1, lobby);
        PyTuple_SET_ITEM(t, 2, user);
        if (PyList_Append(expired, t) < 0) {
            goto error;
        }
        Py_CLEAR(t);
    }
    while ((limit < 0 || PyList_GET_SIZE(to_ping) < limit) &&
           (c = wsm_due_head(&self->reg, now, interval)) != NULL) {
        /* a PyMem realloc at most: runs no Python, c stays valid */
        if (PyList_Append(to_ping, c->ws) < 0) {
            goto error;
        }
        wsm_mark_pinged(&self->reg, c, now, timeout);
        self->n_pings++;
    }
    Py_DECREF(to_ping);
    Py_DECREF(expired);
    return res;
error:
    Py_XDECREF(t);
    Py_XDECREF(res);
    Py_XDECREF(to_ping);
    Py_XDECREF(expired);
    return NULL;
}

/* _set_rate_limit(rate, burst, close_after): inbound token bucket settings.
 * rate <= 0 turns the limit off. Buckets already started keep their tokens
 * (capped to the new burst on their next message). */
static PyObject *
Core_set_rate_limit(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_INIT(self, NULL);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "_set_rate_limit(rate, burst, close_after)");
        return NULL;
    }
    double rate = PyFloat_AsDouble(args[0]);
    if (rate == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double burst = PyFloat_AsDouble(args[1]);
    if (burst == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long close_after = PyLong_AsUnsignedLong(args[2]);
    if (close_after == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!isfinite(rate) || !isfinite(burst) || (rate > 0 && burst < 1)) {
        PyErr_SetString(PyExc_ValueError,
                        "rate must be finite, burst finite and >= 1");
        return NULL;
    }
    wsm_ratelimit_set(&self->rl, rate, burst, close_after);
    Py_RETURN_NONE;
}

/* _allow(websocket) -> int: the rate-limit verdict for one inbound message.
 * 0: allowed (also when the limit is off or the websocket is unknown);
 * 1: dropped, first drop since the bucket was last full (tell the client);
 * 2: dropped again; 3: dropped, and `close_after` drops were exceeded
 * without the bucket refilling (close the connection). */
static PyObject *
Core_allow(CoreObject *self, PyObject *ws)
{
    CHECK_INIT(self, NULL);
    if (!wsm_ratelimit_on(&self->rl)) {
        return PyLong_FromLong(WSM_RATE_ALLOW);
    }
    /* the clock may run Python code: read it before any lookup */
    NOW_COARSE_OR_FAIL(now, self, return NULL);
    wsm_conn *c = wsm_find_conn(&self->reg, ws);
    if (c == NULL || c->state != WSM_ACTIVE) {
        return PyLong_FromLong(WSM_RATE_ALLOW);
    }
    return PyLong_FromLong(wsm_rate_check(&self->rl, c, now));
}

/* _rate_stats() -> (messages dropped, connections closed) by the limit */
static PyObject *
Core_rate_stats(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KK)", self->rl.n_dropped, self->rl.n_closed);
}

/* _next_deadline(ping_interval, ping_timeout) -> float | None
 * The earliest clock time at which _sweep would find something due among
 * the connections registered now (None: none registered). O(1): only the
 * heads of the two ordered lists are read. A connection registered or
 * touched later becomes due no earlier than its own time + ping_interval. */
static PyObject *
Core_next_deadline(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double interval, timeout, due;
    CHECK_INIT(self, NULL);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "_next_deadline(ping_interval, ping_timeout)");
        return NULL;
    }
    if (parse_periods(args, &interval, &timeout) < 0) {
        return NULL;
    }
    if (!wsm_next_deadline(&self->reg, interval, timeout, &due)) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(due);
}

/* _reap(websocket, reason) -> (lobby_code, user_id) | None
 * Count one stale close for reason ("no_pong", "send_failed",
 * "handler_exited") and remove the websocket if it is still registered
 * (returning what disconnect() would). */
static PyObject *
Core_reap(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int reason = -1;
    CHECK_INIT(self, NULL);
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_reap(websocket, reason: str)");
        return NULL;
    }
    for (int i = 0; i < WSM_STALE_NREASONS; i++) {
        if (PyUnicode_CompareWithASCIIString(args[1], wsm_stale_names[i]) == 0) {
            reason = i;
            break;
        }
    }
    if (reason < 0) {
        PyErr_Format(PyExc_ValueError, "unknown stale reason %R", args[1]);
        return NULL;
    }
    self->n_stale[reason]++;
    return Core_disconnect(self, args[0]);
}

/* _set_shutting_down(flag): stop (or resume) admitting connections. */
static PyObject *
Core_set_shutting_down(CoreObject *self, PyObject *flag)
{
    CHECK_INIT(self, NULL);
    int v = PyObject_IsTrue(flag);
    if (v < 0) {
        return NULL;
    }
    self->shutting_down = v;
    Py_RETURN_NONE;
}

/* d[key] = value, stealing the new reference `value` (NULL: an error is set). */
static int
dict_set_new(PyObject *d, PyObject *key /* borrowed */, PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    int rc = PyDict_SetItem(d, key, value);
    Py_DECREF(value);
    return rc;
}

#define dict_set_ull(d, key, v) dict_set_new(d, key, PyLong_FromUnsignedLongLong(v))
#define dict_set_ssize(d, key, v) dict_set_new(d, key, PyLong_FromSsize_t(v))
#define dict_set_double(d, key, v) dict_set_new(d, key, PyFloat_FromDouble(v))

/* round(x, 1) as Python computes it (correctly rounded decimal). */
static double
round1(double x)
{
    /* Fast path: away from a tie, floor/ceil of x*10 divided by 10 is the
     * double nearest the decimal, which is what round() returns. */
    if (isfinite(x) && fabs(x) < 1e15) {
        double y = x * 10.0, f = floor(y), frac = y - f;
        if (fabs(frac - 0.5) > 1e-6) {
            return (frac < 0.5 ? f : f + 1.0) / 10.0;
        }
    }
    char *s = PyOS_double_to_string(x, 'f', 1, 0, NULL);
    if (s == NULL) {
        PyErr_Clear();
        return floor(x * 10.0 + 0.5) / 10.0;
    }
    double v = PyOS_string_to_double(s, NULL, NULL);
    PyMem_Free(s);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return floor(x * 10.0 + 0.5) / 10.0;
    }
    return v;
}

/* get_stats() -> dict. O(1): every count is kept up to date. */
static PyObject *
Core_get_stats(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    module_state *st = self->st;
#define K(name) (st->k_##name)
    PyObject *stale_keys[WSM_STALE_NREASONS] = {K(no_pong), K(send_failed),
                                                 K(handler_exited)};
    /* Every dict (its allocation may run a GC pass whose finalizers
     * disconnect) is allocated before any count is read, so the counts
     * agree with each other and with len() afterwards. Filling them with
     * ints and floats (replacing None values) runs no Python code. */
    PyObject *d = PyDict_Copy(st->tpl_stats), *refused = PyDict_Copy(st->tpl_refused),
             *lat = PyDict_Copy(st->tpl_latency), *stale = PyDict_Copy(st->tpl_stale);
    if (d == NULL || refused == NULL || lat == NULL || stale == NULL) {
        goto error;
    }
    Py_ssize_t total = self->reg.active;
    double pct = self->max_connections > 0
        ? round1((double)total / (double)self->max_connections * 100.0)
        : 100.0;
    if (dict_set_ssize(d, K(total_connections), total) < 0 ||
        dict_set_ssize(d, K(max_connections), self->max_connections) < 0 ||
        dict_set_double(d, K(capacity_percent), pct) < 0 ||
        dict_set_ssize(d, K(active_lobbies), self->reg.active_lobbies) < 0 ||
        dict_set_ssize(d, K(max_per_lobby), self->max_per_lobby) < 0 ||
        dict_set_ssize(d, K(pending_connections), self->reg.pending) < 0 ||
        dict_set_ssize(d, K(connected_users), self->reg.active_users) < 0 ||
        dict_set_ull(d, K(connects), self->n_connects) < 0 ||
        dict_set_ull(d, K(disconnects), self->n_disconnects) < 0 ||
        dict_set_ull(d, K(pings_sent), self->n_pings) < 0 ||
        dict_set_ull(d, K(pongs_received), self->n_pongs) < 0) {
        goto error;
    }
    if (self->max_per_user < 0) {
        if (PyDict_SetItem(d, K(max_per_user), Py_None) < 0) {
            goto error;
        }
    }
    else if (dict_set_ssize(d, K(max_per_user), self->max_per_user) < 0) {
        goto error;
    }
    if (PyDict_SetItem(d, K(shutting_down),
                             self->shutting_down ? Py_True : Py_False) < 0) {
        goto error;
    }
    if (dict_set_ull(refused, K(server_full), self->n_refused_server) < 0 ||
        dict_set_ull(refused, K(lobby_full), self->n_refused_lobby) < 0 ||
        dict_set_ull(refused, K(user_limit), self->n_refused_user) < 0 ||
        dict_set_ull(refused, K(shutting_down), self->n_refused_shutdown) < 0 ||
        dict_set_ull(refused, K(unauthorized), self->n_refused_unauthorized) < 0 ||
        dict_set_ull(refused, K(forbidden_origin), self->n_refused_origin) < 0 ||
        dict_set_ull(refused, K(invalid_id), self->n_refused_invalid) < 0 ||
        PyDict_SetItem(d, K(refused), refused) < 0) {
        goto error;
    }
    double rtt_ms[3];
    int n = wsm_rtt_percentiles(&self->rtt, rtt_ms);
    if (n > 0) {
        if (dict_set_double(lat, K(p50), rtt_ms[0]) < 0 ||
            dict_set_double(lat, K(p95), rtt_ms[1]) < 0 ||
            dict_set_double(lat, K(p99), rtt_ms[2]) < 0 ||
            dict_set_ssize(lat, K(samples), n) < 0) {
            goto error;
        }
    }
    else if (PyDict_SetItem(lat, K(p50), Py_None) < 0 ||
             PyDict_SetItem(lat, K(p95), Py_None) < 0 ||
             PyDict_SetItem(lat, K(p99), Py_None) < 0 ||
             dict_set_ssize(lat, K(samples), 0) < 0) {
        goto error;
    }
    if (PyDict_SetItem(d, K(latency_ms), lat) < 0) {
        goto error;
    }
    if (PyDict_SetItem(d, K(stale_closed), stale) < 0) {
        goto error;
    }
    for (int i = 0; i < WSM_STALE_NREASONS; i++) {
        if (dict_set_ull(stale, stale_keys[i], self->n_stale[i]) < 0) {
            goto error;
        }
    }
    Py_DECREF(stale);
    Py_DECREF(refused);
    Py_DECREF(lat);
    return d;
error:
    Py_XDECREF(stale);
    Py_XDECREF(refused);
    Py_XDECREF(lat);
    Py_XDECREF(d);
    return NULL;
#undef K
}

/* ---- attributes ------------------------------------------------------- */

static PyObject *
Core_get_max_per_user(CoreObject *self, void *Py_UNUSED(closure))
{
    if (self->max_per_user < 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(self->max_per_user);
}

static int
set_limit(Py_ssize_t *slot, PyObject *value, Py_ssize_t minimum,
          const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", name);
        return -1;
    }
    Py_ssize_t v = PyNumber_AsSsize_t(value, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < minimum) {
        PyErr_Format(PyExc_ValueError, "%s must be >= %zd", name, minimum);
        return -1;
    }
    *slot = v;
    return 0;
}

static int
Core_set_max_per_user(CoreObject *self, PyObject *value, void *Py_UNUSED(c))
{
    if (value == Py_None) {
        self->max_per_user = -1;
        return 0;
    }
    return set_limit(&self->max_per_user, value, 1, "max_per_user");
}

static PyObject *
Core_get_max_connections(CoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->max_connections);
}

static int
Core_set_max_connections(CoreObject *self, PyObject *value, void *Py_UNUSED(c))
{
    return set_limit(&self->max_connections, value, 0, "max_connections");
}

static PyObject *
Core_get_max_per_lobby(CoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->max_per_lobby);
}

static int
Core_set_max_per_lobby(CoreObject *self, PyObject *value, void *Py_UNUSED(c))
{
    return set_limit(&self->max_per_lobby, value, 0, "max_per_lobby");
}

static PyObject *
Core_get_max_id_bytes(CoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->max_id_bytes);
}

static int
Core_set_max_id_bytes(CoreObject *self, PyObject *value, void *Py_UNUSED(c))
{
    return set_limit(&self->max_id_bytes, value, 1, "max_id_bytes");
}

static PyObject *
Core_get_clock(CoreObject *self, void *Py_UNUSED(closure))
{
    if (self->clock == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(self->clock);
    return self->clock;
}

static PyObject *
Core_now(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    NOW_OR_FAIL(now, self, return NULL);
    return PyFloat_FromDouble(now);
}

/* _removals() -> int: committed connections removed so far (any path).
 * Unchanged since a snapshot of recipients: every one is still registered
 * where it was. */
static PyObject *
Core_removals(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    return PyLong_FromUnsignedLongLong(self->reg.removals);
}

static PyObject *
Core_get_shutting_down(CoreObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->shutting_down);
}

/* ---- history (issue 12; csrc/history.c) --------------------------------- */

static PyObject *
Core_get_history_size(CoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->hist.size);
}

/* history_size: entries kept per lobby, 0 (or None): off, every ring dropped */
static int
Core_set_history_size(CoreObject *self, PyObject *value, void *Py_UNUSED(c))
{
    Py_ssize_t size = 0;
    if (value != Py_None && set_limit(&size, value, 0, "history_size") < 0) {
        return -1;
    }
    Py_ssize_t before = self->hist.size;
    self->hist.size = size;
    if (size == 0) {
        wsm_history_clear(&self->hist);
    }
    else if (size < before) {
        wsm_history_trim(&self->hist); /* bounded at once, not at each ring's next append */
    }
    return 0;
}

static PyObject *
Core_get_history_ttl(CoreObject *self, void *Py_UNUSED(closure))
{
    if (self->hist.ttl <= 0) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(self->hist.ttl);
}

/* history_ttl: seconds an entry is kept, None (or 0): no age limit */
static int
Core_set_history_ttl(CoreObject *self, PyObject *value, void *Py_UNUSED(c))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete history_ttl");
        return -1;
    }
    double ttl = 0;
    if (value != Py_None) {
        ttl = PyFloat_AsDouble(value);
        if (ttl == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        if (!isfinite(ttl) || ttl < 0) {
            PyErr_SetString(PyExc_ValueError,
                            "history_ttl must be None or a finite number >= 0");
            return -1;
        }
    }
    self->hist.ttl = ttl;
    return 0;
}

/* An exact str for a lobby code: new reference, or NULL with TypeError. */
static PyObject *
history_key(PyObject *lobby)
{
    if (PyUnicode_CheckExact(lobby)) {
        Py_INCREF(lobby);
        return lobby;
    }
    if (PyUnicode_Check(lobby)) {
        return PyUnicode_FromObject(lobby); /* a subclass: copied, its methods never run */
    }
    PyErr_Format(PyExc_TypeError, "lobby_code must be a str, not %.100s",
                 Py_TYPE(lobby)->tp_name);
    return NULL;
}

/* The ring of `key` (exact str), created if absent. The returned pointer is
 * valid until the next call that can run Python code. NULL with an
 * exception set on failure. */
static wsm_ring *
history_ring(CoreObject *self, PyObject *key, double now)
{
    wsm_history *h = &self->hist;
    wsm_history_check_fork(h);
    wsm_history_expire(h, NULL, now);
    wsm_ring *ring = wsm_history_find(h, key);
    if (ring != NULL) {
        wsm_history_expire(h, ring, now);
        return ring;
    }
    char epoch[WSM_EPOCH_LEN + 1];
    wsm_history_next_epoch(h, epoch);
    /* the text added to each message of this ring, before its offset */
    PyObject *quoted = wsm_json_dumps(key, NULL, &self->st->json, 0); /* new ref; an exact str: no Python code */
    if (quoted == NULL) {
        return NULL;
    }
    PyObject *prefix = PyUnicode_FromFormat(",\"_pos\":{\"lobby\":%U,\"epoch\":\"%s\",\"offset\":",
                                            quoted, epoch); /* new ref */
    Py_DECREF(quoted);
    if (prefix == NULL) {
        return NULL;
    }
    /* no Python code ran since the lookup (str allocations only): absent still */
    ring = wsm_history_create(h, key, prefix, now); /* steals prefix */
    if (ring == NULL) {
        PyErr_NoMemory();
    }
    return ring;
}

/* _history_append(lobby_code, data, exclude_user_id=None) -> str
 * `data` (a serialized JSON object) with its position added as the last
 * member, `"_pos":{"lobby":L,"epoch":E,"offset":N}`, kept in the lobby's ring
 * with `exclude_user_id` (a str or None: that user's connections are never
 * sent it on a replay). History off: `data` itself. TypeError if `data` is
 * not an object's text or the user is neither a str nor None. */
static PyObject *
Core_history_append(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_history_append(lobby_code, data, exclude_user_id=None)");
        return NULL;
    }
    PyObject *exclude_arg = nargs == 3 && args[2] != Py_None ? args[2] : NULL; /* borrowed */
    if (exclude_arg != NULL && !PyUnicode_Check(exclude_arg)) {
        PyErr_Format(PyExc_TypeError, "exclude_user_id must be a str or None, not %.100s",
                     Py_TYPE(exclude_arg)->tp_name);
        return NULL;
    }
    CHECK_INIT(self, NULL);
    PyObject *data = args[1];
    if (!PyUnicode_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "_history_append: data must be a str");
        return NULL;
    }
    if (self->hist.size == 0) {
        Py_INCREF(data);
        return data;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(data);
    if (n < 2 || PyUnicode_READ_CHAR(data, 0) != '{' || PyUnicode_READ_CHAR(data, n - 1) != '}') {
        PyErr_SetString(PyExc_TypeError,
                        "with history_size set, a lobby message must be a JSON object "
                        "(its position is added to it as \"_pos\")");
        return NULL;
    }
    /* the clock may run Python code: read it before any lookup */
    NOW_OR_FAIL(now, self, return NULL);
    PyObject *key = history_key(args[0]); /* new ref */
    if (key == NULL) {
        return NULL;
    }
    PyObject *text = NULL, *prefix = NULL, *excluded = NULL;
    if (exclude_arg != NULL) {
        excluded = history_key(exclude_arg); /* new ref: exact str, copied before any lookup */
        if (excluded == NULL) {
            goto error;
        }
    }
    wsm_ring *ring = history_ring(self, key, now);
    if (ring == NULL) {
        goto error;
    }
    uint64_t offset = ring->top + 1;
    prefix = ring->prefix;
    Py_INCREF(prefix); /* ours: the ring's pointer is not kept past here */
    char digits[24];
    int nd = snprintf(digits, sizeof digits, "%llu}}", (unsigned long long)offset);
    int empty = n == 2; /* "{}": no comma before our member */
    Py_ssize_t np = PyUnicode_GET_LENGTH(prefix) - empty;
    Py_UCS4 maxchar = PyUnicode_MAX_CHAR_VALUE(data);
    if (PyUnicode_MAX_CHAR_VALUE(prefix) > maxchar) {
        maxchar = PyUnicode_MAX_CHAR_VALUE(prefix);
    }
    text = PyUnicode_New(n - 1 + np + nd, maxchar); /* new ref; a str: not GC-tracked */
    if (text == NULL) {
        goto error;
    }
    if (PyUnicode_CopyCharacters(text, 0, data, 0, n - 1) < 0 ||
        PyUnicode_CopyCharacters(text, n - 1, prefix, empty, np) < 0) {
        goto error;
    }
    int kind = PyUnicode_KIND(text);
    void *out = PyUnicode_DATA(text);
    for (int i = 0; i < nd; i++) {
        PyUnicode_WRITE(kind, out, n - 1 + np + i, (Py_UCS4)digits[i]);
    }
    /* look the ring up again (no Python code ran, but keep no pointer across
     * allocations); it must be the one whose offset we wrote */
    ring = wsm_history_find(&self->hist, key);
    if (ring == NULL || ring->prefix != prefix || ring->top + 1 != offset) {
        PyErr_SetString(PyExc_RuntimeError, "history changed during an append");
        goto error;
    }
    if (wsm_history_push(&self->hist, ring, text, excluded, now) < 0) {
        PyErr_NoMemory();
        goto error;
    }
    Py_XDECREF(excluded);
    Py_DECREF(prefix);
    Py_DECREF(key);
    return text;
error:
    Py_XDECREF(text);
    Py_XDECREF(prefix);
    Py_XDECREF(excluded);
    Py_DECREF(key);
    return NULL;
}

/* _history_since(lobby_code, epoch, offset, user_id=None)
 *     -> (recovered, epoch, top, [texts])
 * What a client that saw `offset` of `epoch` missed: recovered True and the
 * texts of offsets offset+1 .. top (in order; those broadcast with
 * exclude_user_id == user_id left out), or recovered False and [] when the
 * epoch differs (any str: one that is not 12 ASCII characters never matches,
 * a lone surrogate included), the offset is ahead of top, or an entry it
 * needs was dropped (size or ttl). The lobby's ring is created if absent (its
 * epoch is the position handed back). History off: (False, "", 0, []). */
static PyObject *
Core_history_since(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 3 && nargs != 4) || !PyUnicode_Check(args[1]) ||
        (nargs == 4 && args[3] != Py_None && !PyUnicode_Check(args[3]))) {
        PyErr_SetString(PyExc_TypeError,
                        "_history_since(lobby_code, epoch: str, offset: int, user_id: str | None = None)");
        return NULL;
    }
    CHECK_INIT(self, NULL);
    unsigned long long since = PyLong_AsUnsignedLongLong(args[2]);
    if (since == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->hist.size == 0) {
        return Py_BuildValue("(Osi[])", Py_False, "", 0);
    }
    /* the epoch's characters, compared without encoding (a lone surrogate
     * cannot be UTF-8: it simply does not match) */
    PyObject *want = args[1]; /* borrowed */
    int ascii12 = PyUnicode_IS_ASCII(want) && PyUnicode_GET_LENGTH(want) == WSM_EPOCH_LEN;
    char wanted[WSM_EPOCH_LEN];
    if (ascii12) {
        memcpy(wanted, PyUnicode_1BYTE_DATA(want), WSM_EPOCH_LEN);
    }
    NOW_OR_FAIL(now, self, return NULL);
    PyObject *key = history_key(args[0]); /* new ref */
    if (key == NULL) {
        return NULL;
    }
    PyObject *user = NULL; /* new ref: exact str, or NULL for no user */
    if (nargs == 4 && args[3] != Py_None) {
        user = history_key(args[3]);
        if (user == NULL) {
            Py_DECREF(key);
            return NULL;
        }
    }
    PyObject **items = NULL, *list = NULL, *res = NULL;
    Py_ssize_t k = 0;
    wsm_ring *ring = history_ring(self, key, now);
    if (ring == NULL) {
        goto done;
    }
    /* copy what the result needs: no pointer into the ring past this block */
    char epoch[WSM_EPOCH_LEN + 1];
    memcpy(epoch, ring->epoch, sizeof epoch);
    uint64_t top = ring->top;
    int recovered = ascii12 && memcmp(wanted, epoch, WSM_EPOCH_LEN) == 0 &&
                    since <= top && top - since <= ring->count;
    if (recovered && top > since) {
        Py_ssize_t missed = (Py_ssize_t)(top - since);
        items = PyMem_Malloc((size_t)missed * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        /* no Python code in this walk: exact str compared by their characters */
        for (Py_ssize_t i = 0; i < missed; i++) {
            const wsm_hentry *e = wsm_ring_at(ring, since + 1 + (uint64_t)i);
            if (user != NULL && e->excluded != NULL && wsm_str_same(e->excluded, user)) {
                continue; /* the broadcast skipped this user: so does its replay */
            }
            items[k] = e->text;
            Py_INCREF(items[k]); /* strong: the list below may run a GC pass */
            k++;
        }
    }
    list = PyList_New(k); /* new ref; may run a GC pass (finalizers): the ring is not used after */
    if (list == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyList_SET_ITEM(list, i, items[i]); /* steals */
    }
    PyMem_Free(items);
    items = NULL;
    k = 0;
    res = Py_BuildValue("(OsKN)", recovered ? Py_True : Py_False, epoch,
                        (unsigned long long)top, list); /* steals list */
    list = NULL;
done:
    if (items != NULL) {
        for (Py_ssize_t i = 0; i < k; i++) {
            Py_DECREF(items[i]);
        }
        PyMem_Free(items);
    }
    Py_XDECREF(list);
    Py_XDECREF(user);
    Py_DECREF(key);
    return res;
}

/* _history_info(lobby_code) -> (epoch, top, count) or None */
static PyObject *
Core_history_info(CoreObject *self, PyObject *lobby)
{
    CHECK_INIT(self, NULL);
    NOW_OR_FAIL(now, self, return NULL);
    PyObject *key = history_key(lobby); /* new ref */
    if (key == NULL) {
        return NULL;
    }
    wsm_history_check_fork(&self->hist);
    wsm_history_expire(&self->hist, NULL, now);
    wsm_ring *ring = wsm_history_find(&self->hist, key);
    Py_DECREF(key);
    if (ring == NULL) {
        Py_RETURN_NONE;
    }
    wsm_history_expire(&self->hist, ring, now);
    char epoch[WSM_EPOCH_LEN + 1];
    memcpy(epoch, ring->epoch, sizeof epoch);
    unsigned long long top = ring->top, count = ring->count;
    return Py_BuildValue("(sKK)", epoch, top, count);
}

/* _history_stats() -> (lobbies, entries) held now (expired ones dropped first) */
static PyObject *
Core_history_stats(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    NOW_OR_FAIL(now, self, return NULL);
    wsm_history_check_fork(&self->hist);
    wsm_history_expire(&self->hist, NULL, now);
    return Py_BuildValue("(nn)", self->hist.nrings, self->hist.nentries);
}

/* _history_totals() -> (lobbies, entries, bytes, appended): _history_stats
 * plus the kept texts' character bytes and the appends so far; reads the
 * clock only when there is something to expire */
static PyObject *
Core_history_totals(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_INIT(self, NULL);
    wsm_history_check_fork(&self->hist);
    if (self->hist.ttl > 0 && self->hist.nrings > 0) { /* no clock read otherwise (get_stats) */
        NOW_OR_FAIL(now, self, return NULL);
        wsm_history_check_fork(&self->hist); /* the clock ran Python code */
        wsm_history_expire(&self->hist, NULL, now);
    }
    unsigned long long appended = self->hist.appended;
    return Py_BuildValue("(nnnK)", self->hist.nrings, self->hist.nentries, self->hist.nbytes,
                         appended);
}

static PyGetSetDef Core_getset[] = {
    {"history_size", (getter)Core_get_history_size, (setter)Core_set_history_size,
     "Messages kept per lobby for recovery; 0: history off.", NULL},
    {"history_ttl", (getter)Core_get_history_ttl, (setter)Core_set_history_ttl,
     "Seconds a history entry is kept; None: no age limit.", NULL},
    {"max_connections", (getter)Core_get_max_connections,
     (setter)Core_set_max_connections, "Global connection limit.", NULL},
    {"max_per_lobby", (getter)Core_get_max_per_lobby,
     (setter)Core_set_max_per_lobby, "Connections allowed in one lobby.", NULL},
    {"max_per_user", (getter)Core_get_max_per_user,
     (setter)Core_set_max_per_user,
     "Connections allowed for one user id (None: no limit).", NULL},
    {"max_id_bytes", (getter)Core_get_max_id_bytes,
     (setter)Core_set_max_id_bytes,
     "Longest lobby / user id accepted, in UTF-8 bytes.", NULL},
    {"clock", (getter)Core_get_clock, NULL,
     "The injected monotonic clock, or None for the system's.", NULL},
    {"shutting_down", (getter)Core_get_shutting_down, NULL,
     "True once shutdown began: no connection is admitted.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Core_methods[] = {
    {"can_accept_connection", (PyCFunction)Core_can_accept_connection, METH_O,
     "can_accept_connection(lobby_code) -> (bool, reason)\n\n"
     "Whether a new connection to lobby_code would be admitted now; reason is\n"
     "'server_full', 'lobby_full', 'shutting_down', or '' when admitted.\n"
     "Handshakes in progress count. Reserves nothing: connect() decides.\n"
     "A False answer counts as one refusal in get_stats()['refused'] (the\n"
     "seed's endpoint closes the socket itself on it): ask once per handshake."},
    {"disconnect", (PyCFunction)Core_disconnect, METH_O,
     "disconnect(websocket) -> (lobby_code, user_id) | None\n\n"
     "Remove the connection; None if it was not registered."},
    {"update_last_message", (PyCFunction)Core_update_last_message, METH_O,
     "update_last_message(user_id): every connection of the user is alive."},
    {"record_pong", (PyCFunction)Core_record_pong, METH_O,
     "record_pong(user_id): a health_pong from the user: every connection of\n"
     "the user is alive, and a ping_user() waiting for it returns."},
    {"touch", (PyCFunction)Core_touch, METH_O,
     "touch(websocket) -> bool: this connection received something."},
    {"record_pong_ws", (PyCFunction)Core_record_pong_ws, METH_O,
     "record_pong_ws(websocket) -> latency_ms | None: a pong on this connection."},
    {"latency_ms", (PyCFunction)Core_latency_ms, METH_O,
     "latency_ms(websocket) -> float | None\n\n"
     "Round-trip time in ms of the last ping this connection answered;\n"
     "None before its first answered ping or for an unknown websocket."},
    {"is_user_connected", (PyCFunction)(void (*)(void))Core_is_user_connected,
     METH_FASTCALL | METH_KEYWORDS,
     "is_user_connected(user_id) -> bool: True while any connection is open."},
    {"get_lobby_users", (PyCFunction)(void (*)(void))Core_get_lobby_users,
     METH_FASTCALL | METH_KEYWORDS,
     "get_lobby_users(lobby_code) -> set[str]"},
    {"get_stats", (PyCFunction)Core_get_stats, METH_NOARGS,
     "get_stats() -> dict of counts and limits (O(1))."},
    {"_reserve", (PyCFunction)(void (*)(void))Core_reserve, METH_FASTCALL,
     NULL},
    {"_commit", (PyCFunction)Core_commit, METH_O, NULL},
    {"_count_refusal", (PyCFunction)Core_count_refusal, METH_O, NULL},
    {"_release", (PyCFunction)Core_release, METH_O, NULL},
    {"_info", (PyCFunction)Core_info, METH_O, NULL},
    {"_join", (PyCFunction)(void (*)(void))Core_join, METH_FASTCALL, NULL},
    {"_join_settle", (PyCFunction)(void (*)(void))Core_join_settle, METH_FASTCALL, NULL},
    {"leave", (PyCFunction)(void (*)(void))Core_leave, METH_FASTCALL,
     "leave(websocket, lobby_code) -> bool\n\n"
     "Take the connection out of lobby_code (its first lobby included); True\n"
     "if it was a member."},
    {"_is_member", (PyCFunction)(void (*)(void))Core_is_member, METH_FASTCALL, NULL},
    {"lobbies_of", (PyCFunction)Core_lobbies_of, METH_O,
     "lobbies_of(websocket) -> set[str]\n\n"
     "The lobbies the connection is in (empty if it is not connected)."},
    {"_track_presence", (PyCFunction)Core_track_presence, METH_O, NULL},
    {"_take_dirty", (PyCFunction)Core_take_dirty, METH_NOARGS, NULL},
    {"_note_ping", (PyCFunction)(void (*)(void))Core_note_ping, METH_FASTCALL,
     NULL},
    {"_pong_due", (PyCFunction)Core_pong_due, METH_O, NULL},
    {"_set_pong_hook", (PyCFunction)Core_set_pong_hook, METH_O, NULL},
    {"_set_drop_hook", (PyCFunction)(void (*)(void))Core_set_drop_hook,
     METH_FASTCALL, NULL},
    {"_set_notify", (PyCFunction)(void (*)(void))Core_set_notify, METH_FASTCALL,
     NULL},
    {"_lobby_targets", (PyCFunction)(void (*)(void))Core_lobby_targets,
     METH_FASTCALL, NULL},
    {"_fanout_lobby", (PyCFunction)(void (*)(void))Core_fanout_lobby,
     METH_FASTCALL, NULL},
    {"_history_append", (PyCFunction)(void (*)(void))Core_history_append,
     METH_FASTCALL, NULL},
    {"_history_since", (PyCFunction)(void (*)(void))Core_history_since,
     METH_FASTCALL, NULL},
    {"_history_info", (PyCFunction)Core_history_info, METH_O, NULL},
    {"_history_stats", (PyCFunction)Core_history_stats, METH_NOARGS, NULL},
    {"_history_totals", (PyCFunction)Core_history_totals, METH_NOARGS, NULL},
    {"_user_targets", (PyCFunction)Core_user_targets, METH_O, NULL},
    {"_lobby_count", (PyCFunction)Core_lobby_count, METH_O, NULL},
    {"_snapshot", (PyCFunction)Core_snapshot, METH_NOARGS, NULL},
    {"_sweep", (PyCFunction)(void (*)(void))Core_sweep, METH_FASTCALL, NULL},
    {"_next_deadline", (PyCFunction)(void (*)(void))Core_next_deadline,
     METH_FASTCALL, NULL},
    {"_reap", (PyCFunction)(void (*)(void))Core_reap, METH_FASTCALL, NULL},
    {"_set_shutting_down", (PyCFunction)Core_set_shutting_down, METH_O, NULL},
    {"_set_rate_limit", (PyCFunction)(void (*)(void))Core_set_rate_limit,
     METH_FASTCALL, NULL},
    {"_allow", (PyCFunction)Core_allow, METH_O, NULL},
    {"_rate_stats", (PyCFunction)Core_rate_stats, METH_NOARGS, NULL},
    {"_now", (PyCFunction)Core_now, METH_NOARGS, NULL},
    {"_removals", (PyCFunction)Core_removals, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Core_slots[] = {
    {Py_tp_doc, "C core of wsmanager.ConnectionManager: the registry of "
                "connections by websocket, lobby and user."},
    {Py_tp_init, Core_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_traverse, Core_traverse},
    {Py_tp_clear, Core_clear},
    {Py_tp_dealloc, Core_dealloc},
    {Py_tp_methods, Core_methods},
    {Py_tp_getset, Core_getset},
    {Py_sq_length, Core_len},
    {Py_sq_contains, Core_contains},
    {0, NULL},
};

static PyType_Spec Core_spec = {
    .name = "wsmanager._core.Core",
    .basicsize = sizeof(CoreObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Core_slots,
};

/* ---- module ----------------------------------------------------------- */

static PyObject *
mod_dumps(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
          PyObject *kwnames)
{
    PyObject *def = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError,
                     "dumps() takes exactly one positional argument (%zd given)",
                     nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "default") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "dumps() got an unexpected keyword argument '%U'", name);
            return NULL;
        }
        def = args[nargs + i];
    }
    if (def != Py_None && !PyCallable_Check(def)) {
        PyErr_SetString(PyExc_TypeError, "default must be callable or None");
        return NULL;
    }
    return wsm_json_dumps(args[0], def == Py_None ? NULL : def, &get_state(module)->json, 0);
}

/* The sends' encoder: positional only (no keyword parsing on the hot path). */
static PyObject *
mod_encode_message(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "encode_message() takes exactly 2 positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *def = args[1];
    if (def != Py_None && !PyCallable_Check(def)) {
        PyErr_Format(PyExc_TypeError, "default must be callable or None, not %.200s",
                     Py_TYPE(def)->tp_name);
        return NULL;
    }
    return wsm_json_dumps(args[0], def == Py_None ? NULL : def, &get_state(module)->json, 1);
}

static PyMethodDef module_methods[] = {
    {"dumps", (PyCFunction)(void (*)(void))mod_dumps,
     METH_FASTCALL | METH_KEYWORDS,
     "dumps(obj, *, default=None) -> str\n\n"
     "Compact JSON text of obj (UTF-8 kept as is). Besides JSON's own types:\n"
     "datetime/date/time as the text of .isoformat() (subclasses: their own\n"
     "isoformat()), UUID as str(), Enum by its value (int/str/float mix-ins as\n"
     "that base type), dataclass instances (fields in order) and pydantic v2\n"
     "models (model_dump(mode=\"json\")) as objects, Decimal as a number: its\n"
     "exact str(), since JSON numbers are decimal text of any precision\n"
     "(RFC 8259 section 6) and a price stays a number, as with FastAPI's\n"
     "jsonable_encoder. default(obj) is called for anything else only.\n"
     "Raises ValueError for NaN and infinities (float or Decimal: browsers\n"
     "cannot parse them), TypeError for unsupported types unless default()\n"
     "converts them, RecursionError for too deep nesting; what default() or\n"
     "another hook (model_dump, isoformat, utcoffset) raises propagates."},
    {"encode_message", (PyCFunction)(void (*)(void))mod_encode_message, METH_FASTCALL,
     "encode_message(message, default, /) -> str\n\n"
     "dumps(message, default=default) for the sends: an Exception other than\n"
     "TypeError, RecursionError or MemoryError raised by default() or another\n"
     "conversion hook (model_dump, isoformat, utcoffset, ...) becomes a\n"
     "TypeError naming it and the object's type, with the original as\n"
     "__cause__."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
make_tuple(PyObject *flag, PyObject *reason)
{
    return PyTuple_Pack(2, flag, reason);
}

/* A new dict of `keys` (borrowed) in this order, each mapped to None. */
static PyObject *
make_template(PyObject *const *keys, size_t n)
{
    PyObject *d = PyDict_New();
    if (d == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (PyDict_SetItem(d, keys[i], Py_None) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static int
make_stats_templates(module_state *st)
{
#define K(name) (st->k_##name)
    PyObject *stats[] = {
        K(total_connections), K(max_connections), K(capacity_percent),
        K(active_lobbies), K(max_per_lobby), K(pending_connections),
        K(connected_users), K(connects), K(disconnects), K(pings_sent),
        K(pongs_received), K(max_per_user), K(shutting_down), K(refused),
        K(latency_ms), K(stale_closed),
    };
    PyObject *refused[] = {
        K(server_full), K(lobby_full), K(user_limit), K(shutting_down),
        K(unauthorized), K(forbidden_origin), K(invalid_id),
    };
    PyObject *latency[] = {K(p50), K(p95), K(p99), K(samples)};
    PyObject *stale[] = {K(no_pong), K(send_failed), K(handler_exited)};
#undef K
#define N(a) (sizeof(a) / sizeof((a)[0]))
    st->tpl_stats = make_template(stats, N(stats));
    st->tpl_refused = make_template(refused, N(refused));
    st->tpl_latency = make_template(latency, N(latency));
    st->tpl_stale = make_template(stale, N(stale));
#undef N
    return st->tpl_stats && st->tpl_refused && st->tpl_latency && st->tpl_stale
        ? 0 : -1;
}

static int
module_exec(PyObject *m)
{
    module_state *st = get_state(m);
    /* a forked child's history must not go on under its parent's epochs */
    int fork_err = wsm_history_atfork();
    if (fork_err != 0) {
        errno = fork_err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
#define INTERN(field, text)                                   \
    st->field = PyUnicode_InternFromString(text);             \
    if (st->field == NULL) {                                  \
        return -1;                                            \
    }
    INTERN(str_empty, "");
    INTERN(str_server_full, "server_full");
    INTERN(str_lobby_full, "lobby_full");
    INTERN(str_user_limit, "user_limit");
    INTERN(str_shutting_down, "shutting_down");
#undef INTERN
    if (wsm_json_types_init(&st->json) < 0) {
        return -1;
    }
#define WSM_INIT_KEY(name)                                        \
    st->k_##name = PyUnicode_InternFromString(#name);             \
    if (st->k_##name == NULL) {                                   \
        return -1;                                                \
    }
    WSM_STAT_KEYS(WSM_INIT_KEY)
#undef WSM_INIT_KEY
    if (make_stats_templates(st) < 0) {
        return -1;
    }
    if ((st->accept_ok = make_tuple(Py_True, st->str_empty)) == NULL ||
        (st->refuse_server = make_tuple(Py_False, st->str_server_full)) == NULL ||
        (st->refuse_lobby = make_tuple(Py_False, st->str_lobby_full)) == NULL ||
        (st->refuse_shutdown = make_tuple(Py_False, st->str_shutting_down)) == NULL) {
        return -1;
    }
    st->core_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Core_spec,
                                                             NULL);
    if (st->core_type == NULL) {
        return -1;
    }
    if (PyModule_AddType(m, st->core_type) < 0) {
        return -1;
    }
    return 0;
}

static int
module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = get_state(m);
    if (st == NULL) {
        return 0;
    }
    Py_VISIT(st->core_type);
#define WSM_VISIT_KEY(name) Py_VISIT(st->k_##name);
    WSM_STAT_KEYS(WSM_VISIT_KEY)
#undef WSM_VISIT_KEY
    Py_VISIT(st->str_empty);
    Py_VISIT(st->str_server_full);
    Py_VISIT(st->str_lobby_full);
    Py_VISIT(st->str_user_limit);
    Py_VISIT(st->str_shutting_down);
    Py_VISIT(st->accept_ok);
    Py_VISIT(st->refuse_server);
    Py_VISIT(st->refuse_lobby);
    Py_VISIT(st->refuse_shutdown);
    Py_VISIT(st->tpl_stats);
    Py_VISIT(st->tpl_refused);
    Py_VISIT(st->tpl_latency);
    Py_VISIT(st->tpl_stale);
    return wsm_json_types_traverse(&st->json, visit, arg);
}

static int
module_clear(PyObject *m)
{
    module_state *st = get_state(m);
    if (st == NULL) {
        return 0;
    }
    Py_CLEAR(st->core_type);
#define WSM_CLEAR_KEY(name) Py_CLEAR(st->k_##name);
    WSM_STAT_KEYS(WSM_CLEAR_KEY)
#undef WSM_CLEAR_KEY
    Py_CLEAR(st->str_empty);
    Py_CLEAR(st->str_server_full);
    Py_CLEAR(st->str_lobby_full);
    Py_CLEAR(st->str_user_limit);
    Py_CLEAR(st->str_shutting_down);
    Py_CLEAR(st->accept_ok);
    Py_CLEAR(st->refuse_server);
    Py_CLEAR(st->refuse_lobby);
    Py_CLEAR(st->refuse_shutdown);
    Py_CLEAR(st->tpl_stats);
    Py_CLEAR(st->tpl_refused);
    Py_CLEAR(st->tpl_latency);
    Py_CLEAR(st->tpl_stale);
    wsm_json_types_clear(&st->json);
    return 0;
}

static void
module_free(void *m)
{
    (void)module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsmanager._core",
    .m_doc = "C core of wsmanager: connection registry and JSON encoder.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
