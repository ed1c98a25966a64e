import pycompart
def f():
    total = 0
    with pycompart.segment("P"):
        total = 100
        ready = True
    total += 1
    print(total)
    ready += 1
if __name__ == "__main__":
    f()
    print("done")
