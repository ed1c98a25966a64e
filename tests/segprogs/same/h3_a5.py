import pycompart
def run(cmds):
    x = "none"
    res = []
    for c in cmds:
        with pycompart.segment("P"):
            match c.split():
                case ["set", v]:
                    x = v
                case _:
                    pass
            shown = f"{c}->{x}"
        res.append(shown)
    print(res, x)
if __name__ == "__main__":
    run(["set 3", "noop"])
