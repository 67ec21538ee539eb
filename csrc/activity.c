/* Activity lists: see activity.h. */
#include "activity.h"

#include <math.h>

#include "list.h"

const char *const wsm_stale_names[WSM_STALE_NREASONS] = {
    "no_pong", "send_failed", "handler_exited",
};

void
wsm_activity_start(wsm_registry *r, wsm_conn *c, double now)
{
    c->last_rx = now;
    c->on_list = WSM_ON_IDLE;
    wsm_list_push_tail(&r->idle, c, WSM_OFF_ACT);
}

void
wsm_unlist(wsm_registry *r, wsm_conn *c)
{
    if (c->on_list == WSM_ON_IDLE) {
        wsm_list_unlink(&r->idle, c, WSM_OFF_ACT);
    }
    else if (c->on_list == WSM_ON_WAIT) {
        wsm_list_unlink(&r->wait, c, WSM_OFF_ACT);
    }
    c->on_list = WSM_ON_NONE;
}

void
wsm_touch(wsm_registry *r, wsm_conn *c, double now)
{
    if (c->state != WSM_ACTIVE) {
        return;
    }
    wsm_unlist(r, c);
    c->last_rx = now;
    c->on_list = WSM_ON_IDLE;
    wsm_list_push_tail(&r->idle, c, WSM_OFF_ACT);
}

double
wsm_pong(wsm_registry *r, wsm_conn *c, double now)
{
    double rtt = -1.0;
    if (c->state != WSM_ACTIVE) {
        return rtt;
    }
    if (c->pong_due_since > 0) {
        if (now <= c->pong_deadline) { /* a late pong is no round trip */
            rtt = now - c->pong_due_since;
            if (rtt < 0) {
                rtt = 0;
            }
            c->last_rtt = rtt;
        }
        c->pong_due_since = 0;
    }
    wsm_touch(r, c, now);
    return rtt;
}

void
wsm_mark_pinged(wsm_registry *r, wsm_conn *c, double now, double timeout)
{
    if (c->state != WSM_ACTIVE) {
        return;
    }
    if (c->on_list == WSM_ON_IDLE) {
        wsm_list_unlink(&r->idle, c, WSM_OFF_ACT);
    }
    else if (c->on_list == WSM_ON_WAIT) {
        return; /* keep the first ping's deadline */
    }
    c->ping_sent = now;
    c->pong_due_since = now;
    c->pong_deadline = now + timeout;
    c->on_list = WSM_ON_WAIT;
    wsm_list_push_tail(&r->wait, c, WSM_OFF_ACT);
}

void
wsm_note_ping(wsm_conn *c, double now, double timeout)
{
    if (!wsm_pong_due(c, now)) {
        c->pong_due_since = now;
        c->pong_deadline = now + timeout;
    }
    else if (now + timeout > c->pong_deadline) {
        c->pong_deadline = now + timeout;
    }
}

int
wsm_next_deadline(const wsm_registry *r, double interval, double timeout,
                  double *due)
{
    double d = INFINITY;
    if (r->wait.head == NULL && r->idle.head == NULL) {
        return 0;
    }
    if (r->wait.head) {
        d = r->wait.head->ping_sent + timeout;
    }
    if (r->idle.head && r->idle.head->last_rx + interval < d) {
        d = r->idle.head->last_rx + interval;
    }
    *due = d;
    return 1;
}
