/* BIP324 under `decrypt`, one read at a time: decrypt every complete packet of a read,
 * make the capture records of its messages and re-encrypt them for the other leg, in one
 * call that releases the GIL for the cryptography. The handshake stays in Python
 * (capture/bip324.py); a Pipe takes over one direction's established cipher states.
 *
 * Ciphers are OpenSSL's only: EVP_chacha20_poly1305 for FSChaCha20Poly1305 (packet
 * contents) and EVP_chacha20 for FSChaCha20 (the 3-byte lengths, whose keystream runs on
 * across the 224 packets of an epoch, then gives the next key), as BIP324 defines them.
 * No buffer is ever both input and output of a cipher call.
 *
 * Pipe(recv, send, offset)
 *   recv, send: (l_key, p_key, epoch, index): the cipher of the direction received on one
 *   leg and of the direction sent on the other; offset: stream offset of the next byte.
 * feed(data, t0) -> (count, records, out, dropped, error)
 *   count messages completed; records: their capture records (24-byte header, payload),
 *   the i-th stamped t0 + i; out: their packets for the other leg (short id whenever the
 *   type has one, as V2Session.encrypt_message does); dropped: None or a list of
 *   (short_id, raw) for packets Core drops (short id 33..255, or 0 and the invalid long
 *   type); error: None or (reason, packet_number, contents_length, offset), reason 1 for
 *   an oversize length, 2 for a bad tag: the stream is over, later calls return nothing.
 * Compiled into the capture layer's native module, msgcap.capture._capture (one per
 * layer), whose init adds the type (msgcap_add_pipe); capture/bip324_pipe.py takes it
 * from there with msgcap.capture.native.load (NativePipe). The Python twin is
 * V2Session's packet code (capture/bip324.py).
 *
 * One file although long: it is one cohesive protocol, BIP324's packet layer (cipher
 * states, the read loop, the records and packets it makes), all of it static to the Pipe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#include "_records.h" /* the capture record's layout and Core's payload limit */

#define REKEY_INTERVAL 224
#define LENGTH_LEN 3
#define TAG_LEN 16
#define MAX_CONTENTS_LEN (1 + MSGTYPE_SIZE + MAX_RECORD_PAYLOAD)
#define KS_LEN (LENGTH_LEN * REKEY_INTERVAL + 32)
#define ERR_OVERSIZE 1
#define ERR_BAD_TAG 2
#define RELEASE_GIL_ABOVE (16 * 1024)
#define PENDING_KEEP (64 * 1024) /* room for a packet split across reads kept between them */

static const char *const SHORT_IDS[29] = {
    NULL, "addr", "block", "blocktxn", "cmpctblock", "feefilter", "filteradd", "filterclear",
    "filterload", "getblocks", "getblocktxn", "getdata", "getheaders", "headers", "inv",
    "mempool", "merkleblock", "notfound", "ping", "pong", "sendcmpct", "tx", "getcfilters",
    "cfilter", "getcfheaders", "cfheaders", "getcfcheckpt", "cfcheckpt", "addrv2",
};

typedef struct { /* FSChaCha20: the length cipher */
    unsigned char key[32];
    uint64_t epoch;
    unsigned index;
    unsigned char ks[KS_LEN]; /* this epoch's 224 length words, then the next key */
} lencipher_t;

typedef struct { /* FSChaCha20Poly1305: the contents cipher */
    unsigned char key[32];
    uint64_t epoch;
    unsigned index;
} aead_t;

typedef struct {
    PyObject_HEAD
    lencipher_t recv_len, send_len;
    aead_t recv_aead, send_aead;
    EVP_CIPHER_CTX *open, *seal, *rekey, *stream; /* decrypt, encrypt, rekeys, lengths */
    unsigned char *pending; /* the start of the packet being received */
    size_t pending_len, pending_cap;
    long long rlen; /* its contents length once its 3 bytes are in, else -1 */
    unsigned long long offset; /* stream offset of pending[0] */
    unsigned long long decoys;
    int failed;
} Pipe;

/* --- ciphers ------------------------------------------------------------------------ */

static void nonce_of(uint64_t epoch, uint32_t index, unsigned char nonce[12])
{
    for (int i = 0; i < 4; i++)
        nonce[i] = (unsigned char)(index >> (8 * i));
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (unsigned char)(epoch >> (8 * i));
}

static int len_keystream(EVP_CIPHER_CTX *ctx, lencipher_t *c)
{
    static const unsigned char zeros[KS_LEN];
    unsigned char iv[16]; /* OpenSSL: 32-bit block counter (0), then the 96-bit nonce */
    memset(iv, 0, 4);
    nonce_of(c->epoch, 0, iv + 4);
    int n = 0;
    return EVP_EncryptInit_ex(ctx, EVP_chacha20(), NULL, c->key, iv) &&
           EVP_EncryptUpdate(ctx, c->ks, &n, zeros, KS_LEN) && n == KS_LEN;
}

static int len_advance(EVP_CIPHER_CTX *ctx, lencipher_t *c)
{
    if (++c->index < REKEY_INTERVAL)
        return 1;
    memcpy(c->key, c->ks + LENGTH_LEN * REKEY_INTERVAL, 32);
    c->epoch++;
    c->index = 0;
    return len_keystream(ctx, c);
}

static uint32_t len_xor(const lencipher_t *c, const unsigned char *p)
{
    const unsigned char *k = c->ks + LENGTH_LEN * c->index;
    return (uint32_t)(p[0] ^ k[0]) | (uint32_t)(p[1] ^ k[1]) << 8 | (uint32_t)(p[2] ^ k[2]) << 16;
}

/* After the 224th packet of an epoch, the key is the first 32 bytes of encrypting 32
 * zero bytes under nonce ffffffff + epoch. */
static int aead_advance(EVP_CIPHER_CTX *ctx, aead_t *a)
{
    if (++a->index < REKEY_INTERVAL)
        return 1;
    unsigned char nonce[12], zeros[32] = {0}, key[32];
    int n = 0;
    nonce_of(a->epoch, 0xffffffffu, nonce);
    if (!EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, a->key, nonce) ||
        !EVP_EncryptUpdate(ctx, key, &n, zeros, 32) || n != 32)
        return 0;
    memcpy(a->key, key, 32);
    a->epoch++;
    a->index = 0;
    return 1;
}

/* One packet of prefix + payload (prefix: header byte, then maybe the type) with the send
 * ciphers, written to out (3 + plen + n + 16 bytes). 1, or 0 if OpenSSL failed. */
static int seal(Pipe *self, const unsigned char *prefix, size_t plen, const unsigned char *payload,
                size_t n, const unsigned char *aad, size_t aadlen, unsigned char *out)
{
    uint32_t clen = (uint32_t)(plen + n - 1);
    const unsigned char *k = self->send_len.ks + LENGTH_LEN * self->send_len.index;
    out[0] = (unsigned char)(clen ^ k[0]);
    out[1] = (unsigned char)((clen >> 8) ^ k[1]);
    out[2] = (unsigned char)((clen >> 16) ^ k[2]);
    unsigned char nonce[12];
    nonce_of(self->send_aead.epoch, self->send_aead.index, nonce);
    EVP_CIPHER_CTX *ctx = self->seal; /* set up once: only key and nonce change */
    int m = 0;
    if (!EVP_CipherInit_ex(ctx, NULL, NULL, self->send_aead.key, nonce, 1))
        return 0;
    if (aadlen && !EVP_EncryptUpdate(ctx, NULL, &m, aad, (int)aadlen))
        return 0;
    if (!EVP_EncryptUpdate(ctx, out + 3, &m, prefix, (int)plen) || (size_t)m != plen)
        return 0;
    if (n && (!EVP_EncryptUpdate(ctx, out + 3 + plen, &m, payload, (int)n) || (size_t)m != n))
        return 0;
    if (!EVP_EncryptFinal_ex(ctx, out + 3 + plen + n, &m) ||
        !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + 3 + plen + n))
        return 0;
    return aead_advance(self->rekey, &self->send_aead) && len_advance(self->stream, &self->send_len);
}

/* Decrypt a packet's AEAD part (header, contents, tag; contents rlen bytes) with the recv
 * contents cipher: the first `split` plaintext bytes to head, the rest to body. 1 if it
 * authenticates (and the cipher advanced), 0 if not, -1 if OpenSSL failed. */
static int open_packet(Pipe *self, const unsigned char *src, size_t rlen, size_t split,
                       unsigned char *head, unsigned char *body, const unsigned char *aad,
                       size_t aadlen)
{
    unsigned char nonce[12];
    nonce_of(self->recv_aead.epoch, self->recv_aead.index, nonce);
    EVP_CIPHER_CTX *ctx = self->open; /* set up once: only key and nonce change */
    size_t total = rlen + 1;
    int m = 0;
    if (!EVP_CipherInit_ex(ctx, NULL, NULL, self->recv_aead.key, nonce, 0))
        return -1;
    if (aadlen && !EVP_DecryptUpdate(ctx, NULL, &m, aad, (int)aadlen))
        return -1;
    if (!EVP_DecryptUpdate(ctx, head, &m, src, (int)split))
        return -1;
    if (total > split && !EVP_DecryptUpdate(ctx, body, &m, src + split, (int)(total - split)))
        return -1;
    if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, (void *)(src + total)))
        return -1;
    unsigned char fin[16];
    if (EVP_DecryptFinal_ex(ctx, fin, &m) <= 0)
        return 0;
    return aead_advance(self->rekey, &self->recv_aead) ? 1 : -1;
}

/* --- the per-read step -------------------------------------------------------------- */

/* Core's V2Transport::GetMessageType on a 12-byte long type: its length, or -1. */
static int long_type_len(const unsigned char raw[12])
{
    int n = 0;
    while (n < 12 && raw[n])
        n++;
    for (int i = 0; i < n; i++)
        if (raw[i] < 0x20 || raw[i] > 0x7f)
            return -1;
    for (int i = n; i < 12; i++)
        if (raw[i])
            return -1;
    return n;
}

static int short_id_of(const unsigned char raw[12], int n)
{
    for (int id = 1; id <= 28; id++)
        if ((int)strlen(SHORT_IDS[id]) == n && memcmp(SHORT_IDS[id], raw, (size_t)n) == 0)
            return id;
    return 0;
}

typedef struct {
    const unsigned char *src; /* the packet's AEAD part: header, contents, tag */
    uint32_t rlen;
    unsigned long long offset; /* stream offset of its length field */
} packet_t;

typedef struct {
    int id; /* 0: an invalid long type */
    unsigned char raw[12];
    int rawlen;
} drop_t;

typedef struct {
    size_t records_len, out_len, count, ndrops;
    int status; /* 0, ERR_BAD_TAG at packet `at`, or -1 (OpenSSL failed) */
    size_t at;
} result_t;

/* Phase 2 (without the GIL): decrypt, record and re-encrypt every packet. */
static void process(Pipe *self, const packet_t *packets, size_t np, unsigned long long t0,
                    unsigned char *records, unsigned char *out, drop_t *drops, result_t *r)
{
    for (size_t i = 0; i < np; i++) {
        const packet_t *p = &packets[i];
        unsigned char head[2];
        unsigned char *rec = records + r->records_len;
        unsigned char *payload = rec + RECORD_HEADER_SIZE;
        /* Header and short id (or the long type's 0) to head, the rest straight to where
         * the record wants the payload (a long type is moved out of the way below). */
        size_t split = p->rlen >= 1 ? 2 : 1;
        int ok = open_packet(self, p->src, p->rlen, split, head, payload, NULL, 0);
        if (ok <= 0) {
            r->status = ok < 0 ? -1 : ERR_BAD_TAG;
            r->at = i;
            return;
        }
        if (head[0] & 0x80) {
            self->decoys++;
            continue;
        }
        drop_t *d = &drops[r->ndrops];
        if (p->rlen < 1) { /* no message type at all */
            d->id = 0;
            d->rawlen = 0;
            r->ndrops++;
            continue;
        }
        unsigned char type[12];
        size_t n;
        int id = head[1];
        memset(type, 0, 12);
        if (id) {
            if (id > 32) {
                d->id = id;
                d->rawlen = 0;
                r->ndrops++;
                continue;
            }
            n = p->rlen - 1;
            if (id <= 28)
                memcpy(type, SHORT_IDS[id], strlen(SHORT_IDS[id]));
            else
                id = 0; /* Core hands ids 29..32 on as type "": sent on as a long type */
        } else {
            size_t have = p->rlen - 1 < 12 ? p->rlen - 1 : 12;
            memcpy(type, payload, have);
            int tlen = have < 12 ? -1 : long_type_len(type);
            if (tlen < 0) {
                d->id = 0;
                memcpy(d->raw, type, have);
                d->rawlen = (int)have;
                r->ndrops++;
                continue;
            }
            n = p->rlen - 13;
            if (n)
                memmove(payload, payload + 12, n);
            id = short_id_of(type, tlen);
        }
        unsigned long long t = t0 + r->count;
        for (int k = 0; k < 8; k++)
            rec[k] = (unsigned char)(t >> (8 * k));
        memcpy(rec + 8, type, 12);
        for (int k = 0; k < 4; k++)
            rec[20 + k] = (unsigned char)(n >> (8 * k));
        unsigned char prefix[14] = {0};
        size_t plen = 2;
        if (id) {
            prefix[1] = (unsigned char)id;
        } else {
            memcpy(prefix + 2, type, 12);
            plen = 14;
        }
        if (!seal(self, prefix, plen, payload, n, NULL, 0, out + r->out_len)) {
            r->status = -1;
            r->at = i;
            return;
        }
        r->out_len += LENGTH_LEN + plen + n + TAG_LEN;
        r->records_len += RECORD_HEADER_SIZE + n;
        r->count++;
    }
}

static int reserve_pending(Pipe *self, size_t need)
{
    if (need <= self->pending_cap)
        return 1;
    unsigned char *p = PyMem_Realloc(self->pending, need);
    if (p == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    self->pending = p;
    self->pending_cap = need;
    return 1;
}

static int add_packet(packet_t **packets, size_t *np, size_t *cap, const unsigned char *src,
                      uint32_t rlen, unsigned long long offset)
{
    if (*np == *cap) {
        size_t grown_cap = *cap ? *cap * 2 : 16;
        packet_t *grown = PyMem_Realloc(*packets, grown_cap * sizeof(packet_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return 0;
        }
        *packets = grown;
        *cap = grown_cap;
    }
    (*packets)[*np].src = src;
    (*packets)[*np].rlen = rlen;
    (*packets)[(*np)++].offset = offset;
    return 1;
}

static PyObject *openssl_failed(void)
{
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20 failed");
    return NULL;
}

/* feed's result when data completes no packet (or the stream is over). */
static PyObject *nothing(void)
{
    return Py_BuildValue("(nyyOO)", (Py_ssize_t)0, "", "", Py_None, Py_None);
}

static PyObject *Pipe_feed(Pipe *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long t0;
    if (!PyArg_ParseTuple(args, "y*K:feed", &data, &t0))
        return NULL;
    PyObject *result = NULL, *records = NULL, *out = NULL, *dropped = NULL, *error = NULL;
    packet_t *packets = NULL;
    drop_t *drops = NULL;
    size_t np = 0, cap = 0, rec_bound = 0, out_bound = 0;
    const unsigned char *in = data.buf;
    size_t len = (size_t)data.len, pos = 0;
    int over = 0; /* an oversize length after the packets found */
    uint32_t over_len = 0;
    unsigned long long over_at = 0, over_number = 0;
    unsigned long long base = self->offset + self->pending_len; /* offset of in[0] */
    int pending_done = 0;
    result_t r;
    memset(&r, 0, sizeof r);
    if (self->failed) {
        PyBuffer_Release(&data);
        return nothing();
    }
    /* Phase 1 (GIL held, cheap): find the complete packets, advancing the length cipher
     * (its keystream does not depend on the contents cipher). */
    if (self->pending_len) {
        if (self->rlen < 0) {
            size_t take = LENGTH_LEN - self->pending_len;
            take = take < len ? take : len;
            memcpy(self->pending + self->pending_len, in, take);
            self->pending_len += take;
            pos = take;
            if (self->pending_len == LENGTH_LEN) {
                uint32_t rl = len_xor(&self->recv_len, self->pending);
                if (rl > MAX_CONTENTS_LEN) {
                    over = 1;
                    over_len = rl;
                    over_at = self->offset;
                    over_number = self->recv_len.epoch * REKEY_INTERVAL + self->recv_len.index;
                } else {
                    self->rlen = rl;
                    if (!reserve_pending(self, LENGTH_LEN + 1 + (size_t)rl + TAG_LEN))
                        goto fail;
                }
            }
        }
        if (!over && self->rlen >= 0) {
            size_t need = LENGTH_LEN + 1 + (size_t)self->rlen + TAG_LEN;
            size_t take = need - self->pending_len;
            take = take < len - pos ? take : len - pos;
            memcpy(self->pending + self->pending_len, in + pos, take);
            self->pending_len += take;
            pos += take;
            if (self->pending_len == need) {
                if (!add_packet(&packets, &np, &cap, self->pending + LENGTH_LEN,
                                (uint32_t)self->rlen, self->offset))
                    goto fail;
                rec_bound += RECORD_HEADER_SIZE + (size_t)self->rlen;
                out_bound += (size_t)self->rlen + 32;
                pending_done = 1;
                if (!len_advance(self->stream, &self->recv_len)) {
                    openssl_failed();
                    goto fail;
                }
            }
        }
        if (!pending_done && !over) { /* all of data went into the packet being received */
            PyBuffer_Release(&data);
            return nothing();
        }
    }
    while (!over && len - pos >= LENGTH_LEN) {
        uint32_t rl = len_xor(&self->recv_len, in + pos);
        if (rl > MAX_CONTENTS_LEN) {
            over = 1;
            over_len = rl;
            over_at = base + pos;
            over_number = self->recv_len.epoch * REKEY_INTERVAL + self->recv_len.index;
            break;
        }
        size_t size = LENGTH_LEN + 1 + (size_t)rl + TAG_LEN;
        if (len - pos < size)
            break;
        if (!add_packet(&packets, &np, &cap, in + pos + LENGTH_LEN, rl, base + pos))
            goto fail;
        rec_bound += RECORD_HEADER_SIZE + rl;
        out_bound += (size_t)rl + 32;
        pos += size;
        if (!len_advance(self->stream, &self->recv_len)) {
            openssl_failed();
            goto fail;
        }
    }
    if (np) {
        drops = PyMem_Malloc(np * sizeof(drop_t));
        records = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)rec_bound);
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)out_bound);
        if (drops == NULL || records == NULL || out == NULL) {
            if (drops == NULL)
                PyErr_NoMemory();
            goto fail;
        }
        unsigned char *rec_buf = (unsigned char *)PyBytes_AS_STRING(records);
        unsigned char *out_buf = (unsigned char *)PyBytes_AS_STRING(out);
        /* Phase 2: the AEAD work, without the GIL where it is long enough for another
         * thread (the capture thread) to use it; a small read is done sooner than a GIL
         * hand-over takes. */
        if (rec_bound >= RELEASE_GIL_ABOVE) {
            Py_BEGIN_ALLOW_THREADS
            process(self, packets, np, t0, rec_buf, out_buf, drops, &r);
            Py_END_ALLOW_THREADS
        } else {
            process(self, packets, np, t0, rec_buf, out_buf, drops, &r);
        }
        if (r.status < 0) {
            self->failed = 1;
            openssl_failed();
            goto fail;
        }
    } else {
        records = PyBytes_FromStringAndSize("", 0);
        out = PyBytes_FromStringAndSize("", 0);
        if (records == NULL || out == NULL)
            goto fail;
    }
    if (_PyBytes_Resize(&records, (Py_ssize_t)r.records_len) < 0 ||
        _PyBytes_Resize(&out, (Py_ssize_t)r.out_len) < 0)
        goto fail;
    if (r.status == ERR_BAD_TAG) {
        const packet_t *p = &packets[r.at];
        /* packets[r.at] is the recv cipher's current packet */
        error = Py_BuildValue("(iKkK)", ERR_BAD_TAG,
                              (unsigned long long)(self->recv_aead.epoch * REKEY_INTERVAL +
                                                   self->recv_aead.index),
                              (unsigned long)p->rlen, p->offset);
    } else if (over) {
        error = Py_BuildValue("(iKkK)", ERR_OVERSIZE, over_number, (unsigned long)over_len,
                              over_at);
    }
    if (r.status == ERR_BAD_TAG || over) {
        if (error == NULL)
            goto fail;
        self->failed = 1;
        self->pending_len = 0;
        self->rlen = -1;
    } else {
        /* Keep the tail: the start of the next packet. */
        if (pending_done) {
            self->offset += self->pending_len;
            self->pending_len = 0;
            self->rlen = -1;
            if (self->pending_cap > PENDING_KEEP) { /* a large packet: give its room back */
                PyMem_Free(self->pending);
                self->pending = NULL;
                self->pending_cap = 0;
            }
        }
        if (pos < len) {
            size_t tail = len - pos;
            size_t need = tail;
            long long rl = -1;
            if (tail >= LENGTH_LEN) {
                rl = len_xor(&self->recv_len, in + pos);
                need = LENGTH_LEN + 1 + (size_t)rl + TAG_LEN;
            } else if (need < LENGTH_LEN) {
                need = LENGTH_LEN;
            }
            if (!reserve_pending(self, need))
                goto fail;
            memcpy(self->pending, in + pos, tail);
            self->pending_len = tail;
            self->rlen = rl;
            self->offset = base + pos;
        } else if (self->pending_len == 0) {
            self->offset = base + len;
        }
    }
    if (r.ndrops) {
        dropped = PyList_New((Py_ssize_t)r.ndrops);
        if (dropped == NULL)
            goto fail;
        for (size_t i = 0; i < r.ndrops; i++) {
            PyObject *item = Py_BuildValue("(iy#)", drops[i].id, (const char *)drops[i].raw,
                                           (Py_ssize_t)drops[i].rawlen);
            if (item == NULL)
                goto fail;
            PyList_SET_ITEM(dropped, (Py_ssize_t)i, item);
        }
    } else {
        dropped = Py_None;
        Py_INCREF(dropped);
    }
    if (error == NULL) {
        error = Py_None;
        Py_INCREF(error);
    }
    result = Py_BuildValue("(nNNNN)", (Py_ssize_t)r.count, records, out, dropped, error);
    records = out = dropped = error = NULL;
fail:
    PyMem_Free(packets);
    PyMem_Free(drops);
    Py_XDECREF(records);
    Py_XDECREF(out);
    Py_XDECREF(dropped);
    Py_XDECREF(error);
    PyBuffer_Release(&data);
    return result;
}

/* seal(contents, aad=b"", ignore=False) -> bytes: one packet of raw contents with the send
 * ciphers (Core's BIP324Cipher::Encrypt). */
static PyObject *Pipe_seal(Pipe *self, PyObject *args)
{
    Py_buffer contents, aad = {0};
    int ignore = 0;
    if (!PyArg_ParseTuple(args, "y*|y*p:seal", &contents, &aad, &ignore))
        return NULL;
    PyObject *packet = NULL;
    if (contents.len > 0xffffff) {
        PyErr_SetString(PyExc_ValueError, "packet contents must be 0..16777215 bytes");
        goto done;
    }
    packet = PyBytes_FromStringAndSize(NULL, contents.len + 20);
    if (packet == NULL)
        goto done;
    unsigned char header = ignore ? 0x80 : 0;
    if (!seal(self, &header, 1, contents.buf, (size_t)contents.len, aad.buf,
              aad.buf ? (size_t)aad.len : 0, (unsigned char *)PyBytes_AS_STRING(packet))) {
        Py_CLEAR(packet);
        openssl_failed();
    }
done:
    PyBuffer_Release(&contents);
    if (aad.buf)
        PyBuffer_Release(&aad);
    return packet;
}

/* open(packet, aad=b"") -> (ignore, contents): decrypt one whole packet with the recv
 * ciphers; ValueError if it does not authenticate. */
static PyObject *Pipe_open(Pipe *self, PyObject *args)
{
    Py_buffer packet, aad = {0};
    if (!PyArg_ParseTuple(args, "y*|y*:open", &packet, &aad))
        return NULL;
    PyObject *result = NULL, *contents = NULL;
    unsigned char *src = packet.buf;
    uint32_t rl;
    if (packet.len < 20 || (rl = len_xor(&self->recv_len, src)) != (uint32_t)(packet.len - 20)) {
        PyErr_SetString(PyExc_ValueError, "not one whole packet");
        goto done;
    }
    contents = PyBytes_FromStringAndSize(NULL, rl);
    if (contents == NULL)
        goto done;
    unsigned char head[1];
    int ok = open_packet(self, src + 3, rl, 1, head, (unsigned char *)PyBytes_AS_STRING(contents),
                         aad.buf, aad.buf ? (size_t)aad.len : 0);
    if (ok < 0) {
        openssl_failed();
        goto done;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "packet authentication failed");
        goto done;
    }
    if (!len_advance(self->stream, &self->recv_len)) {
        openssl_failed();
        goto done;
    }
    result = Py_BuildValue("(OO)", (head[0] & 0x80) ? Py_True : Py_False, contents);
done:
    Py_XDECREF(contents);
    PyBuffer_Release(&packet);
    if (aad.buf)
        PyBuffer_Release(&aad);
    return result;
}

static PyObject *cipher_state(const lencipher_t *l, const aead_t *a)
{
    return Py_BuildValue("(y#y#KIKI)", (const char *)l->key, (Py_ssize_t)32, (const char *)a->key,
                         (Py_ssize_t)32, (unsigned long long)l->epoch, l->index,
                         (unsigned long long)a->epoch, a->index);
}

static PyObject *Pipe_state(Pipe *self, PyObject *noargs)
{
    (void)noargs;
    return Py_BuildValue("(NN)", cipher_state(&self->recv_len, &self->recv_aead),
                         cipher_state(&self->send_len, &self->send_aead));
}

static PyObject *Pipe_discard(Pipe *self, PyObject *noargs)
{
    (void)noargs;
    self->pending_len = 0;
    self->rlen = -1;
    Py_RETURN_NONE;
}

static PyObject *Pipe_incomplete(Pipe *self, void *closure)
{
    (void)closure;
    if (self->rlen >= 0)
        return PyLong_FromLongLong(LENGTH_LEN + 1 + self->rlen + TAG_LEN);
    return PyLong_FromSize_t(self->pending_len);
}

static PyObject *Pipe_decoys(Pipe *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->decoys);
}

static int parse_state(PyObject *state, lencipher_t *l, aead_t *a)
{
    Py_buffer lk, pk;
    unsigned long long epoch;
    unsigned int index;
    if (!PyArg_ParseTuple(state, "y*y*KI:cipher state", &lk, &pk, &epoch, &index))
        return 0;
    int ok = lk.len == 32 && pk.len == 32 && index < REKEY_INTERVAL;
    if (ok) {
        memcpy(l->key, lk.buf, 32);
        memcpy(a->key, pk.buf, 32);
        l->epoch = a->epoch = epoch;
        l->index = a->index = index;
    } else {
        PyErr_SetString(PyExc_ValueError, "keys are 32 bytes, index 0..223");
    }
    PyBuffer_Release(&lk);
    PyBuffer_Release(&pk);
    return ok;
}

static int Pipe_init(Pipe *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"recv", "send", "offset", NULL};
    PyObject *recv, *send;
    unsigned long long offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|K:Pipe", kwlist, &PyTuple_Type, &recv,
                                     &PyTuple_Type, &send, &offset))
        return -1;
    if (!parse_state(recv, &self->recv_len, &self->recv_aead) ||
        !parse_state(send, &self->send_len, &self->send_aead))
        return -1;
    EVP_CIPHER_CTX **ctxs[4] = {&self->open, &self->seal, &self->rekey, &self->stream};
    for (int i = 0; i < 4; i++)
        if (*ctxs[i] == NULL && (*ctxs[i] = EVP_CIPHER_CTX_new()) == NULL)
            return (void)openssl_failed(), -1;
    /* The cipher is set once per context: a per-packet init with the cipher again costs
     * OpenSSL 3 a provider fetch (about a microsecond). */
    if (!EVP_CipherInit_ex(self->open, EVP_chacha20_poly1305(), NULL, NULL, NULL, 0) ||
        !EVP_CipherInit_ex(self->seal, EVP_chacha20_poly1305(), NULL, NULL, NULL, 1) ||
        !len_keystream(self->stream, &self->recv_len) ||
        !len_keystream(self->stream, &self->send_len)) {
        openssl_failed();
        return -1;
    }
    self->pending_len = 0;
    self->rlen = -1;
    self->offset = offset;
    self->decoys = 0;
    self->failed = 0;
    return 0;
}

static void Pipe_dealloc(Pipe *self)
{
    EVP_CIPHER_CTX_free(self->open);
    EVP_CIPHER_CTX_free(self->seal);
    EVP_CIPHER_CTX_free(self->rekey);
    EVP_CIPHER_CTX_free(self->stream);
    PyMem_Free(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Pipe_methods[] = {
    {"feed", (PyCFunction)Pipe_feed, METH_VARARGS,
     "feed(data, t0) -> (count, records, out, dropped, error)"},
    {"seal", (PyCFunction)Pipe_seal, METH_VARARGS,
     "seal(contents, aad=b'', ignore=False) -> packet, with the send ciphers"},
    {"open", (PyCFunction)Pipe_open, METH_VARARGS,
     "open(packet, aad=b'') -> (ignore, contents), with the recv ciphers"},
    {"state", (PyCFunction)Pipe_state, METH_NOARGS,
     "state() -> (recv, send), each (l_key, p_key, l_epoch, l_index, p_epoch, p_index)"},
    {"discard", (PyCFunction)Pipe_discard, METH_NOARGS, "drop the buffered bytes"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pipe_getset[] = {
    {"incomplete", (getter)Pipe_incomplete, NULL,
     "bytes the packet being received will hold once complete (or buffered so far)", NULL},
    {"decoys", (getter)Pipe_decoys, NULL, "decoy packets authenticated", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PipeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "msgcap.capture._capture.Pipe",
    .tp_basicsize = sizeof(Pipe),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One direction of BIP324 under decrypt: decrypt, record, re-encrypt.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pipe_init,
    .tp_dealloc = (destructor)Pipe_dealloc,
    .tp_methods = Pipe_methods,
    .tp_getset = Pipe_getset,
};

/* The Pipe type joins the capture layer's one native module, msgcap.capture._capture:
 * its init (capture/_capture.c) calls this. 0 on success, -1 with an exception set. */
int msgcap_add_pipe(PyObject *module)
{
    return PyModule_AddType(module, &PipeType);
}
