import pycompart, json, subprocess
def load(s):
    with pycompart.segment("P"):
        d = json.loads(s)
    return d
def lookup(d, k):
    with pycompart.segment("P"):
        v = d[k]
    return v
def opn(p):
    with pycompart.segment("P"):
        fh = open(p).read()
    return fh
def conv(b):
    with pycompart.segment("P"):
        t = b.decode("utf-8")
    return t
def first(xs):
    with pycompart.segment("P"):
        v = next(iter(xs))
    return v
if __name__ == "__main__":
    tests = [(lookup, ({"a": 1}, "b")), (opn, ("/nonexistent/x",)),
             (conv, (b"\xff\xfe",)), (first, ([],))]
    for fn, a in tests:
        try:
            print(fn(*a))
        except json.JSONDecodeError as e:
            print("json", e.msg, e.pos, e.lineno, e.colno)
        except KeyError as e:
            print("key", e, repr(e), e.args)
        except OSError as e:
            print("os", type(e).__name__, e.errno, e.filename, e.strerror, str(e))
        except UnicodeDecodeError as e:
            print("uni", e.encoding, e.start, e.end, e.reason, str(e))
        except StopIteration as e:
            print("stop", repr(e))
