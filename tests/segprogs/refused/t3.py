import pycompart
def f():
    x = 1
    with pycompart.segment("P"):
        del x
    try:
        print(x)
    except NameError as e:
        print("NameError")
if __name__ == "__main__":
    f()
