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
typedef struct wsm_member wsm_member;

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

/* The lobby memberships of a connection past the first (rooms): one node
 * per (connection, lobby), on the lobby's `guests` list and on the
 * connection's chain. The first membership is embedded in the entry
 * (wsm_conn.lobby, .lobby_link on the lobby's `members`), so connect()
 * allocates nothing more; a connection in one lobby has no node. */
struct wsm_member {
    wsm_conn *conn;
    wsm_group *lobby;
    wsm_member *prev, *next;    /* lobby->guests, oldest first: `next` ends
                                   with NULL, the head's `prev` is the tail */
    wsm_member *cprev, *cnext;  /* the connection's chain (its head: the
                                   registry's `chains` table) */
};

/* A lobby or a user: a keyed group of connections. A group is one or the
 * other for life (they live in separate tables), so the user-only and the
 * lobby-only fields share storage. */
struct wsm_group {
    PyObject *key;          /* strong ref: the exact str id as first seen;
                               its cached hash is the group's table tag */
    wsm_list members;       /* committed connections, oldest first (lobbies:
                               those whose first lobby this is and which
                               have not left it) */
    Py_ssize_t reserved;    /* handshakes admitted but not yet committed
                               (lobbies: and joins awaiting a clustered
                               backend's verdict) */
    union {
        wsm_list pending;   /* users only: those handshakes, oldest first
                               (linked by user_link while PENDING) */
        struct {            /* lobbies only */
            wsm_member *guests;     /* the other memberships (join()),
                                       oldest first; guests->prev is the
                                       newest (O(1) append) */
            wsm_group *dirty_next;  /* non-NULL while on the registry's
                                       presence dirty list; the last one
                                       points to itself */
            uint32_t nguests;       /* length of `guests` */
            uint32_t anchors;       /* connections that left this, their
                                       first lobby (it stays their connect()
                                       lobby: disconnect() returns its key) */
        };
    };
};
/* 64 bytes: one pymalloc size class, paid by every user (each connect() of
 * a new user creates one); a field more costs every user 16. */
_Static_assert(sizeof(wsm_group) <= 64, "wsm_group grew past 64 bytes");

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
    uint64_t removals;      /* memberships ended so far (a connection
                               removed, a lobby left): a delivery loop that
                               saw it unchanged knows every member of its
                               snapshot is still a member */
    wsm_table memberships;  /* wsm_member * by (connection, lobby) */
    wsm_table chains;       /* a connection's first wsm_member, by wsm_conn * */
    Py_ssize_t detached;    /* committed connections not in their first lobby */
    int track_dirty;        /* presence on: membership changes mark lobbies */
    wsm_group *dirty_head;  /* lobbies whose membership changed (FIFO) */
    wsm_group *dirty_tail;
    Py_ssize_t ndirty;
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

/* ---- rooms: memberships past the first ------------------------------- */

/* Memberships (committed) of a lobby: first-lobby members and guests. */
static inline Py_ssize_t wsm_lobby_count(const wsm_group *g)
{
    return g ? g->members.len + (Py_ssize_t)g->nguests : 0;
}
/* Whether the committed connection `c` is a member of lobby `g` (NULL: no). */
int wsm_is_member(wsm_registry *r, wsm_conn *c, wsm_group *g);
/* Add the committed connection `c` to the lobby `lobby` (exact str).
 * WSM_OK: added, or already a member (*added = 0); WSM_LOBBY_FULL (no
 * exception); WSM_ERROR (exception set). With `reserve`, nothing is added:
 * one unit of the lobby's capacity is held (its `reserved`) until
 * wsm_join_commit or wsm_join_release. */
wsm_verdict wsm_join(wsm_registry *r, wsm_conn *c, PyObject *lobby,
                     Py_ssize_t max_lobby, int reserve, int *added);
/* End a reservation of wsm_join(reserve=1) on `lobby`; with `c` (still
 * committed) the membership is added first. 1 added, 0 not, -1 error. */
int wsm_join_settle(wsm_registry *r, wsm_conn *c, PyObject *lobby);
/* Leave `lobby` (exact str). 1 if `c` was a member, else 0. */
int wsm_leave(wsm_registry *r, wsm_conn *c, PyObject *lobby);
/* The next of c's memberships after `m` (NULL: the first extra node);
 * NULL at the end. Read-only walk: no change while walking. */
wsm_member *wsm_conn_extras(wsm_registry *r, wsm_conn *c);
/* Whether `c` (committed) is still linked in its first lobby. */
static inline int wsm_in_first(const wsm_conn *c)
{
    return c->lobby_link.prev != NULL || c->lobby->members.head == c;
}
/* Presence: pop up to `max` dirty lobbies into `out` (each group kept alive
 * while dirty; freed here if empty after its key was INCREF'd into out).
 * Runs no Python code. Returns how many. */
Py_ssize_t wsm_take_dirty(wsm_registry *r, PyObject **out, Py_ssize_t max);

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
