"""Channel behaviour against a hand-driven peer (no instances): nested calls
run on the waiting thread, and cannot hold it past its deadline."""

import os
import threading
import time

import msgspec

from pycompart.transport.channel import CallServer, Channel
from pycompart.transport.streams import PipeTransport
from pycompart.errors import CallTimeout, CompartmentError
from pycompart.wire.protocol import Call, Connection, NEED_DATA

NIL = msgspec.msgpack.encode(None)


class Answer(CallServer):
    def __init__(self):
        self.served = 0
        self.threads = set()

    def execute(self, channel, call):
        self.served += 1
        self.threads.add(threading.get_ident())
        return channel.conn.send_ok(call.id, NIL)


def pair():
    to_peer_r, to_peer_w = os.pipe()
    to_main_r, to_main_w = os.pipe()
    server = Answer()
    channel = Channel(PipeTransport(to_main_r, to_peer_w), Connection(1 << 20), "peer", server=server)
    return channel, server, to_peer_r, to_main_w


def read_events(fd, conn, want):
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(os.read(fd, 65536))
            continue
        if want(event):
            return event


def test_nested_calls_run_on_the_waiting_thread():
    channel, server, peer_r, peer_w = pair()
    peer = Connection(1 << 20)
    done = []

    def fake_peer():
        call = read_events(peer_r, peer, lambda e: isinstance(e, Call))
        for _ in range(3):
            _, frame = peer.send_call("@cb", NIL, 0, call.id)
            os.write(peer_w, frame)
            read_events(peer_r, peer, lambda e: not isinstance(e, Call))
        os.write(peer_w, peer.send_ok(call.id, NIL))
        done.append(True)
    t = threading.Thread(target=fake_peer)
    t.start()
    reply = channel.request("@x", NIL, time.monotonic() + 10)
    t.join(10)
    assert reply.__class__.__name__ == "Ok" and done
    assert server.served == 3 and server.threads == {threading.get_ident()}
    channel.close()


def test_a_peer_flooding_nested_calls_cannot_hold_the_caller_past_its_deadline():
    """The peer keeps sending nested calls and never answers the call they
    belong to: the caller serves them, and still times out on time. (Fails
    if the waiting loop stops checking its deadline.)"""
    channel, server, peer_r, peer_w = pair()
    peer = Connection(1 << 20)
    stop = threading.Event()

    def fake_peer():
        call = read_events(peer_r, peer, lambda e: isinstance(e, Call))
        os.set_blocking(peer_r, False)
        try:
            while not stop.is_set():
                batch = b"".join(peer.send_call("@cb", NIL, 0, call.id)[1] for _ in range(20))
                os.write(peer_w, batch)
                try:
                    while os.read(peer_r, 65536):
                        pass  # drop the replies
                except BlockingIOError:
                    pass
        except OSError:
            pass
    t = threading.Thread(target=fake_peer, daemon=True)
    t.start()
    outcome = []

    def caller():
        try:
            channel.request("@x", NIL, time.monotonic() + 0.3)
        except BaseException as exc:
            outcome.append(exc)
    c = threading.Thread(target=caller)
    started = time.monotonic()
    c.start()
    c.join(10)
    held = c.is_alive()
    stop.set()
    channel.fail(CompartmentError("test over"))  # releases a caller that was held
    c.join(10)
    t.join(10)
    assert not held, "the caller was held past its deadline by nested calls"
    assert isinstance(outcome[0], CallTimeout) and time.monotonic() - started < 10
    assert server.served > 0
    channel.close()
    for fd in (peer_r, peer_w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_nested_calls_queued_for_a_busy_thread_are_bounded():
    """While the caller runs a slow nested call, another thread leads the
    channel and queues what the peer sends next: at most MAX_QUEUED_NESTED
    are kept, the rest are answered with an error."""
    from pycompart.transport.channel import MAX_QUEUED_NESTED
    from pycompart.wire.protocol import Err

    channel, server, peer_r, peer_w = pair()
    release = threading.Event()
    original = server.execute

    def slow_first(ch, call):
        if server.served == 0:
            release.wait(10)
        return original(ch, call)
    server.execute = slow_first
    peer = Connection(1 << 20)
    flood = MAX_QUEUED_NESTED + 200
    refused = []

    def fake_peer():
        calls = []
        while len(calls) < 2:
            calls.append(read_events(peer_r, peer, lambda e: isinstance(e, Call)))
        x = min(calls, key=lambda c: c.id)  # the first thread's call
        frames = [peer.send_call("@cb", NIL, 0, x.id)[1] for _ in range(flood + 1)]
        os.write(peer_w, b"".join(frames))
        answers = 0
        while answers < flood + 1:
            event = read_events(peer_r, peer, lambda e: not isinstance(e, Call))
            answers += 1
            if isinstance(event, Err):
                refused.append(event)
                if len(refused) == flood - MAX_QUEUED_NESTED:
                    release.set()
        for call in calls:
            os.write(peer_w, peer.send_ok(call.id, NIL))
    t = threading.Thread(target=fake_peer, daemon=True)
    t.start()
    first = threading.Thread(target=lambda: channel.request("@x", NIL, time.monotonic() + 30))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=lambda: channel.request("@y", NIL, time.monotonic() + 30))
    second.start()
    for thread in (first, second, t):
        thread.join(30)
    assert not any(thread.is_alive() for thread in (first, second, t))
    assert len(refused) == flood - MAX_QUEUED_NESTED
    assert server.served == MAX_QUEUED_NESTED + 1  # the slow one, then every queued one
    channel.close()
