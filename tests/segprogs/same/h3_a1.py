import pycompart, contextlib
def parse(s):
    n = -1
    with pycompart.segment("P"):
        with contextlib.suppress(ValueError):
            n = int(s)
        r = n * 2
    return r
if __name__ == "__main__":
    print(parse("4"), parse("x"))
