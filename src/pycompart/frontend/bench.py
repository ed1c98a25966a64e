"""``pycompart bench``: what a compartment boundary costs, against baselines
measured in the same run on the same CPUs.

Rows: a null typed call through pycompart; a raw ``os.write``/``os.read``
pipe ping-pong between two Python processes; ``multiprocessing.Pipe``
send/recv; a proxied module-function call, a method call on a remote
reference and a callback (module compartments); instance ready time from the
zygote vs ``python -c pass``; a 1 MiB and a 64 MiB ``bytes`` argument; the
whole-program cost of ``examples/yaml_box`` run boxed vs plain. The headline rows pin both ends to
one CPU, because cross-CPU wake-ups on small VMs cost tens of microseconds
for everything, C included; the unpinned rows are printed too.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import bench_targets as _bench_targets
from .app import App


#: The width of a row's name in the printed report.
_COLUMN = 50


def _stats(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def _time_loop(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        fn()
        out.append((clock() - t) / 1000)
    return out


def raw_pipe(n: int) -> list[float]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w1)
        os.close(r2)
        while True:
            b = os.read(r1, 64)
            if not b:
                os._exit(0)
            os.write(w2, b)
    os.close(r1)
    os.close(w2)
    try:
        for _ in range(200):
            os.write(w1, b"x")
            os.read(r2, 64)
        return _time_loop(lambda: (os.write(w1, b"x"), os.read(r2, 64)), n)
    finally:
        os.close(w1)
        os.close(r2)
        os.waitpid(pid, 0)


def gate_floor(n: int) -> list[float] | None:
    """The call gate's byte loop alone: a compact call from ``main``'s side
    (``gate.call`` + ``gate.receive``, the reply's value decoded) to a child
    serving with ``gate.serve`` whose handler returns a fixed value. What a
    null call would cost with no Python bookkeeping on either side; None
    without the C module."""
    from ..transport import gate

    if not gate.NATIVE:
        return None
    import itertools

    import msgspec

    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    none = msgspec.msgpack.encode(None)
    pid = os.fork()
    if pid == 0:
        os.close(w1)
        os.close(r2)
        gate.serve(r1, w2, memoryview(bytearray(65536)), lambda body: None, -1, 0,
                   lambda rid, name, args: none)
        os._exit(0)
    os.close(r1)
    os.close(w2)
    os.set_blocking(r2, False)
    view, got, ids = memoryview(bytearray(65536)), bytearray(8), itertools.count(1)
    decode = msgspec.msgpack.Decoder().decode

    def call() -> object:
        rid = next(ids)
        gate.call(w1, rid, b"null", b"\x80")
        return decode(gate.receive(r2, view, -1, 0, rid, got))  # type: ignore[arg-type]
    try:
        for _ in range(200):
            call()
        return _time_loop(call, n)
    finally:
        os.close(w1)
        os.close(r2)
        os.waitpid(pid, 0)


def _mp_echo(conn, parent_end, as_bytes: bool) -> None:  # type: ignore[no-untyped-def]
    parent_end.close()  # or our own copy keeps the pipe open and recv never sees EOF
    while True:
        try:
            conn.send(len(conn.recv_bytes()) if as_bytes else conn.recv())
        except EOFError:
            return


def _mp_round_trips(n: int, data: bytes | None, warm: int) -> list[float]:
    """``multiprocessing.Pipe`` to a forked child: ``send(None)``/``recv``,
    or (``data``) ``send_bytes(data)`` and a small answer."""
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_mp_echo, args=(b, a, data is not None), daemon=True)
    proc.start()
    b.close()
    once = (lambda: (a.send(None), a.recv())) if data is None else (lambda: (a.send_bytes(data), a.recv()))
    try:
        for _ in range(warm):
            once()
        return _time_loop(once, n)
    finally:
        a.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def mp_pipe(n: int) -> list[float]:
    return _mp_round_trips(n, None, 200)


def mp_send_bytes(data: bytes, n: int) -> list[float]:
    return _mp_round_trips(n, data, 1)


def python_startup(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


#: Run in a fresh interpreter that imports what the zygote imports: how long
#: a bare fork of it takes (until the child has written one byte), and what
#: one page copied on write costs in the child. The floor under any
#: fork-based instance start on this machine, whatever the child then does.
_FORK_FLOOR = """
import gc, json, os, sys, time
from pycompart.compartment import serve
serve.preload()
gc.collect()
gc.freeze()
n, pages = int(sys.argv[1]), 1024
block = bytearray(pages * 4096)
for i in range(pages):
    block[i * 4096] = 1
r, w = os.pipe()
forks, cow = [], []
for _ in range(n):
    t = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"x")
        c = time.perf_counter_ns()
        for i in range(pages):
            block[i * 4096] = 2
        os.write(w, str((time.perf_counter_ns() - c) / 1000 / pages).encode().ljust(32))
        os._exit(0)
    os.read(r, 1)
    forks.append((time.perf_counter_ns() - t) / 1000)
    cow.append(float(os.read(r, 32)))
    os.waitpid(pid, 0)
print(json.dumps([forks, cow]))
"""


def fork_floor(n: int) -> tuple[list[float], float]:
    """Samples of a bare fork of a zygote-sized interpreter (µs), and the
    median cost of one copy-on-write page fault in its child (µs)."""
    import json

    done = subprocess.run([sys.executable, "-c", _FORK_FLOOR, str(n)], check=True,
                          capture_output=True, text=True, timeout=120)
    forks, cow = json.loads(done.stdout)
    return forks, statistics.median(cow)


def _app(privileges: dict | None = None,  # type: ignore[type-arg]
         **extra: object) -> tuple[App, Callable[[], None], Callable[[bytes], int]]:
    comp: dict = {"call_timeout": "60s", **extra}  # type: ignore[type-arg]
    if privileges is not None:
        comp["privileges"] = privileges
    app = App({"compartments": {"bench": comp}})
    null = app.entrypoint("bench")(_bench_targets.null)
    size = app.entrypoint("bench")(_bench_targets.size)
    return app, null, size


def edge_calls(n: int) -> list[float]:
    """Null calls from one compartment to another over their edge, timed
    inside the caller."""
    targets = "pycompart.frontend.bench_targets"
    app = App({"compartments": {
        "bench": {"functions": [f"{targets}:null"], "call_timeout": "60s"},
        "caller": {"functions": [f"{targets}:edge_loop"], "may_call": ["bench"], "call_timeout": "600s"}}})
    with app:
        loop = app.function(f"{targets}:edge_loop")
        loop(500)  # warm up: the edge is made on the first call
        return loop(n)


def rewriter_speed(n: int) -> tuple[int, list[float]]:
    """``pycompart rewrite`` of a big stdlib module with segments added:
    (lines, the milliseconds of each rewrite)."""
    import _pydecimal

    from .rewrite import rewrite

    with open(_pydecimal.__file__, encoding="utf-8") as f:
        source = f.read()
    source = source + "\n\nimport pycompart\n" + "".join(
        f"\ndef _bench_{i}(x, y):\n    with pycompart.segment('P{i % 3}'):\n"
        f"        z = x * y + {i}\n        w = [z] * 3\n    return w\n" for i in range(5))
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        result = rewrite(source, _pydecimal.__file__)
        out.append((time.perf_counter_ns() - t) / 1e6)
        assert len(result.segments) == 5 and not result.problems
    return source.count("\n"), out


def tifftopnm_batch(images: int) -> tuple[float, float, float] | None:
    """examples/tifftopnm's conversion of ``images`` 256x256 RGB LZW TIFFs:
    (milliseconds per image unboxed, per image compartmentalized, the
    compartmentalized app's start to its first result) or None without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return None
    import io
    import tempfile

    here = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "tifftopnm")
    here = os.path.abspath(here)
    if not os.path.isdir(here):
        return None
    sys.path.insert(0, here)
    try:
        import tiffcore
    finally:
        sys.path.remove(here)
    from ..wire.refs import Fd

    d = tempfile.mkdtemp(prefix="pycompart-bench-tiff-")
    os.chmod(d, 0o755)
    paths = []
    for i in range(images):
        im = Image.new("RGB", (256, 256), (i % 256, 100, 200))
        path = os.path.join(d, f"{i}.tif")
        im.save(path, compression="tiff_lzw")
        os.chmod(path, 0o644)
        paths.append(path)
    try:
        t = time.perf_counter()
        for path in paths:
            im = Image.open(path)
            im.load()
            out = io.BytesIO()
            im.convert(tiffcore.pnm_mode(im.mode)).save(out, "PPM")
        plain = (time.perf_counter() - t) * 1000 / images
        spec = {"compartments": {"libtiff": {"functions": ["tiffcore:decode_fd"], "descriptors": True,
                                             "privileges": {"network": "none", "memory": "1GiB"}}}}
        sys.path.insert(0, here)
        t0 = time.perf_counter()
        app = App(spec)
        with app:
            decode = app.function("tiffcore:decode_fd")
            first = None
            t = 0.0
            for i, path in enumerate(paths):
                if i == 1:
                    t = time.perf_counter()
                with Fd(os.open(path, os.O_RDONLY)) as fd:
                    image = decode(fd)
                tiffcore.check_pixels(*image)
                tiffcore.pnm_bytes(*image)
                if first is None:
                    first = (time.perf_counter() - t0) * 1000
            boxed = (time.perf_counter() - t) * 1000 / max(1, images - 1)
        sys.path.remove(here)
        return plain, boxed, first or 0.0
    finally:
        import shutil

        shutil.rmtree(d)


def instance_ready(n: int, privileges: dict | None = None, spare: bool = False,  # type: ignore[type-arg]
                   template: bool = True, gap: float = 0.0) -> list[float]:
    """From asking the monitor for a new instance to that instance having
    locked itself down, imported its module and said Hello, ready for calls.
    ``spare``: taken from the compartment's ready spares (the next one is
    let start before each ask), else a fresh start: forked from the
    compartment's template, or (``template`` False) from the zygote.
    ``gap``: seconds between one instance's retirement and the next ask
    (back to back, a template is still forking the next instance ahead)."""
    app, null, _ = _app(privileges, instances="per-call", spares=1 if spare else 0, template=template)
    out = []
    with app:
        monitor = app._runtime.monitor  # type: ignore[union-attr]
        pool = monitor.pools["bench"]
        for _ in range(n):
            if spare:
                end = time.monotonic() + 10
                while not pool.spares and time.monotonic() < end:
                    time.sleep(0.002)
            time.sleep(gap)
            t = time.perf_counter_ns()
            inst = monitor.spawn_on_demand("bench", spare=spare)
            out.append((time.perf_counter_ns() - t) / 1000)
            monitor.retire(inst)
    return out


def idle_memory(count: int = 4) -> tuple[float, float]:
    """Proportional and resident set size of an idle instance (KiB), the
    average over ``count`` instances of one compartment (PSS splits the
    pages they share with each other and the zygote)."""
    app = App({"compartments": {"bench": {"instances": count}}})
    app.entrypoint("bench")(_bench_targets.null)
    pss, rss = [], []
    with app:
        time.sleep(0.2)
        for inst in app._runtime.monitor.pools["bench"].ready:  # type: ignore[union-attr]
            try:
                with open(f"/proc/{inst.pid}/smaps_rollup") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("5"))
            except OSError:
                continue
            pss.append(int(fields["Pss"].split()[0]))
            rss.append(int(fields["Rss"].split()[0]))
    return (statistics.mean(pss) if pss else 0.0), (statistics.mean(rss) if rss else 0.0)


def _module_app() -> App:
    return App({"compartments": {"bench_mod": {"modules": ["pycompart.frontend.bench_targets"],
                                               "may_call": ["main"], "call_timeout": "60s"}}})


def per_call_instance(n: int, spares: int = 1, gap: float = 0.0) -> list[float]:
    """A typed call to an ``instances = "per-call"`` compartment: a fresh
    instance (a ready spare if one is), the call, its retirement; ``gap``
    seconds between calls (time for the next spare to start)."""
    app = App({"compartments": {"fresh": {"instances": "per-call", "call_timeout": "60s",
                                          "spares": spares}}})
    null = app.entrypoint("fresh")(_bench_targets.null)
    with app:
        null()
        out = []
        for _ in range(n):
            time.sleep(gap)
            t = time.perf_counter_ns()
            null()
            out.append((time.perf_counter_ns() - t) / 1000)
        return out


def _echo_clients(port: int, connections: int, at_once: int = 8) -> float:
    """Connections per second: each sends 1 KiB and reads it back."""
    import concurrent.futures
    import socket as _socket

    payload = b"x" * 1024

    def one(_: int) -> None:
        with _socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(payload)
            c.shutdown(_socket.SHUT_WR)
            got = b""
            while chunk := c.recv(65536):
                got += chunk
            assert got == payload
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        list(pool.map(one, range(connections)))
    return connections / (time.perf_counter() - start)


def connections_per_second(n: int) -> tuple[float, float]:
    """The echo server of examples/echo, one fresh instance per connection
    (a Broker), vs the same handler on a thread per connection in main."""
    import socket as _socket

    from .broker import Broker

    listener = _socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def threads() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.settimeout(None)
            threading.Thread(target=_bench_targets.echo_conn, args=(conn,), daemon=True).start()
    server = threading.Thread(target=threads, daemon=True)
    server.start()
    try:
        plain = _echo_clients(port, n)
    finally:
        stop.set()
        server.join()
        listener.close()
    app = App({"compartments": {"echo": {
        "modules": ["pycompart.frontend.bench_targets"], "instances": "per-connection",
        "descriptors": True, "call_timeout": "60s", "max_instances": 16}}})
    with app, _socket.create_server(("127.0.0.1", 0)) as listener:
        broker = Broker(app, "echo", "pycompart.frontend.bench_targets:echo_conn")
        serving = threading.Thread(target=broker.serve, args=(listener,), daemon=True)
        serving.start()
        try:
            boxed = _echo_clients(listener.getsockname()[1], n)
        finally:
            broker.stop()
            serving.join(5)
    return plain, boxed


def whole_program(n: int, bytecode: bool = True) -> tuple[list[float], list[float]] | None:
    """Wall time of ``examples/yaml_box`` (PyYAML on six hostile and benign
    files), plain ``python`` vs ``pycompart run``, each a fresh process;
    ``bytecode`` False: with ``PYTHONDONTWRITEBYTECODE=1`` and no cached
    bytecode of the program's own modules."""
    here = os.path.dirname(os.path.abspath(__file__))
    where = os.path.join(here, "..", "..", "..", "examples", "yaml_box")
    try:
        import yaml  # noqa: F401
    except ImportError:
        return None
    if not os.path.isdir(where):
        return None
    inputs = sorted(os.path.join("inputs", f) for f in os.listdir(os.path.join(where, "inputs")))
    plain_cmd = [sys.executable, "show_config.py", *inputs]
    boxed_cmd = [sys.executable, "-m", "pycompart", "run", "app.toml", "--", "show_config.py", *inputs]
    import tempfile

    # A bytecode cache of this run's own, empty at first: cached, it is
    # written by the first (uncounted) round; not, nothing is ever read.
    env = dict(os.environ, PYTHONPYCACHEPREFIX=tempfile.mkdtemp(prefix="pycompart-bench-pyc-"))
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    plain, boxed = [], []
    for i in range(n + 1):  # the first round warms the caches (and writes bytecode, if it may)
        for cmd, samples in ((plain_cmd, plain), (boxed_cmd, boxed)):
            t = time.perf_counter_ns()
            subprocess.run(cmd, cwd=where, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            if i:
                samples.append((time.perf_counter_ns() - t) / 1000)
    import shutil

    shutil.rmtree(env["PYTHONPYCACHEPREFIX"], ignore_errors=True)
    return plain, boxed


def run(quick: bool = False, out: Callable[[str], None] = print) -> dict[str, float]:
    from ..transport import bulk, gate

    n = 2000 if quick else 20000
    results: dict[str, float] = {}
    cpus = sorted(os.sched_getaffinity(0))
    out(f"pycompart bench: python {sys.version.split()[0]}, {len(cpus)} CPUs, "
        f"{n} round trips per row (medians and p99 in microseconds)")
    out(f"  call gate: {'native (C) byte loop' if gate.NATIVE else 'pure Python (no C module)'}; "
        f"bulk lanes {'on' if bulk.ENABLED else 'off'}")
    results["native"] = float(gate.NATIVE)

    def row(name: str, key: str, samples: list[float], base: float | None) -> float:
        """Print a row; its median is ``results[key]``, its p99 ``results[key + "_p99"]``."""
        med, p99 = _stats(samples)
        ratio = f"{med / base:6.2f}x" if base else "  1.00x"
        out(f"  {name:{_COLUMN}s} median {med:10.1f}  p99 {p99:10.1f}  {ratio}")
        results[key], results[key + "_p99"] = med, p99
        return med

    for label, affinity in (("pinned to one CPU", {cpus[0]}), ("unpinned", set(cpus))):
        tag = "pinned" if label.startswith("pinned") else "unpinned"
        os.sched_setaffinity(0, affinity)
        out(f"\n{label}: (ratio to the raw pipe round trip)")
        base = row("raw pipe round trip (os.write/os.read)", f"raw_pipe_{tag}", raw_pipe(n), None)
        row("multiprocessing.Pipe send/recv", f"mp_pipe_{tag}", mp_pipe(n), base)
        floor = gate_floor(n) if tag == "pinned" else None
        if floor is not None:
            row("floor: the C call loop, an empty handler each end", "gate_floor", floor, base)
        app, null, size = _app()
        blob = app.entrypoint("bench")(_bench_targets.blob)
        with app:
            for _ in range(500):
                null()
            null_call = row("pycompart null typed call", f"null_call_{tag}", _time_loop(null, n), base)
            if tag == "pinned":
                mib = b"x" * (1 << 20)
                row("pycompart call, 1 MiB bytes argument", "arg_1mib",
                    _time_loop(lambda: size(mib), 50 if quick else 200), base)
                big = b"x" * (64 << 20)
                rounds = 5 if quick else 20
                arg = row("pycompart call, 64 MiB bytes argument", "arg_64mib",
                          _time_loop(lambda: size(big), rounds), base)
                res = row("pycompart call, 64 MiB bytes result", "result_64mib",
                          _time_loop(lambda: blob(64 << 20), rounds), base)
                mp_big = row("multiprocessing.Pipe.send_bytes, 64 MiB", "mp_send_bytes_64mib",
                             mp_send_bytes(big, rounds), base)
                gbs = results["arg_64mib_gbs"] = (64 << 20) / (arg * 1e3)
                results["result_64mib_gbs"] = (64 << 20) / (res * 1e3)
                out(f"  {'':{_COLUMN}s} (64 MiB argument: {gbs:.2f} GB/s, {mp_big / arg:.1f}x "
                    f"send_bytes; result: {results['result_64mib_gbs']:.2f} GB/s)")
        edge = row("null call between two compartments (edge)", f"edge_call_{tag}", edge_calls(n), base)
        out(f"  {'':{_COLUMN}s} (edge call / main->compartment call: {edge / null_call:.2f}x)")
        mapp = _module_app()
        with mapp:
            mod = mapp.compartment("bench_mod").module("pycompart.frontend.bench_targets")
            obj = mod.Obj()
            cb = lambda: None  # noqa: E731
            for _ in range(500):
                mod.fn()
                obj.ping()
            row("proxied module function call", f"proxy_call_{tag}", _time_loop(mod.fn, n), base)
            row("remote-reference method call", f"remote_method_{tag}", _time_loop(obj.ping, n), base)
            callback = row("call that makes one callback into main", f"callback_{tag}",
                           _time_loop(lambda: mod.call(cb), n // 2), base)
            out(f"  {'':{_COLUMN}s} (callback call / null typed call: {callback / null_call:.2f}x)")
            row("read a module's 100-int list (shared)", f"module_attr_{tag}",
                _time_loop(lambda: mod.TABLE, n // 2), base)
            row("call returning a 100-int list (a copy)", f"copied_list_{tag}",
                _time_loop(mod.table, n // 2), base)
            if tag == "unpinned":
                few = max(n // 100, 20)
                row("list() of a returned 1000-item generator", "generator_1000",
                    _time_loop(lambda: list(mod.count_up(1000)), few), base)
                row("returned generator, 10 items, dropped", "iterator_made",
                    _time_loop(lambda: list(mod.count_up(10)), few * 5), base)
                data = list(range(1000))
                row("box iterates main's 1000-item iterator", "main_iterable_1000",
                    _time_loop(lambda: mod.consume(iter(data)), few), base)
    os.sched_setaffinity(0, set(cpus))
    out("\ninstance start: (ratio to python -c pass)")
    base = row("python -c pass", "python_startup", python_startup(5 if quick else 20), None)
    k = 10 if quick else 50
    row("instance ready, fresh start, default lock-down", "instance_ready_fresh",
        instance_ready(k, gap=0.02), base)
    row("  same, back to back", "instance_ready_fresh_back_to_back", instance_ready(k), base)
    row("  same, without network namespace", "instance_ready_fresh_host_net",
        instance_ready(k, {"network": "host"}, gap=0.02), base)
    row("  same, template = false (from the zygote)", "instance_ready_no_template",
        instance_ready(k, template=False, gap=0.02), base)
    row("instance ready, a ready spare taken", "instance_ready", instance_ready(k, spare=True), base)
    forks, cow = fork_floor(k)
    row("  floor: bare fork of a zygote-sized python", "fork_floor", forks, base)
    results["cow_fault_us"] = cow
    out(f"  {'':{_COLUMN}s} (one page copied on write in the child: {cow:.2f} us)")
    out("  (default lock-down: own network and IPC namespaces, uid nobody when root, capabilities\n"
        "   dropped, NO_NEW_PRIVS, non-dumpable, Landlock files+TCP+scopes, seccomp 'python';\n"
        "   a fresh start forks the compartment's template, locked down once, and adds its own\n"
        "   Landlock domain and no-fork filter; asked 20 ms apart, but 'back to back': the\n"
        "   template is still forking the next instance ahead; a spare is such an instance,\n"
        "   started ahead of need: spares = 1 by default)")
    row("typed call, fresh instance per call, back to back", "per_call_back_to_back",
        per_call_instance(k), base)
    row("  same, 20 ms apart (a spare is ready each time)", "per_call_spaced",
        per_call_instance(k, gap=0.02), base)
    row("  same, spares = 0, 20 ms apart", "per_call_no_spares", per_call_instance(k, 0, 0.02), base)
    pss, rss = idle_memory()
    results["idle_pss_kib"], results["idle_rss_kib"] = pss, rss
    out(f"  {'memory per idle instance (of 4)':{_COLUMN}s} PSS {pss / 1024:6.1f} MiB  RSS {rss / 1024:6.1f} MiB")
    plain_cps, boxed_cps = connections_per_second(100 if quick else 1000)
    results["connections_threads"] = plain_cps
    results["connections_per_instance"] = boxed_cps
    out(f"\nconnections per second (1 KiB echo, 8 clients at once):\n"
        f"  {'threads in one process':{_COLUMN}s} {plain_cps:10.0f}/s\n"
        f"  {'a fresh instance per connection (Broker)':{_COLUMN}s} {boxed_cps:10.0f}/s  "
        f"{boxed_cps / plain_cps:6.3f}x")
    lines, rewrites = rewriter_speed(3 if quick else 10)
    med, _ = _stats(rewrites)
    results["rewrite_ms"] = med
    out(f"\npycompart rewrite of _pydecimal.py ({lines} lines, 5 segments added): "
        f"median {med:.1f} ms ({lines / med * 1000:,.0f} lines/s)")
    batch = tifftopnm_batch(20 if quick else 100)
    if batch is not None:
        plain, boxed, first = batch
        results["tifftopnm_plain_ms"], results["tifftopnm_boxed_ms"] = plain, boxed
        results["tifftopnm_start_ms"] = first
        out(f"\nexamples/tifftopnm, 256x256 RGB LZW images (one app, one decoder instance):\n"
            f"  {'per image, unboxed (Pillow in one process)':{_COLUMN}s} {plain:8.2f} ms\n"
            f"  {'per image, decoded in compartment libtiff':{_COLUMN}s} {boxed:8.2f} ms  "
            f"{(boxed / plain - 1) * 100:+.0f}%\n"
            f"  {'app start to the first image decoded':{_COLUMN}s} {first:8.1f} ms")
    for bytecode in (True, False):
        programs = whole_program(2 if quick else 10, bytecode)
        if programs is None:
            break
        how = "bytecode cached" if bytecode else "PYTHONDONTWRITEBYTECODE=1, no cached bytecode"
        out(f"\nwhole program: examples/yaml_box, PyYAML on 6 files, {how} (ratio to plain python)")
        suffix = "" if bytecode else "_nopyc"
        base = row("python show_config.py", "program_plain" + suffix, programs[0], None)
        boxed = row("pycompart run app.toml -- show_config.py", "program_boxed" + suffix, programs[1], base)
        results["run_overhead_ms" + suffix] = (boxed - base) / 1000
        out(f"  {'':{_COLUMN}s} (pycompart run adds {(boxed - base) / 1000:.0f} ms)")
    pin = results["null_call_pinned"] / results["raw_pipe_pinned"]
    out("\nsummary against the speed targets:")
    targets = [
        ("null typed call, pinned", f"{pin:.2f}x raw pipe", pin <= 1.5, "<= 1.5x"),
        ("instance ready (spare)", f"{results['instance_ready'] / results['python_startup']:.3f}x python -c pass",
         results["instance_ready"] / results["python_startup"] <= 0.2, "<= 0.2x"),
        ("instance ready (fresh start)",
         f"{results['instance_ready_fresh'] / results['python_startup']:.3f}x python -c pass",
         results["instance_ready_fresh"] / results["python_startup"] <= 0.2, "<= 0.2x"),
        ("64 MiB bytes argument", f"{results['arg_64mib_gbs']:.2f} GB/s, "
         f"{results['mp_send_bytes_64mib'] / results['arg_64mib']:.1f}x send_bytes",
         results["arg_64mib_gbs"] >= 4 and results["mp_send_bytes_64mib"] >= 4 * results["arg_64mib"],
         ">= 4 GB/s and >= 4x"),
        ("proxied module function call, pinned",
         f"{results['proxy_call_pinned'] / results['raw_pipe_pinned']:.2f}x raw pipe",
         results["proxy_call_pinned"] <= 4 * results["raw_pipe_pinned"], "<= 4x"),
        ("remote method call, pinned", f"{results['remote_method_pinned'] / results['raw_pipe_pinned']:.2f}x raw pipe",
         results["remote_method_pinned"] <= 4 * results["raw_pipe_pinned"], "<= 4x"),
        ("callback, pinned", f"{results['callback_pinned'] / results['null_call_pinned']:.2f} null calls",
         results["callback_pinned"] <= 2 * results["null_call_pinned"], "<= 2"),
    ]
    if "run_overhead_ms" in results:
        targets.append(("pycompart run overhead (yaml_box)", f"{results['run_overhead_ms']:.0f} ms",
                        results["run_overhead_ms"] <= 100, "<= 100 ms"))
    for name, got, ok, want in targets:
        out(f"  {'met ' if ok else 'MISS'}  {name:40s} {got:34s} (target {want})")
    out(f"  floor on this machine: the raw pipe round trip, {results['raw_pipe_pinned']:.1f} us pinned, "
        f"{results['raw_pipe_unpinned']:.1f} us across CPUs (a cross-CPU wake-up, for C too)")
    return results


def markdown(r: dict[str, float]) -> str:
    """The README's performance table, from one run's figures."""
    raw, raw_u = r["raw_pipe_pinned"], r["raw_pipe_unpinned"]

    def us(key: str) -> str:
        return f"{r[key]:,.1f} µs"

    def x(key: str, base: float) -> str:
        return f"{r[key] / base:.2f}×"

    rows = [
        ("raw `os.write`/`os.read` pipe round trip", f"{raw:.1f} µs", f"{raw_u:.1f} µs", "1.00×"),
        ("`multiprocessing.Pipe` send/recv", us("mp_pipe_pinned"), us("mp_pipe_unpinned"),
         x("mp_pipe_pinned", raw)),
        ("pycompart null typed call", us("null_call_pinned"), us("null_call_unpinned"),
         x("null_call_pinned", raw)),
        *([("floor: the C call loop, an empty handler each end", us("gate_floor"), "", x("gate_floor", raw))]
          if "gate_floor" in r else []),
        ("null call between two compartments (edge)", us("edge_call_pinned"), us("edge_call_unpinned"),
         x("edge_call_pinned", raw)),
        ("proxied module function call", us("proxy_call_pinned"), us("proxy_call_unpinned"),
         x("proxy_call_pinned", raw)),
        ("remote-reference method call", us("remote_method_pinned"), us("remote_method_unpinned"),
         x("remote_method_pinned", raw)),
        ("call that makes one callback into main", us("callback_pinned"), us("callback_unpinned"),
         f"{r['callback_pinned'] / r['null_call_pinned']:.1f} null calls"),
        ("64 MiB `bytes` argument", f"{r['arg_64mib'] / 1000:.1f} ms", "",
         f"{r['arg_64mib_gbs']:.1f} GB/s, {r['mp_send_bytes_64mib'] / r['arg_64mib']:.1f}× "
         "`Pipe.send_bytes`"),
        ("64 MiB `bytes` result", f"{r['result_64mib'] / 1000:.1f} ms", "", f"{r['result_64mib_gbs']:.1f} GB/s"),
        ("`python -c pass`", f"{r['python_startup'] / 1000:.1f} ms", "", "1.00×"),
        ("instance ready, fresh start, default lock-down", f"{r['instance_ready_fresh'] / 1000:.1f} ms", "",
         f"{r['instance_ready_fresh'] / r['python_startup']:.2f}× `python -c pass`"),
        ("the same, asked back to back", f"{r['instance_ready_fresh_back_to_back'] / 1000:.1f} ms", "",
         f"{r['instance_ready_fresh_back_to_back'] / r['python_startup']:.2f}×"),
        ("instance ready, a ready spare taken", f"{r['instance_ready'] / 1000:.2f} ms", "",
         f"{r['instance_ready'] / r['python_startup']:.3f}×"),
        ("floor: a bare fork of a zygote-sized Python", f"{r['fork_floor'] / 1000:.2f} ms", "",
         f"{r['fork_floor'] / r['python_startup']:.3f}× (a page copied on write: "
         f"{r['cow_fault_us']:.1f} µs)"),
        ("typed call, fresh instance per call, back to back", f"{r['per_call_back_to_back'] / 1000:.1f} ms",
         "", ""),
        ("the same, 20 ms apart (a spare ready each time)", f"{r['per_call_spaced'] / 1000:.2f} ms", "", ""),
        ("memory of an idle instance (PSS / RSS)", f"{r['idle_pss_kib'] / 1024:.1f} / "
         f"{r['idle_rss_kib'] / 1024:.1f} MiB", "", ""),
        ("echo connections per second, an instance each vs threads",
         f"{r['connections_per_instance']:,.0f}/s vs {r['connections_threads']:,.0f}/s", "",
         f"{r['connections_per_instance'] / r['connections_threads']:.3f}×"),
    ]
    for suffix, how in (("", "bytecode cached"), ("_nopyc", "no bytecode cache")):
        if "program_plain" + suffix in r:
            rows.append((f"`examples/yaml_box` whole program, {how}: boxed vs plain",
                         f"{r['program_boxed' + suffix] / 1000:.0f} ms vs {r['program_plain' + suffix] / 1000:.0f} ms",
                         "", f"+{r['run_overhead_ms' + suffix]:.0f} ms"))
    if "tifftopnm_plain_ms" in r:
        rows.append(("`examples/tifftopnm` 256×256 image, boxed vs unboxed",
                     f"{r['tifftopnm_boxed_ms']:.2f} ms vs {r['tifftopnm_plain_ms']:.2f} ms", "",
                     f"{(r['tifftopnm_boxed_ms'] / r['tifftopnm_plain_ms'] - 1) * 100:+.0f}%"))
    rows.append(("`pycompart rewrite` of `_pydecimal.py`", f"{r['rewrite_ms']:.0f} ms", "", ""))
    out = ["| row | median, pinned to one CPU | unpinned | ratio (pinned) |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out) + "\n"
