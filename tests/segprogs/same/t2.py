import pycompart
def f(flag):
    if flag:
        y = 1
    with pycompart.segment("P"):
        r = y if flag else 0
    print(r)
if __name__ == "__main__":
    f(True); f(False)
