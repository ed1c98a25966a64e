import pycompart
counter = 0
def f():
    global counter
    counter = 10
    with pycompart.segment("P"):
        seen = counter
    print(seen)
if __name__ == "__main__":
    f()
