/* The capture thread's inner loop in C: check the checksums of a batch of frames and
 * append the valid ones to a capture file, with the GIL released once for all of it.
 *
 * Python threads take turns on the GIL; the event loop (uvloop) holds it while it sends,
 * so a capture thread that needs the GIL back after every hash and every write waits
 * for it again and again. Here one batch costs one release. SHA-256 is OpenSSL's (the
 * same code hashlib runs).
 *
 * write_checked(fd, frames) -> list[bool]
 *   frames: list of (header: bytes, parts: tuple[bytes | memoryview, ...], expected: bytes)
 *   header is the 24-byte capture record header, parts the payload's pieces, expected the
 *   frame's 4 checksum bytes. Frames whose payload hashes to `expected` are appended,
 *   header then payload, with writev() (a short write is completed); the result says
 *   which. Raises OSError when the write fails; the file is first cut back to where it
 *   ended before the batch (a full disk must not leave a torn record).
 *   A negative fd checks only. Loaded through capture/batch.py, which has the Python twin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <openssl/evp.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

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

static PyMethodDef methods[] = {
    {"write_checked", write_checked, METH_VARARGS,
     "write_checked(fd, [(header, parts, expected), ...]) -> list[bool]: append the frames "
     "whose payload hashes to `expected`, with the GIL released once (fd < 0: check only)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "msgcap.capture._capture",
    "Checksum checks and capture writes without the GIL.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capture(void) { return PyModule_Create(&module); }
