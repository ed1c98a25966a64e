import pycompart
try:
    import simplejson as json
except ImportError:
    import json
def f(d):
    with pycompart.segment("P"):
        s = json.dumps(d)
    print(s)
if __name__ == "__main__":
    f({"a": 1})
