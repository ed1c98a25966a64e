import pycompart
from decimal import Decimal
@pycompart.entrypoint("P")
def g(pt, price):
    return pt, price * 2
def f():
    with pycompart.segment("P"):
        total = Decimal("1.10")
        point = (1, 2)
        tags = {"a"}
    print(total * 2, point == (1, 2), tags | {"b"} if isinstance(tags, set) else "not a set")
    print(g((3, 4), Decimal("2.5")))
if __name__ == "__main__":
    f()
