"""A small inventory library (the boxed dependency of this example).

It parses CSV-like text into Record objects held in an Inventory; the
program that uses it passes callbacks in (a progress hook, sort keys,
filters) and calls methods on the objects it gets back."""

import contextlib


class Record:
    def __init__(self, name, quantity, price):
        self.name = name
        self.quantity = quantity
        self.price = price

    def value(self):
        return round(self.quantity * self.price, 2)

    def __repr__(self):
        return f"Record({self.name!r}, quantity={self.quantity}, price={self.price})"


class Inventory:
    def __init__(self, records):
        self._records = list(records)

    def __len__(self):
        return len(self._records)

    def __iter__(self):
        return iter(self._records)

    def __getitem__(self, index):
        return self._records[index]

    def sorted_by(self, key, reverse=False):
        return sorted(self._records, key=key, reverse=reverse)

    def where(self, predicate):
        return Inventory(r for r in self._records if predicate(r))

    def total(self):
        return round(sum(r.value() for r in self._records), 2)

    @contextlib.contextmanager
    def restock(self, on_change=None):
        """Changes made inside the block are reported to on_change at the end."""
        before = {r.name: r.quantity for r in self._records}
        yield self
        for r in self._records:
            if r.quantity != before[r.name] and on_change is not None:
                on_change(r.name, before[r.name], r.quantity)

    def add(self, name, quantity):
        for r in self._records:
            if r.name == name:
                r.quantity += quantity
                return r
        raise KeyError(name)


def parse(text, progress=None):
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        name, quantity, price = (part.strip() for part in line.split(","))
        records.append(Record(name, int(quantity), float(price)))
        if progress is not None:
            progress(i, len(lines))
    return Inventory(records)
