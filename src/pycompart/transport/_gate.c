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
 *   receive(rfd, buf, timeout_ms, spin_us) -> int
 *       A caller's wait for its reply, its call sent: waits for rfd (a
 *       non-blocking descriptor) to be readable, polling without sleeping for
 *       up to spin_us first, and reads once into buf. Returns the bytes read
 *       (0 at end of stream), or -2 if nothing arrived by the timeout or a
 *       signal came first (Python's handlers have run).
 *
 * What this code reads is never parsed beyond the fixed 8-byte frame header
 * (u32 length, u16 descriptors, u16 bulk segments, little endian); the
 * message itself is msgspec's, in Python. Every length is checked against
 * the bytes actually read and the size of buf before it is used. The GIL is
 * released around every system call; signals are handed to Python.
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

static PyObject *
gate_serve(PyObject *Py_UNUSED(module), PyObject *args)
{
    int rfd, wfd, write_timeout_ms, spin_us;
    Py_buffer buf;
    PyObject *handle;
    if (!PyArg_ParseTuple(args, "iiw*Oii:serve", &rfd, &wfd, &buf, &handle, &write_timeout_ms, &spin_us))
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
        PyObject *body = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE, (Py_ssize_t)length);
        if (body == NULL)
            goto error;
        PyObject *reply = PyObject_CallOneArg(handle, body);
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
        Py_ssize_t size = PyBytes_GET_SIZE(reply);
        if (size > 0) {
            const char *data = PyBytes_AS_STRING(reply);
            size_t written = 0;
            int rc, err;
            int64_t deadline = write_timeout_ms < 0 ? -1 : now_ms() + write_timeout_ms;
            Py_BEGIN_ALLOW_THREADS  /* we hold a reference: data stays valid */
            rc = write_all(wfd, data, (size_t)size, deadline, &written);
            err = errno;
            Py_END_ALLOW_THREADS
            Py_DECREF(reply);
            if (rc < 0) {
                errno = err;
                if (err == ETIMEDOUT)
                    PyErr_SetString(PyExc_TimeoutError, "the reply could not be written in time");
                else
                    PyErr_SetFromErrno(PyExc_OSError);
                goto error;
            }
        } else {
            Py_DECREF(reply);
        }
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
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iw*ii:receive", &rfd, &buf, &timeout_ms, &spin_us))
        return NULL;
    PyObject *out = NULL;
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    int err = 0;
    ssize_t n = -2;
    Py_BEGIN_ALLOW_THREADS
    spin_until_readable(rfd, spin_us);
    for (;;) {
        ssize_t got = read(rfd, buf.buf, (size_t)buf.len);
        if (got >= 0) {
            n = got;
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
        out = PyLong_FromSsize_t(n);
    }
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef gate_methods[] = {
    {"serve", gate_serve, METH_VARARGS, "An idle instance's serve loop (see gate.py)."},
    {"receive", gate_receive, METH_VARARGS, "A caller's wait for its reply (see gate.py)."},
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
