/*
 * lease_etcd_json.c: what the etcd provider writes and reads on the wire:
 * base64 (keys and values travel so in etcd's JSON gateway), the bodies of
 * the requests, and the parsing of the replies.
 *
 * A reply is untrusted input (any server, or anything between, may answer
 * on a member's URL): it is parsed with jansson from (bytes, length), every
 * field the provider reads is checked for its type and range, and anything
 * else is EPROTO, never a crash or a wrong value taken for a right one.
 * tests/fuzz_etcd.c drives opq__etcd_parse with libFuzzer.
 *
 * The gateway's JSON is protobuf's mapping: 64-bit integers are strings of
 * decimal digits ("revision":"12"), and a field whose value is zero or
 * false is left out. Both are accepted here (and JSON integers too); a
 * missing field reads as 0.
 *
 * jansson rather than json-c: its json_loadb parses a buffer with a length
 * (no NUL needed, none trusted), json_string_length gives a string's
 * length with any NUL bytes in it, and its parser has a nesting limit, so
 * a reply cannot recurse it off the stack.
 */
#include "config.h"

#include "lease_etcd_impl.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

void opq__etcd_set_err(char *buf, size_t len, const char *fmt, ...)
{
	if (buf == NULL || len == 0)
		return;
	int n = snprintf(buf, len, "etcd: ");
	if (n < 0 || (size_t)n >= len)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf + n, len - (size_t)n, fmt, ap);
	va_end(ap);
	for (char *p = buf; *p; p++) /* one line: a server's words may not be */
		if (*p == '\n' || *p == '\r' || *p == '\t')
			*p = ' ';
}

char *opq__etcd_strf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return NULL;
	char *s = malloc((size_t)n + 1);
	if (s == NULL)
		return NULL;
	va_start(ap, fmt);
	vsnprintf(s, (size_t)n + 1, fmt, ap);
	va_end(ap);
	return s;
}

/* ---- base64 ---- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t opq__etcd_b64_len(size_t len)
{
	return (len + 2) / 3 * 4;
}

void opq__etcd_b64_encode(const void *in, size_t len, char *out)
{
	const unsigned char *p = in;
	size_t o = 0;
	for (size_t i = 0; i < len; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16;
		if (i + 1 < len)
			v |= (uint32_t)p[i + 1] << 8;
		if (i + 2 < len)
			v |= p[i + 2];
		out[o++] = B64[v >> 18];
		out[o++] = B64[(v >> 12) & 63];
		out[o++] = i + 1 < len ? B64[(v >> 6) & 63] : '=';
		out[o++] = i + 2 < len ? B64[v & 63] : '=';
	}
	out[o] = '\0';
}

char *opq__etcd_b64(const void *in, size_t len)
{
	char *s = malloc(opq__etcd_b64_len(len) + 1);
	if (s != NULL)
		opq__etcd_b64_encode(in, len, s);
	return s;
}

static int b64_val(char c)
{
	const char *p = c ? strchr(B64, c) : NULL;
	return p ? (int)(p - B64) : -1;
}

int opq__etcd_b64_decode(const char *in, size_t len, unsigned char *out, size_t outmax,
                         size_t *outlen)
{
	if (len % 4 != 0)
		return EPROTO;
	size_t o = 0;
	for (size_t i = 0; i < len; i += 4) {
		bool last = i + 4 == len;
		int pad = 0;
		if (last && in[i + 3] == '=')
			pad = in[i + 2] == '=' ? 2 : 1;
		int v[4];
		for (int k = 0; k < 4 - pad; k++)
			if ((v[k] = b64_val(in[i + k])) < 0)
				return EPROTO;
		for (int k = 4 - pad; k < 4; k++)
			v[k] = 0;
		uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 |
		             (uint32_t)v[3];
		/* The bits a padded quantum leaves over must be zero (canonical). */
		if ((pad == 1 && (w & 0xff)) || (pad == 2 && (w & 0xffff)))
			return EPROTO;
		size_t n = 3 - (size_t)pad;
		if (o + n > outmax)
			return ERANGE;
		for (size_t k = 0; k < n; k++)
			out[o++] = (unsigned char)(w >> (16 - 8 * k));
	}
	*outlen = o;
	return 0;
}

/* ---- replies ---- */

struct pctx {
	char *errbuf;
	size_t errlen;
};

static int bad(struct pctx *c, const char *what)
{
	opq__etcd_set_err(c->errbuf, c->errlen, "malformed reply: %s", what);
	return EPROTO;
}

/* An int64 field: absent (0), a JSON integer, or a string of digits with an optional '-'. */
static int get_i64(struct pctx *c, const json_t *obj, const char *name, int64_t *out)
{
	const json_t *v = json_object_get(obj, name);
	*out = 0;
	if (v == NULL || json_is_null(v))
		return 0;
	if (json_is_integer(v)) {
		*out = (int64_t)json_integer_value(v);
		return 0;
	}
	if (!json_is_string(v))
		return bad(c, name);
	const char *s = json_string_value(v);
	size_t n = json_string_length(v);
	bool neg = n > 0 && s[0] == '-';
	size_t i = neg ? 1 : 0;
	if (i == n || n - i > 19)
		return bad(c, name);
	uint64_t x = 0;
	for (; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return bad(c, name);
		x = x * 10 + (uint64_t)(s[i] - '0');
	}
	if (x > (uint64_t)INT64_MAX)
		return bad(c, name);
	*out = neg ? -(int64_t)x : (int64_t)x;
	return 0;
}

/* An object field: absent (NULL, 0) or an object. */
static int get_obj(struct pctx *c, const json_t *obj, const char *name, json_t **out)
{
	json_t *v = json_object_get(obj, name);
	*out = NULL;
	if (v == NULL || json_is_null(v))
		return 0;
	if (!json_is_object(v))
		return bad(c, name);
	*out = v;
	return 0;
}

static int get_bool(struct pctx *c, const json_t *obj, const char *name, bool *out)
{
	const json_t *v = json_object_get(obj, name);
	*out = false;
	if (v == NULL || json_is_null(v))
		return 0;
	if (!json_is_boolean(v))
		return bad(c, name);
	*out = json_is_true(v);
	return 0;
}

static int parse_header(struct pctx *c, const json_t *o, struct etcd_reply *r)
{
	json_t *h;
	int rc = get_obj(c, o, "header", &h);
	if (rc == 0 && h != NULL)
		rc = get_i64(c, h, "revision", &r->revision);
	return rc;
}

static int parse_kv(struct pctx *c, const json_t *o, struct etcd_kv *kv)
{
	if (!json_is_object(o))
		return bad(c, "kvs");
	int rc;
	if ((rc = get_i64(c, o, "create_revision", &kv->create_revision)) ||
	    (rc = get_i64(c, o, "mod_revision", &kv->mod_revision)) ||
	    (rc = get_i64(c, o, "lease", &kv->lease)))
		return rc;
	if (kv->create_revision < 0 || kv->mod_revision < 0)
		return bad(c, "negative revision");
	const json_t *v = json_object_get(o, "value");
	kv->value_len = 0;
	kv->value_long = false;
	if (v != NULL && !json_is_null(v)) {
		if (!json_is_string(v))
			return bad(c, "value");
		rc = opq__etcd_b64_decode(json_string_value(v), json_string_length(v), kv->value,
		                          sizeof(kv->value), &kv->value_len);
		if (rc == ERANGE) {
			kv->value_long = true;
			kv->value_len = 0;
		} else if (rc != 0) {
			return bad(c, "value is not base64");
		}
	}
	kv->present = true;
	return 0;
}

/* A range response: the first of its kvs, if any. */
static int parse_range(struct pctx *c, const json_t *o, struct etcd_kv *kv)
{
	const json_t *kvs = json_object_get(o, "kvs");
	if (kvs == NULL || json_is_null(kvs))
		return 0;
	if (!json_is_array(kvs))
		return bad(c, "kvs");
	if (json_array_size(kvs) == 0)
		return 0;
	return parse_kv(c, json_array_get(kvs, 0), kv);
}

static int parse_txn(struct pctx *c, const json_t *o, struct etcd_reply *r)
{
	int rc = get_bool(c, o, "succeeded", &r->succeeded);
	if (rc)
		return rc;
	const json_t *resp = json_object_get(o, "responses");
	if (resp == NULL || json_is_null(resp))
		return 0;
	if (!json_is_array(resp))
		return bad(c, "responses");
	for (size_t i = 0; i < json_array_size(resp); i++) {
		const json_t *x = json_array_get(resp, i);
		if (!json_is_object(x))
			return bad(c, "a response");
		json_t *range;
		if ((rc = get_obj(c, x, "response_range", &range)))
			return rc;
		if (range != NULL && !r->kv.present && (rc = parse_range(c, range, &r->kv)))
			return rc;
	}
	return 0;
}

/* {"error":"...","message":"...","code":N}, or in a stream {"error":{"grpc_code":N,...}}. */
static int parse_error(struct pctx *c, const json_t *o, struct etcd_reply *r)
{
	const json_t *e = json_object_get(o, "error");
	int64_t code = 0;
	const json_t *msg = NULL;
	int rc;
	if (json_is_object(e)) {
		rc = get_i64(c, e, "grpc_code", &code);
		msg = json_object_get(e, "message");
	} else {
		rc = get_i64(c, o, "code", &code);
		msg = json_object_get(o, "message");
		if (msg == NULL)
			msg = e;
	}
	if (rc)
		return rc;
	/* An error whose code is 0 (OK) or out of gRPC's range is still an error. */
	r->grpc_code = code > 0 && code < 64 ? (int)code : 2 /* Unknown */;
	if (json_is_string(msg))
		snprintf(r->message, sizeof(r->message), "%.*s",
		         (int)(json_string_length(msg) < 150 ? json_string_length(msg) : 150),
		         json_string_value(msg));
	else
		snprintf(r->message, sizeof(r->message), "error code %d", r->grpc_code);
	/* The words are a server's: no NUL or control bytes kept. */
	for (char *p = r->message; *p; p++)
		if ((unsigned char)*p < 0x20)
			*p = ' ';
	return 0;
}

int opq__etcd_parse(enum etcd_kind kind, const char *buf, size_t len, struct etcd_reply *r,
                    char *errbuf, size_t errlen)
{
	struct pctx c = {errbuf, errlen};
	memset(r, 0, sizeof(*r));
	if (buf == NULL || kind < 0 || kind >= ETCD_NKINDS)
		return bad(&c, "nothing");
	json_error_t jerr;
	/* A keepalive is a stream: one JSON object a line; the first is ours. */
	size_t flags = kind == ETCD_KEEPALIVE ? JSON_DISABLE_EOF_CHECK : 0;
	json_t *root = json_loadb(buf, len, flags | JSON_REJECT_DUPLICATES, &jerr);
	if (root == NULL) {
		opq__etcd_set_err(errbuf, errlen, "malformed reply: %.80s", jerr.text);
		return EPROTO;
	}
	int rc = 0;
	json_t *o = root;
	if (!json_is_object(o)) {
		rc = bad(&c, "not an object");
		goto out;
	}
	if (json_object_get(o, "error") != NULL) {
		rc = parse_error(&c, o, r);
		goto out;
	}
	if (kind == ETCD_KEEPALIVE) {
		json_t *res;
		if ((rc = get_obj(&c, o, "result", &res)))
			goto out;
		if (res == NULL) {
			rc = bad(&c, "no result");
			goto out;
		}
		o = res;
	}
	if ((rc = parse_header(&c, o, r)))
		goto out;
	switch (kind) {
	case ETCD_RANGE:
		rc = parse_range(&c, o, &r->kv);
		break;
	case ETCD_TXN:
		rc = parse_txn(&c, o, r);
		break;
	case ETCD_GRANT:
	case ETCD_KEEPALIVE:
		if ((rc = get_i64(&c, o, "ID", &r->id)) == 0)
			rc = get_i64(&c, o, "TTL", &r->ttl);
		break;
	default:
		break;
	}
out:
	json_decref(root);
	if (rc != 0)
		memset(r, 0, sizeof(*r));
	return rc;
}
