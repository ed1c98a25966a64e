import pycompart
def f(data):
    prev = None
    for v in data:
        with pycompart.segment("P"):
            if prev is not None:
                print("delta", v - prev)
            prev = v
if __name__ == "__main__":
    f([1, 4, 9])
