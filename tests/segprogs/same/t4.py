import pycompart
def f(a):
    with pycompart.segment("P"):
        y = (n := len(a)) + n
    print(y)
if __name__ == "__main__":
    f([1, 2, 3])
