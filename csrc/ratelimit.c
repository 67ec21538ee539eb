/* Token buckets: see ratelimit.h. */
#include "ratelimit.h"

void
wsm_ratelimit_set(wsm_ratelimit *rl, double rate, double burst,
                  unsigned long max_violations)
{
    rl->rate = rate > 0 ? rate : 0.0;
    rl->burst = burst;
    rl->max_violations = max_violations;
}

wsm_rate_verdict
wsm_rate_check(wsm_ratelimit *rl, wsm_conn *c, double now)
{
    if (!c->bucket_ready) {
        c->bucket_ready = 1;
        c->tokens = rl->burst;
        c->tokens_ts = now;
        c->violations = 0;
    }
    else {
        double elapsed = now - c->tokens_ts;
        if (elapsed > 0) {
            c->tokens += elapsed * rl->rate;
        }
        c->tokens_ts = now;
        if (c->tokens >= rl->burst) {
            c->tokens = rl->burst;
            c->violations = 0;  /* the client calmed down */
        }
    }
    if (c->tokens >= 1.0) {
        c->tokens -= 1.0;
        return WSM_RATE_ALLOW;
    }
    rl->n_dropped++;
    if (c->violations < UINT32_MAX) {
        c->violations++;
    }
    if (rl->max_violations > 0 && c->violations > rl->max_violations) {
        rl->n_closed++;
        return WSM_RATE_CLOSE;
    }
    return c->violations == 1 ? WSM_RATE_DROP_FIRST : WSM_RATE_DROP;
}
