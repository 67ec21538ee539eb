/* History (issue 12): per-lobby bounded rings of the messages sent to a
 * lobby, each with its position (epoch, offset), for recovery.
 *
 * One table keyed by lobby code (exact str, by its cached hash: no Python
 * code runs in a lookup), separate from the registry: a lobby keeps its
 * history while nobody is in it. A ring holds at most `size` entries (the
 * oldest is dropped first) and, with a `ttl`, only entries at most `ttl`
 * seconds old; a ring whose newest entry is older than `ttl` is dropped
 * whole (its epoch is then lost: the next message starts a new epoch at
 * offset 1). Rings sit on one list ordered by their last append, so that
 * expiry walks only what is due: O(expired), never O(lobbies).
 *
 * Entries are the exact str objects sent (strong references); the ring's
 * arrays are PyMem memory, so tracemalloc sees all of it. Nothing here
 * calls Python code: the only Python objects touched are exact str (their
 * hash is cached, their deallocation runs no code). Pointers returned
 * (wsm_ring *) are valid until the next call of this module or any call
 * that can run Python code: the caller copies what it needs first.
 */
#ifndef WSM_HISTORY_H
#define WSM_HISTORY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "table.h"

#define WSM_EPOCH_LEN 12

typedef struct {
    PyObject *text;         /* strong: exact str, the positioned message */
    PyObject *excluded;     /* strong: exact str, the broadcast's exclude_user_id, or NULL */
    double t;               /* when it was appended (core clock, seconds) */
} wsm_hentry;

typedef struct wsm_ring {
    PyObject *lobby;        /* strong: exact str, the key */
    PyObject *prefix;       /* strong: exact str, `,"_pos":{"lobby":..,"epoch":"..","offset":` */
    struct wsm_ring *older, *newer;     /* the age list, by last append */
    uint64_t top;           /* offset of the newest entry; 0: none yet */
    double last;            /* time of the newest append (or the creation) */
    wsm_hentry *buf;        /* circular, `cap` slots (grows up to the size) */
    uint32_t cap, head, count;
    char epoch[WSM_EPOCH_LEN + 1];
} wsm_ring;

typedef struct {
    wsm_table table;        /* str hash -> wsm_ring * */
    wsm_ring *oldest, *newest;
    Py_ssize_t size;        /* entries kept per lobby; 0: history off */
    double ttl;             /* seconds an entry is kept; 0: no age limit */
    uint64_t seed;          /* random per core: epochs differ across processes */
    uint64_t created;       /* rings created so far: epochs differ within one */
    Py_ssize_t nrings;
    Py_ssize_t nentries;
    Py_ssize_t nbytes;      /* character data of the kept texts (length x kind) */
    uint64_t appended;      /* messages appended so far (never goes down) */
    unsigned long forks;    /* wsm_history_forks when the rings were made */
} wsm_history;

/* Forks this process came through (bumped in the child by a pthread_atfork
 * handler, wsm_history_atfork): a child has its parent's memory, so its
 * rings and seed would go on under the parent's epochs. */
extern unsigned long wsm_history_forks;
/* Install the fork handler (once per process); 0, or an errno value. */
int wsm_history_atfork(void);

void wsm_history_init(wsm_history *h, uint64_t seed);
/* Drop every ring (history lost: new epochs from now on). */
void wsm_history_clear(wsm_history *h);
/* The ring of `lobby` (exact, ready str), or NULL. */
wsm_ring *wsm_history_find(wsm_history *h, PyObject *lobby);
/* The next epoch a new ring would get, written into out[WSM_EPOCH_LEN + 1]. */
void wsm_history_next_epoch(const wsm_history *h, char *out);
/* Add a ring for `lobby` (absent) with the epoch of wsm_history_next_epoch
 * and `prefix` (stolen, also on failure). NULL on out of memory (no
 * exception set). */
wsm_ring *wsm_history_create(wsm_history *h, PyObject *lobby, PyObject *prefix,
                             double now);
/* Drop what is older than the ttl: whole rings from the oldest end of the
 * age list, then the expired head entries of `ring` (may be NULL). */
void wsm_history_expire(wsm_history *h, wsm_ring *ring, double now);
/* Append `text` (a new reference is taken) as offset ring->top + 1, with
 * `excluded` (exact str, a new reference is taken, or NULL): the user whose
 * connections the broadcast skipped, never replayed to them. Drops the
 * oldest entry past the size. -1 on out of memory (no exception set; the
 * ring is unchanged). */
int wsm_history_push(wsm_history *h, wsm_ring *ring, PyObject *text, PyObject *excluded,
                     double now);
/* In a forked child (the first call after the fork): drop every ring and
 * take a new seed, so the child's epochs are its own. Call before any use. */
void wsm_history_forked(wsm_history *h);
static inline void
wsm_history_check_fork(wsm_history *h)
{
    if (h->forks != wsm_history_forks) {
        wsm_history_forked(h);
    }
}
/* Drop the oldest entries of every ring holding more than h->size (after
 * the size was lowered): what is kept is bounded at once. */
void wsm_history_trim(wsm_history *h);
/* Bytes of an exact str's character data, as CPython stores it (length x
 * 1, 2 or 4): what history's `nbytes` counts. */
static inline Py_ssize_t
wsm_text_bytes(PyObject *text)
{
    return PyUnicode_GET_LENGTH(text) * (Py_ssize_t)PyUnicode_KIND(text);
}
/* The entry of `offset` (ring->top - ring->count < offset <= ring->top). */
static inline const wsm_hentry *
wsm_ring_at(const wsm_ring *ring, uint64_t offset)
{
    uint64_t first = ring->top - ring->count + 1;
    uint32_t i = (uint32_t)((ring->head + (offset - first)) % ring->cap);
    return &ring->buf[i];
}

#endif
