import pycompart
def f():
    with pycompart.segment("P"):
        big = list(range(1000))
        n = len(big)
    del big
    print(n)
if __name__ == "__main__":
    f()
