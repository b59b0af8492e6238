"""Objects that plain pickle cannot share, stored by one process and used by another.

The parent creates an ephemeral dict and starts a worker: this same script, run again
with ``--worker`` and the dict's id. The worker stores a lambda, an instance of a class
defined in its ``__main__``, a module, and the dict handle itself as both key and value
(``d[d] = d``). The parent then reads each one back and uses it.

Values are pickled with cloudpickle. It stores the code of the lambda and the definition
of the class from ``__main__`` with the value, so the reader needs neither. A module and
a dict handle are stored by reference: the reader imports the module, and the handle
comes back as a live handle on the same dict.

    python examples/worker_objects.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from sharedict import Dict


class Greeter:
    """A class of ``__main__``, which the standard pickle could only store by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def greet(self) -> str:
        return f"hello from the {self.name}"


def fill(dict_id: str) -> None:
    """Store the four objects in the dict ``dict_id``; runs in the worker process."""
    d = Dict.from_id(dict_id)
    d["lambda"] = lambda n: n * n
    d["instance"] = Greeter("worker")
    d["module"] = statistics
    d[d] = d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", metavar="DICT_ID", help="run as the worker that fills the dict DICT_ID")
    args = parser.parse_args()
    if args.worker:
        fill(args.worker)
        return

    with Dict.ephemeral() as d:
        # The worker is a separate interpreter, as a separate program would be. It has its
        # own __main__ module and gets the dict only as its id.
        subprocess.run([sys.executable, __file__, "--worker", d.object_id], check=True)
        print(f"the worker stored {d.len()} entries in {d.object_id}")

        square = d["lambda"]
        print(f"lambda: square(7) = {square(7)}")

        greeter = d["instance"]
        print(f"instance of {type(greeter).__name__}: greet() = {greeter.greet()!r}")

        module = d["module"]
        print(f"module {module.__name__}: mean([1, 2, 3, 4]) = {module.mean([1, 2, 3, 4])}")

        handle = d[d]
        print(f"handle: d[d] == d is {handle == d}, and d[d]['lambda'](3) = {handle['lambda'](3)}")


if __name__ == "__main__":
    main()
