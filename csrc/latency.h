/* Round-trip times: a ring of the last WSM_RTT_WINDOW samples and their
 * percentiles (get_stats()["latency_ms"]). Plain C, no Python. */
#ifndef WSM_LATENCY_H
#define WSM_LATENCY_H

#define WSM_RTT_WINDOW 1024

typedef struct {
    double rtt[WSM_RTT_WINDOW]; /* seconds, the most recent samples */
    int len;                    /* samples held, <= WSM_RTT_WINDOW */
    int pos;                    /* where the next one goes */
    int dirty;                  /* samples arrived since pct was computed */
    double pct[3];              /* p50, p95, p99 in ms */
} wsm_rtt_ring;

/* Add one round trip, in seconds (the oldest is dropped once full). */
void wsm_rtt_record(wsm_rtt_ring *r, double rtt);

/* p50, p95 and p99 (nearest rank) of the samples held, in ms, into
 * pct_ms[0..2]; sorts only when samples arrived since the last call.
 * Returns the number of samples; 0: none, pct_ms is left untouched. */
int wsm_rtt_percentiles(wsm_rtt_ring *r, double pct_ms[3]);

#endif
