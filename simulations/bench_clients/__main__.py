"""``python -m simulations.bench_clients``: the command of :mod:`simulations.bench_clients`."""

import sys
from pathlib import Path

if not __package__:  # run by its path: the project's root makes the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from simulations.bench_clients.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
