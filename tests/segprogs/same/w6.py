import pycompart
LIMIT = 3
def f():
    with pycompart.segment("P"):
        r = LIMIT
    print(r)
if __name__ == "__main__":
    LIMIT = 5
    f()
