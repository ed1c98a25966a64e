import pycompart
def f(items):
    found = None
    with pycompart.segment("P"):
        for it in items:
            if it > 3:
                found = it
                break
    return found
if __name__ == "__main__":
    print(f([1, 5]))
    print(f([1, 2]))
