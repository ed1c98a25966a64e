"""Uses the inventory library: callbacks in, objects out (knows nothing
about pycompart)."""

import inventory

DATA = """
bolts, 120, 0.10
gears, 8, 12.50
springs, 40, 0.75
motors, 3, 49.00
"""


def progress(done, total):
    print(f"  parsed {done}/{total}")


inv = inventory.parse(DATA, progress=progress)
print(f"{len(inv)} records, worth {inv.total()}")
print("by value:", [r.name for r in inv.sorted_by(key=lambda r: r.value(), reverse=True)])
cheap = inv.where(lambda r: r.price < 1)
print("cheap:", [f"{r.name} x{r.quantity}" for r in cheap])
first = inv[0]
print("first:", first, "value", first.value(), "is a Record:", isinstance(first, inventory.Record))
with inv.restock(on_change=lambda name, old, new: print(f"  restocked {name}: {old} -> {new}")):
    inv.add("gears", 4)
    inv.add("motors", 1)
try:
    inv.add("widgets", 1)
except KeyError as exc:
    print("no such item:", exc)
print(f"worth {inv.total()} now")
