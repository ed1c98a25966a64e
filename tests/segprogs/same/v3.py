import pycompart, sys
def f():
    with pycompart.segment("P"):
        sys.exit(3)
if __name__ == "__main__":
    try:
        f()
    except SystemExit as e:
        print("SystemExit", e.code)
    except BaseException as e:
        print("OTHER", type(e).__name__, e)
