import pycompart
def parse(s):
    n = 0
    with pycompart.segment("P"):
        try:
            n = int(s)
        except* ValueError:
            pass
        out = n + 1
    return out
if __name__ == "__main__":
    print(parse("5"), parse("z"))
