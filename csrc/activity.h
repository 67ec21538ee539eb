/* Activity: the heartbeat's data. Every committed connection is on one of
 * two lists of the registry, each ordered by time:
 *   idle  not pinged, by last_rx (last time anything was received);
 *   wait  pinged, by ping_sent, until anything is received.
 * Touching an entry moves it to the idle tail in O(1); a sweep walks from
 * the heads and stops at the first entry not due: O(due), never
 * O(connections). The next deadline reads the two heads only.
 *
 * Calls no Python code; the same pointer rule as registry.h applies to the
 * wsm_conn * it takes and returns. */
#ifndef WSM_ACTIVITY_H
#define WSM_ACTIVITY_H

#include "registry.h"

/* Why a connection was closed as stale (get_stats()["stale_closed"]). */
enum wsm_stale_reason {
    WSM_STALE_NO_PONG = 0,      /* pinged, nothing received in ping_timeout */
    WSM_STALE_SEND_FAILED,      /* the heartbeat's ping could not be sent */
    WSM_STALE_HANDLER_EXITED,   /* its endpoint ended without disconnect() */
    WSM_STALE_NREASONS
};
/* "no_pong", "send_failed", "handler_exited", in that order. */
extern const char *const wsm_stale_names[WSM_STALE_NREASONS];

/* A committed connection starts its activity clock: idle tail, at `now`. */
void wsm_activity_start(wsm_registry *r, wsm_conn *c, double now);
/* Take a connection off the activity lists (it is removed or closed). */
void wsm_unlist(wsm_registry *r, wsm_conn *c);

/* Mark a connection as having received something: leaves the wait list,
 * moves to the idle tail. */
void wsm_touch(wsm_registry *r, wsm_conn *c, double now);
/* A pong arrived: touch, and return the round-trip time in seconds of the
 * ping it answers (also kept in c->last_rtt), or -1 if no ping was
 * outstanding or it timed out (past c->pong_deadline). */
double wsm_pong(wsm_registry *r, wsm_conn *c, double now);
/* Connection was sent a ping at `now`, answered in time until now + timeout
 * (timeout may be infinite): idle list -> wait list tail. */
void wsm_mark_pinged(wsm_registry *r, wsm_conn *c, double now, double timeout);
/* A pong is awaited: a ping was sent less than its timeout ago, unanswered. */
static inline int wsm_pong_due(const wsm_conn *c, double now)
{
    return c->pong_due_since > 0 && now <= c->pong_deadline;
}
/* A ping was sent outside the sweep (ping_user); a pong within `timeout`
 * seconds yields a round trip. While an earlier ping is still awaited, the
 * round trip is measured from that one, and the pong may come until the
 * later of the two deadlines. The activity lists are not changed. */
void wsm_note_ping(wsm_conn *c, double now, double timeout);

/* The oldest pinged connection if it has been silent for `timeout` since
 * its ping, else NULL. Borrowed. */
static inline wsm_conn *
wsm_expired_head(const wsm_registry *r, double now, double timeout)
{
    wsm_conn *c = r->wait.head;
    return c && c->ping_sent + timeout <= now ? c : NULL;
}
/* The longest-silent unpinged connection if it has received nothing for
 * `interval`, else NULL. Borrowed. */
static inline wsm_conn *
wsm_due_head(const wsm_registry *r, double now, double interval)
{
    wsm_conn *c = r->idle.head;
    return c && c->last_rx + interval <= now ? c : NULL;
}
/* The earliest time a sweep would find something due among the connections
 * on the lists now, into *due. Returns 0 (and leaves *due) when both lists
 * are empty, 1 otherwise. O(1). */
int wsm_next_deadline(const wsm_registry *r, double interval, double timeout,
                      double *due);

#endif
