import pycompart
def up(v): return v.upper()
HANDLERS = {"up": up}
def f(s):
    with pycompart.segment("P"):
        r = HANDLERS["up"](s)
    print(r)
if __name__ == "__main__":
    f("abc")
