/* Core-to-core round trip: two threads pinned to two CPUs pass a counter back and forth on one cache line.
 *
 * Why: on the shared 2-vCPU AMD EPYC VMs the two vCPUs sit either on one CCD (a round trip of ~55 ns, and the
 * read bandwidth of one CCD's link, ~35 GB/s) or on two (~350 ns, ~50 GB/s), and that flips from one minute to
 * the next. A decode step synchronises its threads ~120 times, so the placement moves both a step's time and the
 * bytes floor it is measured against; tools/bench_decode.py records it next to each bandwidth sample.
 * Built with caprese.runtime.native.library.build(..., source=this file). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

typedef struct {
    int64_t iters;
    int cpu, pinned;
    _Alignas(64) _Atomic int64_t ball; /* odd: the partner's turn to hit it back; even: the caller's */
    char pad[56];                      /* the ball's line holds nothing else */
} Court;

static int pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    return pthread_setaffinity_np(pthread_self(), sizeof s, &s) == 0;
}

static void *partner(void *arg) {
    Court *c = arg;
    c->pinned = pin(c->cpu);
    const int64_t n = 2 * c->iters;
    for (int64_t i = 1; i < n; i += 2) {
        while (atomic_load_explicit(&c->ball, memory_order_acquire) != i) {}
        atomic_store_explicit(&c->ball, i + 1, memory_order_release);
    }
    return NULL;
}

/* Nanoseconds per round trip between CPUs cpu_a (the calling thread, pinned for the measurement and given its
 * own affinity back after) and cpu_b, over `iters` round trips; -1 where a CPU is not in this process's set. */
double caprese_core_round_trip_ns(int cpu_a, int cpu_b, int64_t iters) {
    cpu_set_t own;
    if (pthread_getaffinity_np(pthread_self(), sizeof own, &own) != 0 || !pin(cpu_a)) return -1.0;
    Court c = {0};
    c.iters = iters < 1 ? 1 : iters;
    c.cpu = cpu_b;
    pthread_t t;
    double ns = -1.0;
    if (pthread_create(&t, NULL, partner, &c) == 0) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int64_t i = 0; i < 2 * c.iters; i += 2) { /* c.iters: not on the ball's line */
            atomic_store_explicit(&c.ball, i + 1, memory_order_release);
            while (atomic_load_explicit(&c.ball, memory_order_acquire) != i + 2) {}
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        pthread_join(t, NULL);
        if (c.pinned) ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)c.iters;
    }
    pthread_setaffinity_np(pthread_self(), sizeof own, &own);
    return ns;
}
