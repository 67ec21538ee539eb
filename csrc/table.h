/* An open-addressed hash table of pointers (linear probing, backward-shift
 * deletion: no tombstones), for the registry's three tables. A slot holds a
 * tag (the websocket pointer for connections, the str hash for groups) and
 * the item; a lookup reads the contiguous slots of its probe run and
 * dereferences an item only when its tag matches, which is what made it
 * faster than uthash's chained buckets (one cache miss per chain link, a
 * 56-byte handle in every entry) at 100k entries.
 *
 * The table never looks inside an item and calls no Python code; its slot
 * array is PyMem memory (tracemalloc sees it). A pointer to a slot is valid
 * until the next insert or remove.
 */
#ifndef WSM_TABLE_H
#define WSM_TABLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uintptr_t tag;
    void *item;             /* NULL: empty slot */
} wsm_slot;

typedef struct {
    wsm_slot *slots;        /* NULL until the first insert */
    size_t mask;            /* capacity - 1 (a power of two), 0 when empty */
    size_t used;
} wsm_table;

/* Home slot of a tag: a multiplicative mix, so pointers (aligned, low bits
 * zero) and str hashes spread alike. */
static inline size_t
wsm_table_home(const wsm_table *t, uintptr_t tag)
{
    uint64_t x = (uint64_t)tag;
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 29;
    return (size_t)x & t->mask;
}

/* Walk the slots whose tag equals `tag_`, binding `slot` (a wsm_slot *) to
 * each; the body decides by looking at slot->item. The table must not
 * change inside the loop. */
#define WSM_TABLE_FOR_TAG(t, tag_, slot)                                   \
    for (size_t wsm_i_ = (t)->slots ? wsm_table_home((t), (tag_)) : 0;      \
         (t)->slots && ((slot) = &(t)->slots[wsm_i_])->item != NULL;       \
         wsm_i_ = (wsm_i_ + 1) & (t)->mask)                                \
        if ((slot)->tag == (tag_))

/* Add an item (not present yet). Returns 0, or -1 on out of memory (no
 * exception set; the table is unchanged). */
int wsm_table_insert(wsm_table *t, uintptr_t tag, void *item);
/* Remove the slot holding `item` (with `tag`); no-op if absent. The slot
 * array is freed once empty and shrunk once under 1/8 full. */
void wsm_table_remove(wsm_table *t, uintptr_t tag, const void *item);
/* Free the slot array; the items are the caller's. */
void wsm_table_free(wsm_table *t);

/* Visit every item: for (size_t i = 0; wsm_table_next(t, &i, &item);) */
static inline int
wsm_table_next(const wsm_table *t, size_t *pos, void **item)
{
    if (t->slots == NULL) {
        return 0;
    }
    while (*pos <= t->mask) {
        void *it = t->slots[(*pos)++].item;
        if (it != NULL) {
            *item = it;
            return 1;
        }
    }
    return 0;
}

#endif
