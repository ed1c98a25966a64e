import pycompart
def f():
    import os
    def helper(v): return v + 1
    with pycompart.segment("P"):
        r = helper(os.sep == "/")
    print(r)
if __name__ == "__main__":
    f()
