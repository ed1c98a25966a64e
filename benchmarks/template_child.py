"""How fast could a forked template start an instance? ``python benchmarks/template_child.py``

Not a feature: a measurement behind the README's "Not there yet". It
imports what the zygote imports, then forks a child that does only what
an instance forked from a template that was already locked down would still
have to do itself: bind itself to its parent, take its own process group,
add a Landlock domain of its own (the signal and abstract-socket scopes,
which would keep siblings apart), load the seccomp filter, make its channel
and say hello. The median time from fork to the parent reading the hello
is the template design's floor on this machine, before the messages
between the monitor, the zygote and a template. Compare it with
``python -c pass`` and the fresh start in ``pycompart bench``. The seccomp
filter needs libseccomp, as ``pycompart bench`` does.
"""

import gc
import os
import signal
import statistics
import subprocess
import sys
import time

from pycompart.compartment import serve
from pycompart.kernel import credentials, landlock, process, seccomp
from pycompart.transport.channel import Channel
from pycompart.transport.streams import PipeTransport
from pycompart.wire.protocol import Connection


def main(rounds: int = 40) -> None:
    serve.preload()
    program = seccomp.compile_bpf("python")
    credentials.no_new_privs()
    scopes = landlock.scope_flags(landlock.abi_version())
    gc.collect()
    gc.freeze()
    samples = []
    for _ in range(rounds):
        call_r, call_w = os.pipe()
        reply_r, reply_w = os.pipe()
        t = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            try:
                process.set_parent_death_signal(signal.SIGKILL)
                os.setpgid(0, 0)
                os.close(call_w)
                os.close(reply_r)
                if scopes:
                    landlock.Ruleset(scopes=scopes).enforce()
                seccomp.load_bpf(program)
                Channel(PipeTransport(call_r, reply_w), Connection(1 << 20), "main")
                os.write(reply_w, Connection.send_hello(os.getpid(), "template", ["f"], False))
            finally:
                os._exit(0)
        os.close(call_r)
        os.close(reply_w)
        os.read(reply_r, 4096)
        samples.append((time.perf_counter_ns() - t) / 1000)
        os.waitpid(pid, 0)
        os.close(call_w)
        os.close(reply_r)
    start = []
    for _ in range(10):
        t = time.perf_counter_ns()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        start.append((time.perf_counter_ns() - t) / 1000)
    child, plain = statistics.median(samples), statistics.median(start)
    print(f"fork to hello, template-like child: median {child:8.0f} us")
    print(f"python -c pass:                     median {plain:8.0f} us")
    print(f"ratio: {child / plain:.2f}x (the target for an instance start is 0.2x)")


if __name__ == "__main__":
    main()
