"""``lorascope seeds``: the pipeline for N seed triples as DVC experiments, then one report across them.

Seed i sets ``base.seed``, ``finetune.seed`` and ``sae.seed`` to i (``--vary`` narrows that, e.g. to keep
one base model and vary the finetune and the SAE). The experiments run through DVC's queue, ``jobs`` at a
time; each finished one is read back (``seeds.results``) and the report (``seeds.summary``) goes to
``reports/seeds.md`` and ``reports/seeds.json`` (``.dvcignore`` keeps them out of the ``report`` stage's
output). A seed that fails is reported with its error and the others are kept; the command fails only
when no seed finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.seeds import queue
from lorascope.seeds.results import SeedResult, read

REPORT_MD, REPORT_JSON = paths.SEEDS_REPORT
NEEDED = ("base", "lora", "full")
"""The variants Table 1 needs."""


def check(params: Params, seeds: Sequence[int], vary: Sequence[str], root: Path) -> None:
    """One-line errors for what cannot give a report: no or repeated seeds, a profile without the
    stages the report reads, a workspace that is not a git + DVC repository with a commit."""
    if not seeds:
        raise LorascopeError("seeds: --n must be at least 1 (or list --seeds)")
    if dup := sorted({s for s in seeds if list(seeds).count(s) > 1}):
        raise LorascopeError(f"seeds: --seeds lists {', '.join(map(str, dup))} more than once")
    if any(s < 0 for s in seeds):
        raise LorascopeError("seeds: seeds must be >= 0")
    if bad := [v for v in vary if v not in queue.SEEDED]:
        raise LorascopeError(f"seeds: --vary {', '.join(bad)}: expected some of {', '.join(queue.SEEDED)}")
    if not vary:
        raise LorascopeError("seeds: --vary names no section; every seed would be the same run")
    if missing := [v for v in NEEDED if v not in params.evaluate.variants]:
        raise LorascopeError(
            f"evaluate.variants: the profile lacks {', '.join(missing)}; the seeds report needs Table 1 "
            f"({', '.join(NEEDED)})"
        )
    if not params.steer.directions:
        raise LorascopeError("steer.directions: empty; the seeds report compares the steering curve")
    dvc_yaml = root / "dvc.yaml"
    text = dvc_yaml.read_text() if dvc_yaml.is_file() else ""
    if lacking := [s for s in ("recovery:", "sae:", "steer:", "categorize:") if f"\n  {s}" not in text]:
        raise LorascopeError(
            f"{dvc_yaml}: no {', '.join(s.rstrip(':') for s in lacking)} stage; `lorascope pipeline write` first"
        )
    if not (root / ".git").exists() or not (root / ".dvc").is_dir():
        raise LorascopeError(f"{root}: not a git + DVC repository; seeds runs DVC experiments")


def run(params: Params, root: Path, seeds: Sequence[int], jobs: int, vary: Sequence[str]) -> dict[str, Any]:
    """Queue, run and collect every seed; write the report; returns it (as data)."""
    from rich.console import Console
    from rich.progress import Progress

    from lorascope.atomic import write_json, write_text
    from lorascope.seeds.summary import markdown, summarize

    check(params, seeds, vary, root)
    from lorascope.project import use_workspace
    from lorascope.tracking import client

    with use_workspace(root, root):  # create the store once: concurrent experiments would race to migrate it
        client().search_experiments(max_results=1)
    ids = queue.queue(root, seeds, vary)
    with Progress(console=Console(stderr=True), transient=False) as bar:
        job = bar.add_task(f"seeds: {len(seeds)} DVC experiment(s), {jobs} at a time", total=len(seeds))
        state = queue.run(root, ids, jobs, lambda done: bar.update(job, completed=done))
    results: list[SeedResult] = []
    failed: dict[int, str] = {}
    for seed in seeds:
        triple = {s: (seed if s in vary else getattr(params, s).seed) for s in queue.SEEDED}
        if state[seed] != "Success":
            failed[seed] = queue.failure(root, seed)
            continue
        results.append(read(root, queue.experiment_name(seed), seed, triple))
    if not results:  # nothing to report: an earlier report stays as it was
        raise LorascopeError(f"seeds: no seed finished ({'; '.join(f'{s}: {w}' for s, w in failed.items())})")
    report = summarize(results, failed, params.steer.alphas, same_base="base" not in vary)
    (root / paths.REPORTS).mkdir(parents=True, exist_ok=True)
    write_json(root / REPORT_JSON, report)
    write_text(root / REPORT_MD, markdown(report))
    return report
