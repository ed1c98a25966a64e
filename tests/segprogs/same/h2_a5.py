import pycompart
def f():
    it = iter([1, 2, 3])
    print(next(it))
    with pycompart.segment("P"):
        it = [4, 5]
    print(it)
if __name__ == "__main__":
    f()
