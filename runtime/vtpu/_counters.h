/* Relaxed atomic adds on int64 slots: counters shared by every vtpu process on a node live in
 * one mmap'd file, so increments must be atomic across processes, not just threads. */
#include <stdint.h>
#include <pthread.h>
#include <time.h>
static inline void vtpu_atomic_add(int64_t *slot, int64_t delta) {
    __atomic_fetch_add(slot, delta, __ATOMIC_RELAXED);
}
static inline int64_t vtpu_atomic_load(int64_t *slot) {
    return __atomic_load_n(slot, __ATOMIC_RELAXED);
}
static inline int64_t vtpu_clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static pthread_mutex_t vtpu_active_mutex = PTHREAD_MUTEX_INITIALIZER;
static inline void vtpu_lock(void) { pthread_mutex_lock(&vtpu_active_mutex); }
static inline void vtpu_unlock(void) { pthread_mutex_unlock(&vtpu_active_mutex); }
