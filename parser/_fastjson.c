/*
 * Native twin of parser/fastjson.py: renders the JSON body of the bulk message types
 * (tx, block, headers, cmpctblock, blocktxn, inv, getdata, notfound) straight from the
 * payload into JSON text. Same output and same accepted payloads as the Python code;
 * tests/test_fastjson.py checks all three renderers (typed, Python, native) agree.
 *
 * render(msgtype: str, payload: bytes, reverse: bool) -> bytes
 * raises ValueError(reason, offset) for a payload that is not a valid serialization,
 * with the reason and payload offset parser.wire.DecodeError carries when the typed codec
 * (Reader) rejects it. The checks on the way stay as coarse as before (80 bytes for a
 * header, 36 for an outpoint); only once one fails is Reader's field worked out.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define COLD __attribute__((cold, noinline))
#else
#define COLD
#endif

/* Why a payload was rejected; render() words it as Reader does. */
enum {
    E_NEED = 1,     /* "need {a} bytes, {n - at} left" */
    E_COUNT,        /* "count {a} needs at least {a * b} bytes, {left} left" */
    E_NONCANONICAL, /* "non-canonical CompactSize {a}" */
    E_TRAILING,     /* "{n - at} trailing bytes" */
    E_TEXT,         /* text */
    E_NOMEM,
};

typedef struct {
    const uint8_t *p;
    size_t n, pos;
    int reverse;
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

static const char HEX[] = "0123456789abcdef";

static int grow(Ctx *c, size_t extra) {
    if (c->len + extra <= c->cap) return 0;
    size_t cap = c->cap ? c->cap : 256;
    while (cap < c->len + extra) cap *= 2;
    char *o = realloc(c->out, cap);
    if (!o) return fail(c, E_NOMEM, c->pos, 0);
    c->out = o;
    c->cap = cap;
    return 0;
}

static int put(Ctx *c, const char *s) {
    size_t k = strlen(s);
    if (grow(c, k)) return -1;
    memcpy(c->out + c->len, s, k);
    c->len += k;
    return 0;
}

static int put_u64(Ctx *c, uint64_t v) {
    char tmp[24];
    int i = 24;
    do { tmp[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    if (grow(c, 24 - i)) return -1;
    memcpy(c->out + c->len, tmp + i, 24 - i);
    c->len += 24 - i;
    return 0;
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
    if (grow(c, 2 * n + 2)) return -1;
    char *o = c->out + c->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        uint8_t b = reverse ? p[n - 1 - i] : p[i];
        *o++ = HEX[b >> 4];
        *o++ = HEX[b & 15];
    }
    *o++ = '"';
    c->len += 2 * n + 2;
    return 0;
}

/* c->pos <= c->n always: every advance is checked against what is left. */
static int need(Ctx *c, size_t k) {
    if (k > c->n - c->pos) return fail(c, E_NEED, c->pos, k);
    return 0;
}

static int rd_u8(Ctx *c, uint64_t *v) {
    if (need(c, 1)) return -1;
    *v = c->p[c->pos++];
    return 0;
}

static uint64_t le(const uint8_t *p, int k) {
    uint64_t v = 0;
    for (int i = k - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int rd_le(Ctx *c, int k, uint64_t *v) {
    if (need(c, k)) return -1;
    *v = le(c->p + c->pos, k);
    c->pos += k;
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

static int hash_at(Ctx *c) {
    if (need(c, 32)) return -1;
    if (put_hex(c, c->p + c->pos, 32, c->reverse)) return -1;
    c->pos += 32;
    return 0;
}

static int var_hex(Ctx *c) {
    uint64_t k;
    if (rd_count(c, 1, &k)) return -1;
    if (put_hex(c, c->p + c->pos, (size_t)k, 0)) return -1;
    c->pos += (size_t)k;
    return 0;
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
    char head[64];
    int w = snprintf(head, sizeof head, "{\"nLockTime\":%llu,\"version\":%llu",
                     (unsigned long long)lock, (unsigned long long)version);
    if (grow(c, (size_t)w)) return -1;
    memmove(c->out + start + w, c->out + start, c->len - start);
    memcpy(c->out + start, head, (size_t)w);
    c->len += (size_t)w;
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
    if (put(c, ",\"nBits\":") || put_u64(c, le(h + 72, 4))) return -1;
    if (put(c, ",\"nNonce\":") || put_u64(c, le(h + 76, 4))) return -1;
    if (put(c, ",\"nTime\":") || put_u64(c, le(h + 68, 4))) return -1;
    if (put(c, ",\"nVersion\":") || put_i64(c, (int32_t)(uint32_t)le(h, 4)) || put(c, "}"))
        return -1;
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
        if (put(c, ",\"type\":") || put_u64(c, type) || put(c, "}")) return -1;
    }
    return put(c, "]}");
}

static int body(Ctx *c, const char *t) {
    if (!strcmp(t, "tx")) {
        return put(c, "{\"tx\":") || tx(c) || put(c, "}");
    }
    if (!strcmp(t, "block")) {
        if (80 > c->n) return fail_fields(c, HEADER_FIELDS, 6);
        c->pos = 80;
        return put(c, "{\"block\":{\"vtx\":") || txs(c) || put(c, "}}");
    }
    if (!strcmp(t, "headers")) {
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
    if (!strcmp(t, "cmpctblock")) {
        uint64_t nonce, n;
        if (put(c, "{\"header_and_shortids\":{\"header\":") || header(c)) return -1;
        if (rd_le(c, 8, &nonce) || put(c, ",\"nonce\":") || put_u64(c, nonce)) return -1;
        if (rd_count(c, 6, &n)) return -1;
        size_t ids_at = c->pos;
        uint64_t n_ids = n;
        c->pos += 6 * n;
        if (rd_count(c, 11, &n) || put(c, ",\"prefilled_txn\":[")) return -1;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t index;
            if ((i && put(c, ",")) || rd_compact(c, &index)) return -1;
            if (put(c, "{\"index\":") || put_u64(c, index) || put(c, ",\"tx\":") || tx(c) ||
                put(c, "}"))
                return -1;
        }
        if (put(c, "],\"prefilled_txn_length\":") || put_u64(c, n) || put(c, ",\"shortids\":["))
            return -1;
        for (uint64_t i = 0; i < n_ids; i++) {
            if ((i && put(c, ",")) || put_u64(c, le(c->p + ids_at + 6 * i, 6))) return -1;
        }
        return put(c, "],\"shortids_length\":") || put_u64(c, n_ids) || put(c, "}}");
    }
    if (!strcmp(t, "blocktxn")) {
        if (put(c, "{\"block_transactions\":{\"blockhash\":") || hash_at(c)) return -1;
        return put(c, ",\"transactions\":") || txs(c) || put(c, "}}");
    }
    if (!strcmp(t, "inv") || !strcmp(t, "getdata")) return inventory(c, "{\"inv\":[");
    if (!strcmp(t, "notfound")) return inventory(c, "{\"vec\":[");
    return fail_text(c, 0, "no native renderer for this message type");
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

static PyObject *render(PyObject *self, PyObject *args) {
    const char *msgtype;
    Py_buffer payload;
    int reverse;
    if (!PyArg_ParseTuple(args, "sy*p", &msgtype, &payload, &reverse)) return NULL;
    Ctx c = {.p = payload.buf, .n = (size_t)payload.len, .reverse = reverse};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = body(&c, msgtype);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (rc == 0 && c.pos != c.n) rc = fail(&c, E_TRAILING, c.pos, 0);
    if (rc) {
        raise_error(&c);
    } else {
        result = PyBytes_FromStringAndSize(c.out, (Py_ssize_t)c.len);
    }
    free(c.out);
    PyBuffer_Release(&payload);
    return result;
}

static PyMethodDef methods[] = {
    {"render", render, METH_VARARGS, "render(msgtype, payload, reverse) -> JSON bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "msgcap.parser._fastjson", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastjson(void) { return PyModule_Create(&module); }
