"""A TCP echo server, privilege-separated as in the seeds (and OpenSSH,
nsjail's per-connection mode): main binds the port and accepts; every
connection is served by its own fresh instance of the handler compartment,
which has no filesystem and no network privilege (it gets only its
connected socket).

    python examples/echo/server.py --port PORT [--host 127.0.0.1]

Prints a line with "listening on" and the port once it accepts
connections. SIGINT or SIGTERM stops it cleanly, leaving no process behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _venv import ensure_pycompart  # noqa: E402

ensure_pycompart()
import pycompart  # noqa: E402

sys.path.insert(0, HERE)


def tcp_port(text: str) -> int:
    port = int(text)  # (argparse turns a ValueError into a usage error)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0-65535)")
    return port


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="TCP echo server, one compartment per connection")
    parser.add_argument("--port", type=tcp_port, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        listener = socket.create_server((args.host, args.port), backlog=128, reuse_port=False)
    except OSError as exc:
        print(f"server.py: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    app = pycompart.App.from_spec(os.path.join(HERE, "app.toml"))
    with app, listener:
        broker = pycompart.Broker(app, "handler", "echohandler:serve",
                                  on_error=lambda exc: print(f"server.py: a connection failed: {exc}",
                                                             file=sys.stderr, flush=True))
        serving = threading.Thread(target=broker.serve, args=(listener,), daemon=True)
        serving.start()
        port = listener.getsockname()[1]
        print(f"echo server listening on {args.host}:{port}", flush=True)
        while not stop.wait(0.5):
            pass
        broker.stop()
        serving.join(2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
