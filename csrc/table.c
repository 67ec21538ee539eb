/* Open-addressed pointer table: see table.h. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "table.h"

#define WSM_TABLE_MIN 8

static void
place(wsm_slot *slots, size_t mask, uintptr_t tag, void *item)
{
    wsm_table tmp = {slots, mask, 0};
    size_t i = wsm_table_home(&tmp, tag);
    while (slots[i].item != NULL) {
        i = (i + 1) & mask;
    }
    slots[i].tag = tag;
    slots[i].item = item;
}

static int
resize(wsm_table *t, size_t cap)
{
    wsm_slot *slots = PyMem_Calloc(cap, sizeof(wsm_slot));
    if (slots == NULL) {
        return -1;
    }
    if (t->slots != NULL) {
        for (size_t i = 0; i <= t->mask; i++) {
            if (t->slots[i].item != NULL) {
                place(slots, cap - 1, t->slots[i].tag, t->slots[i].item);
            }
        }
        PyMem_Free(t->slots);
    }
    t->slots = slots;
    t->mask = cap - 1;
    return 0;
}

int
wsm_table_insert(wsm_table *t, uintptr_t tag, void *item)
{
    size_t cap = t->slots ? t->mask + 1 : 0;
    /* at most 4/5 full: a hit probes ~3 adjacent slots (4 to a cache
     * line), a miss ~13; fuller than that, misses get long */
    if ((t->used + 1) * 5 > cap * 4) {
        size_t ncap = cap ? cap * 2 : WSM_TABLE_MIN;
        if (ncap <= cap || resize(t, ncap) < 0) {
            return -1;
        }
    }
    place(t->slots, t->mask, tag, item);
    t->used++;
    return 0;
}

void
wsm_table_remove(wsm_table *t, uintptr_t tag, const void *item)
{
    wsm_slot *s;
    size_t i = 0, mask = t->mask;
    int found = 0;
    WSM_TABLE_FOR_TAG(t, tag, s) {
        if (s->item == item) {
            i = (size_t)(s - t->slots);
            found = 1;
            break;
        }
    }
    if (!found) {
        return;
    }
    /* backward-shift: move later members of the run into the hole when
     * their home is not between the hole and their slot */
    size_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (t->slots[j].item == NULL) {
            break;
        }
        size_t home = wsm_table_home(t, t->slots[j].tag);
        /* is home cyclically in (hole, j]? then it must stay */
        if (hole <= j ? (hole < home && home <= j)
                      : (hole < home || home <= j)) {
            continue;
        }
        t->slots[hole] = t->slots[j];
        hole = j;
    }
    t->slots[hole].item = NULL;
    t->slots[hole].tag = 0;
    t->used--;
    /* give memory back: none left, or under 1/8 full (to 1/2 full; if that
     * allocation fails the table simply stays as it is) */
    if (t->used == 0) {
        wsm_table_free(t);
    }
    else if (mask + 1 > 64 && t->used * 8 < mask + 1) {
        (void)resize(t, (mask + 1) / 4);
    }
}

void
wsm_table_free(wsm_table *t)
{
    PyMem_Free(t->slots);
    t->slots = NULL;
    t->mask = 0;
    t->used = 0;
}
