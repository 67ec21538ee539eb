/* The connection registry: connections keyed by websocket identity, lobbies,
 * users, capacity reservations; the activity lists the heartbeat walks are
 * part of the registry and kept by activity.c.
 *
 * Plain C over open-addressed tables (table.h); it holds strong references to Python objects (the
 * websocket and the interned id strings) but never calls back into Python
 * while a table or list is being walked: the walkers copy what they need
 * first.
 *
 * The rule its callers (module.c) keep: a wsm_conn *, wsm_group * or
 * wsm_list * is only valid until the next call that can run Python code
 * (the hash or eq of a key object, allocating a GC-tracked object, a hook,
 * a Py_DECREF that may free a last reference). The lookups below take
 * exact str ids only (the hash of an exact str runs no Python code) and
 * websockets by identity (no __hash__ / __eq__ is called). Look up again
 * after any such call.
 *
 * Every count the public API reports is kept up to date on each change, so
 * capacity checks and statistics are O(1).
 */
#ifndef WSM_REGISTRY_H
#define WSM_REGISTRY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "table.h"


typedef struct wsm_conn wsm_conn;
typedef struct wsm_group wsm_group;

/* Intrusive doubly linked list node. */
typedef struct wsm_link {
    wsm_conn *prev;
    wsm_conn *next;
} wsm_link;

typedef struct wsm_list {
    wsm_conn *head;
    wsm_conn *tail;
    Py_ssize_t len;
} wsm_list;

/* A lobby or a user: a keyed group of connections. */
struct wsm_group {
    PyObject *key;          /* strong ref: the exact str id as first seen;
                               its cached hash is the group's table tag */
    wsm_list members;       /* committed connections, oldest first */
    Py_ssize_t reserved;    /* handshakes admitted but not yet committed */
    wsm_list pending;       /* users only: those handshakes, oldest first
                               (linked by user_link while PENDING) */
};

enum wsm_conn_state {
    WSM_PENDING = 0,        /* capacity reserved, accept() in progress */
    WSM_ACTIVE = 1,         /* committed: in lobby and user lists */
};

enum wsm_activity_list {
    WSM_ON_NONE = 0,
    WSM_ON_IDLE = 1,        /* waiting to become due for a ping */
    WSM_ON_WAIT = 2,        /* pinged, waiting for any answer */
};

struct wsm_conn {
    PyObject *ws;           /* strong ref; identity is the key */
    wsm_group *lobby;
    wsm_group *user;
    uint8_t state;          /* enum wsm_conn_state */
    uint8_t on_list;        /* enum wsm_activity_list */
    uint8_t bucket_ready;   /* tokens/tokens_ts initialized (lazily, on first use) */
    uint8_t notify;         /* bits set by the Python side (an outbound backlog,
                               a removal callback): tell it when the
                               connection is removed */
    uint32_t violations;    /* messages dropped since the bucket was last full */
    wsm_link lobby_link;
    wsm_link user_link;
    wsm_link act_link;      /* on idle list (by last_rx) or wait list (by ping_sent) */
    union {                 /* the key of its activity list (act_link):
                               only one is ever read, by on_list */
        double last_rx;     /* WSM_ON_IDLE: last time anything was received */
        double ping_sent;   /* WSM_ON_WAIT: when it was put on the wait list */
    };
    double pong_due_since;  /* last ping not yet answered by a pong, 0 if none:
                               kept apart from ping_sent so that any message
                               proves liveness while only a pong gives an RTT */
    double pong_deadline;   /* a pong after this time answers a ping that timed
                               out: it proves liveness, but is no round trip */
    double last_rtt;        /* round trip of the last ping answered, seconds;
                               < 0 while none was measured */
    double tokens;          /* inbound token bucket */
    double tokens_ts;
};
/* 128 bytes: one pymalloc size class; a field more costs every connection 16. */
_Static_assert(sizeof(wsm_conn) <= 128, "wsm_conn grew past 128 bytes");

typedef struct wsm_registry {
    wsm_table conns;        /* wsm_conn * by websocket pointer (the tag) */
    wsm_table lobbies;      /* wsm_group * by lobby code (tag: its hash) */
    wsm_table users;        /* wsm_group * by user id (tag: its hash) */
    Py_ssize_t active;      /* committed connections */
    Py_ssize_t pending;     /* reserved, not committed */
    Py_ssize_t active_lobbies;  /* lobbies with at least one committed conn */
    Py_ssize_t active_users;    /* users with at least one committed conn */
    wsm_list idle;          /* ACTIVE conns not pinged, ordered by last_rx */
    wsm_list wait;          /* ACTIVE conns pinged, ordered by ping_sent */
    uint64_t removals;      /* committed connections removed so far: a
                               delivery loop that saw it unchanged knows every
                               member of its snapshot is still a member */
} wsm_registry;

/* Refusal reasons of wsm_reserve. */
typedef enum {
    WSM_OK = 0,
    WSM_SERVER_FULL,
    WSM_LOBBY_FULL,
    WSM_USER_FULL,
    WSM_ERROR,              /* an exception is set */
} wsm_verdict;

void wsm_registry_init(wsm_registry *r);
/* Drop every entry and reference. Safe to call twice. */
void wsm_registry_clear(wsm_registry *r);
int wsm_registry_traverse(wsm_registry *r, visitproc visit, void *arg);

wsm_conn *wsm_find_conn(wsm_registry *r, PyObject *ws);           /* borrowed */
wsm_group *wsm_find_lobby(wsm_registry *r, PyObject *code);       /* borrowed, NULL w/o exc if absent; -1 never */
wsm_group *wsm_find_user(wsm_registry *r, PyObject *uid);

/* Add a PENDING connection holding one unit of capacity in the server, the
 * lobby and the user. `reserved_limits`: max_connections, max_per_lobby,
 * max_per_user (<0: no limit). Returns the new entry, or NULL with *verdict
 * set to the refusal (no exception) or WSM_ERROR (exception set). */
wsm_conn *wsm_reserve(wsm_registry *r, PyObject *ws, PyObject *lobby,
                      PyObject *user, Py_ssize_t max_conn,
                      Py_ssize_t max_lobby, Py_ssize_t max_user,
                      double now, wsm_verdict *verdict);
/* PENDING -> ACTIVE: linked into its lobby and user, activity clock started. */
void wsm_commit(wsm_registry *r, wsm_conn *c, double now);
/* The "replace" policy (max_per_user reached: the user's oldest connection
 * makes room for the new one). How many of `user`'s entries a new handshake
 * into `lobby` must replace to be admitted: 0 when it fits without, or when
 * replacing cannot make it fit (max_user < 1, or the server or the lobby
 * would still be full). The entries to replace are, in this order, the
 * user's committed connections, oldest first, then its handshakes in
 * progress, oldest first: see wsm_user_oldest. `user` must be an exact str
 * (its hash runs no Python code). */
Py_ssize_t wsm_replace_count(wsm_registry *r, PyObject *lobby, PyObject *user,
                             Py_ssize_t max_conn, Py_ssize_t max_lobby,
                             Py_ssize_t max_user);
/* The user's oldest committed connection, else its oldest handshake in
 * progress; NULL if it has neither. Borrowed: valid until the registry
 * changes or Python code runs. */
wsm_conn *wsm_user_oldest(wsm_registry *r, PyObject *user);
/* Remove an entry (either state) and free it. The caller must hold its own
 * reference to anything it still needs from it (ws, lobby->key, user->key):
 * the entry's references are released here. */
void wsm_remove(wsm_registry *r, wsm_conn *c);

/* The activity lists (touch, pong, ping, sweeps): activity.h. */

/* Iterate the lobbies (in table order): size_t pos = 0; wsm_group *g;
 * while (wsm_next_lobby(r, &pos, &g)) ... The table must not change
 * while iterating. */
static inline int wsm_next_lobby(wsm_registry *r, size_t *pos, wsm_group **g)
{
    void *item;
    if (!wsm_table_next(&r->lobbies, pos, &item)) {
        return 0;
    }
    *g = item;
    return 1;
}

static inline Py_ssize_t wsm_group_count(const wsm_group *g)
{
    return g ? g->members.len : 0;
}

#endif
