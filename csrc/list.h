/* Intrusive doubly linked lists of connections, shared by registry.c and
 * activity.c. A wsm_conn carries one wsm_link per list it can be on (its
 * lobby, its user, one activity list); `off` is the offset of that link.
 * Plain C: no Python code runs here. Internal to csrc/. */
#ifndef WSM_LIST_H
#define WSM_LIST_H

#include <stddef.h>

#include "registry.h"

#define WSM_OFF_LOBBY offsetof(wsm_conn, lobby_link)
#define WSM_OFF_USER offsetof(wsm_conn, user_link)
#define WSM_OFF_ACT offsetof(wsm_conn, act_link)

static inline void
wsm_list_push_tail(wsm_list *l, wsm_conn *c, size_t off)
{
    wsm_link *lk = (wsm_link *)((char *)c + off);
    lk->prev = l->tail;
    lk->next = NULL;
    if (l->tail) {
        ((wsm_link *)((char *)l->tail + off))->next = c;
    }
    else {
        l->head = c;
    }
    l->tail = c;
    l->len++;
}

static inline void
wsm_list_unlink(wsm_list *l, wsm_conn *c, size_t off)
{
    wsm_link *lk = (wsm_link *)((char *)c + off);
    if (lk->prev) {
        ((wsm_link *)((char *)lk->prev + off))->next = lk->next;
    }
    else {
        l->head = lk->next;
    }
    if (lk->next) {
        ((wsm_link *)((char *)lk->next + off))->prev = lk->prev;
    }
    else {
        l->tail = lk->prev;
    }
    lk->prev = lk->next = NULL;
    l->len--;
}

#endif
