"""The floor under `extract`'s per-document reader: what a fork costs before it reads anything.

    python bench/fork_floor.py            # 200 forks each way, twice, interleaved

A process that has imported pypdfium2 (as extract's reader server has) forks a child that exits at
once, with and without `unshare(CLONE_NEWUSER | CLONE_NEWNET)` (the reader's own namespace, no
network). Printed per fork: wall time, the children's CPU time, the parent's CPU time. The sum of the
two CPU times is what a document pays before its first page; compare it with bench/extract.py's direct
CPU for a 1-page text PDF (about 2 ms).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import time

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def forks(n: int, namespace: bool) -> tuple[float, float, float]:
    libc = ctypes.CDLL(None, use_errno=True)
    began, children, own = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            if namespace:
                libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
            os._exit(0)
        os.waitpid(pid, 0)
    wall = (time.perf_counter() - began) / n * 1000
    after, now = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
    child_cpu = ((after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)) / n * 1000
    own_cpu = ((now.user + now.system) - (own.user + own.system)) / n * 1000
    return wall, child_cpu, own_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import pypdfium2  # noqa: F401 - the reader server's size, as extract forks it

    print("per fork, ms: wall, children's CPU, parent's CPU, CPU in all")
    for _ in range(args.rounds):
        for namespace in (False, True):
            wall, child, own = forks(args.forks, namespace)
            name = "fork + unshare(user, net)" if namespace else "fork"
            print(f"{name:<26} {wall:6.2f} {child:6.2f} {own:6.2f} {child + own:6.2f}")


if __name__ == "__main__":
    main()
