import pycompart
def f(a):
    with pycompart.segment("P"):
        [v for v in a if (last := v) > 0]
    print(last)
if __name__ == "__main__":
    f([3, 4])
