import pycompart
def f(fail):
    e = "initial"
    with pycompart.segment("P"):
        try:
            if fail:
                raise ValueError("x")
        except ValueError as e:
            pass
    print(e)
if __name__ == "__main__":
    f(False)
