import pycompart
def f(v):
    match v:
        case [a, b]:
            pass
    with pycompart.segment("P"):
        s = a + b
    print(s)
if __name__ == "__main__":
    f([1, 2])
