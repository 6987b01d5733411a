/*
 * lease_attr.c: the attributes of lease handles (opq_lease_attr_create(3)),
 * and the small helpers they share with lease.c: random bytes for the
 * default owner and the backoff's jitter, and the length check of names.
 */
#include "internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<sys/random.h>)
#include <sys/random.h>
#define OPQ_HAVE_GETRANDOM 1
#endif
#endif

#define NS_PER_S 1000000000LL

void opq__lease_random(void *buf, size_t len)
{
	size_t got = 0;
#ifdef OPQ_HAVE_GETRANDOM
	while (got < len) {
		ssize_t n = getrandom((char *)buf + got, len - got, 0);
		if (n <= 0)
			break;
		got += (size_t)n;
	}
#endif
	if (got < len) {
		int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			while (got < len) {
				ssize_t n = read(fd, (char *)buf + got, len - got);
				if (n <= 0)
					break;
				got += (size_t)n;
			}
			close(fd);
		}
	}
	if (got < len) { /* last resort: time and addresses, mixed */
		uint64_t x = (uint64_t)opq__mono_ns() ^ ((uint64_t)getpid() << 32) ^
		             (uint64_t)(uintptr_t)buf;
		for (size_t i = got; i < len; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			((unsigned char *)buf)[i] = (unsigned char)x;
		}
	}
}

/* 1..max bytes and no more: the length, or 0 when empty or too long. */
size_t opq__lease_str_ok(const char *s, size_t max)
{
	if (!s)
		return 0;
	size_t n = strnlen(s, max + 1);
	return n >= 1 && n <= max ? n : 0;
}

/* ---- attributes ------------------------------------------------------------ */

void opq__lease_attr_defaults(struct opq_lease_attr *a)
{
	memset(a, 0, sizeof(*a));
	char host[128];
	if (gethostname(host, sizeof(host)) != 0)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	uint64_t r;
	opq__lease_random(&r, sizeof(r));
	snprintf(a->owner, sizeof(a->owner), "%s:%ld:%016llx", host, (long)getpid(),
	         (unsigned long long)r);
	a->lease_ns = 10 * NS_PER_S;
	a->ppm = 10000;
	a->fixed_ns = 10000000;
	a->poll_min = 10000000;
	a->poll_max = NS_PER_S;
}

OPQ_EXPORT int opq_lease_attr_create(opq_lease_attr **attr)
{
	if (!attr)
		return EINVAL;
	struct opq_lease_attr *a = opq__malloc(sizeof(*a));
	if (!a)
		return ENOMEM;
	opq__lease_attr_defaults(a);
	*attr = a;
	return 0;
}

OPQ_EXPORT void opq_lease_attr_destroy(opq_lease_attr *attr)
{
	opq__free(attr);
}

OPQ_EXPORT int opq_lease_attr_set_owner(opq_lease_attr *attr, const char *owner)
{
	size_t n = opq__lease_str_ok(owner, OPQ_LEASE_OWNER_MAX);
	if (!attr || !n)
		return EINVAL;
	memcpy(attr->owner, owner, n + 1);
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_chan(opq_lease_attr *attr, opq_chan *ch)
{
	if (!attr)
		return EINVAL;
	attr->chan = ch;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_duration(opq_lease_attr *attr, int64_t lease_ns)
{
	if (!attr || lease_ns <= 0)
		return EINVAL;
	attr->lease_ns = lease_ns;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_margin(opq_lease_attr *attr, int64_t ppm, int64_t fixed_ns)
{
	if (!attr || ppm < 0 || fixed_ns < 0)
		return EINVAL;
	attr->ppm = ppm;
	attr->fixed_ns = fixed_ns;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_poll(opq_lease_attr *attr, int64_t min_ns, int64_t max_ns)
{
	if (!attr || min_ns <= 0 || max_ns < min_ns)
		return EINVAL;
	attr->poll_min = min_ns;
	attr->poll_max = max_ns;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_data(opq_lease_attr *attr, const void *data, size_t len)
{
	if (!attr || len > OPQ_LEASE_DATA_MAX || (len && !data))
		return EINVAL;
	if (len)
		memcpy(attr->data, data, len);
	attr->data_len = len;
	return 0;
}
