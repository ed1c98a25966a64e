import pycompart, os
TOKEN = os.urandom(4).hex()
def f():
    with pycompart.segment("P"):
        t = TOKEN
    print(t == TOKEN)
if __name__ == "__main__":
    f()
