"""Run a function in a forked child and report how it ended, so kernel
restrictions never touch the test process itself."""

import os
import time


def in_child(fn, *, timeout: float = 10.0):
    """("ok", str(return value)) | ("errno", str(errno)) | ("error", type name)
    | ("signal", signal number)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = f"ok {fn()}"
        except OSError as exc:
            out = f"errno {exc.errno}"
        except MemoryError:
            out = "errno memory"
        except BaseException as exc:
            out = f"error {type(exc).__name__}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            raise AssertionError("child did not finish")
        time.sleep(0.005)
    out = os.read(r, 200).decode()
    os.close(r)
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status))
    kind, _, value = out.partition(" ")
    return (kind, value)
