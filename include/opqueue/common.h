/*
 * opqueue/common.h: definitions shared by every opqueue module.
 *
 * Conventions (see opqueue(7)): every function returns 0 or a positive
 * errno value, like pthreads; it never prints and never aborts on bad
 * input; a NULL pointer where an object is required is EINVAL. Deadlines
 * are absolute CLOCK_MONOTONIC instants, NULL meaning "wait forever".
 */
#ifndef OPQUEUE_COMMON_H
#define OPQUEUE_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#if defined(OPQ_BUILDING_LIBRARY) && defined(__GNUC__)
#define OPQ_EXPORT __attribute__((visibility("default")))
#else
#define OPQ_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A link in one of the library's intrusive lists, embedded in public
 * structs that the library keeps on lists (opq_op). Its fields are the
 * library's: never read or write them.
 */
struct opq__link {
	struct opq__link *opq__next, *opq__prev;
};

/* The version of the headers; opq_version() gives the library's. */
#define OPQ_VERSION_MAJOR 0
#define OPQ_VERSION_MINOR 1
#define OPQ_VERSION_PATCH 0

/*
 * Return the version of the linked library as a static string such as
 * "0.1.0". The caller must not free it. Thread-safe.
 */
OPQ_EXPORT const char *opq_version(void);

/*
 * Store in *deadline the CLOCK_MONOTONIC instant `ns` nanoseconds from now
 * (ns may be 0 or negative: a deadline that has already passed). Use it
 * to build the absolute deadlines every timed opqueue call takes.
 * Returns 0, or EINVAL if deadline is NULL. Thread-safe and
 * async-signal-safe.
 */
OPQ_EXPORT int opq_deadline_after(struct timespec *deadline, int64_t ns);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_COMMON_H */
