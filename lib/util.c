/*
 * util.c: allocation (with the test-only fault injector), monotonic
 * condition variables, deadlines and the version.
 */
#include "internal.h"

#include <stdatomic.h>
#include <stdlib.h>

#ifdef OPQ_HAVE_JEMALLOC
/*
 * Only jemalloc's non-standard entry points are used, so the host process
 * keeps its own malloc (the C library's comes first in symbol lookup).
 */
void *mallocx(size_t size, int flags);
void sdallocx(void *ptr, size_t size, int flags);
#endif

/* Fault injector: the allocation whose number equals fault_at fails. */
static atomic_long fault_at;
static atomic_long fault_seen;

void opq__fault_set(long n)
{
	atomic_store(&fault_seen, 0);
	atomic_store(&fault_at, n);
}

long opq__fault_count(void)
{
	return atomic_load(&fault_seen);
}

static bool fault_now(void)
{
	if (OPQ_LIKELY(atomic_load_explicit(&fault_at, memory_order_relaxed) == 0))
		return false;
	long seen = atomic_fetch_add(&fault_seen, 1) + 1;
	return seen == atomic_load(&fault_at);
}

void *opq__malloc(size_t size)
{
	return fault_now() ? NULL : malloc(size);
}

void *opq__calloc(size_t n, size_t size)
{
	return fault_now() ? NULL : calloc(n, size);
}

void opq__free(void *p)
{
	free(p);
}

void *opq__box_alloc(size_t size)
{
	if (fault_now())
		return NULL;
#ifdef OPQ_HAVE_JEMALLOC
	return mallocx(size, 0);
#else
	return malloc(size);
#endif
}

void opq__box_free(void *p, size_t size)
{
#ifdef OPQ_HAVE_JEMALLOC
	sdallocx(p, size, 0);
#else
	(void)size;
	free(p);
#endif
}

int opq__mutex_init(pthread_mutex_t *mutex)
{
#ifdef OPQ_DEBUG
	pthread_mutexattr_t ma;
	int rc = pthread_mutexattr_init(&ma);
	if (rc)
		return rc;
	pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ERRORCHECK);
	rc = pthread_mutex_init(mutex, &ma);
	pthread_mutexattr_destroy(&ma);
	return rc;
#else
	return pthread_mutex_init(mutex, NULL);
#endif
}

int opq__cond_init(pthread_cond_t *cond)
{
	pthread_condattr_t ca;
	int rc = pthread_condattr_init(&ca);
	if (rc)
		return rc;
	rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	if (rc == 0)
		rc = pthread_cond_init(cond, &ca);
	pthread_condattr_destroy(&ca);
	return rc;
}

bool opq__deadline_ok(const struct timespec *deadline)
{
	return !deadline || (deadline->tv_nsec >= 0 && deadline->tv_nsec < 1000000000);
}

bool opq__ts_before(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

int opq__cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex, const struct timespec *deadline)
{
	if (!deadline) {
		OPQ_CHECK(pthread_cond_wait(cond, mutex));
		return 0;
	}
	int rc = pthread_cond_timedwait(cond, mutex, deadline);
	return rc == ETIMEDOUT ? ETIMEDOUT : 0;
}

OPQ_EXPORT int opq_deadline_after(struct timespec *deadline, int64_t ns)
{
	if (!deadline)
		return EINVAL;
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	int64_t sec = ns / 1000000000;
	int64_t nsec = now.tv_nsec + ns % 1000000000;
	if (nsec >= 1000000000) {
		nsec -= 1000000000;
		sec++;
	} else if (nsec < 0) {
		nsec += 1000000000;
		sec--;
	}
	deadline->tv_sec = now.tv_sec + (time_t)sec;
	deadline->tv_nsec = (long)nsec;
	return 0;
}

OPQ_EXPORT const char *opq_version(void)
{
	return PACKAGE_VERSION;
}
