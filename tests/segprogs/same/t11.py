import pycompart
def f():
    for i in range(3):
        with pycompart.segment("P"):
            if i > 0:
                print("prev", last)
        last = i
if __name__ == "__main__":
    f()
