/*
 * fuzz_etcd.c: libFuzzer over the etcd provider's reply parsing
 * (lib/lease_etcd_json.c), which reads what the network hands it. The first
 * byte of an input picks the kind of reply (range, txn, grant, keepalive,
 * revoke), the rest is the reply's body. Besides what AddressSanitizer and
 * UBSan catch, it checks the parser's contract: 0 or EPROTO, words on
 * EPROTO, nothing read past what was kept; and that base64 round-trips.
 *
 * Built and run by tests/fuzz_etcd.sh (clang -fsanitize=fuzzer,address),
 * a few seconds in make check; for longer, by hand:
 *   FUZZ_SECONDS=600 top_srcdir=. top_builddir=_build/d sh tests/fuzz_etcd.sh
 * Seeds: tests/fuzz_etcd_corpus (real replies of etcd 3.4).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lease_etcd_impl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	enum etcd_kind kind = (enum etcd_kind)(data[0] % ETCD_NKINDS);
	/* A copy of exactly the body: ASan sees a read past its end. */
	char *body = malloc(size - 1 ? size - 1 : 1);
	if (body == NULL)
		return 0;
	memcpy(body, data + 1, size - 1);
	struct etcd_reply r;
	char err[96];
	err[0] = '\0';
	int rc = opq__etcd_parse(kind, body, size - 1, &r, err, sizeof(err));
	if (rc != 0 && rc != EPROTO)
		abort();
	if (rc == EPROTO && (err[0] == '\0' || memchr(err, '\0', sizeof(err)) == NULL))
		abort();
	if (rc == 0) {
		if (r.kv.value_len > sizeof(r.kv.value) || (r.kv.value_long && r.kv.value_len))
			abort();
		if (memchr(r.message, '\0', sizeof(r.message)) == NULL)
			abort();
		if (r.grpc_code < 0 || r.grpc_code >= 64)
			abort();
		if (r.kv.present && (r.kv.create_revision < 0 || r.kv.mod_revision < 0))
			abort();
	}
	/* base64: the body decoded (as a reply's value would be), and a round trip. */
	unsigned char *out = malloc(size);
	size_t n = 0;
	if (out != NULL) {
		int d = opq__etcd_b64_decode(body, size - 1, out, size, &n);
		if (d != 0 && d != EPROTO && d != ERANGE)
			abort();
		if (d == 0 && n > size)
			abort();
		char *b = opq__etcd_b64(data, size);
		if (b != NULL) {
			if (strlen(b) != opq__etcd_b64_len(size) ||
			    opq__etcd_b64_decode(b, strlen(b), out, size, &n) != 0 || n != size ||
			    memcmp(out, data, size) != 0)
				abort();
			free(b);
		}
		free(out);
	}
	free(body);
	return 0;
}
