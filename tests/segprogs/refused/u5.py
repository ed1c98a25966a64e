import pycompart
def f():
    with pycompart.segment("P"):
        def sq(v): return v * v
        import json
        class K: pass
    print(sq(3), json.dumps([1]), K.__name__)
if __name__ == "__main__":
    f()
