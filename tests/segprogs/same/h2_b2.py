import pycompart, re, logging
PAT = re.compile(r"\d+")
log = logging.getLogger("x")
def f(s):
    with pycompart.segment("P"):
        m = PAT.findall(s)
    print(m)
if __name__ == "__main__":
    f("a12b34")
