"""A plugin API the tests place in a compartment and subclass from main:
base classes whose code calls methods main's subclasses override."""

import os
import unittest


class Extension:
    priority = 5
    tags = ("base",)

    def __init__(self, name="ext", **config):
        self.name = name
        self.config = dict(config)
        self.calls = []

    def run(self, text):
        # The compartment's code calls an overridable hook on self.
        return self.prefix() + self.transform(text) + self.suffix()

    def prefix(self):
        return "["

    def suffix(self):
        return "]"

    def transform(self, text):
        return text

    def record(self, what):
        self.calls.append(what)
        return len(self.calls)

    def where(self):
        return os.getpid()

    @property
    def label(self):
        return f"{self.name}:{self.priority}"

    @classmethod
    def kind(cls):
        return cls.__name__

    @staticmethod
    def helper(x):
        return x * 2

    def __len__(self):
        return len(self.calls)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class Loud(Extension):
    def transform(self, text):
        return super().transform(text).upper()


def drive(ext, text):
    """The package's own code, handed main's subclass instance."""
    return ext.run(text)


def is_extension(obj):
    return isinstance(obj, Extension), type(obj).__name__


def read_attr(obj, name):
    return getattr(obj, name)


def registry_names(exts):
    return [e.name for e in exts]


class Case(unittest.TestCase):
    """A package's TestCase helper: suites subclass these."""

    def assertShout(self, text):
        self.assertEqual(text, text.upper())

    def where(self):
        return os.getpid()


def forge_on(obj, op, *rest, on_class=False):
    """From inside the compartment: a hand-made request to main naming the
    handle of main's instance behind the twin ``obj`` (or of main's class)."""
    from pycompart.compartment.objects import Callback
    from pycompart.transport.channel import serving
    from pycompart.wire import refs

    ref = type(obj)._pc_main_class._pc_ref if on_class else obj._pc_main
    server = Callback.call_out.__self__
    payload = refs._encoder.encode([refs.yours_ext(ref._pc_handle), *rest])
    reply = server.channel.request(op, payload, None, serving(server.channel) or server.active[-1])
    if reply.__class__.__name__ == "Err":
        return ("error", reply.error.type_name, reply.error.message)
    return ("ok", server.peer.decode(reply.value))


def build(factory, *args, **kwargs):
    """Make an instance of whatever class the caller hands over."""
    obj = factory(*args, **kwargs)
    return obj, isinstance(obj, Extension), obj.run("in box")


_registry = []


def register(ext):
    """A plugin registry: the package keeps what main hands it."""
    _registry.append(ext)
    return len(_registry)


def run_registered(text):
    return [ext.run(text) for ext in _registry]


def unregister_all():
    _registry.clear()


_made = []


def build_many(factory, n, keep=False):
    """Make n instances of the class main hands over; keep them or not."""
    for i in range(n):
        obj = factory(str(i))
        if keep:
            _made.append(obj)
    return len(_made)


def use_made(text):
    return [obj.run(text) for obj in _made]


class ShoutAsserts:
    """A mixin of assertions (pyparsing's TestParseResultsAsserts): main's
    test class puts unittest.TestCase beside it, and its code calls
    TestCase's methods on self."""

    def assertShouted(self, text):
        self.assertEqual(text, text.upper(), msg=f"{text!r} is not shouted")

    def assertRefused(self, fn):
        with self.assertRaises(ValueError):
            fn()


class lazy_class_property:
    """pyparsing's _lazyclassproperty: computed from the class it is read on."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, cls):
        return self.fn(cls if cls is not None else type(obj))


class CharSet:
    _ranges: list = []

    @lazy_class_property
    def chars(cls):
        out = []
        for klass in cls.__mro__:
            if klass is CharSet:
                break
            for low, high in getattr(klass, "_ranges", ()):
                out.extend(range(low, high + 1))
        return "".join(map(chr, out))


class TreeHelpers:
    """Hostile beside xml.etree.ElementTree.ElementTree: asks main to
    write a file where the compartment may not (red team)."""

    def save_to(self, path):
        self.write(path)
        return "written"


class CountAsserts:
    def count_big(self, n):
        self.assertCountEqual([[i] for i in range(n)], [[i] for i in range(n)])
        return "counted"


class LineAsserts:
    def same_text(self, first, second):
        self.assertEqual(first, second, msg="texts differ")
        return "same"
