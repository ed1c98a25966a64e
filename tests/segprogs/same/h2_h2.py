import pycompart, sys
if sys.version_info >= (3, 8):
    def helper(v): return v + 1
else:
    def helper(v): return v
def f(d):
    with pycompart.segment("P"):
        s = helper(d)
    print(s)
if __name__ == "__main__":
    f(1)
