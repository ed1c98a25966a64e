/* The call gate's native fast path: the byte loop around a call, nothing else.
 *
 * Two functions, each with a pure-Python twin in gate.py that does exactly
 * the same (and is used when this module cannot be built or is turned off):
 *
 *   serve(rfd, wfd, buf, handle, write_timeout_ms, spin_us) -> int
 *       An idle instance's serve loop. Reads from rfd into buf (after
 *       polling without sleeping for up to spin_us: see Channel._spin); while each
 *       read holds exactly one whole frame that carries no descriptors and
 *       no bulk segments, calls handle(body) with the frame's body (bytes)
 *       and writes the bytes it returns (if any) to wfd. Returns when
 *       anything else happens, so that Python deals with it: the number of
 *       bytes left in buf (a partial frame, several frames, a frame with
 *       descriptors or bulk segments), 0 at end of stream, -1 when handle
 *       returned None, a signal arrived or a read would block.
 *
 *   receive(rfd, buf, timeout_ms, spin_us, rid=0, got=None) -> int
 *       A caller's wait for its reply, its call sent: waits for rfd (a
 *       non-blocking descriptor) to be readable, polling without sleeping for
 *       up to spin_us first, and reads once into buf. Returns the bytes read
 *       (0 at end of stream), or -2 if nothing arrived by the timeout or a
 *       signal came first (Python's handlers have run). got (a writable
 *       buffer of 8 bytes or more) is set to the count read (int64) as soon
 *       as the read returns: a signal handler's exception raised when this
 *       function returns would lose those bytes, and the caller can tell.
 *
 *   call(wfd, rid, name, args, parent=0) -> bool
 *       A caller's call in compact form (below): top-level, or nested in
 *       call parent of the peer's (a callback), written with one
 *       write: True if it went out whole; False if nothing was written (the
 *       frame is bigger than PIPE_BUF, or the pipe has no room for it), so
 *       that Python sends it another way.
 *
 *   write(wfd, data, sent) -> int
 *       One write of data to the non-blocking wfd: the bytes written, added
 *       to sent (int64 in a writable buffer of 8 bytes or more) before
 *       Python runs again, or -1 if the pipe has no room. A signal handler's
 *       exception raised as it returns leaves sent exact, so the caller can
 *       tell a whole frame from a torn one.
 *
 *   serve(..., fast) and receive(..., rid) also take compact calls and
 *   replies: serve hands a compact top-level call to fast(rid, name, args)
 *   (bytes: the value, which serve sends back as a compact reply; a 1-tuple:
 *   a whole frame to send as it is; None: not taken, serve returns with the
 *   frame left in buf; False: taken and answered, serve returns -1), and
 *   receive returns the value (bytes) of a compact reply to call rid that
 *   is all it read.
 *
 * What this code reads is never parsed beyond the fixed 8-byte frame header
 * (u32 length, u16 descriptors, u16 bulk segments, little endian) and the
 * fixed envelope of a compact call or reply (wire/protocol.py):
 *
 *   call:  0xC1 0x01 | u64 id | u64 parent | u8 concurrent | u16 n | name (n bytes) | args
 *   reply: 0xC1 0x02 | u64 id | value
 *
 * Values (args, value) are msgspec's, in Python. Every length is checked
 * against the bytes actually read and the size of buf before it is used. The
 * GIL is released around every system call; signals are handed to Python.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 8
#define COMPACT 0xC1
#define COMPACT_CALL 1
#define COMPACT_OK 2
#define CALL_ENVELOPE 21 /* marker, kind, id, parent, concurrent, name length */
#define OK_ENVELOPE 10   /* marker, kind, id */
#define ATOMIC_WRITE 4096 /* PIPE_BUF on Linux: a write this big is all or nothing */

static uint32_t
read_u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint16_t
read_u16le(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint64_t
read_u64le(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void
put_u16le(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void
put_u32le(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void
put_u64le(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static int64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t
now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Poll fd without sleeping for up to spin_us: a round trip whose two ends
 * both sleep pays two cross-CPU wake-ups. Called without the GIL. */
static void
spin_until_readable(int fd, int spin_us)
{
    if (spin_us <= 0)
        return;
    int64_t end = now_us() + spin_us;
    struct pollfd p = {fd, POLLIN, 0};
    do {
        if (poll(&p, 1, 0) != 0)
            return;
    } while (now_us() < end);
}

/* Write all of data, polling when the pipe is full. Called without the GIL.
 * Returns 0, or -1 with errno set (ETIMEDOUT once deadline_ms passes;
 * a negative deadline_ms waits for ever). *written counts what went out. */
static int
write_all(int fd, const char *data, size_t len, int64_t deadline_ms, size_t *written)
{
    *written = 0;
    while (*written < len) {
        ssize_t n = write(fd, data + *written, len - *written);
        if (n > 0) {
            *written += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN)
            return -1;
        struct pollfd p = {fd, POLLOUT, 0};
        int wait = -1;
        if (deadline_ms >= 0) {
            int64_t left = deadline_ms - now_ms();
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            wait = left > 1000000 ? 1000000 : (int)left;
        }
        if (poll(&p, 1, wait) < 0 && errno != EINTR)
            return -1;
    }
    return 0;
}

/* Write a reply (the GIL held on entry and exit; released while writing).
 * Returns 0, or -1 with a Python exception set. */
static int
send_reply(int wfd, const char *data, Py_ssize_t size, int write_timeout_ms)
{
    size_t written = 0;
    int rc, err;
    int64_t deadline = write_timeout_ms < 0 ? -1 : now_ms() + write_timeout_ms;
    Py_BEGIN_ALLOW_THREADS  /* the caller holds a reference: data stays valid */
    rc = write_all(wfd, data, (size_t)size, deadline, &written);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = err;
        if (err == ETIMEDOUT)
            PyErr_SetString(PyExc_TimeoutError, "the reply could not be written in time");
        else
            PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* A compact top-level call (no parent, not concurrent) whose name lies
 * within the body: its id, name and arguments. Returns 0 if it is one. */
static int
parse_compact_call(const unsigned char *body, uint32_t length, uint64_t *rid,
                   const unsigned char **name, uint32_t *name_len,
                   const unsigned char **rest, uint32_t *rest_len)
{
    if (length < CALL_ENVELOPE || body[0] != COMPACT || body[1] != COMPACT_CALL)
        return -1;
    if (read_u64le(body + 10) != 0 || body[18] != 0)
        return -1; /* nested or concurrent: Python's */
    uint32_t n = read_u16le(body + 19);
    if (n > length - CALL_ENVELOPE)
        return -1;
    *rid = read_u64le(body + 2);
    *name = body + CALL_ENVELOPE;
    *name_len = n;
    *rest = body + CALL_ENVELOPE + n;
    *rest_len = length - CALL_ENVELOPE - n;
    return 0;
}

/* The compact reply frame to call rid carrying value, as new bytes. */
static PyObject *
compact_reply(uint64_t rid, PyObject *value)
{
    Py_ssize_t vlen = PyBytes_GET_SIZE(value);
    if (vlen > (Py_ssize_t)UINT32_MAX - OK_ENVELOPE) {
        PyErr_SetString(PyExc_ValueError, "serve: reply value too large for a frame");
        return NULL;
    }
    PyObject *frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + OK_ENVELOPE + vlen);
    if (frame == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
    put_u32le(p, (uint32_t)(OK_ENVELOPE + vlen));
    put_u16le(p + 4, 0);
    put_u16le(p + 6, 0);
    p[8] = COMPACT;
    p[9] = COMPACT_OK;
    put_u64le(p + 10, rid);
    memcpy(p + HEADER_SIZE + OK_ENVELOPE, PyBytes_AS_STRING(value), (size_t)vlen);
    return frame;
}

static PyObject *
gate_serve(PyObject *Py_UNUSED(module), PyObject *args)
{
    int rfd, wfd, write_timeout_ms, spin_us;
    Py_buffer buf;
    PyObject *handle, *fast = Py_None;
    if (!PyArg_ParseTuple(args, "iiw*Oii|O:serve", &rfd, &wfd, &buf, &handle, &write_timeout_ms, &spin_us,
                          &fast))
        return NULL;
    Py_ssize_t result = -1;
    if (buf.len < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "buffer smaller than a frame header");
        goto error;
    }
    for (;;) {
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        spin_until_readable(rfd, spin_us);
        n = read(rfd, buf.buf, (size_t)buf.len);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            errno = err;
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto error;
                result = -1;
                break;
            }
            if (errno == EAGAIN) {
                result = -1;
                break;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
        if (n < HEADER_SIZE) {
            result = n; /* end of stream (0) or a frame in pieces */
            break;
        }
        const unsigned char *p = (const unsigned char *)buf.buf;
        uint32_t length = read_u32le(p);
        if ((uint64_t)n != (uint64_t)length + HEADER_SIZE || read_u16le(p + 4) || read_u16le(p + 6)) {
            result = n;
            break;
        }
        uint64_t rid;
        const unsigned char *name, *rest;
        uint32_t name_len, rest_len;
        PyObject *reply;
        if (fast != Py_None
                && parse_compact_call(p + HEADER_SIZE, length, &rid, &name, &name_len, &rest, &rest_len) == 0) {
            PyObject *py_name = PyBytes_FromStringAndSize((const char *)name, name_len);
            PyObject *py_rest = py_name ? PyBytes_FromStringAndSize((const char *)rest, rest_len) : NULL;
            PyObject *py_rid = py_rest ? PyLong_FromUnsignedLongLong(rid) : NULL;
            PyObject *got = py_rid ? PyObject_CallFunctionObjArgs(fast, py_rid, py_name, py_rest, NULL) : NULL;
            Py_XDECREF(py_name);
            Py_XDECREF(py_rest);
            Py_XDECREF(py_rid);
            if (got == NULL)
                goto error;
            if (got == Py_None) {
                Py_DECREF(got);
                result = n; /* not taken: the frame is still in buf */
                break;
            }
            if (got == Py_False) {
                Py_DECREF(got);
                result = -1;
                break;
            }
            if (PyBytes_Check(got)) {
                reply = compact_reply(rid, got);
                Py_DECREF(got);
                if (reply == NULL)
                    goto error;
            } else if (PyTuple_Check(got) && PyTuple_GET_SIZE(got) == 1 && PyBytes_Check(PyTuple_GET_ITEM(got, 0))) {
                reply = PyTuple_GET_ITEM(got, 0);
                Py_INCREF(reply);
                Py_DECREF(got);
            } else {
                Py_DECREF(got);
                PyErr_SetString(PyExc_TypeError, "serve: fast must return bytes, a 1-tuple of bytes, None or False");
                goto error;
            }
        } else {
            PyObject *body = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE, (Py_ssize_t)length);
            if (body == NULL)
                goto error;
            reply = PyObject_CallOneArg(handle, body);
            Py_DECREF(body);
            if (reply == NULL)
                goto error;
            if (reply == Py_None) {
                Py_DECREF(reply);
                result = -1;
                break;
            }
            if (!PyBytes_Check(reply)) {
                Py_DECREF(reply);
                PyErr_SetString(PyExc_TypeError, "serve: handle must return bytes or None");
                goto error;
            }
        }
        Py_ssize_t size = PyBytes_GET_SIZE(reply);
        int rc = size > 0 ? send_reply(wfd, PyBytes_AS_STRING(reply), size, write_timeout_ms) : 0;
        Py_DECREF(reply);
        if (rc < 0)
            goto error;
        if (PyErr_CheckSignals() < 0)
            goto error;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(result);
error:
    PyBuffer_Release(&buf);
    return NULL;
}

static PyObject *
gate_receive(PyObject *Py_UNUSED(module), PyObject *args)
{
    int rfd, timeout_ms, spin_us;
    unsigned long long rid = 0;
    Py_buffer buf, got;
    memset(&got, 0, sizeof got);
    if (!PyArg_ParseTuple(args, "iw*ii|Kw*:receive", &rfd, &buf, &timeout_ms, &spin_us, &rid, &got))
        return NULL;
    if (got.obj != NULL && got.len < (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "receive: got must hold 8 bytes");
        PyBuffer_Release(&buf);
        PyBuffer_Release(&got);
        return NULL;
    }
    PyObject *out = NULL;
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    int err = 0;
    ssize_t n = -2;
    Py_BEGIN_ALLOW_THREADS
    spin_until_readable(rfd, spin_us);
    for (;;) {
        ssize_t count = read(rfd, buf.buf, (size_t)buf.len);
        if (count >= 0) {
            n = count;
            if (got.obj != NULL) {
                int64_t value = (int64_t)count;
                memcpy(got.buf, &value, sizeof value);
            }
            break;
        }
        if (errno != EAGAIN) {
            err = errno;
            break;
        }
        struct pollfd p = {rfd, POLLIN, 0};
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0)
                break;
            wait = left > 1000000 ? 1000000 : (int)left;
        }
        if (poll(&p, 1, wait) < 0) {
            err = errno;  /* EINTR too: Python's handlers run before we wait again */
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (err == EINTR) {
        if (PyErr_CheckSignals() == 0)  /* Python's handlers first; nothing read */
            out = PyLong_FromLong(-2);
    } else if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        const unsigned char *p = (const unsigned char *)buf.buf;
        if (rid != 0 && n >= HEADER_SIZE + OK_ENVELOPE && (uint64_t)n == (uint64_t)read_u32le(p) + HEADER_SIZE
                && read_u16le(p + 4) == 0 && read_u16le(p + 6) == 0 && p[8] == COMPACT && p[9] == COMPACT_OK
                && read_u64le(p + 10) == rid)
            out = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE + OK_ENVELOPE,
                                            n - HEADER_SIZE - OK_ENVELOPE);
        else
            out = PyLong_FromSsize_t(n);
    }
    PyBuffer_Release(&buf);
    if (got.obj != NULL)
        PyBuffer_Release(&got);
    return out;
}

static PyObject *
gate_call(PyObject *Py_UNUSED(module), PyObject *args)
{
    int wfd;
    unsigned long long rid, parent = 0;
    Py_buffer name, rest;
    if (!PyArg_ParseTuple(args, "iKy*y*|K:call", &wfd, &rid, &name, &rest, &parent))
        return NULL;
    PyObject *out = NULL;
    unsigned char frame[ATOMIC_WRITE];
    Py_ssize_t total = HEADER_SIZE + CALL_ENVELOPE + name.len + rest.len;
    if (name.len > 0xFFFF || total > ATOMIC_WRITE) {
        out = Py_NewRef(Py_False);
        goto done;
    }
    put_u32le(frame, (uint32_t)(total - HEADER_SIZE));
    put_u16le(frame + 4, 0);
    put_u16le(frame + 6, 0);
    frame[8] = COMPACT;
    frame[9] = COMPACT_CALL;
    put_u64le(frame + 10, rid);
    put_u64le(frame + 18, parent);
    frame[26] = 0;
    put_u16le(frame + 27, (uint16_t)name.len);
    memcpy(frame + HEADER_SIZE + CALL_ENVELOPE, name.buf, (size_t)name.len);
    memcpy(frame + HEADER_SIZE + CALL_ENVELOPE + name.len, rest.buf, (size_t)rest.len);
    for (;;) {
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        n = write(wfd, frame, (size_t)total);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n == total) {
            out = Py_NewRef(Py_True);
            break;
        }
        if (n < 0 && err == EINTR) {
            if (PyErr_CheckSignals() < 0)
                break;
            continue;
        }
        if (n < 0 && err == EAGAIN) {
            out = Py_NewRef(Py_False);
            break;
        }
        if (n < 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {  /* not a pipe: part of the frame is out */
            PyErr_SetString(PyExc_OSError, "call: a partial write (not a pipe?)");
        }
        break;
    }
done:
    PyBuffer_Release(&name);
    PyBuffer_Release(&rest);
    return out;
}

static PyObject *
gate_write(PyObject *Py_UNUSED(module), PyObject *args)
{
    int wfd;
    Py_buffer data, sent;
    if (!PyArg_ParseTuple(args, "iy*w*:write", &wfd, &data, &sent))
        return NULL;
    PyObject *out = NULL;
    if (sent.len < (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "write: sent must hold 8 bytes");
        goto done;
    }
    for (;;) {
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        n = write(wfd, data.buf, (size_t)data.len);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0) {
            /* Counted before Python runs again: a signal handler's exception
             * raised as we return cannot lose what went out. */
            int64_t total;
            memcpy(&total, sent.buf, sizeof total);
            total += (int64_t)n;
            memcpy(sent.buf, &total, sizeof total);
            out = PyLong_FromSsize_t(n);
            break;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0)  /* nothing written */
                break;
            continue;
        }
        if (err == EAGAIN) {
            out = PyLong_FromLong(-1);
            break;
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&sent);
    return out;
}

static PyMethodDef gate_methods[] = {
    {"serve", gate_serve, METH_VARARGS, "An idle instance's serve loop (see gate.py)."},
    {"receive", gate_receive, METH_VARARGS, "A caller's wait for its reply (see gate.py)."},
    {"call", gate_call, METH_VARARGS, "A caller's compact call, written whole or not at all (see gate.py)."},
    {"write", gate_write, METH_VARARGS, "One write, counted in sent as it returns (see gate.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef gate_module = {
    PyModuleDef_HEAD_INIT, "_gate", "The call gate's native fast path (see gate.py).", -1, gate_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__gate(void)
{
    return PyModule_Create(&gate_module);
}
