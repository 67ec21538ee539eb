/* Inbound rate limit: one token bucket per connection (its state lives in
 * the wsm_conn: tokens, tokens_ts, violations, bucket_ready), one setting
 * and two counters per core. Calls no Python code. */
#ifndef WSM_RATELIMIT_H
#define WSM_RATELIMIT_H

#include "registry.h"

typedef struct {
    double rate;                    /* tokens per second; <= 0: off */
    double burst;                   /* bucket size */
    unsigned long max_violations;   /* drops before the verdict is "close";
                                       0: never */
    unsigned long long n_dropped;   /* messages dropped */
    unsigned long long n_closed;    /* connections told to close */
} wsm_ratelimit;

/* The verdict for one inbound message (the values _allow() returns). */
typedef enum {
    WSM_RATE_ALLOW = 0,
    WSM_RATE_DROP_FIRST = 1,    /* first drop since the bucket was last full */
    WSM_RATE_DROP = 2,          /* dropped again */
    WSM_RATE_CLOSE = 3,         /* max_violations drops exceeded */
} wsm_rate_verdict;

/* New settings (validated by the caller: finite, burst >= 1 when on).
 * Buckets already started keep their tokens, capped to the new burst on
 * their next message. */
void wsm_ratelimit_set(wsm_ratelimit *rl, double rate, double burst,
                       unsigned long max_violations);

static inline int
wsm_ratelimit_on(const wsm_ratelimit *rl)
{
    return rl->rate > 0;
}

/* Take one token from c's bucket (started full on its first message). */
wsm_rate_verdict wsm_rate_check(wsm_ratelimit *rl, wsm_conn *c, double now);

#endif
