"""Start-up time of the command line: `facetool --help`, `--version` and a subcommand's `--help`.

Each command runs in a fresh interpreter (``python -m facetool ...``), ``--repeat`` times; the table
gives the median wall time and its ratio to two baselines measured in the same run:
``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what every command
paid before the CLI imported lazily). Goal: `--help` under a second, a small multiple of the bare
interpreter and a fraction of the torch import.

    .venv/bin/python benchmarks/bench_cli.py            # 5 repeats
    .venv/bin/python benchmarks/bench_cli.py --quick    # 2 repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = [
    ("facetool --help", ["-m", "facetool", "--help"]),
    ("facetool --version", ["-m", "facetool", "--version"]),
    ("facetool train aig --help", ["-m", "facetool", "train", "aig", "--help"]),
    ("facetool eval ijbc --help", ["-m", "facetool", "eval", "ijbc", "--help"]),
]
BASELINES = [("python -c pass", ["-c", "pass"]), ("python -c 'import torch'", ["-c", "import torch"])]


def wall(args: list[str], repeat: int) -> float:
    env = {**os.environ, "COLUMNS": "120"}
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, *args], capture_output=True, env=env)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {r.stderr.decode()[-500:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per command (median reported)")
    ap.add_argument("--quick", action="store_true", help="2 runs per command")
    a = ap.parse_args()
    repeat = 2 if a.quick else max(1, a.repeat)
    wall(["-c", "pass"], 1)  # warm the file cache
    base = {name: wall(args, repeat) for name, args in BASELINES}
    bare, torch_import = base["python -c pass"], base["python -c 'import torch'"]
    print(f"{'command':30s} {'median s':>9s} {'x python -c pass':>17s} {'x import torch':>15s}")
    for name, args in BASELINES + CASES:
        t = base[name] if name in base else wall(args, repeat)
        print(f"{name:30s} {t:9.3f} {t / bare:17.1f} {t / torch_import:15.2f}")


if __name__ == "__main__":
    main()
