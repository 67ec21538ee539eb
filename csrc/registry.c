/* Connection registry: see registry.h for the contract. */
#include "registry.h"
#include "activity.h"
#include "list.h"

int wsm_uthash_oom = 0;

/* ---- hashing ---------------------------------------------------------- */


static inline unsigned
ptr_hash(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    return (unsigned)x;
}

/* Hash and UTF-8 view of a validated str key. Returns -1 with an exception
 * set on failure. */
static int
str_key(PyObject *key, const char **utf8, Py_ssize_t *len, unsigned *hv)
{
    Py_hash_t h = PyObject_Hash(key);
    if (h == -1 && PyErr_Occurred()) {
        return -1;
    }
    *utf8 = PyUnicode_AsUTF8AndSize(key, len);
    if (*utf8 == NULL) {
        return -1;
    }
    *hv = (unsigned)((uint64_t)h ^ ((uint64_t)h >> 32));
    return 0;
}

static wsm_group *
group_find(wsm_group *table, PyObject *key)
{
    const char *utf8;
    Py_ssize_t len;
    unsigned hv;
    wsm_group *g = NULL;
    if (table == NULL) {
        return NULL;
    }
    if (str_key(key, &utf8, &len, &hv) < 0) {
        PyErr_Clear();
        return NULL;
    }
    HASH_FIND_BYHASHVALUE(hh, table, utf8, (unsigned)len, hv, g);
    return g;
}

/* Find or create a group. NULL with an exception set on failure. */
static wsm_group *
group_get(wsm_group **table, PyObject *key)
{
    const char *utf8;
    Py_ssize_t len;
    unsigned hv;
    wsm_group *g = NULL;
    if (str_key(key, &utf8, &len, &hv) < 0) {
        return NULL;
    }
    if (*table) {
        HASH_FIND_BYHASHVALUE(hh, *table, utf8, (unsigned)len, hv, g);
        if (g) {
            return g;
        }
    }
    g = PyMem_Calloc(1, sizeof(*g));
    if (g == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_INCREF(key);
    g->key = key;
    wsm_uthash_oom = 0;
    HASH_ADD_KEYPTR_BYHASHVALUE(hh, *table, utf8, (unsigned)len, hv, g);
    if (wsm_uthash_oom) {
        wsm_uthash_oom = 0;
        Py_DECREF(key);
        PyMem_Free(g);
        PyErr_NoMemory();
        return NULL;
    }
    return g;
}

/* Free a group once nothing refers to it. */
static void
group_release_if_empty(wsm_group **table, wsm_group *g)
{
    if (g->members.len == 0 && g->reserved == 0) {
        HASH_DELETE(hh, *table, g);
        Py_CLEAR(g->key);
        PyMem_Free(g);
    }
}

/* ---- public ----------------------------------------------------------- */

void
wsm_registry_init(wsm_registry *r)
{
    memset(r, 0, sizeof(*r));
}

int
wsm_registry_traverse(wsm_registry *r, visitproc visit, void *arg)
{
    wsm_conn *c, *tmp;
    wsm_group *g, *gtmp;
    HASH_ITER(hh, r->conns, c, tmp) {
        Py_VISIT(c->ws);
    }
    HASH_ITER(hh, r->lobbies, g, gtmp) {
        Py_VISIT(g->key);
    }
    HASH_ITER(hh, r->users, g, gtmp) {
        Py_VISIT(g->key);
    }
    return 0;
}

void
wsm_registry_clear(wsm_registry *r)
{
    /* Unhook everything first, then drop references: a websocket's
     * finalizer may run Python code, which must see a consistent (empty)
     * registry and must not find half-freed entries. */
    wsm_conn *conns = r->conns;
    wsm_group *lobbies = r->lobbies;
    wsm_group *users = r->users;
    wsm_conn *c, *tmp;
    wsm_group *g, *gtmp;

    r->conns = NULL;
    r->lobbies = NULL;
    r->users = NULL;
    r->active = r->pending = r->active_lobbies = r->active_users = 0;
    memset(&r->idle, 0, sizeof(r->idle));
    memset(&r->wait, 0, sizeof(r->wait));

    HASH_ITER(hh, conns, c, tmp) {
        HASH_DELETE(hh, conns, c);
        PyObject *ws = c->ws;
        PyMem_Free(c);
        Py_XDECREF(ws);
    }
    HASH_ITER(hh, lobbies, g, gtmp) {
        HASH_DELETE(hh, lobbies, g);
        PyObject *key = g->key;
        PyMem_Free(g);
        Py_XDECREF(key);
    }
    HASH_ITER(hh, users, g, gtmp) {
        HASH_DELETE(hh, users, g);
        PyObject *key = g->key;
        PyMem_Free(g);
        Py_XDECREF(key);
    }
}

wsm_conn *
wsm_find_conn(wsm_registry *r, PyObject *ws)
{
    wsm_conn *c = NULL;
    if (r->conns) {
        HASH_FIND_BYHASHVALUE(hh, r->conns, &ws, sizeof(PyObject *),
                              ptr_hash(ws), c);
    }
    return c;
}

wsm_group *
wsm_find_lobby(wsm_registry *r, PyObject *code)
{
    return group_find(r->lobbies, code);
}

wsm_group *
wsm_find_user(wsm_registry *r, PyObject *uid)
{
    return group_find(r->users, uid);
}

wsm_conn *
wsm_reserve(wsm_registry *r, PyObject *ws, PyObject *lobby, PyObject *user,
            Py_ssize_t max_conn, Py_ssize_t max_lobby, Py_ssize_t max_user,
            double now, wsm_verdict *verdict)
{
    wsm_group *lg = NULL, *ug = NULL;
    wsm_conn *c = NULL;

    if (max_conn >= 0 && r->active + r->pending >= max_conn) {
        *verdict = WSM_SERVER_FULL;
        return NULL;
    }
    lg = group_find(r->lobbies, lobby);
    if (max_lobby >= 0 && lg && lg->members.len + lg->reserved >= max_lobby) {
        *verdict = WSM_LOBBY_FULL;
        return NULL;
    }
    if (max_lobby == 0) {
        *verdict = WSM_LOBBY_FULL;
        return NULL;
    }
    ug = group_find(r->users, user);
    if (max_user >= 0 &&
        ((ug && ug->members.len + ug->reserved >= max_user) || max_user == 0)) {
        *verdict = WSM_USER_FULL;
        return NULL;
    }

    c = PyMem_Calloc(1, sizeof(*c));
    if (c == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    if (lg == NULL && (lg = group_get(&r->lobbies, lobby)) == NULL) {
        goto error;
    }
    lg->reserved++;
    if (ug == NULL && (ug = group_get(&r->users, user)) == NULL) {
        lg->reserved--;
        group_release_if_empty(&r->lobbies, lg);
        goto error;
    }
    ug->reserved++;

    Py_INCREF(ws);
    c->ws = ws;
    c->lobby = lg;
    c->user = ug;
    c->state = WSM_PENDING;
    c->last_rx = now;
    c->last_rtt = -1.0;
    wsm_uthash_oom = 0;
    HASH_ADD_KEYPTR_BYHASHVALUE(hh, r->conns, &c->ws, sizeof(PyObject *),
                                ptr_hash(ws), c);
    if (wsm_uthash_oom) {
        wsm_uthash_oom = 0;
        lg->reserved--;
        ug->reserved--;
        group_release_if_empty(&r->lobbies, lg);
        group_release_if_empty(&r->users, ug);
        Py_DECREF(ws);
        PyErr_NoMemory();
        goto error;
    }
    wsm_list_push_tail(&ug->pending, c, WSM_OFF_USER);
    r->pending++;
    *verdict = WSM_OK;
    return c;

error:
    PyMem_Free(c);
    *verdict = WSM_ERROR;
    return NULL;
}

void
wsm_commit(wsm_registry *r, wsm_conn *c, double now)
{
    if (c->state != WSM_PENDING) {
        return;
    }
    c->state = WSM_ACTIVE;
    r->pending--;
    r->active++;
    c->lobby->reserved--;
    c->user->reserved--;
    wsm_list_unlink(&c->user->pending, c, WSM_OFF_USER);
    if (c->lobby->members.len == 0) {
        r->active_lobbies++;
    }
    if (c->user->members.len == 0) {
        r->active_users++;
    }
    wsm_list_push_tail(&c->lobby->members, c, WSM_OFF_LOBBY);
    wsm_list_push_tail(&c->user->members, c, WSM_OFF_USER);
    wsm_activity_start(r, c, now);
}

void
wsm_remove(wsm_registry *r, wsm_conn *c)
{
    wsm_group *lg = c->lobby, *ug = c->user;
    PyObject *ws = c->ws;

    HASH_DELETE(hh, r->conns, c);
    if (c->state == WSM_ACTIVE) {
        wsm_list_unlink(&lg->members, c, WSM_OFF_LOBBY);
        wsm_list_unlink(&ug->members, c, WSM_OFF_USER);
        wsm_unlist(r, c);
        if (lg->members.len == 0) {
            r->active_lobbies--;
        }
        if (ug->members.len == 0) {
            r->active_users--;
        }
        r->active--;
        r->removals++;
    }
    else {
        lg->reserved--;
        ug->reserved--;
        wsm_list_unlink(&ug->pending, c, WSM_OFF_USER);
        r->pending--;
    }
    PyMem_Free(c);
    group_release_if_empty(&r->lobbies, lg);
    group_release_if_empty(&r->users, ug);
    /* Last: the websocket's finalizer may run arbitrary code. */
    Py_DECREF(ws);
}

Py_ssize_t
wsm_replace_count(wsm_registry *r, PyObject *lobby, PyObject *user,
                  Py_ssize_t max_conn, Py_ssize_t max_lobby,
                  Py_ssize_t max_user)
{
    wsm_group *ug, *lg;
    wsm_conn *c;
    Py_ssize_t need, i, in_lobby = 0, n;

    if (max_user < 1 || (ug = group_find(r->users, user)) == NULL) {
        return 0;
    }
    need = ug->members.len + ug->reserved - max_user + 1;
    if (need <= 0) {
        return 0;
    }
    lg = group_find(r->lobbies, lobby);
    /* which of the `need` oldest entries are in the target lobby */
    for (i = 0, c = ug->members.head; c != NULL && i < need;
         c = c->user_link.next, i++) {
        in_lobby += c->lobby == lg;
    }
    for (c = ug->pending.head; c != NULL && i < need;
         c = c->user_link.next, i++) {
        in_lobby += c->lobby == lg;
    }
    if (max_conn >= 0 && r->active + r->pending - need >= max_conn) {
        return 0;
    }
    n = lg ? lg->members.len + lg->reserved - in_lobby : 0;
    if (max_lobby >= 0 && n >= max_lobby) {
        return 0;
    }
    return need;
}

wsm_conn *
wsm_user_oldest(wsm_registry *r, PyObject *user)
{
    wsm_group *ug = group_find(r->users, user);
    if (ug == NULL) {
        return NULL;
    }
    return ug->members.head ? ug->members.head : ug->pending.head;
}
