"""`lorascope --help` start-up time (target: under 1 s), side by side with the peer CLIs it wraps.

Runs each command N times in fresh processes and prints the median wall time, the ratio to
lorascope's, and whether the target holds. Usage: python benchmarks/cli_startup.py [N]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from timing import median_wall

TARGET_S = 1.0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    bindir = Path(sys.executable).parent
    commands = {
        "lorascope --help": [str(bindir / "lorascope"), "--help"],
        "dvc --help": [shutil.which("dvc", path=str(bindir)) or "dvc", "--help"],
        "mlflow --help": [shutil.which("mlflow", path=str(bindir)) or "mlflow", "--help"],
    }
    results = {name: median_wall(cmd, n) for name, cmd in commands.items()}
    ours = results["lorascope --help"]
    print(f"median of {n} runs")
    for name, t in results.items():
        print(f"{name:<20} {t * 1000:8.0f} ms   ratio to lorascope {t / ours:5.1f}x")
    verdict = "meets" if ours < TARGET_S else "MISSES"
    print(f"lorascope --help {ours:.3f} s {verdict} the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
