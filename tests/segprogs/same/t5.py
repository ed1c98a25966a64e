import pycompart
def f(v):
    with pycompart.segment("P"):
        match v:
            case [a, b]:
                s = a + b
            case _:
                s = 0
    print(s, a)
if __name__ == "__main__":
    f([1, 2])
