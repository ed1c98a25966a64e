import pycompart
def helper(): return "orig"
def other(): return "patched"
def f():
    with pycompart.segment("P"):
        r = helper()
    print(r)
if __name__ == "__main__":
    helper = other
    f()
