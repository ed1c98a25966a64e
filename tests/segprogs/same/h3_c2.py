import pycompart
def scan(lines):
    hit = None
    for ln in lines:
        with pycompart.segment("P"):
            ln.startswith("#") or (hit := ln.strip())
            msg = f"line {ln!r} last={hit}"
        print(msg)
if __name__ == "__main__":
    scan(["a ", "#c", "b"])
