/* History rings: see history.h for the contract. No Python code runs here:
 * the objects touched are exact str (cached hash, no finalizer). */
#include "history.h"
#include "pycompat.h"

#include <pthread.h>
#include <unistd.h>

unsigned long wsm_history_forks;

static void
atfork_child(void)
{
    wsm_history_forks++;
}

int
wsm_history_atfork(void)
{
    static int installed;
    if (installed) {
        return 0;
    }
    int err = pthread_atfork(NULL, NULL, atfork_child);
    if (err == 0) {
        installed = 1;
    }
    return err;
}

static inline uintptr_t
str_tag(PyObject *key)
{
    return (uintptr_t)PyObject_Hash(key); /* exact str: cached, no Python code */
}

void
wsm_history_init(wsm_history *h, uint64_t seed)
{
    memset(h, 0, sizeof(*h));
    h->seed = seed;
    h->forks = wsm_history_forks;
}

/* splitmix64: epochs look random and never repeat within a core */
static uint64_t
mix(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

void
wsm_history_next_epoch(const wsm_history *h, char *out)
{
    static const char digits[] = "0123456789abcdefghijklmnopqrstuv";
    uint64_t x = mix(h->seed + h->created + 1);
    for (int i = 0; i < WSM_EPOCH_LEN; i++) { /* 12 x 5 bits */
        out[i] = digits[x & 31];
        x >>= 5;
    }
    out[WSM_EPOCH_LEN] = '\0';
}

wsm_ring *
wsm_history_find(wsm_history *h, PyObject *lobby)
{
    wsm_slot *s;
    WSM_TABLE_FOR_TAG(&h->table, str_tag(lobby), s) {
        wsm_ring *ring = s->item;
        if (wsm_str_same(ring->lobby, lobby)) {
            return ring;
        }
    }
    return NULL;
}

static void
age_unlink(wsm_history *h, wsm_ring *ring)
{
    if (ring->older) {
        ring->older->newer = ring->newer;
    }
    else {
        h->oldest = ring->newer;
    }
    if (ring->newer) {
        ring->newer->older = ring->older;
    }
    else {
        h->newest = ring->older;
    }
    ring->older = ring->newer = NULL;
}

static void
age_push(wsm_history *h, wsm_ring *ring)
{
    ring->older = h->newest;
    ring->newer = NULL;
    if (h->newest) {
        h->newest->newer = ring;
    }
    else {
        h->oldest = ring;
    }
    h->newest = ring;
}

wsm_ring *
wsm_history_create(wsm_history *h, PyObject *lobby, PyObject *prefix, double now)
{
    wsm_ring *ring = PyMem_Calloc(1, sizeof(wsm_ring));
    if (ring == NULL) {
        Py_DECREF(prefix);
        return NULL;
    }
    if (wsm_table_insert(&h->table, str_tag(lobby), ring) < 0) {
        PyMem_Free(ring);
        Py_DECREF(prefix);
        return NULL;
    }
    Py_INCREF(lobby);
    ring->lobby = lobby;
    ring->prefix = prefix; /* stolen */
    ring->last = now;
    wsm_history_next_epoch(h, ring->epoch);
    h->created++;
    h->nrings++;
    age_push(h, ring);
    return ring;
}

/* Drop the oldest entry of a non-empty ring. */
static void
drop_head(wsm_history *h, wsm_ring *ring)
{
    PyObject *text = ring->buf[ring->head].text;
    PyObject *excluded = ring->buf[ring->head].excluded;
    ring->buf[ring->head].text = NULL;
    ring->buf[ring->head].excluded = NULL;
    ring->head = (ring->head + 1) % ring->cap;
    ring->count--;
    h->nentries--;
    h->nbytes -= wsm_text_bytes(text);
    Py_DECREF(text); /* exact str: their deallocation runs no Python code */
    Py_XDECREF(excluded);
}

static void
ring_free(wsm_history *h, wsm_ring *ring)
{
    while (ring->count) {
        drop_head(h, ring);
    }
    PyMem_Free(ring->buf);
    Py_DECREF(ring->prefix);
    Py_DECREF(ring->lobby);
    PyMem_Free(ring);
}

static void
ring_drop(wsm_history *h, wsm_ring *ring)
{
    wsm_table_remove(&h->table, str_tag(ring->lobby), ring);
    age_unlink(h, ring);
    h->nrings--;
    ring_free(h, ring);
}

void
wsm_history_clear(wsm_history *h)
{
    while (h->oldest) {
        ring_drop(h, h->oldest);
    }
    wsm_table_free(&h->table);
}

void
wsm_history_forked(wsm_history *h)
{
    wsm_history_clear(h); /* the parent's rings: their epochs are the parent's */
    h->seed = mix(h->seed ^ ((uint64_t)getpid() << 32) ^ wsm_history_forks);
    h->forks = wsm_history_forks;
}

void
wsm_history_trim(wsm_history *h)
{
    for (wsm_ring *ring = h->oldest; ring != NULL; ring = ring->newer) {
        while (ring->count && (Py_ssize_t)ring->count > h->size) {
            drop_head(h, ring); /* exact str only: no Python code, the list stays */
        }
    }
}

void
wsm_history_expire(wsm_history *h, wsm_ring *ring, double now)
{
    if (h->ttl <= 0) {
        return;
    }
    double cutoff = now - h->ttl;
    while (h->oldest && h->oldest->last < cutoff && h->oldest != ring) {
        ring_drop(h, h->oldest);
    }
    if (ring) {
        while (ring->count && ring->buf[ring->head].t < cutoff) {
            drop_head(h, ring);
        }
    }
}

int
wsm_history_push(wsm_history *h, wsm_ring *ring, PyObject *text, PyObject *excluded,
                 double now)
{
    uint32_t size = h->size > (Py_ssize_t)UINT32_MAX ? UINT32_MAX : (uint32_t)h->size;
    while (ring->count && ring->count >= size) { /* also after size shrank */
        drop_head(h, ring);
    }
    if (ring->count == ring->cap) { /* grow: double, up to the size */
        uint32_t cap = ring->cap ? ring->cap : 4;
        while (cap <= ring->count) {
            cap = cap > UINT32_MAX / 2 ? UINT32_MAX : cap * 2;
        }
        if (cap > size) {
            cap = size;
        }
        wsm_hentry *buf = PyMem_Calloc(cap, sizeof(wsm_hentry));
        if (buf == NULL) {
            return -1;
        }
        for (uint32_t i = 0; i < ring->count; i++) {
            buf[i] = ring->buf[(ring->head + i) % ring->cap];
        }
        PyMem_Free(ring->buf);
        ring->buf = buf;
        ring->cap = cap;
        ring->head = 0;
    }
    uint32_t tail = (ring->head + ring->count) % ring->cap;
    Py_INCREF(text);
    Py_XINCREF(excluded);
    ring->buf[tail].text = text;
    ring->buf[tail].excluded = excluded;
    ring->buf[tail].t = now;
    ring->count++;
    ring->top++;
    ring->last = now;
    h->nentries++;
    h->nbytes += wsm_text_bytes(text);
    h->appended++;
    age_unlink(h, ring);
    age_push(h, ring);
    return 0;
}
