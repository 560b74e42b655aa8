"""`dvc repro` when nothing changed (target: under 2 s), side by side with `dvc status`.

`dvc status` is DVC's own cheapest full check of the same pipeline, so the ratio shows what our
stages' declared deps cost on top of DVC itself. Run from the repository root after one `dvc repro`
(the script runs it once if the pipeline is not up to date). Usage: python benchmarks/dvc_noop.py [N]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from timing import median_wall

TARGET_S = 2.0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "repro", "--quiet"], check=True)  # no-op when already reproduced
    repro = median_wall([dvc, "repro"], n)
    status = median_wall([dvc, "status"], n)
    print(f"median of {n} runs")
    print(f"dvc repro (no-op)  {repro * 1000:8.0f} ms")
    print(f"dvc status         {status * 1000:8.0f} ms   ratio repro/status {repro / status:4.2f}x")
    verdict = "meets" if repro < TARGET_S else "MISSES"
    print(f"dvc repro no-op {repro:.3f} s {verdict} the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
