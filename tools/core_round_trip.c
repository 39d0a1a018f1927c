/* Core-to-core round trip: two threads pinned to two CPUs pass a counter back and forth on one cache line.
 *
 * Why: on the shared 2-vCPU AMD EPYC VMs the two vCPUs sit either on one CCD (a round trip of ~55-120 ns, and the
 * read bandwidth of one CCD's link, ~35 GB/s) or on two (~350 ns, ~50 GB/s), and that flips from one minute to
 * the next. A decode step synchronises its threads ~120 times, so the placement moves both a step's time and the
 * bytes floor it is measured against; tools/bench_decode.py records it next to each bandwidth sample.
 * Built with caprese.runtime.native.library.built(source=this file). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define STOP (-1) /* the caller's last value: the partner returns */

typedef struct {
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
    for (int64_t v; (v = atomic_load_explicit(&c->ball, memory_order_acquire)) != STOP;)
        if (v & 1) atomic_store_explicit(&c->ball, v + 1, memory_order_release);
    return NULL;
}

static double seconds(const struct timespec *a, const struct timespec *b) {
    return (double)(b->tv_sec - a->tv_sec) + 1e-9 * (double)(b->tv_nsec - a->tv_nsec);
}

/* Nanoseconds per round trip between CPUs cpu_a (the calling thread, pinned for the measurement and given its
 * own affinity back after) and cpu_b: the mean of `iters` round trips, or of those done within max_s seconds (a
 * CPU shared with other work stretches them to scheduler time slices); -1 where a CPU is not in this process's
 * set. */
double caprese_core_round_trip_ns(int cpu_a, int cpu_b, int64_t iters, double max_s) {
    cpu_set_t own;
    if (pthread_getaffinity_np(pthread_self(), sizeof own, &own) != 0 || !pin(cpu_a)) return -1.0;
    Court c = {0};
    c.cpu = cpu_b;
    pthread_t t;
    double ns = -1.0;
    if (pthread_create(&t, NULL, partner, &c) == 0) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        int64_t done = 0;
        for (; done < iters; done++) {
            atomic_store_explicit(&c.ball, 2 * done + 1, memory_order_release);
            while (atomic_load_explicit(&c.ball, memory_order_acquire) != 2 * done + 2) {}
            if ((done & 1023) == 1023) {
                clock_gettime(CLOCK_MONOTONIC, &b);
                if (seconds(&a, &b) > max_s) {
                    done++;
                    break;
                }
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        atomic_store_explicit(&c.ball, STOP, memory_order_release);
        pthread_join(t, NULL);
        if (c.pinned && done > 0) ns = seconds(&a, &b) * 1e9 / (double)done;
    }
    pthread_setaffinity_np(pthread_self(), sizeof own, &own);
    return ns;
}
