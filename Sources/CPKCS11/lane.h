// The broker's lane (docs/FORK.md "The lane"): a region of memory one child shares with the
// broker, holding one call at a time, with a sequence word in each direction. The side that waits
// spins a little first (a call over the lane then costs no system call and no wake-up), then
// sleeps on a futex with a timeout, so that neither side waits for a peer that has gone.
// Included by the child's side (Sources/CPKCS11/shim.c) and by the broker (Sources/Broker/lane.c);
// not a public header of CPKCS11: Swift sees only the two functions CPKCS11.h declares. What the
// bytes mean is written in Swift (Loader/Lane.swift) and in Sources/Broker/lane.c.
#ifndef P11FORK_LANE_H
#define P11FORK_LANE_H

#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/// The region: the header, then one message (a request, then its reply in the same place).
enum { P11FORK_LANE_SIZE = 1 << 18, P11FORK_LANE_DATA = 64, P11FORK_LANE_CAPACITY = P11FORK_LANE_SIZE - P11FORK_LANE_DATA };

typedef struct P11ForkLane {
    /// The child's call count: raised once a request is in place.
    _Atomic uint32_t request;
    /// The broker's answer count: set to `request` once the reply is in place.
    _Atomic uint32_t reply;
    /// Set while the broker sleeps on `request`, and while the child sleeps on `reply`.
    _Atomic uint32_t broker_sleeps;
    _Atomic uint32_t child_sleeps;
    /// Set by the broker when it will serve no more calls on this lane.
    _Atomic uint32_t closed;
    /// The length of the message in the data part.
    _Atomic uint32_t length;
} P11ForkLane;

static inline unsigned char *p11fork_lane_data(P11ForkLane *lane) { return (unsigned char *)lane + P11FORK_LANE_DATA; }

#if defined(__x86_64__) || defined(__i386__)
#define P11FORK_LANE_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define P11FORK_LANE_PAUSE() __asm__ __volatile__("yield")
#else
#define P11FORK_LANE_PAUSE() ((void)0)
#endif

static inline long p11fork_lane_futex(_Atomic uint32_t *word, int operation, uint32_t value, long timeout_ms) {
    struct timespec timeout = { .tv_sec = timeout_ms / 1000, .tv_nsec = (timeout_ms % 1000) * 1000000L };
    return syscall(SYS_futex, (uint32_t *)word, operation, value, timeout_ms >= 0 ? &timeout : NULL, NULL, 0);
}

static inline uint64_t p11fork_lane_now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

/// Waits until `*word` differs from `seen`: spins for `spin_ns` (pausing, then yielding the
/// processor after the first microseconds, so that a peer waiting for this core gets it), then
/// sleeps on the futex in slices of `slice_ms`, asking `gone(context)` after each whether to give
/// up. Returns 1 when the word changed, 0 when `gone` said so.
static inline int p11fork_lane_wait(_Atomic uint32_t *word, uint32_t seen, _Atomic uint32_t *sleeps, uint64_t spin_ns,
                                    long slice_ms, int (*gone)(void *), void *context) {
    uint64_t start = 0;
    for (unsigned turn = 0;; turn++) {
        if (atomic_load_explicit(word, memory_order_acquire) != seen) return 1;
        if ((turn & 63) == 63) {
            uint64_t now = p11fork_lane_now_ns();
            if (start == 0) start = now;
            else if (now - start >= spin_ns) break;
            if (now - start > 5000) sched_yield();
        }
        P11FORK_LANE_PAUSE();
    }
    for (;;) {
        atomic_store(sleeps, 1);
        if (atomic_load(word) != seen) break;
        p11fork_lane_futex(word, FUTEX_WAIT, seen, slice_ms);
        if (atomic_load(word) != seen) break;
        atomic_store(sleeps, 0);
        if (gone(context)) return 0;
    }
    atomic_store(sleeps, 0);
    return 1;
}

/// Publishes `value` in `*word` and wakes the peer when it sleeps on it.
static inline void p11fork_lane_post(_Atomic uint32_t *word, uint32_t value, _Atomic uint32_t *peer_sleeps) {
    atomic_store(word, value);
    if (atomic_load(peer_sleeps)) p11fork_lane_futex(word, FUTEX_WAKE, 1, -1);
}

#endif
