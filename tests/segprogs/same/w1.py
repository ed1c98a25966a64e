import pycompart
def f(n):
    with pycompart.segment("P"):
        class C:
            size = n
        r = C.size
    print(r)
if __name__ == "__main__":
    f(7)
