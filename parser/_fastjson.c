/*
 * The native half of reading captures: message bodies straight from the payload to JSON
 * text, and whole runs of capture records at a time, so that a capture of small messages
 * costs no Python work per message.
 *
 * render(msgtype: str, payload: bytes, reverse: bool) -> bytes | None
 *     One message body as JSON text, the same text (and the same accepted payloads) as
 *     parser/messages.py's typed classes give; tests/test_fastjson.py checks every type.
 *     Raises ValueError(reason, offset) for a payload that is not a valid serialization,
 *     with the reason and payload offset parser.wire.DecodeError carries when the typed
 *     codec (Reader) rejects it. None: a valid payload this code leaves to Python (an
 *     addrv2 TorV3 or I2P address, a version user agent that is not plain ASCII).
 *
 * check(msgtype: str, payload: bytes, /) -> bool
 *     Whether render() would accept the payload, without rendering it (a walk that
 *     writes nothing, an order of magnitude faster): True, or ValueError(reason, offset)
 *     as render() raises it; False where render() would leave it to Python.
 *
 * render_batch(out, used, limit, chunks, plan, run, pos, looks, opts, first)
 *         -> (run, pos, first, used)
 *     Writes the JSON of the selected records of a plan's runs, from run `run` (at pos or
 *     after, in its chunk) into the bytearray out from byte used on, as parser/render.py's
 *     render() and orjson would write each. It stops (returning the run and position to
 *     go on from; run == number of runs when done) once the output reaches limit bytes,
 *     or at a selected record it leaves to Python: an unknown type, a payload it rejects
 *     (Python words the problem) or one it does not render (see render). out is a buffer
 *     that only ever grows (a bytearray cannot shrink without giving its memory back): its
 *     first `used` bytes are the output, the rest is room. looks: (head, tail) per chunk,
 *     written around each record's fields; opts = (before, after, reverse, since, until,
 *     types): before goes between records, after after each.
 *
 * A plan comes from the capture layer's merge (capture/_capture.c's plan, or its Python
 * twin): runs of whole records of several files in time order. The records are walked,
 * and selected (since <= time <= until and, unless types is None, the type's name in the
 * tuple types), by capture/_records.h, which the capture module shares. Every length is
 * checked against what is left; data that is not whole records raises ValueError.
 *
 * This module only renders (and checks, for the dataset export): walking and merging
 * capture files is the capture layer's (msgcap.capture._capture).
 *
 * One file although long: it is one cohesive protocol, the P2P message serializations,
 * one walker per type over one reader and writer (Ctx), so that a transaction, say, is
 * walked in one place for render, check and render_batch alike.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#include <arpa/inet.h>
#include <sys/socket.h>
#define HAVE_INET_NTOP 1
#endif

#include "../capture/_records.h" /* the record format, and batches' chunks, plans, filters */

/* Why a payload was rejected; render() words it as Reader does. */
enum {
    E_NEED = 1,     /* "need {a} bytes, {n - at} left" */
    E_COUNT,        /* "count {a} needs at least {a * b} bytes, {left} left" */
    E_NONCANONICAL, /* "non-canonical CompactSize {a}" */
    E_TRAILING,     /* "{n - at} trailing bytes" */
    E_BIP155,       /* "unsupported BIP155 network {a} with address length {b}" */
    E_TEXT,         /* text */
    E_PYTHON,       /* valid as far as read, but rendered by Python */
    E_NOMEM,
};

typedef struct {
    const uint8_t *p;
    size_t n, pos;
    int reverse;
    PyObject *sink; /* a bytearray to render into (GIL held), or NULL: malloc'd out */
    int dry;        /* check only: nothing is written (out stays NULL, len 0) */
    /* out[0:len] is the output, out[len:cap] room */
    char *out;
    size_t len, cap;
    int err;   /* an E_ value once rendering failed */
    size_t at; /* where: the payload offset DecodeError reports */
    size_t left;
    uint64_t a, b;
    const char *text;
} Ctx;

static COLD int fail(Ctx *c, int err, size_t at, uint64_t a) {
    c->err = err;
    c->at = at;
    c->a = a;
    return -1;
}

static COLD int fail_text(Ctx *c, size_t at, const char *text) {
    c->text = text;
    return fail(c, E_TEXT, at, 0);
}

static COLD int to_python(Ctx *c) { return fail(c, E_PYTHON, c->pos, 0); }

/* Fixed-size fields from c->pos on do not all fit: fail at the first that does not, as
   Reader reading them one at a time does. */
static COLD int fail_fields(Ctx *c, const uint8_t *sizes, int count) {
    size_t at = c->pos;
    int i = 0;
    while (i < count - 1 && sizes[i] <= c->n - at) at += sizes[i++];
    return fail(c, E_NEED, at, sizes[i]);
}

static const uint8_t HEADER_FIELDS[] = {4, 32, 32, 4, 4, 4}; /* 80 bytes */
static const uint8_t OUTPOINT_FIELDS[] = {32, 4};             /* 36 bytes */

/* The two hex digits of each byte value, filled in at module init. */
static char HEX_PAIRS[256][2];

/* --- output ------------------------------------------------------------------------- */

static COLD int grow_to(Ctx *c, size_t want) {
    size_t cap = c->cap > 256 ? c->cap : 256;
    while (cap < want) {
        if (cap > PY_SSIZE_T_MAX / 2) return fail(c, E_NOMEM, c->pos, 0);
        cap *= 2;
    }
    if (c->sink) {
        if (PyByteArray_Resize(c->sink, (Py_ssize_t)cap) < 0) {
            PyErr_Clear();
            return fail(c, E_NOMEM, c->pos, 0);
        }
        c->out = PyByteArray_AS_STRING(c->sink);
    } else {
        char *o = realloc(c->out, cap);
        if (!o) return fail(c, E_NOMEM, c->pos, 0);
        c->out = o;
    }
    c->cap = cap;
    return 0;
}

static inline int grow(Ctx *c, size_t extra) {
    if (extra <= c->cap - c->len) return 0;
    if (extra > PY_SSIZE_T_MAX - c->len) return fail(c, E_NOMEM, c->pos, 0);
    return grow_to(c, c->len + extra);
}

static inline int put_n(Ctx *c, const char *s, size_t k) {
    if (c->dry) return 0;
    if (grow(c, k)) return -1;
    memcpy(c->out + c->len, s, k);
    c->len += k;
    return 0;
}

static inline int put(Ctx *c, const char *s) { return put_n(c, s, strlen(s)); }

/* The decimal digits of v, ending at end; returns where they start. */
static char *digits(char *end, uint64_t v) {
    static const char PAIRS[] = "00010203040506070809101112131415161718192021222324"
                                "25262728293031323334353637383940414243444546474849"
                                "50515253545556575859606162636465666768697071727374"
                                "75767778798081828384858687888990919293949596979899";
    while (v >= 100) {
        end -= 2;
        memcpy(end, PAIRS + 2 * (v % 100), 2);
        v /= 100;
    }
    if (v >= 10) {
        end -= 2;
        memcpy(end, PAIRS + 2 * v, 2);
    } else {
        *--end = (char)('0' + v);
    }
    return end;
}

static int put_u64(Ctx *c, uint64_t v) {
    if (c->dry) return 0;
    char tmp[24];
    char *start = digits(tmp + sizeof tmp, v);
    return put_n(c, start, (size_t)(tmp + sizeof tmp - start));
}

static int put_i64(Ctx *c, int64_t v) {
    if (v < 0) {
        if (put(c, "-")) return -1;
        return put_u64(c, (uint64_t)0 - (uint64_t)v);
    }
    return put_u64(c, (uint64_t)v);
}

/* A JSON string of the hex of n bytes at p, optionally byte-reversed. */
static int put_hex(Ctx *c, const uint8_t *p, size_t n, int reverse) {
    if (c->dry) return 0;
    if (n > (PY_SSIZE_T_MAX - 2) / 2) return fail(c, E_NOMEM, c->pos, 0);
    if (grow(c, 2 * n + 2)) return -1;
    char *o = c->out + c->len;
    *o++ = '"';
    if (reverse) {
        for (size_t i = n; i-- > 0; o += 2) memcpy(o, HEX_PAIRS[p[i]], 2);
    } else {
        for (size_t i = 0; i < n; i++, o += 2) memcpy(o, HEX_PAIRS[p[i]], 2);
    }
    *o = '"';
    c->len += 2 * n + 2;
    return 0;
}

/* "key":value pairs; the key literal includes its quotes, colon and any comma. */
static int key_u64(Ctx *c, const char *key, uint64_t v) { return put(c, key) || put_u64(c, v); }
static int key_i64(Ctx *c, const char *key, int64_t v) { return put(c, key) || put_i64(c, v); }

/* --- reading the payload ------------------------------------------------------------- */

/* c->pos <= c->n always: every advance is checked against what is left. */
static inline int need(Ctx *c, size_t k) {
    if (k > c->n - c->pos) return fail(c, E_NEED, c->pos, k);
    return 0;
}

static int rd_u8(Ctx *c, uint64_t *v) {
    if (need(c, 1)) return -1;
    *v = c->p[c->pos++];
    return 0;
}

static int rd_le(Ctx *c, int k, uint64_t *v) {
    if (need(c, (size_t)k)) return -1;
    *v = le(c->p + c->pos, k);
    c->pos += (size_t)k;
    return 0;
}

static int rd_u16be(Ctx *c, uint64_t *v) {
    if (need(c, 2)) return -1;
    *v = ((uint64_t)c->p[c->pos] << 8) | c->p[c->pos + 1];
    c->pos += 2;
    return 0;
}

static int rd_compact(Ctx *c, uint64_t *v) {
    uint64_t first;
    if (rd_u8(c, &first)) return -1;
    if (first < 0xfd) { *v = first; return 0; }
    int k = first == 0xfd ? 2 : first == 0xfe ? 4 : 8;
    uint64_t floor = first == 0xfd ? 0xfd : first == 0xfe ? 0x10000 : 0x100000000ULL;
    if (rd_le(c, k, v)) return -1;
    if (*v < floor) return fail(c, E_NONCANONICAL, c->pos - 1 - (size_t)k, *v);
    return 0;
}

/* A (canonical) count v just read does not fit: fail where it starts. */
static COLD int fail_count(Ctx *c, uint64_t v, uint64_t min_size) {
    size_t size = v < 0xfd ? 1 : v <= 0xffff ? 3 : v <= 0xffffffffULL ? 5 : 9;
    c->b = min_size;
    c->left = c->n - c->pos;
    return fail(c, E_COUNT, c->pos - size, v);
}

/* A count of items of at least min_size bytes each that the rest can hold. */
static int rd_count(Ctx *c, uint64_t min_size, uint64_t *v) {
    if (rd_compact(c, v)) return -1;
    if (*v > (c->n - c->pos) / min_size) return fail_count(c, *v, min_size);
    return 0;
}

/* --- pieces of bodies ------------------------------------------------------------------ */

static int hash_at(Ctx *c) {
    if (need(c, 32)) return -1;
    if (put_hex(c, c->p + c->pos, 32, c->reverse)) return -1;
    c->pos += 32;
    return 0;
}

static int key_hash(Ctx *c, const char *key) { return put(c, key) || hash_at(c); }

static int var_hex(Ctx *c) {
    uint64_t k;
    if (rd_count(c, 1, &k)) return -1;
    if (put_hex(c, c->p + c->pos, (size_t)k, 0)) return -1;
    c->pos += (size_t)k;
    return 0;
}

/* A JSON list of 32-byte hashes, count first (Reader.hashes). */
static int hash_list(Ctx *c) {
    uint64_t n;
    if (rd_count(c, 32, &n) || put(c, "[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        if ((i && put(c, ",")) || hash_at(c)) return -1;
    }
    return put(c, "]");
}

static int tx(Ctx *c) {
    uint64_t version, n_in, n_out = 0, flags = 0, v, lock;
    if (rd_le(c, 4, &version) || rd_count(c, 41, &n_in)) return -1;
    int read_outputs = n_in != 0;
    if (n_in == 0) {
        if (rd_u8(c, &flags)) return -1;
        if (flags) {
            if (rd_count(c, 41, &n_in)) return -1;
            read_outputs = 1;
        }
    }
    /* The lock time is last on the wire but first in the output: render the rest, then
       insert the head in front of it. */
    size_t start = c->len;
    if (put(c, ",\"vin\":[")) return -1;
    for (uint64_t i = 0; i < n_in; i++) {
        uint64_t k;
        if (36 > c->n - c->pos) return fail_fields(c, OUTPOINT_FIELDS, 2);
        const uint8_t *prev = c->p + c->pos;
        c->pos += 36;
        if (rd_count(c, 1, &k)) return -1;
        /* k bytes fit (rd_count): then nSequence */
        if (c->n - c->pos - (size_t)k < 4) return fail(c, E_NEED, c->pos + (size_t)k, 4);
        if (put(c, i ? ",{\"nSequence\":" : "{\"nSequence\":")) return -1;
        if (put_u64(c, le(c->p + c->pos + k, 4)) || put(c, ",\"prevout\":{\"hash\":")) return -1;
        if (put_hex(c, prev, 32, c->reverse) || put(c, ",\"n\":") || put_u64(c, le(prev + 32, 4)))
            return -1;
        if (put(c, "},\"scriptSig\":") || put_hex(c, c->p + c->pos, (size_t)k, 0) || put(c, "}"))
            return -1;
        c->pos += (size_t)k + 4;
    }
    if (put(c, "],\"vout\":[")) return -1;
    if (read_outputs) {
        if (rd_count(c, 9, &n_out)) return -1;
        for (uint64_t i = 0; i < n_out; i++) {
            if (rd_le(c, 8, &v)) return -1;
            if (put(c, i ? ",{\"nValue\":" : "{\"nValue\":") || put_i64(c, (int64_t)v)) return -1;
            if (put(c, ",\"scriptPubKey\":") || var_hex(c) || put(c, "}")) return -1;
        }
    }
    if (put(c, "],\"wit\":{\"vtxinwit\":[")) return -1;
    if (flags) {
        for (uint64_t i = 0; i < n_in; i++) {
            uint64_t items;
            if (rd_count(c, 1, &items)) return -1;
            if (put(c, i ? ",{\"scriptWitness\":{\"stack\":[" : "{\"scriptWitness\":{\"stack\":["))
                return -1;
            for (uint64_t j = 0; j < items; j++) {
                if ((j && put(c, ",")) || var_hex(c)) return -1;
            }
            if (put(c, "]}}")) return -1;
        }
    }
    if (put(c, "]}}") || rd_le(c, 4, &lock)) return -1;
    if (c->dry) return 0;
    size_t end = c->len;
    if (key_u64(c, "{\"nLockTime\":", lock) || key_u64(c, ",\"version\":", version)) return -1;
    /* rotate the head, just written at end, to start */
    size_t w = c->len - end;
    char head[64];
    memcpy(head, c->out + end, w);
    memmove(c->out + start + w, c->out + start, end - start);
    memcpy(c->out + start, head, w);
    return 0;
}

static int txs(Ctx *c) {
    uint64_t n;
    if (rd_count(c, 10, &n) || put(c, "[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        if ((i && put(c, ",")) || tx(c)) return -1;
    }
    return put(c, "]");
}

static int header(Ctx *c) {
    if (80 > c->n - c->pos) return fail_fields(c, HEADER_FIELDS, 6);
    const uint8_t *h = c->p + c->pos;
    if (put(c, "{\"hashMerkleRoot\":") || put_hex(c, h + 36, 32, c->reverse)) return -1;
    if (put(c, ",\"hashPrevBlock\":") || put_hex(c, h + 4, 32, c->reverse)) return -1;
    if (key_u64(c, ",\"nBits\":", le(h + 72, 4)) || key_u64(c, ",\"nNonce\":", le(h + 76, 4)))
        return -1;
    if (key_u64(c, ",\"nTime\":", le(h + 68, 4))) return -1;
    if (key_i64(c, ",\"nVersion\":", (int32_t)(uint32_t)le(h, 4)) || put(c, "}")) return -1;
    c->pos += 80;
    return 0;
}

static int inventory(Ctx *c, const char *key) {
    uint64_t n;
    if (rd_count(c, 36, &n) || put(c, key)) return -1;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t type = le(c->p + c->pos, 4);
        c->pos += 4;
        if (put(c, i ? ",{\"hash\":" : "{\"hash\":") || hash_at(c)) return -1;
        if (key_u64(c, ",\"type\":", type) || put(c, "}")) return -1;
    }
    return put(c, "]}");
}

/* The dotted IPv4 address of 4 bytes at p, as a JSON string. */
static int put_ipv4(Ctx *c, const uint8_t *p) {
    char s[24];
    int w = snprintf(s, sizeof s, "\"%u.%u.%u.%u\"", p[0], p[1], p[2], p[3]);
    return put_n(c, s, (size_t)w);
}

/* The JSON of an address read as Core's test framework reads addrv1 (AddressV1.json):
   the IPv4 address in the last 4 of the 16 bytes, net 1. */
static int address_v1(Ctx *c, int with_time) {
    uint64_t time = 0, services, port;
    if (with_time && rd_le(c, 4, &time)) return -1;
    if (rd_le(c, 8, &services) || need(c, 16)) return -1;
    const uint8_t *ip = c->p + c->pos;
    c->pos += 16;
    if (rd_u16be(c, &port)) return -1;
    if (put(c, "{\"net\":1,\"ip\":") || put_ipv4(c, ip + 12)) return -1;
    if (key_u64(c, ",\"nServices\":", services) || key_u64(c, ",\"port\":", port)) return -1;
    return key_u64(c, ",\"time\":", time) || put(c, "}");
}

/* A BIP155 address (AddressV2.read and .json); TorV3 and I2P names are left to Python. */
static int address_v2(Ctx *c) {
    uint64_t time, services, net, length, port;
    if (rd_le(c, 4, &time) || rd_compact(c, &services)) return -1;
    size_t start = c->pos;
    if (rd_u8(c, &net) || rd_compact(c, &length)) return -1;
    int want = net == 1 ? 4 : net == 2 ? 16 : net == 4 ? 32 : net == 5 ? 32 : net == 6 ? 16 : -1;
    if (want < 0 || length != (uint64_t)want) {
        c->b = length;
        return fail(c, E_BIP155, start, net);
    }
    if (need(c, (size_t)length)) return -1;
    const uint8_t *addr = c->p + c->pos;
    c->pos += (size_t)length;
    if (rd_u16be(c, &port)) return -1;
    if (key_u64(c, "{\"net\":", net) || put(c, ",\"ip\":")) return -1;
    if (net == 1) {
        if (put_ipv4(c, addr)) return -1;
    } else if (net == 2 || net == 6) {
#ifdef HAVE_INET_NTOP
        char s[64];
        /* socket.inet_ntop, which Python's typed path calls, is this libc function. */
        if (!inet_ntop(AF_INET6, addr, s, sizeof s)) return to_python(c);
        if (put(c, "\"") || put(c, s) || put(c, "\"")) return -1;
#else
        return to_python(c);
#endif
    } else {
        return to_python(c); /* TorV3 (needs SHA3) and I2P names */
    }
    if (key_u64(c, ",\"nServices\":", services) || key_u64(c, ",\"port\":", port)) return -1;
    return key_u64(c, ",\"time\":", time) || put(c, "}");
}

/* --- message bodies, one per type --------------------------------------------------- */

static int b_empty(Ctx *c) { return put(c, "{}"); }

static int b_tx(Ctx *c) { return put(c, "{\"tx\":") || tx(c) || put(c, "}"); }

static int b_block(Ctx *c) {
    if (80 > c->n) return fail_fields(c, HEADER_FIELDS, 6);
    c->pos = 80; /* Core's parser prints only CBlock's own slot, vtx */
    return put(c, "{\"block\":{\"vtx\":") || txs(c) || put(c, "}}");
}

static int b_headers(Ctx *c) {
    uint64_t n, zero;
    if (rd_count(c, 81, &n) || put(c, "{\"headers\":[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        if ((i && put(c, ",")) || header(c)) return -1;
        size_t at = c->pos;
        if (rd_compact(c, &zero)) return -1;
        if (zero) return fail_text(c, at, "header with a non-zero transaction count");
    }
    return put(c, "]}");
}

static int b_cmpctblock(Ctx *c) {
    uint64_t nonce, n;
    if (put(c, "{\"header_and_shortids\":{\"header\":") || header(c)) return -1;
    if (rd_le(c, 8, &nonce) || key_u64(c, ",\"nonce\":", nonce)) return -1;
    if (rd_count(c, 6, &n)) return -1;
    size_t ids_at = c->pos;
    uint64_t n_ids = n;
    c->pos += 6 * n;
    if (rd_count(c, 11, &n) || put(c, ",\"prefilled_txn\":[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t index;
        if ((i && put(c, ",")) || rd_compact(c, &index)) return -1;
        if (key_u64(c, "{\"index\":", index) || put(c, ",\"tx\":") || tx(c) || put(c, "}"))
            return -1;
    }
    if (key_u64(c, "],\"prefilled_txn_length\":", n) || put(c, ",\"shortids\":[")) return -1;
    for (uint64_t i = 0; i < n_ids; i++) {
        if ((i && put(c, ",")) || put_u64(c, le(c->p + ids_at + 6 * i, 6))) return -1;
    }
    return key_u64(c, "],\"shortids_length\":", n_ids) || put(c, "}}");
}

static int b_blocktxn(Ctx *c) {
    if (key_hash(c, "{\"block_transactions\":{\"blockhash\":")) return -1;
    return put(c, ",\"transactions\":") || txs(c) || put(c, "}}");
}

static int b_inv(Ctx *c) { return inventory(c, "{\"inv\":["); }
static int b_notfound(Ctx *c) { return inventory(c, "{\"vec\":["); }

static int b_version(Ctx *c) {
    uint64_t version, services, timestamp, nonce, ua_len, height, relay = 0;
    if (rd_le(c, 4, &version) || rd_le(c, 8, &services) || rd_le(c, 8, &timestamp)) return -1;
    /* Both addresses are rendered into the output first, then moved into place. */
    size_t addr_to = c->len;
    if (address_v1(c, 0)) return -1;
    size_t addr_from = c->len;
    if (address_v1(c, 0)) return -1;
    size_t addrs_end = c->len;
    if (rd_le(c, 8, &nonce) || rd_count(c, 1, &ua_len)) return -1;
    const uint8_t *ua = c->p + c->pos;
    for (uint64_t i = 0; i < ua_len; i++) {
        /* only text JSON and UTF-8 leave as is; the rest (escapes, UTF-8 checks) is Python's */
        if (ua[i] < 0x20 || ua[i] > 0x7e || ua[i] == '"' || ua[i] == '\\') return to_python(c);
    }
    c->pos += (size_t)ua_len;
    if (rd_le(c, 4, &height)) return -1;
    if (c->pos < c->n && rd_u8(c, &relay)) return -1;
    if (c->dry) return 0;
    /* {"addrFrom":…,"addrTo":…,"nNonce":…,"relay":…,"nServices":…,"nStartingHeight":…,
       "nTime":…,"nVersion":…,"strSubVer":…}: copy the addresses out, then write it all. */
    size_t to_len = addr_from - addr_to, from_len = addrs_end - addr_from;
    char *addrs = malloc(addrs_end - addr_to);
    if (!addrs) return fail(c, E_NOMEM, c->pos, 0);
    memcpy(addrs, c->out + addr_to, addrs_end - addr_to);
    c->len = addr_to;
    int rc = put(c, "{\"addrFrom\":") || put_n(c, addrs + to_len, from_len) ||
             put(c, ",\"addrTo\":") || put_n(c, addrs, to_len);
    free(addrs);
    if (rc) return -1;
    if (key_u64(c, ",\"nNonce\":", nonce) || key_u64(c, ",\"relay\":", relay)) return -1;
    if (key_u64(c, ",\"nServices\":", services)) return -1;
    if (key_i64(c, ",\"nStartingHeight\":", (int32_t)(uint32_t)height)) return -1;
    if (key_i64(c, ",\"nTime\":", (int64_t)timestamp)) return -1;
    if (key_i64(c, ",\"nVersion\":", (int32_t)(uint32_t)version)) return -1;
    return put(c, ",\"strSubVer\":\"") || put_n(c, (const char *)ua, (size_t)ua_len) || put(c, "\"}");
}

static int b_addr(Ctx *c) {
    uint64_t n;
    if (rd_count(c, 30, &n) || put(c, "{\"addrs\":[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        if ((i && put(c, ",")) || address_v1(c, 1)) return -1;
    }
    return put(c, "]}");
}

static int b_addrv2(Ctx *c) {
    uint64_t n;
    if (rd_count(c, 9, &n) || put(c, "{\"addrs\":[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        if ((i && put(c, ",")) || address_v2(c)) return -1;
    }
    return put(c, "]}");
}

/* getblocks and getheaders: nVersion, vHave, hashstop on the wire. */
static int locator(Ctx *c, int stop_first) {
    uint64_t version;
    if (rd_le(c, 4, &version)) return -1;
    size_t hashes_at = c->pos;
    uint64_t n;
    if (rd_count(c, 32, &n)) return -1;
    c->pos += 32 * (size_t)n;
    size_t stop_at = c->pos;
    if (need(c, 32)) return -1;
    size_t end = c->pos + 32;
    if (stop_first) {
        if (key_hash(c, "{\"hashstop\":") || put(c, ",\"locator\":")) return -1;
    } else if (put(c, "{\"locator\":")) {
        return -1;
    }
    c->pos = hashes_at;
    if (key_i64(c, "{\"nVersion\":", (int32_t)(uint32_t)version) || put(c, ",\"vHave\":") ||
        hash_list(c) || put(c, "}"))
        return -1;
    if (!stop_first) {
        c->pos = stop_at;
        if (key_hash(c, ",\"hashstop\":")) return -1;
    }
    c->pos = end;
    return put(c, "}");
}

static int b_getblocks(Ctx *c) { return locator(c, 0); }
static int b_getheaders(Ctx *c) { return locator(c, 1); }

static int b_merkleblock(Ctx *c) {
    uint64_t total, n;
    if (put(c, "{\"merkleblock\":{\"header\":") || header(c)) return -1;
    if (rd_le(c, 4, &total) || key_u64(c, ",\"txn\":{\"nTransactions\":", total)) return -1;
    size_t hashes_at = c->pos;
    if (rd_count(c, 32, &n)) return -1;
    c->pos += 32 * (size_t)n;
    uint64_t k;
    if (rd_count(c, 1, &k) || put(c, ",\"vBits\":[")) return -1;
    for (uint64_t i = 0; i < 8 * k; i++) {
        int bit = c->p[c->pos + i / 8] >> (i % 8) & 1;
        if ((i && put(c, ",")) || put(c, bit ? "true" : "false")) return -1;
    }
    size_t end = c->pos + (size_t)k;
    c->pos = hashes_at;
    if (put(c, "],\"vHash\":") || hash_list(c)) return -1;
    c->pos = end;
    return put(c, "}}}");
}

static int b_sendcmpct(Ctx *c) {
    uint64_t announce, version;
    if (rd_u8(c, &announce) || rd_le(c, 8, &version)) return -1;
    return put(c, announce ? "{\"announce\":true" : "{\"announce\":false") ||
           key_u64(c, ",\"version\":", version) || put(c, "}");
}

static int b_getblocktxn(Ctx *c) {
    uint64_t n, index;
    if (key_hash(c, "{\"block_txn_request\":{\"blockhash\":")) return -1;
    if (rd_count(c, 1, &n) || put(c, ",\"indexes\":[")) return -1;
    for (uint64_t i = 0; i < n; i++) {
        if ((i && put(c, ",")) || rd_compact(c, &index) || put_u64(c, index)) return -1;
    }
    return put(c, "]}}");
}

/* {"<key>":<u64>} */
static int u64_body(Ctx *c, const char *key) {
    uint64_t v;
    return rd_le(c, 8, &v) || key_u64(c, key, v) || put(c, "}");
}

static int b_ping(Ctx *c) { return u64_body(c, "{\"nonce\":"); }
static int b_feefilter(Ctx *c) { return u64_body(c, "{\"feerate\":"); }

static int b_sendtxrcncl(Ctx *c) {
    uint64_t version, salt;
    if (rd_le(c, 4, &version) || rd_le(c, 8, &salt)) return -1;
    return key_u64(c, "{\"version\":", version) || key_u64(c, ",\"salt\":", salt) || put(c, "}");
}

static int b_filterload(Ctx *c) {
    uint64_t funcs, tweak, flags;
    if (put(c, "{\"data\":") || var_hex(c)) return -1;
    if (rd_le(c, 4, &funcs) || rd_le(c, 4, &tweak) || rd_u8(c, &flags)) return -1;
    return key_u64(c, ",\"nHashFuncs\":", funcs) || key_u64(c, ",\"nTweak\":", tweak) ||
           key_u64(c, ",\"nFlags\":", flags) || put(c, "}");
}

static int b_filteradd(Ctx *c) { return put(c, "{\"data\":") || var_hex(c) || put(c, "}"); }

/* getcfilters and getcfheaders */
static int b_getcf(Ctx *c) {
    uint64_t type, height;
    if (rd_u8(c, &type) || rd_le(c, 4, &height)) return -1;
    if (key_u64(c, "{\"filter_type\":", type) || key_u64(c, ",\"start_height\":", height))
        return -1;
    return key_hash(c, ",\"stop_hash\":") || put(c, "}");
}

static int b_cfilter(Ctx *c) {
    uint64_t type;
    if (rd_u8(c, &type) || key_u64(c, "{\"filter_type\":", type)) return -1;
    if (key_hash(c, ",\"block_hash\":") || put(c, ",\"filter_data\":") || var_hex(c)) return -1;
    return put(c, "}");
}

static int b_cfheaders(Ctx *c) {
    uint64_t type;
    if (rd_u8(c, &type) || key_u64(c, "{\"filter_type\":", type)) return -1;
    if (key_hash(c, ",\"stop_hash\":") || key_hash(c, ",\"prev_header\":")) return -1;
    return put(c, ",\"hashes\":") || hash_list(c) || put(c, "}");
}

static int b_getcfcheckpt(Ctx *c) {
    uint64_t type;
    if (rd_u8(c, &type) || key_u64(c, "{\"filter_type\":", type)) return -1;
    return key_hash(c, ",\"stop_hash\":") || put(c, "}");
}

static int b_cfcheckpt(Ctx *c) {
    uint64_t type;
    if (rd_u8(c, &type) || key_u64(c, "{\"filter_type\":", type)) return -1;
    if (key_hash(c, ",\"stop_hash\":")) return -1;
    return put(c, ",\"headers\":") || hash_list(c) || put(c, "}");
}

typedef struct {
    const char *name;
    int (*body)(Ctx *);
} Kind;

/* Every type of parser/messages.py's MESSAGES, the most frequent first. */
static const Kind KINDS[] = {
    {"inv", b_inv},
    {"tx", b_tx},
    {"getdata", b_inv},
    {"ping", b_ping},
    {"pong", b_ping},
    {"cmpctblock", b_cmpctblock},
    {"headers", b_headers},
    {"block", b_block},
    {"getheaders", b_getheaders},
    {"addrv2", b_addrv2},
    {"addr", b_addr},
    {"feefilter", b_feefilter},
    {"notfound", b_notfound},
    {"getblocktxn", b_getblocktxn},
    {"blocktxn", b_blocktxn},
    {"cfilter", b_cfilter},
    {"getcfilters", b_getcf},
    {"cfheaders", b_cfheaders},
    {"getcfheaders", b_getcf},
    {"cfcheckpt", b_cfcheckpt},
    {"getcfcheckpt", b_getcfcheckpt},
    {"version", b_version},
    {"verack", b_empty},
    {"sendcmpct", b_sendcmpct},
    {"sendheaders", b_empty},
    {"wtxidrelay", b_empty},
    {"sendaddrv2", b_empty},
    {"sendtxrcncl", b_sendtxrcncl},
    {"getaddr", b_empty},
    {"getblocks", b_getblocks},
    {"mempool", b_empty},
    {"merkleblock", b_merkleblock},
    {"filterload", b_filterload},
    {"filteradd", b_filteradd},
    {"filterclear", b_empty},
};

static const Kind *kind_of(const char *name, size_t len) {
    for (size_t i = 0; i < sizeof KINDS / sizeof KINDS[0]; i++) {
        if (!strncmp(KINDS[i].name, name, len) && KINDS[i].name[len] == '\0') return &KINDS[i];
    }
    return NULL;
}

/* The body of one payload (c->p, c->n), all of it. */
static int body(Ctx *c, const Kind *k) {
    if (k->body(c)) return -1;
    if (c->pos != c->n) return fail(c, E_TRAILING, c->pos, 0);
    return 0;
}

/* Raise ValueError(reason, offset), the reason in Reader's words. */
static COLD void raise_error(const Ctx *c) {
    PyObject *reason = NULL;
    switch (c->err) {
    case E_NOMEM:
        PyErr_NoMemory();
        return;
    case E_NEED:
        reason = PyUnicode_FromFormat("need %llu bytes, %zu left", (unsigned long long)c->a,
                                      c->n - c->at);
        break;
    case E_COUNT: {
        /* n * min_size can pass 2**64: multiply as Python ints */
        PyObject *n = PyLong_FromUnsignedLongLong(c->a);
        PyObject *size = PyLong_FromUnsignedLongLong(c->b);
        PyObject *total = n && size ? PyNumber_Multiply(n, size) : NULL;
        if (total)
            reason = PyUnicode_FromFormat("count %S needs at least %S bytes, %zu left", n,
                                          total, c->left);
        Py_XDECREF(n);
        Py_XDECREF(size);
        Py_XDECREF(total);
        break;
    }
    case E_NONCANONICAL:
        reason = PyUnicode_FromFormat("non-canonical CompactSize %llu", (unsigned long long)c->a);
        break;
    case E_TRAILING:
        reason = PyUnicode_FromFormat("%zu trailing bytes", c->n - c->at);
        break;
    case E_BIP155:
        reason = PyUnicode_FromFormat("unsupported BIP155 network %llu with address length %llu",
                                      (unsigned long long)c->a, (unsigned long long)c->b);
        break;
    case E_TEXT:
        reason = PyUnicode_FromString(c->text);
        break;
    default:
        reason = PyUnicode_FromString("cannot render");
    }
    if (!reason) return;
    PyObject *args = Py_BuildValue("(Nn)", reason, (Py_ssize_t)c->at);
    if (!args) return;
    PyErr_SetObject(PyExc_ValueError, args);
    Py_DECREF(args);
}

/* Walk payload as msgtype into c (which says dry or reverse), without the GIL, and
   release payload: 0 when it decoded, 1 where it is left to Python, -1 with an
   exception set (no native renderer, or the payload does not decode). c->out is the
   caller's to free. */
static int render_walk(const char *msgtype, Py_buffer *payload, Ctx *c) {
    const Kind *k = kind_of(msgtype, strlen(msgtype));
    if (!k) {
        PyBuffer_Release(payload);
        PyErr_Format(PyExc_KeyError, "no native renderer for %s", msgtype);
        return -1;
    }
    c->p = payload->buf;
    c->n = (size_t)payload->len;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = body(c, k);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(payload);
    if (!rc) return 0;
    if (c->err == E_PYTHON) return 1;
    raise_error(c);
    return -1;
}

static PyObject *render(PyObject *self, PyObject *args) {
    const char *msgtype;
    Py_buffer payload;
    int reverse;
    if (!PyArg_ParseTuple(args, "sy*p", &msgtype, &payload, &reverse)) return NULL;
    Ctx c = {.reverse = reverse};
    int rc = render_walk(msgtype, &payload, &c);
    PyObject *result = rc < 0   ? NULL
                       : rc > 0 ? Py_NewRef(Py_None)
                                : PyBytes_FromStringAndSize(c.out, (Py_ssize_t)c.len);
    free(c.out);
    return result;
}

static PyObject *check(PyObject *self, PyObject *args) {
    const char *msgtype;
    Py_buffer payload;
    if (!PyArg_ParseTuple(args, "sy*", &msgtype, &payload)) return NULL;
    Ctx c = {.dry = 1};
    int rc = render_walk(msgtype, &payload, &c);
    free(c.out); /* NULL: nothing was written */
    return rc < 0 ? NULL : Py_NewRef(rc > 0 ? Py_False : Py_True);
}

/* --- whole records: a batch's plan of runs (capture/_records.h walks them) ------------- */

/* What goes around each record's JSON. */
typedef struct {
    const char *head, *tail, *before, *after;
    Py_ssize_t head_len, tail_len, before_len, after_len;
} Look;

enum { RUN_DONE, RUN_PYTHON, RUN_FULL, RUN_BAD, RUN_NOMEM };

/* Render the selected records of p[pos:end] into c until its output reaches limit; *at
   is where it stopped: end, the record left to Python (RUN_PYTHON) or that is not whole
   (RUN_BAD), or the next record (RUN_FULL). */
static int render_run(Ctx *c, const uint8_t *p, size_t pos, size_t end, const Look *look,
                      const Filter *f, size_t limit, int *first, size_t *at) {
    Rec r;
    for (; pos < end; pos += RECORD_HEADER_SIZE + r.size) {
        *at = pos;
        if (c->len >= limit) return RUN_FULL;
        if (!record_at(p, end, pos, &r)) return RUN_BAD;
        if (!selected(f, &r)) continue;
        const Kind *k = kind_of((const char *)r.name, r.name_len);
        if (!k) return RUN_PYTHON; /* an unknown type */
        size_t mark = c->len;
        c->p = r.payload;
        c->n = r.size;
        c->pos = 0;
        c->err = 0;
        int rc = (!*first && put_n(c, look->before, (size_t)look->before_len)) ||
                 put_n(c, look->head, (size_t)look->head_len) || put_u64(c, r.time) ||
                 key_u64(c, ",\"size\":", r.size) || put(c, ",\"msgtype\":\"") ||
                 put(c, k->name) || put(c, "\"");
        size_t body_at = c->len;
        rc = rc || put(c, ",\"body\":") || body(c, k);
        if (!rc && r.size == 0) c->len = body_at; /* Core prints no body for an empty payload */
        rc = rc || put_n(c, look->tail, (size_t)look->tail_len) ||
             put_n(c, look->after, (size_t)look->after_len);
        if (rc) {
            c->len = mark;
            /* rejected, or rendered by Python: Python words it */
            return c->err == E_NOMEM ? RUN_NOMEM : RUN_PYTHON;
        }
        *first = 0;
    }
    *at = end;
    return RUN_DONE;
}

static PyObject *render_batch(PyObject *self, PyObject *args) {
    PyObject *out, *chunk_list, *looks, *types;
    Py_buffer plan;
    Py_ssize_t used, limit, run, pos;
    Look look;
    int reverse, first;
    Filter f;
    if (!PyArg_ParseTuple(args, "O!nnO!y*nnO!(y#y#pKKO)p", &PyByteArray_Type, &out, &used,
                          &limit, &PyList_Type, &chunk_list, &plan, &run, &pos, &PyList_Type,
                          &looks, &look.before, &look.before_len, &look.after, &look.after_len,
                          &reverse, &f.since, &f.until, &types, &first))
        return NULL;
    Chunks c = {0, NULL};
    PyObject *result = NULL;
    Py_ssize_t n_runs;
    const PlanRun *runs;
    if (parse_filter(types, &f) < 0 || get_chunks(chunk_list, &c) < 0) goto done;
    if (!(runs = plan_runs(&plan, &c, &n_runs))) goto done;
    if (PyList_GET_SIZE(looks) != c.k || used < 0 || used > PyByteArray_GET_SIZE(out) ||
        limit < 0 || run < 0 || run > n_runs || pos < 0 ||
        (run < n_runs && pos > runs[run].end)) {
        PyErr_SetString(PyExc_ValueError, "render_batch: arguments out of range");
        goto done;
    }
    Ctx ctx = {.reverse = reverse, .sink = out, .out = PyByteArray_AS_STRING(out),
               .len = (size_t)used, .cap = (size_t)PyByteArray_GET_SIZE(out)};
    size_t at = 0;
    int status = RUN_DONE;
    for (; run < n_runs; run++) {
        const PlanRun *r = &runs[run];
        PyObject *head_tail = PyList_GET_ITEM(looks, r->k);
        if (!PyArg_ParseTuple(head_tail, "y#y#", &look.head, &look.head_len, &look.tail,
                              &look.tail_len))
            goto done;
        size_t from = pos > r->start ? (size_t)pos : (size_t)r->start;
        pos = 0;
        status = render_run(&ctx, c.bufs[r->k].buf, from, (size_t)r->end, &look, &f,
                            (size_t)limit, &first, &at);
        if (status != RUN_DONE) break;
    }
    if (status == RUN_NOMEM) {
        PyErr_NoMemory();
    } else if (status == RUN_BAD) {
        not_whole((Py_ssize_t)at);
    } else {
        result = Py_BuildValue("(nnOn)", run, status == RUN_DONE ? (Py_ssize_t)0 : (Py_ssize_t)at,
                               first ? Py_True : Py_False, (Py_ssize_t)ctx.len);
    }
done:
    release_chunks(&c);
    PyBuffer_Release(&plan);
    return result;
}

static PyMethodDef methods[] = {
    {"render", render, METH_VARARGS, "render(msgtype, payload, reverse) -> JSON bytes or None"},
    {"check", check, METH_VARARGS, "check(msgtype, payload) -> whether render() accepts it"},
    {"render_batch", render_batch, METH_VARARGS,
     "render_batch(out, used, limit, chunks, plan, run, pos, looks, opts, first)"
     " -> (run, pos, first, used)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "msgcap.parser._fastjson", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastjson(void) {
    static const char HEX[] = "0123456789abcdef";
    for (int b = 0; b < 256; b++) {
        HEX_PAIRS[b][0] = HEX[b >> 4];
        HEX_PAIRS[b][1] = HEX[b & 15];
    }
    return PyModule_Create(&module);
}
