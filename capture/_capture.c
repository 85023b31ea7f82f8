/* The capture layer's one native module: the capture thread's inner loop, and the walk over
 * whole capture records that bulk readers (capture/records.py, capture/conversation.py)
 * take from here. Loaded with msgcap.capture.native.load("msgcap.capture._capture");
 * every function has a Python twin, used when it was not built.
 *
 * write_checked(fd, frames) -> list[bool]
 *   Check the checksums of a batch of frames and append the valid ones to a capture file,
 *   with the GIL released once for all of it. Python threads take turns on the GIL; the
 *   event loop (uvloop) holds it while it sends, so a capture thread that needs the GIL
 *   back after every hash and every write waits for it again and again. Here one batch
 *   costs one release. SHA-256 is OpenSSL's (the same code hashlib runs).
 *   frames: list of (header: bytes, parts: tuple[bytes | memoryview, ...], expected: bytes)
 *   header is the 24-byte capture record header, parts the payload's pieces, expected the
 *   frame's 4 checksum bytes. Frames whose payload hashes to `expected` are appended,
 *   header then payload, with writev() (a short write is completed); the result says
 *   which. Raises OSError when the write fails; the file is first cut back to where it
 *   ended before the batch (a full disk must not leave a torn record).
 *   A negative fd checks only. Twin: capture/batch.py.
 *
 * scan(data, pos, limit, last) -> (end, next_time, last)
 *   Walks the whole records of a capture file chunk from pos while their time is within
 *   [last, limit] and never decreases; end is where it stopped, next_time the time of the
 *   whole record there (None if there is none: end of data, a partial record or an
 *   implausible length), last the time of the last record walked. Twin: records.py.
 *
 * plan(chunks, positions, times) -> (plan, positions, times, stopped)
 *   Merges chunks of several files by time, as capture/conversation.py's merge does: each
 *   chunk has a whole record at its position, with the time given. The plan is the runs
 *   that come next, as packed int64 triples (chunk, start, end), up to where the chunk
 *   `stopped` has no whole record left; positions and times are where each chunk is then
 *   (the stopped one's time None). Twin: conversation.py.
 *
 * tally(counts, chunks, plan, since, until, types)
 *   Adds the selected records of a plan's runs to counts[chunk]: {name: (messages,
 *   bytes)}. Selected: see Filter in _records.h. Twin: conversation.py.
 *
 * The plan's runs are rendered by the parser's module (parser/_fastjson.c, render_batch),
 * which walks them with the same code: capture/_records.h.
 *
 * Pipe: BIP324's per-read step under `decrypt`, compiled from its own source file
 * (capture/_v2.c, one cohesive protocol) into this module, the layer's only one; the
 * init below adds it. Twin: capture/bip324.py's V2Session.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <openssl/evp.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_records.h"

int msgcap_add_pipe(PyObject *module); /* capture/_v2.c: adds the type Pipe */

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

typedef struct {
    Py_buffer *bufs; /* payload pieces, then released */
    Py_ssize_t nbufs;
    const char *header; /* 24 bytes */
    const char *expected; /* 4 bytes */
    int valid;
} item_t;

static int sha256d_prefix_matches(EVP_MD_CTX *ctx, item_t *it)
{
    unsigned char first[EVP_MAX_MD_SIZE], second[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_DigestInit_ex(ctx, EVP_sha256(), NULL))
        return -1;
    for (Py_ssize_t i = 0; i < it->nbufs; i++)
        if (!EVP_DigestUpdate(ctx, it->bufs[i].buf, (size_t)it->bufs[i].len))
            return -1;
    if (!EVP_DigestFinal_ex(ctx, first, &n))
        return -1;
    if (!EVP_Digest(first, n, second, &n, EVP_sha256(), NULL))
        return -1;
    return memcmp(second, it->expected, 4) == 0;
}

/* writev everything in iov[0..count), completing short writes. 0, or an errno. When a
 * write fails part way, the file is cut back to where it ended before (a full disk must
 * not leave a torn record); if that fails too, *undo_err is set to its errno. A real
 * writev() either writes bytes or fails, so where the batch began is the end of the file
 * less what was written: found only on failure, no syscall on the hot path. */
static int write_all(int fd, struct iovec *iov, int count, int *undo_err)
{
    *undo_err = 0;
    off_t written = 0;
    int err = 0;
    while (count > 0) {
        int batch = count < IOV_MAX ? count : IOV_MAX;
        ssize_t n = writev(fd, iov, batch);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (n == 0) {
            err = EIO; /* no progress: do not spin */
            break;
        }
        written += n;
        while (batch > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
            batch--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    if (err && written > 0) {
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0) {
            if (errno != ESPIPE) /* a pipe: nothing to cut back */
                *undo_err = errno;
        } else if (ftruncate(fd, end - written) != 0)
            *undo_err = errno;
    }
    return err;
}

static PyObject *write_checked(PyObject *self, PyObject *args)
{
    (void)self;
    int fd;
    PyObject *frames;
    if (!PyArg_ParseTuple(args, "iO!:write_checked", &fd, &PyList_Type, &frames))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(frames);
    item_t *items = PyMem_Calloc((size_t)(count ? count : 1), sizeof(item_t));
    if (items == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    struct iovec *iov = NULL;
    Py_ssize_t ready = 0, total_pieces = 0;
    for (; ready < count; ready++) {
        PyObject *frame = PyList_GET_ITEM(frames, ready);
        PyObject *header, *parts, *expected;
        if (!PyTuple_Check(frame)) {
            PyErr_SetString(PyExc_TypeError, "each frame must be a tuple");
            goto done;
        }
        if (!PyArg_ParseTuple(frame, "O!O!O!:frame", &PyBytes_Type, &header, &PyTuple_Type,
                              &parts, &PyBytes_Type, &expected))
            goto done;
        if (PyBytes_GET_SIZE(header) != 24 || PyBytes_GET_SIZE(expected) != 4) {
            PyErr_SetString(PyExc_ValueError, "header must be 24 bytes, expected 4");
            goto done;
        }
        item_t *it = &items[ready];
        it->header = PyBytes_AS_STRING(header);
        it->expected = PyBytes_AS_STRING(expected);
        Py_ssize_t np = PyTuple_GET_SIZE(parts);
        it->bufs = PyMem_Calloc((size_t)(np ? np : 1), sizeof(Py_buffer));
        if (it->bufs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (; it->nbufs < np; it->nbufs++)
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(parts, it->nbufs), &it->bufs[it->nbufs],
                                   PyBUF_SIMPLE) < 0)
                goto done;
        total_pieces += np + 1;
    }
    iov = PyMem_Calloc((size_t)(total_pieces ? total_pieces : 1), sizeof(struct iovec));
    if (iov == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int failed_hash = 0, err = 0, undo_err = 0;
    Py_BEGIN_ALLOW_THREADS
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        failed_hash = 1;
    } else {
        int n_iov = 0;
        for (Py_ssize_t i = 0; i < count && !failed_hash; i++) {
            int ok = sha256d_prefix_matches(ctx, &items[i]);
            if (ok < 0) {
                failed_hash = 1;
                break;
            }
            items[i].valid = ok;
            if (!ok)
                continue;
            iov[n_iov].iov_base = (void *)items[i].header;
            iov[n_iov++].iov_len = 24;
            for (Py_ssize_t j = 0; j < items[i].nbufs; j++) {
                if (items[i].bufs[j].len == 0)
                    continue;
                iov[n_iov].iov_base = items[i].bufs[j].buf;
                iov[n_iov++].iov_len = (size_t)items[i].bufs[j].len;
            }
        }
        EVP_MD_CTX_free(ctx);
        if (!failed_hash && fd >= 0)
            err = write_all(fd, iov, n_iov, &undo_err);
    }
    Py_END_ALLOW_THREADS
    if (failed_hash) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
        goto done;
    }
    if (err && undo_err) {
        PyObject *msg = PyUnicode_FromFormat(
            "%s; and the file could not be cut back to its last whole record (%s): it ends "
            "in a torn record", strerror(err), strerror(undo_err));
        PyObject *exc = msg ? PyObject_CallFunction(PyExc_OSError, "iO", err, msg) : NULL;
        Py_XDECREF(msg);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        goto done;
    }
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyList_New(count);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *b = items[i].valid ? Py_True : Py_False;
        Py_INCREF(b);
        PyList_SET_ITEM(result, i, b);
    }
done:
    for (Py_ssize_t i = 0; i < count; i++) {
        for (Py_ssize_t j = 0; j < items[i].nbufs; j++)
            PyBuffer_Release(&items[i].bufs[j]);
        PyMem_Free(items[i].bufs);
    }
    PyMem_Free(items);
    PyMem_Free(iov);
    return result;
}

/* --- whole records ------------------------------------------------------------------ */

/* Walk the whole records of p[0:n] from pos while their time is within [*last, limit]
   (updating *last). Returns where the walk stopped; *later is the time of the whole
   record there, if there is one (then 1 is returned in *found). */
static size_t walk(const uint8_t *p, size_t n, size_t pos, uint64_t limit, uint64_t *last,
                   int *found, uint64_t *later) {
    Rec r;
    *found = 0;
    while (record_at(p, n, pos, &r)) {
        if (r.time > limit || r.time < *last) {
            *found = 1;
            *later = r.time;
            break;
        }
        *last = r.time;
        pos += RECORD_HEADER_SIZE + r.size;
    }
    return pos;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    Py_ssize_t pos;
    unsigned long long limit, last;
    if (!PyArg_ParseTuple(args, "y*nKK", &data, &pos, &limit, &last)) return NULL;
    if (pos < 0 || pos > data.len) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "position %zd outside the data", pos);
    }
    int found;
    uint64_t later, at_last = last;
    size_t end = walk(data.buf, (size_t)data.len, (size_t)pos, limit, &at_last, &found, &later);
    PyBuffer_Release(&data);
    if (!found) return Py_BuildValue("(nOK)", (Py_ssize_t)end, Py_None, at_last);
    return Py_BuildValue("(nKK)", (Py_ssize_t)end, (unsigned long long)later, at_last);
}

static PyObject *plan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *chunk_list, *positions, *times;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &chunk_list, &PyList_Type, &positions,
                          &PyList_Type, &times))
        return NULL;
    Py_ssize_t k = PyList_GET_SIZE(chunk_list);
    if (k < 1 || PyList_GET_SIZE(positions) != k || PyList_GET_SIZE(times) != k) {
        PyErr_SetString(PyExc_ValueError, "plan needs one position and one time per chunk");
        return NULL;
    }
    Chunks c;
    if (get_chunks(chunk_list, &c) < 0) return NULL;
    size_t *pos = PyMem_Calloc((size_t)k, sizeof *pos);
    uint64_t *time = PyMem_Calloc((size_t)k, sizeof *time);
    PlanRun *runs = NULL;
    size_t n_runs = 0, cap = 0;
    PyObject *result = NULL;
    if (!pos || !time) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(positions, i));
        time[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(times, i));
        if (PyErr_Occurred()) goto done;
        if (at < 0 || at > c.bufs[i].len) {
            PyErr_SetString(PyExc_ValueError, "position outside its chunk");
            goto done;
        }
        pos[i] = (size_t)at;
    }
    /* Take the next run from the chunk whose next record comes first (ties: the earlier
       chunk), up to the next time of the chunk that comes second; until a chunk has no
       whole record left: its file must be read on first. */
    Py_ssize_t stopped = -1;
    while (stopped < 0) {
        Py_ssize_t a = 0, b = -1;
        for (Py_ssize_t i = 1; i < k; i++) {
            if (time[i] < time[a]) {
                b = a;
                a = i;
            } else if (b < 0 || time[i] < time[b]) {
                b = i;
            }
        }
        /* b comes after a: at its time if a is the earlier chunk, else just before */
        uint64_t limit = b < 0 ? UINT64_MAX : a < b ? time[b] : time[b] - 1;
        uint64_t last = 0, later;
        int found;
        size_t end = walk(c.bufs[a].buf, (size_t)c.bufs[a].len, pos[a], limit, &last, &found,
                          &later);
        if (end > pos[a]) {
            if (n_runs == cap) {
                cap = cap ? 2 * cap : 64;
                PlanRun *grown = PyMem_Realloc(runs, cap * sizeof *runs);
                if (!grown) {
                    PyErr_NoMemory();
                    goto done;
                }
                runs = grown;
            }
            runs[n_runs++] = (PlanRun){a, (int64_t)pos[a], (int64_t)end};
        }
        pos[a] = end;
        if (found)
            time[a] = later;
        else
            stopped = a;
    }
    PyObject *new_positions = PyList_New(k), *new_times = PyList_New(k);
    if (new_positions && new_times) {
        for (Py_ssize_t i = 0; i < k; i++) {
            PyList_SET_ITEM(new_positions, i, PyLong_FromSize_t(pos[i]));
            PyList_SET_ITEM(new_times, i,
                            i == stopped ? Py_NewRef(Py_None) : PyLong_FromUnsignedLongLong(time[i]));
        }
        result = Py_BuildValue("(y#OOn)", (const char *)runs,
                               (Py_ssize_t)(n_runs * sizeof *runs), new_positions, new_times,
                               stopped);
    }
    Py_XDECREF(new_positions);
    Py_XDECREF(new_times);
done:
    release_chunks(&c);
    PyMem_Free(pos);
    PyMem_Free(time);
    PyMem_Free(runs);
    return result;
}

/* counts[name] += (1, size) for each record, names gathered in a small table first. */
typedef struct {
    const uint8_t *name;
    size_t len;
    unsigned long long count, bytes;
} Tally;

static int add_tally(PyObject *counts, const Tally *t) {
    PyObject *key = PyBytes_FromStringAndSize((const char *)t->name, (Py_ssize_t)t->len);
    if (!key) return -1;
    unsigned long long count = t->count, bytes = t->bytes, c0 = 0, b0 = 0;
    PyObject *old = PyDict_GetItemWithError(counts, key); /* borrowed */
    PyObject *value = NULL;
    if (old || !PyErr_Occurred()) {
        if (!old || PyArg_ParseTuple(old, "KK", &c0, &b0))
            value = Py_BuildValue("(KK)", count + c0, bytes + b0);
    }
    int rc = value ? PyDict_SetItem(counts, key, value) : -1;
    Py_XDECREF(value);
    Py_DECREF(key);
    return rc;
}

static int flush_tally(PyObject *counts, const Tally *t, int n) {
    for (int i = 0; i < n; i++) {
        if (add_tally(counts, &t[i]) < 0) return -1;
    }
    return 0;
}

static PyObject *tally(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *counts, *chunk_list, *types;
    Py_buffer plan;
    Filter f;
    if (!PyArg_ParseTuple(args, "O!O!y*KKO", &PyList_Type, &counts, &PyList_Type, &chunk_list,
                          &plan, &f.since, &f.until, &types))
        return NULL;
    Chunks c = {0, NULL};
    Py_ssize_t n_runs;
    const PlanRun *runs;
    int rc = -1;
    if (parse_filter(types, &f) < 0 || get_chunks(chunk_list, &c) < 0) goto done;
    if (!(runs = plan_runs(&plan, &c, &n_runs))) goto done;
    if (PyList_GET_SIZE(counts) != c.k) {
        PyErr_SetString(PyExc_ValueError, "tally needs one dict per chunk");
        goto done;
    }
    for (Py_ssize_t i = 0; i < c.k; i++) {
        if (!PyDict_Check(PyList_GET_ITEM(counts, i))) {
            PyErr_SetString(PyExc_TypeError, "tally needs one dict per chunk");
            goto done;
        }
    }
    enum { SLOTS = 32 };
    Tally t[SLOTS];
    rc = 0;
    for (Py_ssize_t run = 0; run < n_runs && rc == 0; run++) {
        const PlanRun *r = &runs[run];
        PyObject *into = PyList_GET_ITEM(counts, r->k);
        const uint8_t *p = c.bufs[r->k].buf;
        int used = 0;
        Rec rec;
        for (size_t pos = (size_t)r->start; pos < (size_t)r->end; pos += RECORD_HEADER_SIZE + rec.size) {
            if (!record_at(p, (size_t)r->end, pos, &rec)) {
                not_whole((Py_ssize_t)pos);
                rc = -1;
                break;
            }
            if (!selected(&f, &rec)) continue;
            int i = 0;
            while (i < used && !(t[i].len == rec.name_len && !memcmp(t[i].name, rec.name, rec.name_len)))
                i++;
            if (i == used) {
                if (used == SLOTS) {
                    if ((rc = flush_tally(into, t, used)) < 0) break;
                    used = i = 0;
                }
                t[used++] = (Tally){rec.name, rec.name_len, 0, 0};
            }
            t[i].count++;
            t[i].bytes += rec.size;
        }
        if (rc == 0) rc = flush_tally(into, t, used);
    }
done:
    release_chunks(&c);
    PyBuffer_Release(&plan);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"write_checked", write_checked, METH_VARARGS,
     "write_checked(fd, [(header, parts, expected), ...]) -> list[bool]: append the frames "
     "whose payload hashes to `expected`, with the GIL released once (fd < 0: check only)."},
    {"scan", scan, METH_VARARGS, "scan(data, pos, limit, last) -> (end, next_time, last)"},
    {"plan", plan, METH_VARARGS, "plan(chunks, positions, times) -> (plan, positions, times, stopped)"},
    {"tally", tally, METH_VARARGS, "tally(counts, chunks, plan, since, until, types)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "msgcap.capture._capture",
    "Checksum checks and capture writes without the GIL, walks over capture records, and "
    "BIP324's per-read step (Pipe).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capture(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MAX_RECORD_PAYLOAD", MAX_RECORD_PAYLOAD) < 0
              || msgcap_add_pipe(m) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
