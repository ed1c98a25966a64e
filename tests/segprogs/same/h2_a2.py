import pycompart
def setup():
    global CONFIG
    CONFIG = 5
def f():
    with pycompart.segment("P"):
        v = CONFIG * 2
    print(v)
if __name__ == "__main__":
    setup()
    f()
