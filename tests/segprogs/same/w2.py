import pycompart
def f(a):
    res = "unset"
    with pycompart.segment("P"):
        for v in a:
            if v < 0:
                break
        else:
            res = "all non-negative"
        try:
            q = 10 // a[0]
        finally:
            done = True
    print(res, q, done)
if __name__ == "__main__":
    f([1, 2]); f([5, -1])
