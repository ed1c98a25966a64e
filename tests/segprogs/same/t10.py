import pycompart
def outer():
    x = 41
    def inner():
        with pycompart.segment("P"):
            y = x + 1
        return y
    return inner()
if __name__ == "__main__":
    print(outer())
