import pycompart
class Acc:
    def __init__(self): self.n = 1
    def bump(self):
        with pycompart.segment("P"):
            m = self.n + 1
        self.n = m
        return m
if __name__ == "__main__":
    print(Acc().bump())
