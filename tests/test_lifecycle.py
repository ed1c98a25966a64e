"""Process life cycle: nothing outlives main, __main__ entrypoints work."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import pycompart

    app = pycompart.App({"compartments": {"parser": {"instances": 3}}})

    @app.entrypoint("parser")
    def parse(data: bytes) -> dict[str, int]:
        return {"pid": int(os.readlink("/proc/self")), "n": len(data)}

    @app.entrypoint("parser")
    def busy(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    if __name__ == "__main__":
        with app:
            out = parse(b"hello")
            print(json.dumps({"main": os.getpid(), "zygote": app.zygote_pid,
                              "instances": app.instances("parser"), "result": out}), flush=True)
            if sys.argv[1:] == ["hang"]:
                time.sleep(60)
            if sys.argv[1:] == ["busy"]:
                # Every instance busy in a call (not reading its channel):
                # only the parent-death signal can end it when main dies.
                import threading
                for _ in range(3):
                    threading.Thread(target=busy, args=(60.0,), daemon=True).start()
                time.sleep(0.5)
                print("busy", flush=True)
                time.sleep(60)
''')


def _gone(pid: int) -> bool:
    """Exited *and* reaped: a zombie does not count as gone."""
    return not os.path.exists(f"/proc/{pid}")


def _wait_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not _gone(p)]
        if not left:
            return []
        time.sleep(0.02)
    return left


def _run(tmp_path, *args):
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)


def test_main_function_entrypoint_and_clean_exit(tmp_path):
    proc = _run(tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    info = json.loads(out)
    assert info["result"]["n"] == 5 and info["result"]["pid"] in info["instances"]
    assert _wait_gone([info["zygote"], *info["instances"]]) == []


def test_sigkill_of_main_takes_every_instance_with_it(tmp_path):
    proc = _run(tmp_path, "hang")
    line = proc.stdout.readline()
    info = json.loads(line)
    pids = [info["zygote"], *info["instances"]]
    assert all(not _gone(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert _wait_gone(pids) == [], "zygote or instances outlived a SIGKILLed main"


def test_sigkill_of_main_ends_busy_instances_after_the_uid_drop(tmp_path):
    """The kernel clears the parent-death signal when an instance changes
    uid; the lock-down re-arms it. Busy instances never see their channel
    close, so this is the only thing that ends them."""
    proc = _run(tmp_path, "busy")
    info = json.loads(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "busy"
    pids = [info["zygote"], *info["instances"]]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    left = _wait_gone(pids)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "busy instances outlived a SIGKILLed main"


def test_sigterm_of_main_is_clean_too(tmp_path):
    proc = _run(tmp_path, "hang")
    info = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert _wait_gone([info["zygote"], *info["instances"]]) == []


ESCAPEE = textwrap.dedent('''
    import ctypes, json, os, sys, time
    import pycompart

    app = pycompart.App({"compartments": {"box": {"privileges": {
        "syscalls": {"profile": "python", "allow": ["prctl", "fork", "clone", "setsid"]},
        "processes": 64}}}})

    @app.entrypoint("box")
    def run_away() -> list[int]:
        """What a hostile instance does to outlive main: clear its own
        parent-death signal, and fork a child in a session of its own that
        never had one."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG, 0
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.setsid()
            os.write(w, os.readlink("/proc/self").encode())
            time.sleep(120)
            os._exit(0)
        return [int(os.readlink("/proc/self")), int(os.read(r, 32))]

    if __name__ == "__main__":
        with app:
            print(json.dumps({"zygote": app.zygote_pid, "escaped": run_away()}), flush=True)
            time.sleep(60)
''')


def test_nothing_outlives_main_whatever_an_instance_does(tmp_path):
    """Finding 6: PR_SET_PDEATHSIG could be cleared (and a forked child has
    none): SIGKILL main and the instance lived on under init with its
    privileges. The zygote is init of the app's pid namespace now: when it
    goes, the kernel ends every process in it."""
    script = tmp_path / "escapee.py"
    script.write_text(ESCAPEE)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    info = json.loads(proc.stdout.readline())
    pids = [info["zygote"], *info["escaped"]]
    assert all(not _gone(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    left = _wait_gone(pids)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "an instance or its child outlived a SIGKILLed main"


def test_a_stopped_app_has_reaped_its_zygote(make_app):
    """``App.stop`` waits for the zygote's process (only ``pycompart run``,
    whose main exits next, leaves that to its exit): no zombie is left in a
    program that starts and stops apps."""
    app = make_app({"compartments": {"box": {}}})
    app.entrypoint("box")(os.getpid)
    app.start()
    pid = app.zygote_pid
    assert pid
    app.stop()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
