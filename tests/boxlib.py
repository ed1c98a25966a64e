"""A module the tests place in a compartment ("box"). Never imported in the
test process itself: it reaches the tests through the import hook."""

import os
import sys
import threading
import time

VERSION = "1.2"
TABLE = {"a": [1, 2, (3, 4)], (1, 2): {5}}
_private_value = "hidden"
__secret__ = "dunder"


class BoxError(ValueError):
    pass


class DeepError(BoxError):
    pass


class Counter:
    """Supports most protocols, so the proxy class gets most dunders."""

    def __init__(self, name, values=()):
        self.name = name
        self.values = list(values)
        self._hidden = "hidden"
        self.entered = 0

    def add(self, value):
        self.values.append(value)
        return self

    def total(self, scale=1):
        return sum(self.values) * scale

    def __len__(self):
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def __setitem__(self, index, value):
        self.values[index] = value

    def __contains__(self, value):
        return value in self.values

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        self.entered -= 1
        return exc_type is KeyError  # swallows KeyError only

    def __eq__(self, other):
        return isinstance(other, Counter) and other.values == self.values

    def __hash__(self):
        return hash(tuple(self.values))

    def __lt__(self, other):
        return self.total() < other.total()

    def __repr__(self):
        return f"Counter({self.name!r}, {self.values})"

    def __str__(self):
        return f"counter {self.name}"


class Opaque:
    pass


def make(name, *values):
    return Counter(name, values)


def make_many(n):
    return [Opaque() for _ in range(n)]


def exported():
    """How many objects this instance holds for main."""
    from pycompart.compartment.objects import Callback

    return len(Callback.call_out.__self__.peer.exports)


def held_callbacks():
    from pycompart.compartment.objects import Callback

    return len(Callback.call_out.__self__.peer.proxies)


def apply(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def sort_with(items, key):
    return sorted(items, key=key)


def nest(fn, depth):
    """main's fn calls back into nest: A -> B -> A -> B ..."""
    return fn(depth)


def threaded(fn, n):
    """Call fn from n threads of this compartment at once."""
    results = [None] * n
    errors = []

    def work(i):
        try:
            results[i] = fn(i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


_kept = []


def keep(fn):
    _kept.append(fn)
    return len(_kept)


def call_kept():
    return [fn() for fn in _kept]


def fail(deep=False):
    raise (DeepError if deep else BoxError)("it failed", 7)


def pid():
    return int(os.readlink("/proc/self"))  # the host's number: instances have a pid namespace


def crash():
    os.kill(os.getpid(), 9)


def read_shared():
    import pc_test_config

    return pc_test_config.LIMIT, sorted(n for n in dir(pc_test_config) if not n.startswith("_"))


def forge(op, handle, *rest):
    """Send main a hand-made request naming one of main's handles."""
    from pycompart.wire import refs
    from pycompart.transport.channel import serving
    from pycompart.compartment.objects import Callback

    server = Callback.call_out.__self__
    payload = refs._encoder.encode([refs.yours_ext(handle), *rest])
    reply = server.channel.request(op, payload, None, serving(server.channel) or server.active[-1])
    if reply.__class__.__name__ == "Err":
        return ("error", reply.error.type_name, reply.error.message)
    return ("ok", server.peer.decode(reply.value))


_late = []


def call_later(fn):
    """Call fn from a thread of ours once main's call has returned."""
    import time

    def work():
        time.sleep(0.2)
        try:
            _late.append(("ok", fn()))
        except Exception as exc:
            _late.append(("error", type(exc).__name__, str(exc)))
    threading.Thread(target=work).start()


def late_result():
    return list(_late)


def spin_callbacks(fn):
    while True:
        fn()


def spin_threads(fn, n):
    """n threads that call fn without end (each call returns at once)."""
    def spin():
        try:
            while True:
                fn()
        except Exception:
            return  # main stopped serving us: the call we belonged to is over
    threads = [threading.Thread(target=spin, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def import_other(name):
    import importlib

    try:
        importlib.import_module(name)
        return "imported"
    except ImportError as exc:
        return str(exc)


def read_stream(f):
    """Use a file object main passed in; report what else it offers."""
    first = f.readline()
    rest = f.read()
    refused = []
    for name in ("fileno", "buffer", "detach", "__class__", "_checkClosed"):
        try:
            getattr(f, name)
        except AttributeError:
            refused.append(name)
    return first, rest, f.name, refused


# -- red team 0.3: a module that tries to take over names and callables of main's --

__all__ = ["VERSION", "make", "print", "open", "input", "_private_value"]


def print(*args, **kwargs):  # noqa: A001  (the point: shadowing main's print)
    _stolen.append(" ".join(map(str, args)))


def open(*args, **kwargs):  # noqa: A001
    raise RuntimeError("not main's open")


def input(*args, **kwargs):  # noqa: A001
    return "forged input"


_stolen = []


def stolen():
    return list(_stolen)


_handed = {}


def remember(fn):
    """Keep one of main's callables, as a registry would."""
    _handed["fn"] = fn
    return fn  # returned in the same call: that is a decorator, and fine


def handed_back():
    """Later, hand it back in place of a function of ours."""
    return _handed["fn"]


def raise_in_callback(fn):
    try:
        fn()
    except Exception as exc:
        return [type(exc).__name__, str(exc), getattr(exc, "remote_traceback", "")]
    return None


def exit_with(code):
    """A package's CLI entry point: ends with sys.exit()."""
    import sys

    sys.exit(code)


def interrupt():
    raise KeyboardInterrupt


def stdlib_errors(which):
    import dataclasses
    import json

    if which == "json":
        return json.loads("{not json")
    if which == "frozen":
        @dataclasses.dataclass(frozen=True)
        class P:
            x: int = 0
        P().x = 1
    if which == "from-none":
        try:
            {}["k"]
        except KeyError:
            raise LookupError("empty") from None
    if which == "stop":
        return next(iter(()))


def through_callback(fn):
    """main's fn calls back into this compartment, which raises there."""
    return fn()


def catch_in_box(fn):
    """Call main's fn; catch the box's own BoxError coming back through it."""
    try:
        fn()
    except BoxError as exc:
        return ["caught", type(exc).__name__, str(exc)]
    return ["not raised"]


class BoxWarning(UserWarning):
    pass


def warn(kind="user", n=1):
    import warnings

    for i in range(n):
        if kind == "user":
            warnings.warn("careful", UserWarning)
        elif kind == "deprecated":
            warnings.warn("old api", DeprecationWarning, stacklevel=2)
        elif kind == "own":
            warnings.warn("own kind", BoxWarning)
        elif kind == "varying":
            warnings.warn(f"number {i}", RuntimeWarning)
    return "done"


class LibError(Exception):
    pass


class ParseError(ValueError, LibError):
    """Two bases: callers catch either."""


def parse_fail():
    raise ParseError("bad input")


def describe_callable(fn):
    """What code inspecting main's callable sees here."""
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return [str(inspect.signature(fn)), fn.__name__, fn.__qualname__, fn.__doc__, fn.__module__,
            wrapper.__name__, str(inspect.signature(wrapper))]


def merge_into(target, *dicts):
    """toolz.merge style: the box calls the collection methods of main's mapping."""
    for d in dicts:
        target.update(d)
    return sorted(target.items()), target.get("missing", "none"), list(target.keys())


def use_sequence(seq):
    seq.append(4)
    return seq.index(4), seq.count(1)


def has(obj, name):
    return hasattr(obj, name)


def gen(n):
    yield from range(n)


def take(it, n):
    import itertools

    return list(itertools.islice(it, n))


def take_and_return(it, n):
    """Take n items of main's iterator, then hand it back to main."""
    import itertools

    got = list(itertools.islice(it, n))
    return got, it


_workers = []


def start_worker(fn, then_wait=False):
    """A worker thread calls main's fn while main's call is still in flight
    (fn may wait for what main does once this call returns)."""
    import time

    def work():
        try:
            _workers.append(("ok", fn()))
        except Exception as exc:
            _workers.append(("error", type(exc).__name__, str(exc)))
    t = threading.Thread(target=work)
    t.start()
    if then_wait:
        t.join()
    else:
        time.sleep(0.2)  # the callback is in main before our reply is
    return "started"


def worker_results(timeout=10):
    import time

    end = time.monotonic() + timeout
    while not _workers and time.monotonic() < end:
        time.sleep(0.01)
    return list(_workers)


def ask(prompt):
    import builtins

    return builtins.input(prompt)


def read_stdin(how):
    if how == "all":
        return sys.stdin.read()
    if how == "lines":
        return list(sys.stdin)
    return sys.stdin.read(how)


def forge_stdin(*request):
    """Ask main for its stdin by hand, whatever the spec says."""
    from pycompart.wire import refs
    from pycompart.compartment.objects import Callback

    server = Callback.call_out.__self__
    reply = server.channel.request("@stdin", refs._encoder.encode(list(request)), None,
                                   server.active[-1])
    if reply.__class__.__name__ == "Err":
        return ("error", reply.error.type_name, reply.error.message)
    return ("ok", server.peer.decode(reply.value))


def annotate(fn, name, value):
    """What decorators do: set an attribute on the function they get."""
    if not hasattr(fn, name):
        setattr(fn, name, [])
    getattr(fn, name).append(value)
    return fn


def annotations_of(fn, name):
    return list(getattr(fn, name, ["missing"])), fn.__doc__


def set_doc(fn, doc):
    fn.__doc__ = doc
    return fn.__doc__


def catch_interrupt(fn):
    """A CLI framework's main loop: it catches Ctrl-C in the command."""
    try:
        fn()
    except KeyboardInterrupt as exc:
        return ["aborted", exc.args]
    return ["finished"]


REGISTRY = ["builtin"]
OPTIONS = {"strict": False}


def registry_state():
    return list(REGISTRY), dict(OPTIONS)


def fresh_list():
    return [1, 2]


def double(x):
    return x * 2


class WithHook:
    """A function stored on an instance is an attribute, not a method."""

    def __init__(self, hook=double):
        self.hook = hook


def gen_then_fail():
    yield 1
    yield 2
    raise ValueError("third")


def collect_until_error(items):
    got = []
    try:
        for item in items:
            got.append(item)
    except Exception as exc:
        return got, type(exc).__name__
    return got, None


class Abort(BaseException):
    """A library's own control exception, not an Exception."""


def abort():
    raise Abort("stop")


PRODUCED = []
_KEPT_GENERATORS = []


def counted(n):
    for i in range(n):
        PRODUCED.append(i)
        yield i


def counted_and_kept(n):
    g = counted(n)
    _KEPT_GENERATORS.append(g)  # the box uses it again later
    return g


def produced():
    out = len(PRODUCED)
    PRODUCED.clear()
    return out


def stall_with_echoed_errors(waves=4, per=8, size=65000, sleep=30):
    """Red team 0.4: forge calls from "worker threads" whose error replies
    echo ~64 KiB each, then stop reading: main's reply sender blocks on a
    full pipe."""
    import time

    from pycompart.compartment.objects import Callback
    from pycompart.wire import refs

    server = Callback.call_out.__self__
    channel = server.channel
    parent = server.active[-1]
    for _ in range(waves):
        for _ in range(per):
            _, frame = channel.conn.send_call("@" + "A" * size, refs._encoder.encode([]), 0,
                                              parent, True)
            with channel.send_lock():
                channel.transport.send(frame, (), None)
        time.sleep(0.3)
    time.sleep(sleep)


class Stream:
    """Has __next__ (one token ahead) but iterates with another object,
    like jinja2's TokenStream."""

    def __init__(self, items):
        self._items = list(items)
        self.current = self._items.pop(0) if self._items else None

    def __next__(self):
        value = self.current
        self.current = self._items.pop(0) if self._items else None
        return value

    def __iter__(self):
        return _StreamIterator(self)


class _StreamIterator:
    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        return self

    def __next__(self):
        if self.stream.current is None:
            raise StopIteration
        return next(self.stream)


def read_stdin_bytes():
    return sys.stdin.buffer.read()


def what_python_says(obj):
    """What Python itself says of main's object here: its type's names and
    the message of an operation it does not support."""
    try:
        obj + 1
    except TypeError as exc:
        message = str(exc)
    else:
        message = ""
    return type(obj).__name__, type(obj).__qualname__, message


def call_each(fn, n, pause=0.0):
    """Call main's fn n times, going on past the Exceptions it raises (not
    past other BaseExceptions, as unboxed); ``pause`` seconds after each."""
    out = []
    for i in range(n):
        try:
            out.append(fn(i))
        except Exception as exc:
            out.append(type(exc).__name__)
        time.sleep(pause)
    return out


def flag_and_debug(flags):
    """A flag of main's combined with one of ours (helper's finding: the
    two references bounced ``__and__`` between the peers)."""
    import re

    return flags & re.DEBUG, re.compile("abc", flags).match("ABC") is not None


def kind_of(value):
    return type(value).__module__, type(value).__qualname__, isinstance(value, int), isinstance(value, str)


def status(code):
    import http

    return http.HTTPStatus(code)


class Name(str):
    """A str subclass of ours: main holds it by reference."""


def name(text):
    return Name(text)


def lookup(key):
    """Main's str subclass as a key of our own dict and set."""
    return {"fast": 1}.get(key), key in {"fast"}, hash(key) == hash("fast")


class Delta:
    """Adds only to its own kind (dateutil's relativedelta, in miniature)."""

    def __add__(self, other):
        return Delta() if isinstance(other, Delta) else NotImplemented

    __radd__ = __add__


def delta():
    return Delta()


class SlowKey:
    """Hashed and compared slowly once this module's own code is done
    with it: a set of them costs main one slow round trip per element."""

    quiet = True

    def __hash__(self):
        if not SlowKey.quiet:
            time.sleep(0.25)
        return id(self)

    def __eq__(self, other):
        return self is other


def slow_keys(n, as_dict=False):
    SlowKey.quiet = True
    try:
        keys = [SlowKey() for _ in range(n)]
        value = {k: 1 for k in keys} if as_dict else set(keys)
    finally:
        SlowKey.quiet = False
    return value


import enum  # noqa: E402


class Colour(enum.Enum):
    RED = 1
    GREEN = 2


def is_red(colour):
    return colour is Colour.RED


def read_stdin_from_a_thread():
    """A worker thread's input(): main must not read for it."""
    out = []

    def work():
        try:
            out.append(sys.stdin.readline())
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(10)
    return out


def same(value):
    return value


def fail_on_name(raw):
    """An error naming a file whose name is not UTF-8, as os decodes it."""
    raise FileNotFoundError(2, "No such file", os.fsdecode(raw))


def what_main_shows(fn):
    """repr, str, and (asked by hand, as hostile code would) hash of one of
    main's callables."""
    return [repr(fn), str(fn), fn._pc_op("hash"), format(fn, "")]


import datetime  # noqa: E402


class Zone(datetime.tzinfo):
    """Two hours east of UTC, three in July: rules of its own, so never a
    fixed-offset value."""

    def utcoffset(self, dt):
        return datetime.timedelta(hours=2) + self.dst(dt)

    def dst(self, dt):
        return datetime.timedelta(hours=1 if dt is not None and dt.month == 7 else 0)

    def tzname(self, dt):
        return "ZS" if self.dst(dt) else "Z"


ZONE = Zone()


def in_zone(month):
    return datetime.datetime(2020, month, 1, 12, tzinfo=ZONE)


def zone_facts(dt):
    return [dt.tzinfo is ZONE, dt.utcoffset(), dt.hour]


class SlotError(Exception):
    """Keeps its state in slots and computes some in properties
    (pyparsing's ParseException)."""

    __slots__ = ("loc", "pstr", "parser")

    def __init__(self, pstr, loc):
        self.pstr, self.loc, self.parser = pstr, loc, object()
        super().__init__(pstr, loc)

    @property
    def col(self):
        return self.loc + 1

    @property
    def broken(self):
        raise RuntimeError("not sent")


def fail_with_slots(text):
    raise SlotError(text, 3)


def own_spec_name():
    """What a package's code asks of its own module (humanize's locale path)."""
    return __spec__ and __spec__.name


def colliding_set(n):
    """A set main refuses to build (its keys all share one hash)."""
    return {7 + k * (2**61 - 1) for k in range(1, n)}


def is_tzinfo(zone):
    return isinstance(zone, datetime.tzinfo)
