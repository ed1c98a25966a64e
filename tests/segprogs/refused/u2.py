import pycompart, heapq
def f(h):
    with pycompart.segment("P"):
        heapq.heappush(h, 3)
        alias = h
        alias.append(9)
        setattr_target = None
    print(h)
if __name__ == "__main__":
    f([1])
