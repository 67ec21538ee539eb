/* Connection registry: see registry.h for the contract. */
#include "registry.h"
#include "activity.h"
#include "list.h"
#include "pycompat.h"

/* ---- keys ------------------------------------------------------------ */

/* The tag of a group key: the str's hash, cached in the str object (an
 * exact str: computing it runs no Python code). */
static inline uintptr_t
str_tag(PyObject *key)
{
    return (uintptr_t)PyObject_Hash(key);
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
        if (wsm_str_same(g->key, key)) {
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
group_free(wsm_table *table, wsm_group *g)
{
    wsm_table_remove(table, str_tag(g->key), g);
    Py_CLEAR(g->key);
    PyMem_Free(g);
}

static void
lobby_release_if_empty(wsm_registry *r, wsm_group *g)
{
    if (g->members.len == 0 && g->reserved == 0 && g->nguests == 0 &&
        g->anchors == 0 && g->dirty_next == NULL) {
        group_free(&r->lobbies, g);
    }
}

static void
user_release_if_empty(wsm_registry *r, wsm_group *g)
{
    if (g->members.len == 0 && g->reserved == 0) { /* pending: empty too */
        group_free(&r->users, g);
    }
}

/* ---- presence: lobbies whose membership changed --------------------- */

static inline void
mark_dirty(wsm_registry *r, wsm_group *g)
{
    if (!r->track_dirty || g->dirty_next != NULL) {
        return;
    }
    g->dirty_next = g; /* the last one */
    if (r->dirty_tail) {
        r->dirty_tail->dirty_next = g;
    }
    else {
        r->dirty_head = g;
    }
    r->dirty_tail = g;
    r->ndirty++;
}

Py_ssize_t
wsm_take_dirty(wsm_registry *r, PyObject **out, Py_ssize_t max)
{
    Py_ssize_t n = 0;
    while (n < max && r->dirty_head != NULL) {
        wsm_group *g = r->dirty_head;
        if (g->dirty_next == g) {
            r->dirty_head = r->dirty_tail = NULL;
        }
        else {
            r->dirty_head = g->dirty_next;
        }
        r->ndirty--;
        g->dirty_next = NULL;
        out[n++] = Py_NewRef(g->key); /* ours: the DECREF below is not the last */
        lobby_release_if_empty(r, g);
    }
    return n;
}

/* ---- memberships past the first ------------------------------------- */

static inline uintptr_t
member_tag(const wsm_conn *c, const wsm_group *g)
{
    return (uintptr_t)c ^ ((uintptr_t)g * (uintptr_t)0x9E3779B97F4A7C15ULL);
}

static wsm_member *
member_find(wsm_registry *r, wsm_conn *c, wsm_group *g)
{
    wsm_slot *s;
    WSM_TABLE_FOR_TAG(&r->memberships, member_tag(c, g), s) {
        wsm_member *m = s->item;
        if (m->conn == c && m->lobby == g) {
            return m;
        }
    }
    return NULL;
}

static wsm_slot *
chain_slot(wsm_registry *r, wsm_conn *c)
{
    wsm_slot *s;
    WSM_TABLE_FOR_TAG(&r->chains, (uintptr_t)c, s) {
        return s; /* one head per connection */
    }
    return NULL;
}

wsm_member *
wsm_conn_extras(wsm_registry *r, wsm_conn *c)
{
    wsm_slot *s = chain_slot(r, c);
    return s ? s->item : NULL;
}

int
wsm_is_member(wsm_registry *r, wsm_conn *c, wsm_group *g)
{
    if (g == NULL || c->state != WSM_ACTIVE) {
        return 0;
    }
    if (c->lobby == g && wsm_in_first(c)) {
        return 1;
    }
    return g->nguests > 0 && member_find(r, c, g) != NULL;
}

/* Unlink and free one node; the group is released if nothing else holds it. */
static void
member_drop(wsm_registry *r, wsm_member *m, wsm_slot *head)
{
    wsm_group *g = m->lobby;
    wsm_table_remove(&r->memberships, member_tag(m->conn, g), m);
    if (m == g->guests) {
        g->guests = m->next;
    }
    else {
        m->prev->next = m->next;
    }
    if (m->next) {
        m->next->prev = m->prev; /* the tail, if m was the head */
    }
    else if (g->guests) {
        g->guests->prev = m->prev; /* m was the tail */
    }
    g->nguests--;
    if (m->cprev) {
        m->cprev->cnext = m->cnext;
    }
    else if (m->cnext) {
        head->item = m->cnext;
    }
    else {
        wsm_table_remove(&r->chains, (uintptr_t)m->conn, m);
    }
    if (m->cnext) {
        m->cnext->cprev = m->cprev;
    }
    if (wsm_lobby_count(g) == 0) {
        r->active_lobbies--;
    }
    mark_dirty(r, g);
    PyMem_Free(m);
    lobby_release_if_empty(r, g);
}

/* Every extra membership of `c` ends (it is being removed). */
static void
drop_extras(wsm_registry *r, wsm_conn *c)
{
    wsm_slot *s;
    while ((s = chain_slot(r, c)) != NULL) {
        member_drop(r, s->item, s);
    }
}

/* Add a node for (c, g): g exists. 0, or -1 with MemoryError set. */
static int
member_add(wsm_registry *r, wsm_conn *c, wsm_group *g)
{
    if (g->nguests == UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "too many memberships in one lobby");
        return -1;
    }
    wsm_member *m = PyMem_Calloc(1, sizeof(*m));
    if (m == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    m->conn = c;
    m->lobby = g;
    if (wsm_table_insert(&r->memberships, member_tag(c, g), m) < 0) {
        PyMem_Free(m);
        PyErr_NoMemory();
        return -1;
    }
    wsm_slot *head = chain_slot(r, c);
    if (head == NULL) {
        if (wsm_table_insert(&r->chains, (uintptr_t)c, m) < 0) {
            wsm_table_remove(&r->memberships, member_tag(c, g), m);
            PyMem_Free(m);
            PyErr_NoMemory();
            return -1;
        }
    }
    else {
        wsm_member *first = head->item;
        m->cnext = first;
        first->cprev = m;
        head->item = m;
    }
    if (wsm_lobby_count(g) == 0) {
        r->active_lobbies++;
    }
    if (g->guests) {
        m->prev = g->guests->prev; /* the tail */
        m->prev->next = m;
        g->guests->prev = m;
    }
    else {
        m->prev = m;
        g->guests = m;
    }
    g->nguests++;
    mark_dirty(r, g);
    return 0;
}

wsm_verdict
wsm_join(wsm_registry *r, wsm_conn *c, PyObject *lobby, Py_ssize_t max_lobby,
         int reserve, int *added)
{
    wsm_group *g = group_find(&r->lobbies, lobby);
    *added = 0;
    if (wsm_is_member(r, c, g)) {
        return WSM_OK;
    }
    if (max_lobby >= 0 && wsm_lobby_count(g) + (g ? g->reserved : 0) >= max_lobby) {
        return WSM_LOBBY_FULL;
    }
    if (g == NULL && (g = group_get(&r->lobbies, lobby)) == NULL) {
        return WSM_ERROR;
    }
    if (reserve) {
        g->reserved++;
        *added = 1;
        return WSM_OK;
    }
    if (member_add(r, c, g) < 0) {
        lobby_release_if_empty(r, g);
        return WSM_ERROR;
    }
    *added = 1;
    return WSM_OK;
}

int
wsm_join_settle(wsm_registry *r, wsm_conn *c, PyObject *lobby)
{
    wsm_group *g = group_find(&r->lobbies, lobby);
    if (g == NULL) {
        return 0; /* the registry was cleared meanwhile */
    }
    if (g->reserved > 0) {
        g->reserved--;
    }
    if (c == NULL || c->state != WSM_ACTIVE || wsm_is_member(r, c, g)) {
        lobby_release_if_empty(r, g);
        return 0;
    }
    if (member_add(r, c, g) < 0) {
        lobby_release_if_empty(r, g);
        return -1;
    }
    return 1;
}

int
wsm_leave(wsm_registry *r, wsm_conn *c, PyObject *lobby)
{
    wsm_group *g = group_find(&r->lobbies, lobby);
    if (g == NULL || c->state != WSM_ACTIVE) {
        return 0;
    }
    if (c->lobby == g && wsm_in_first(c)) {
        wsm_list_unlink(&g->members, c, WSM_OFF_LOBBY);
        g->anchors++; /* < UINT32_MAX: at most one per connection (each holds a socket) */
        r->detached++;
        if (wsm_lobby_count(g) == 0) {
            r->active_lobbies--;
        }
        mark_dirty(r, g);
        r->removals++;
        return 1;
    }
    wsm_member *m = g->nguests ? member_find(r, c, g) : NULL;
    if (m == NULL) {
        return 0;
    }
    member_drop(r, m, chain_slot(r, c));
    r->removals++;
    return 1;
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
    /* Only the websockets can take part in a reference cycle: the group
     * keys are exact str (checked_id / lookup_id copy a subclass), which the
     * collector does not track, so visiting them only cost a cache miss per
     * lobby and per user in every full collection. Each websocket is read
     * from its slot's tag (the pointer the conns table is keyed by), in one
     * contiguous walk of the slots, without touching the entries. */
    const wsm_table *t = &r->conns;
    if (t->slots == NULL) {
        return 0;
    }
    for (size_t i = 0; i <= t->mask; i++) {
        const wsm_slot *s = &t->slots[i];
        if (s->item != NULL) {
            assert(((const wsm_conn *)s->item)->ws == (PyObject *)s->tag);
            Py_VISIT((PyObject *)s->tag);
        }
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
    wsm_table memberships = r->memberships, chains = r->chains;
    uint64_t removals = r->removals;
    int track = r->track_dirty;
    void *item;
    size_t i = 0;

    memset(r, 0, sizeof(*r));
    r->removals = removals + 1;
    r->track_dirty = track;
    while (wsm_table_next(&memberships, &i, &item)) {
        PyMem_Free(item); /* holds no Python reference */
    }
    wsm_table_free(&memberships);
    wsm_table_free(&chains);
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
    if (max_lobby >= 0 && lg && wsm_lobby_count(lg) + lg->reserved >= max_lobby) {
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
        lobby_release_if_empty(r, lg);
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
        lobby_release_if_empty(r, lg);
        user_release_if_empty(r, ug);
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
    if (wsm_lobby_count(c->lobby) == 0) {
        r->active_lobbies++;
    }
    mark_dirty(r, c->lobby);
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
        drop_extras(r, c);
        if (wsm_in_first(c)) {
            wsm_list_unlink(&lg->members, c, WSM_OFF_LOBBY);
            if (wsm_lobby_count(lg) == 0) {
                r->active_lobbies--;
            }
            mark_dirty(r, lg);
        }
        else {
            lg->anchors--;
            r->detached--;
        }
        wsm_list_unlink(&ug->members, c, WSM_OFF_USER);
        wsm_unlist(r, c);
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
    lobby_release_if_empty(r, lg);
    user_release_if_empty(r, ug);
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
        in_lobby += wsm_is_member(r, c, lg);
    }
    for (c = ug->pending.head; c != NULL && i < need;
         c = c->user_link.next, i++) {
        in_lobby += c->lobby == lg;
    }
    if (max_conn >= 0 && r->active + r->pending - need >= max_conn) {
        return 0;
    }
    n = lg ? wsm_lobby_count(lg) + lg->reserved - in_lobby : 0;
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
