/*
 * The lease module on the etcd provider ("lease_etcd", when the build has
 * it; only when -m names it, as tests/etcdcluster.sh does with a cluster of
 * its own), on the members that OPQ_ETCD_ENDPOINTS lists: lease.c's random
 * API sequences and holding-interval checks. etcd's leases last whole
 * seconds (the TTL is the lease time rounded up), so a holder whose short
 * lease ran out locally without a release keeps others out for up to a
 * second: the handles here draw lease times of 50 ms to 1 s.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>

#include <opqueue/lease_etcd.h>

#include "stress.h"

static int setup_etcd(void **statep, unsigned threads, uint64_t seed)
{
	const char *endpoints = getenv("OPQ_ETCD_ENDPOINTS");
	if (!endpoints || !*endpoints) {
		fprintf(stderr, "lease_etcd: set OPQ_ETCD_ENDPOINTS to the members' client URLs "
		                "(tests/etcdcluster.sh starts a cluster and sets it)\n");
		return EINVAL;
	}
	char err[512];
	opq_lease_etcd *e;
	int rc = opq_lease_etcd_create(&e, endpoints, NULL, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "lease_etcd: %s\n", err);
		return rc;
	}
	opq_lease_provider *prov;
	rc = opq_lease_provider_etcd_create(&prov, e);
	opq_lease_etcd_destroy(e); /* the provider keeps its reference */
	if (rc)
		return rc;
	static const int64_t leases[4] = {50000000, 200000000, 500000000, 1000000000};
	return stress_lease_setup_remote(statep, "lease_etcd", prov, threads, seed, leases);
}

const struct stress_module stress_lease_etcd = {
    .name = "lease_etcd",
    .setup = setup_etcd,
    .step = stress_lease_step,
    .check = stress_lease_check,
    .teardown = stress_lease_teardown,
    .calls = stress_lease_calls,
    .named_only = true,
};
