/*
 * opqueue-fanout: a request handler fans out to three backends in a scope.
 * One backend fails; with "first error cancels the siblings" (the default)
 * the slow one is cancelled at once and the request answers early;
 * with -c (collect) every backend runs to its end.
 *
 *   opqueue-fanout [-c] [-r runners] [-d deadline_ms]
 */
#include "fanout.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int collect = 0, opt;
	unsigned runners = 4;
	int64_t deadline_ms = 0;
	while ((opt = getopt(argc, argv, "cr:d:h")) != -1) {
		switch (opt) {
		case 'c':
			collect = 1;
			break;
		case 'r':
			runners = (unsigned)atoi(optarg);
			if (runners < 1 || runners > 256) {
				fprintf(stderr, "%s: -r takes 1 to 256 runners\n", argv[0]);
				return 2;
			}
			break;
		case 'd':
			deadline_ms = atoll(optarg);
			break;
		default:
			fprintf(opt == 'h' ? stdout : stderr,
			        "usage: %s [-ch] [-r runners] [-d deadline_ms]\n", argv[0]);
			return opt == 'h' ? 0 : 2;
		}
	}
	struct fanout_backend b[FANOUT_BACKENDS] = {
	    {.name = "cache", .latency_ms = 20},
	    {.name = "database", .latency_ms = 80, .error = EIO},
	    {.name = "search", .latency_ms = 1500},
	};
	struct fanout_result res;
	printf("request: fan out to %d backends, policy %s%s\n", FANOUT_BACKENDS,
	       collect ? "collect" : "first error cancels the siblings",
	       deadline_ms > 0 ? ", with a deadline" : "");
	int rc = fanout_run(runners, !collect, deadline_ms, b, &res);
	if (rc) {
		fprintf(stderr, "fanout: %s\n", strerror(rc));
		return 1;
	}
	for (int i = 0; i < FANOUT_BACKENDS; i++)
		printf("  %-8s (works %4lld ms%s): %-28s at %4lld ms\n", b[i].name,
		       (long long)b[i].latency_ms, b[i].error ? ", fails" : "",
		       b[i].result == 0           ? "answered"
		       : b[i].result == ECANCELED ? "cancelled"
		                                  : strerror(b[i].result),
		       (long long)b[i].ended_ms);
	printf("request answered %s after %lld ms\n",
	       res.first_error ? strerror(res.first_error) : "OK", (long long)res.total_ms);
	return 0;
}
