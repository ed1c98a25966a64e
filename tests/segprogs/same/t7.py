import pycompart
x = 1
if __name__ == "__main__":
    with pycompart.segment("P"):
        x = 2
    print(x)
