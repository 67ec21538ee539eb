/* Connection registry: see registry.h for the contract. */
#include "registry.h"
#include "activity.h"
#include "list.h"

/* ---- keys ------------------------------------------------------------ */

/* The tag of a group key: the str's hash, cached in the str object (an
 * exact str: computing it runs no Python code). */
static inline uintptr_t
str_tag(PyObject *key)
{
    return (uintptr_t)PyObject_Hash(key);
}

/* Equality of two exact, ready str objects, as str.__eq__ decides it,
 * without calling it: identity first (ids are usually the very objects
 * that were registered), then length, kind and the code units. */
static inline int
str_same(PyObject *a, PyObject *b)
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

static wsm_group *
group_find(wsm_table *table, PyObject *key)
{
    wsm_slot *s;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(key) < 0) {
        PyErr_Clear();
        return NULL;
    }
#endif
    uintptr_t tag = str_tag(key);
    WSM_TABLE_FOR_TAG(table, tag, s) {
        wsm_group *g = s->item;
        if (str_same(g->key, key)) {
            return g;
        }
    }
    return NULL;
}

/* Find or create a group. NULL with an exception set on failure. */
static wsm_group *
group_get(wsm_table *table, PyObject *key)
{
    wsm_group *g = group_find(table, key);
    if (g != NULL) {
        return g;
    }
    g = PyMem_Calloc(1, sizeof(*g));
    if (g == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (wsm_table_insert(table, str_tag(key), g) < 0) {
        PyMem_Free(g);
        PyErr_NoMemory();
        return NULL;
    }
    g->key = Py_NewRef(key);
    return g;
}

/* Free a group once nothing refers to it. */
static void
group_release_if_empty(wsm_table *table, wsm_group *g)
{
    if (g->members.len == 0 && g->reserved == 0) {
        wsm_table_remove(table, str_tag(g->key), g);
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
    void *item;
    size_t i = 0;
    while (wsm_table_next(&r->conns, &i, &item)) {
        Py_VISIT(((wsm_conn *)item)->ws);
    }
    i = 0;
    while (wsm_table_next(&r->lobbies, &i, &item)) {
        Py_VISIT(((wsm_group *)item)->key);
    }
    i = 0;
    while (wsm_table_next(&r->users, &i, &item)) {
        Py_VISIT(((wsm_group *)item)->key);
    }
    return 0;
}

/* Free every item of a detached table, then its slots. The items' Python
 * references are dropped after each item is freed: a finalizer finds the
 * registry already empty. */
static void
clear_table(wsm_table *t, int conns)
{
    void *item;
    size_t i = 0;
    while (wsm_table_next(t, &i, &item)) {
        PyObject *ref = conns ? ((wsm_conn *)item)->ws : ((wsm_group *)item)->key;
        PyMem_Free(item);
        Py_XDECREF(ref);
    }
    wsm_table_free(t);
}

void
wsm_registry_clear(wsm_registry *r)
{
    /* Unhook everything first, then drop references: a websocket's
     * finalizer may run Python code, which must see a consistent (empty)
     * registry and must not find half-freed entries. */
    wsm_table conns = r->conns, lobbies = r->lobbies, users = r->users;
    uint64_t removals = r->removals;

    memset(r, 0, sizeof(*r));
    r->removals = removals;
    clear_table(&conns, 1);
    clear_table(&lobbies, 0);
    clear_table(&users, 0);
}

wsm_conn *
wsm_find_conn(wsm_registry *r, PyObject *ws)
{
    wsm_slot *s;
    WSM_TABLE_FOR_TAG(&r->conns, (uintptr_t)ws, s) {
        return s->item; /* the tag is the websocket itself */
    }
    return NULL;
}

wsm_group *
wsm_find_lobby(wsm_registry *r, PyObject *code)
{
    return group_find(&r->lobbies, code);
}

wsm_group *
wsm_find_user(wsm_registry *r, PyObject *uid)
{
    return group_find(&r->users, uid);
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
    lg = group_find(&r->lobbies, lobby);
    if (max_lobby >= 0 && lg && lg->members.len + lg->reserved >= max_lobby) {
        *verdict = WSM_LOBBY_FULL;
        return NULL;
    }
    if (max_lobby == 0) {
        *verdict = WSM_LOBBY_FULL;
        return NULL;
    }
    ug = group_find(&r->users, user);
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
    if (wsm_table_insert(&r->conns, (uintptr_t)ws, c) < 0) {
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

    wsm_table_remove(&r->conns, (uintptr_t)ws, c);
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

    if (max_user < 1 || (ug = group_find(&r->users, user)) == NULL) {
        return 0;
    }
    need = ug->members.len + ug->reserved - max_user + 1;
    if (need <= 0) {
        return 0;
    }
    lg = group_find(&r->lobbies, lobby);
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
    wsm_group *ug = group_find(&r->users, user);
    if (ug == NULL) {
        return NULL;
    }
    return ug->members.head ? ug->members.head : ug->pending.head;
}
