import pycompart
print("top-level side effect")
with pycompart.segment("P"):
    r = 6 * 7
print(r)
