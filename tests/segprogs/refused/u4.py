import pycompart
def outer():
    count = 0
    with pycompart.segment("P"):
        def inc():
            nonlocal count
            count += 1
        inc()
    print(count)
if __name__ == "__main__":
    outer()
