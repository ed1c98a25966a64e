import pycompart
def f(acc):
    with pycompart.segment("P"):
        acc.append(1)
        acc = None
if __name__ == "__main__":
    a = []; f(a); print(a)
