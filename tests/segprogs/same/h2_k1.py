import pycompart
def f(lines):
    count = 0
    for line in lines:
        with pycompart.segment("P"):
            count += 1
            print(count, line)
if __name__ == "__main__":
    f(["a", "b", "c"])
