/*
 * Capture records in C: Core's -capturemessages format (capture/records.py), and batches
 * of chunks of several files merged into a plan of runs (capture/conversation.py).
 *
 * Shared by the capture layer's native module (capture/_capture.c: scan, plan, tally)
 * and by the parser's (parser/_fastjson.c: render_batch), which walk the same records;
 * the parser includes this capture header, never the other way round. Everything here
 * is static: each module gets its own copy.
 *
 * A record: time (uint64 LE) | type (12 bytes, NUL padded) | length (uint32 LE) | payload.
 * Every length is checked against what is left; a length above MAX_RECORD_PAYLOAD is no
 * record (Core captures only messages whose header it accepted).
 */
#ifndef MSGCAP_CAPTURE_RECORDS_H
#define MSGCAP_CAPTURE_RECORDS_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define COLD __attribute__((cold, noinline))
#else
#define COLD
#endif

#define RECORD_HEADER_SIZE 24
#define MAX_RECORD_PAYLOAD 4000000 /* capture/records.py MAX_RECORD_PAYLOAD */
#define MSGTYPE_SIZE 12

/* The k-byte little-endian unsigned integer at p. */
static inline uint64_t le(const uint8_t *p, int k) {
    uint64_t v = 0;
    for (int i = k - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* One whole record, its fields in place. */
typedef struct {
    uint64_t time;
    const uint8_t *name; /* the 12-byte type field */
    size_t name_len;     /* up to the first NUL */
    size_t size;         /* payload bytes */
    const uint8_t *payload;
} Rec;

/* The whole record at pos in p[0:n], or 0 if there is none there. */
static inline int record_at(const uint8_t *p, size_t n, size_t pos, Rec *r) {
    if (pos > n || n - pos < RECORD_HEADER_SIZE) return 0;
    const uint8_t *h = p + pos;
    r->time = le(h, 8);
    r->name = h + 8;
    r->size = (size_t)le(h + 20, 4);
    if (r->size > MAX_RECORD_PAYLOAD || r->size > n - pos - RECORD_HEADER_SIZE) return 0;
    const uint8_t *nul = memchr(r->name, 0, MSGTYPE_SIZE);
    r->name_len = nul ? (size_t)(nul - r->name) : MSGTYPE_SIZE;
    r->payload = h + RECORD_HEADER_SIZE;
    return 1;
}

/* The chunks of a batch: a list of bytes-like objects, as buffers. */
typedef struct {
    Py_ssize_t k;
    Py_buffer *bufs;
} Chunks;

static inline void release_chunks(Chunks *c) {
    for (Py_ssize_t i = 0; i < c->k; i++) PyBuffer_Release(&c->bufs[i]);
    PyMem_Free(c->bufs);
    c->bufs = NULL;
    c->k = 0;
}

static inline int get_chunks(PyObject *list, Chunks *c) {
    Py_ssize_t k = PyList_GET_SIZE(list);
    c->k = 0;
    c->bufs = PyMem_Calloc(k ? (size_t)k : 1, sizeof(Py_buffer));
    if (!c->bufs) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(list, i), &c->bufs[i], PyBUF_SIMPLE) < 0) {
            release_chunks(c);
            return -1;
        }
        c->k = i + 1;
    }
    return 0;
}

/* One run of a plan: chunk k, bytes [start, end) (packed int64 triples in Python). */
typedef struct {
    int64_t k, start, end;
} PlanRun;

/* A plan (bytes) as runs, each checked against its chunk. */
static inline const PlanRun *plan_runs(const Py_buffer *plan, const Chunks *c, Py_ssize_t *n) {
    if (plan->len % (Py_ssize_t)sizeof(PlanRun)) goto bad;
    *n = plan->len / (Py_ssize_t)sizeof(PlanRun);
    const PlanRun *runs = plan->buf;
    for (Py_ssize_t i = 0; i < *n; i++) {
        const PlanRun *r = &runs[i];
        if (r->k < 0 || r->k >= c->k || r->start < 0 || r->start > r->end ||
            r->end > c->bufs[r->k].len)
            goto bad;
    }
    return runs;
bad:
    PyErr_SetString(PyExc_ValueError, "a plan run outside its chunk");
    return NULL;
}

/* Which records are taken: since <= time <= until and, unless types is None, the type's
   name (its bytes up to the first NUL) in the tuple types. */
typedef struct {
    unsigned long long since, until;
    PyObject *types; /* a tuple of bytes, or None for all */
} Filter;

static inline int parse_filter(PyObject *types, Filter *f) {
    if (types != Py_None && !PyTuple_Check(types)) {
        PyErr_SetString(PyExc_TypeError, "types must be a tuple of bytes or None");
        return -1;
    }
    f->types = types;
    return 0;
}

static inline int selected(const Filter *f, const Rec *r) {
    if (r->time < f->since || r->time > f->until) return 0;
    if (f->types == Py_None) return 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(f->types); i++) {
        PyObject *t = PyTuple_GET_ITEM(f->types, i);
        if (PyBytes_Check(t) && (size_t)PyBytes_GET_SIZE(t) == r->name_len &&
            !memcmp(PyBytes_AS_STRING(t), r->name, r->name_len))
            return 1;
    }
    return 0;
}

static COLD PyObject *not_whole(Py_ssize_t pos) {
    return PyErr_Format(PyExc_ValueError, "no whole record at %zd", pos);
}

#endif /* MSGCAP_CAPTURE_RECORDS_H */
