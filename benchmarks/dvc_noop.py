"""`dvc repro` when nothing changed (target: under 2 s), side by side with `dvc status` and with DVC's YAML
parsed by ruamel's pure-Python parser (what DVC does without `ruamel.yaml.clib`, a lorascope dependency).

DVC parses `params.yaml` once per stage with params and the lock twice; the libyaml parser (the same YAML 1.2
values: ruamel's resolver stays in Python) is most of the difference. Run from the repository root after one
`dvc repro` (the script runs it once if the pipeline is not up to date). Usage: python benchmarks/dvc_noop.py [N]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from timing import median_wall

TARGET_S = 2.0
PURE = (
    "import sys, ruamel.yaml\n"
    "_init = ruamel.yaml.YAML.__init__\n"
    "def _pure(self, *a, **k):\n"
    "    k['pure'] = True\n"
    "    _init(self, *a, **k)\n"
    "ruamel.yaml.YAML.__init__ = _pure\n"
    "from dvc.cli import main\n"
    "sys.argv = ['dvc', 'repro']\n"
    "sys.exit(main())\n"
)
"""`dvc repro` with every ruamel YAML() forced to the pure-Python parser."""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "repro", "--quiet"], check=True)  # no-op when already reproduced
    repro = median_wall([dvc, "repro"], n)
    pure = median_wall([sys.executable, "-c", PURE], n)
    status = median_wall([dvc, "status"], n)
    print(f"median of {n} runs")
    print(f"dvc repro (no-op)               {repro * 1000:8.0f} ms")
    print(f"dvc repro, pure-Python YAML     {pure * 1000:8.0f} ms   ratio pure/libyaml {pure / repro:4.2f}x")
    print(
        f"dvc status                      {status * 1000:8.0f} ms   ratio repro/status {repro / status:4.2f}x"
    )
    verdict = "meets" if repro < TARGET_S else "MISSES"
    print(f"dvc repro no-op {repro:.3f} s {verdict} the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
