/* Round-trip ring and percentiles: see latency.h. */
#include "latency.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void
wsm_rtt_record(wsm_rtt_ring *r, double rtt)
{
    r->rtt[r->pos] = rtt;
    r->pos = (r->pos + 1) % WSM_RTT_WINDOW;
    r->dirty = 1;
    if (r->len < WSM_RTT_WINDOW) {
        r->len++;
    }
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Percentile (nearest rank) of sorted values, in ms. */
static double
pct_ms_of(const double *sorted, int n, double p)
{
    int rank = (int)ceil(p / 100.0 * n);
    if (rank < 1) {
        rank = 1;
    }
    return sorted[rank - 1] * 1000.0;
}

int
wsm_rtt_percentiles(wsm_rtt_ring *r, double pct_ms[3])
{
    int n = r->len;
    if (n == 0) {
        return 0;
    }
    if (r->dirty) { /* sort only when new samples came in */
        double sorted[WSM_RTT_WINDOW];
        memcpy(sorted, r->rtt, sizeof(double) * (size_t)n);
        qsort(sorted, (size_t)n, sizeof(double), cmp_double);
        r->pct[0] = pct_ms_of(sorted, n, 50);
        r->pct[1] = pct_ms_of(sorted, n, 95);
        r->pct[2] = pct_ms_of(sorted, n, 99);
        r->dirty = 0;
    }
    pct_ms[0] = r->pct[0];
    pct_ms[1] = r->pct[1];
    pct_ms[2] = r->pct[2];
    return n;
}
