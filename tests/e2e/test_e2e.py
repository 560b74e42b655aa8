"""End to end: a fresh git + DVC repo, one `dvc repro` of the tiny profile shared by every test here.

What DVC promises is checked on it: the committed `dvc.lock` is what a fresh repro writes, a no-op
re-run, a forced re-run of a finetune leaves everything cached, editing a module or a params key makes
stale exactly the stages that read it, push + pull across two clones runs nothing, experiments; and
the lineage through MLflow by digest. The model organism's science checks run on the same repro.
(The bfloat16 repro is tests/e2e/test_bf16.py; under `pytest -n 2` each e2e module runs whole on one
worker: conftest.pytest_xdist_make_scheduler.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SUMMARY

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # one shared repro: 4 min on a quiet 2-core VM

ALL_STAGES = (
    "base", "prepare", "finetune@lora", "finetune@full", "extract@lora", "extract@mlp", "evaluate@base",
    "evaluate@lora", "evaluate@full", "recovery", "sae", "contexts@lora", "contexts@mlp", "contexts@sae",
    "autointerp@lora", "autointerp@mlp", "autointerp@sae", "categorize", "ablate", "ablate-export@attn",
    "ablate-export@mlp", "evaluate@lora-attn-ablated", "evaluate@lora-mlp-ablated", "steer", "attribute", "report",
)  # fmt: skip


def sh(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def copy_tree(dest: Path) -> None:
    """This repository's tracked files, as a fresh clone has them (with their working-tree content,
    so an uncommitted edit is tested; an untracked stray file is not copied: `git add` a new file)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return git_env()


def git_env() -> dict[str, str]:
    """This process's environment for git and DVC in a fresh repository: the venv's commands first, a
    git identity, and no MLflow store or workspace root of the test session (the repository's own)."""
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LORASCOPE_ROOT")}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}"
    out.update(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )  # fmt: skip
    return out


def fresh_repo(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], params: str | None = None
) -> Path:
    """A git repository of this tree's tracked files (``params`` as its params.yaml when given), committed."""
    root = tmp_path_factory.mktemp("clone") / "lorascope"
    copy_tree(root)
    if params is not None:
        (root / "params.yaml").write_text(params)
    sh("git", "init", "-q", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "clone", cwd=root, env=env)
    return root


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> tuple[Path, str, Path]:
    """A fresh git repository of this tree after one traced `dvc repro`: (root, stdout, trace file)."""
    root = fresh_repo(tmp_path_factory, env)
    trace = root.parent / "trace.jsonl"
    first = sh("dvc", "repro", cwd=root, env={**env, "LORASCOPE_TRACE": str(trace)})
    return root, first.stdout, trace


def test_the_organism_shows_the_papers_effects(repro, record_property):
    """The science check on the real `dvc repro` of the tiny profile (tests/test_organism.py's checks):
    Tables 1 and 2, a backtracking feature found, labelled and steered, the ablation KL ranked. Its
    Tables 1 and 2 are printed at the end of the test session (CI's log shows them)."""
    from tests.test_organism import (
        check_ablation,
        check_attribution,
        check_planted_direction,
        check_sae,
        check_steering,
        check_tables,
    )

    root, _, _ = repro
    for table in ("table1", "table2"):
        record_property(SUMMARY, (root / "reports" / f"{table}.md").read_text())
    check_tables(root)
    check_sae(root)
    check_steering(root, check_planted_direction(root))
    check_ablation(root)
    check_attribution(root)


def stale(root: Path, env: dict[str, str]) -> set[str]:
    """The stages `dvc status` reports as changed."""
    out = json.loads(sh("dvc", "status", "--json", cwd=root, env=env).stdout or "{}")
    return {name.split(":")[-1] for name in out}


def runs(db: Path, stage: str) -> list[tuple[str, dict[str, str]]]:
    with sqlite3.connect(db) as con:
        ids = [r[0] for r in con.execute(
            "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = ? ORDER BY r.start_time", (f"lorascope-{stage}",))]  # fmt: skip
        return [
            (i, dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (i,)).fetchall()))
            for i in ids
        ]


def test_fresh_repro_writes_the_committed_lock_and_a_rerun_runs_nothing(repro, env):
    root, first, _ = repro
    for stage in ALL_STAGES:
        assert f"Running stage '{stage}'" in first, stage
    for out in (
        "metrics/eval/lora.json", "metrics/eval/lora-mlp-ablated.json", "models/lora-attn-ablated/ablation.json",
        "metrics/ablation/groups.json", "metrics/ablation/figure3.json", "data/steer/summary.parquet",
        "metrics/steer.json", "reports/index.html", "reports/dashboard.html", "reports/figure3.png",
        "reports/table2.md", "data/interp/sae.parquet", "data/interp/categories/figure1.json",
        "metrics/recovery.json", "metrics/recovery.md", "data/activations/lora/index.json",
        "data/contexts/mlp.features.parquet", "models/sae/sae.safetensors", "metrics/sae.json",
        "models/lora/adapter_model.safetensors", "models/full/model.safetensors", "models/base/config.json",
        "data/prepared/train.parquet", "metrics/prepare.json",
    ):  # fmt: skip
        assert (root / out).is_file(), out
    # the lock a fresh repro writes is the committed one, byte for byte (CI enforces it here)
    diff = sh("git", "diff", "--exit-code", "HEAD", "--", "dvc.lock", cwd=root, env=env, check=False)
    assert diff.returncode == 0, (  # (DVC stages the lock it writes: compare with the commit, not the index)
        "dvc.lock differs from the committed one: run `dvc repro` and commit the lock it writes\n"
        + diff.stdout[:4000]
    )
    # nothing run-specific in any output
    texts = [*root.glob("metrics/**/*.json"), *root.glob("models/**/*.json"), *root.glob("data/**/*.json"),
             *root.glob("models/**/*.md"), *root.glob("reports/*.md"), root / "reports/index.html"]  # fmt: skip
    for path in texts:
        text = path.read_text()
        assert "run_id" not in text and str(root) not in text, path
    assert not list(root.glob("**/run.json")) and not list(root.glob("**/*.run.json"))

    second = sh("dvc", "repro", cwd=root, env=env)
    assert "Data and pipelines are up to date." in second.stdout and "Running stage" not in second.stdout


def test_every_stage_declares_what_it_imports_and_reads(repro):
    """The traced repro: each stage's loaded lorascope modules are among its code deps, and each
    params key it read is among its params deps (or its speed-only keys)."""
    from lorascope.pipeline import (
        NOT_A_DEP,
        by_name,
        code_deps,
        covers,
        is_docstring_only,
        module_file,
        other_sections,
    )

    root, _, trace = repro
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assembled = other_sections()  # every command loads every section model through config.py
    seen = set()
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        name = stage_name(record["argv"])
        seen.add(name)
        stage = by_name(name)
        deps = set(code_deps(stage))
        for module in set(record["modules"]) - NOT_A_DEP:
            path = module_file(module)
            if path is None or path in assembled or is_docstring_only(path):
                continue
            rel = path.relative_to(REPO).as_posix()
            assert rel in deps, f"{name} imports {module} but {rel} is not among its deps"
        declared = [k for keys in lock[name].get("params", {}).values() for k in keys]
        for key in record["keys"]:
            assert covers([*declared, *stage.speed], key), f"{name} reads {key}, not a params dep of it"
    assert seen == set(ALL_STAGES)


def stage_name(argv: list[str]) -> str:
    """The DVC stage a traced command line ran."""
    if argv[:2] == ["evaluate", "recovery"]:
        return "recovery"
    family = "ablate-export" if argv[:2] == ["ablate", "export"] else argv[0]
    item = next((argv[i + 1] for i, a in enumerate(argv) if a in ("--variant", "--source", "--group")), None)
    return f"{family}@{item}" if item else family


def test_push_then_pull_in_another_clone_runs_nothing(repro, env, tmp_path):
    root, _, _ = repro
    remote = tmp_path / "remote"
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=root, env=env)
    sh("dvc", "push", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "lock", "--allow-empty", cwd=root, env=env)

    other = tmp_path / "other"
    sh("git", "clone", "-q", str(root), str(other), cwd=tmp_path, env=env)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=other, env=env)
    sh("dvc", "pull", cwd=other, env=env)
    assert stale(other, env) == set()
    again = sh("dvc", "repro", cwd=other, env=env)
    assert "Running stage" not in again.stdout
    assert (other / "models/sae/sae.safetensors").read_bytes() == (
        root / "models/sae/sae.safetensors"
    ).read_bytes()


def test_lineage_through_mlflow_by_digest(repro, env):
    root, _, _ = repro
    db = root / "mlflow.db"
    assert db.is_file() and (root / "mlruns").is_dir()
    ignored = sh(
        "git", "check-ignore", "mlflow.db", "mlruns", "models/base", "data/prepared", cwd=root, env=env
    )
    assert ignored.stdout.split() == ["mlflow.db", "mlruns", "models/base", "data/prepared"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    [(prep_id, tags)] = runs(db, "prepare")
    [base_dep] = [d for d in lock["prepare"]["deps"] if d["path"] == "models/base"]
    [base_out] = [o for o in lock["base"]["outs"] if o["path"] == "models/base"]
    assert tags["dvc.md5.models/base"] == base_dep["md5"] == base_out["md5"]
    [(base_id, base_tags)] = runs(db, "base")[:1]
    assert base_tags["dvc.out.models/base"] == base_out["md5"] and tags["upstream.base"] == base_id
    first_commit = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=root, env=env).stdout.strip()
    assert tags["git.commit"] == first_commit  # the repro ran on the clone's first commit

    def run_of(path: str) -> tuple[str, dict]:
        """What `lorascope lineage --json <path>` prints, walked in this process (the CLI is run below)."""
        from lorascope.tracking import lineage, producer, use_tracking_uri

        with use_tracking_uri(f"sqlite:///{db}"):
            made_by = producer(root / path, name=path)
            assert made_by is not None, path
            chain = lineage(made_by["run_id"])
        return chain["run_id"], chain

    lora_id, lora = run_of("models/lora")
    cli = json.loads(sh("lorascope", "lineage", "--json", "models/lora", cwd=root, env=env).stdout)
    assert cli == lora
    assert {u["stage"] for u in lora["upstream"]} == {"prepare", "base"}
    # contexts -> extract -> finetune -> prepare -> base
    contexts_id, chain = run_of("data/contexts/lora.parquet")
    [extract] = chain["upstream"]
    assert extract["stage"] == "extract"
    assert [u["stage"] for u in extract["upstream"]] == ["base", "finetune", "prepare"]
    assert [u["run_id"] for u in extract["upstream"] if u["stage"] == "finetune"] == [lora_id]
    text = sh("lorascope", "lineage", "data/contexts/lora.parquet", cwd=root, env=env).stdout
    assert f"<-  base  run {base_id}" in text

    eval_id, eval_chain = run_of("metrics/eval/lora.json")
    assert [u["run_id"] for u in eval_chain["upstream"] if u["stage"] == "finetune"] == [lora_id]
    _, interp = run_of("data/interp/lora.parquet")
    assert [u["run_id"] for u in interp["upstream"]] == [contexts_id]
    # Table 1 in `dvc metrics show`; the recovery run reaches every evaluated variant
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=root, env=env).stdout)[""]["data"]
    table = shown["metrics/recovery.json"]["data"]["tasks"]
    assert set(table) == {"aime24_nofigures", "math500", "gpqa_diamond"}
    _, recovery = run_of("metrics/recovery.json")
    assert len(recovery["upstream"]) == 5 and eval_id in {u["run_id"] for u in recovery["upstream"]}
    # Table 2: the ablated adapters come from the finetune through the export
    for group in ("attn", "mlp"):
        export_id, export = run_of(f"models/lora-{group}-ablated")
        assert [u["run_id"] for u in export["upstream"]] == [lora_id]
        _, ablated_eval = run_of(f"metrics/eval/lora-{group}-ablated.json")
        assert export_id in {u["run_id"] for u in ablated_eval["upstream"]}
    # summary metrics only: per-component KL is a plain output, not thousands of metrics
    assert set(shown) == {"metrics/recovery.json", "metrics/prepare.json", "metrics/sae.json",
                          "metrics/ablation/groups.json", "metrics/attribute/accuracy.json"}  # fmt: skip
    _, attribute = run_of("metrics/attribute/accuracy.json")
    assert lora_id in {u["run_id"] for u in attribute["upstream"]}
    _, ablate = run_of("metrics/ablation/groups.json")
    assert lora_id in {u["run_id"] for u in ablate["upstream"]}
    # the report: nothing missing after a full repro, its run reaches the recovery run
    report_id, report = run_of("reports")
    [(rid, report_tags)] = [r for r in runs(db, "report") if r[0] == report_id]
    assert report_tags["upstream.metrics/recovery.json"] == recovery["run_id"]
    with sqlite3.connect(db) as con:
        [(missing,)] = con.execute(
            "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'missing_items'", (rid,)
        ).fetchall()
    assert missing == 0
    plots = sh("dvc", "plots", "show", "--json", cwd=root, env=env).stdout
    for name in ("loss_lora.csv", "loss_full.csv", "ablation_layers.csv", "ablation_types.csv"):
        assert f"reports/plots/{name}" in plots, name


def test_experiments_log_to_the_same_store_and_show_a_readable_table(repro, env):
    root, _, _ = repro
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "lock", "--allow-empty", cwd=root, env=env)
    before = runs(root / "mlflow.db", "report")
    exp = sh("dvc", "exp", "run", "--temp", "-S", "report.dpi=60", cwd=root, env=env)
    assert "Running stage 'report'" in exp.stdout and exp.stdout.count("Running stage") == 1
    after = runs(root / "mlflow.db", "report")
    assert len(after) == len(before) + 1  # the temp workspace logged to the repository's store
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    with sqlite3.connect(root / "mlflow.db") as con:
        dpi = con.execute(
            "SELECT value FROM params WHERE run_uuid = ? AND key = 'dpi'", (after[-1][0],)
        ).fetchone()
    assert dpi == ("60",)
    table = sh("dvc", "exp", "show", "--only-changed", "--no-pager", "--md", cwd=root, env=env).stdout
    header = [c.strip() for c in table.splitlines()[0].split("|") if c.strip()]
    assert "report.dpi" in header and len(header) < 12, header


def test_rerunning_a_finetune_and_edits_make_stale_exactly_their_readers(repro, env):
    """A forced re-run of the LoRA finetune (days of GPU time at paper scale) writes the same adapter, so
    nothing after it runs again (`base` re-run the same way:
    `tests/base/test_base.py::test_same_seed_same_bytes`). Last in the module: the re-run logs a second
    finetune run of the same adapter, which the lineage test would then find as the adapter's latest
    producer."""
    from lorascope.pipeline import STAGES, code_deps

    root, _, _ = repro
    before = (root / "models/lora/adapter_model.safetensors").read_bytes()
    rerun = sh("dvc", "repro", "-f", "-s", "finetune@lora", cwd=root, env=env)  # same seed, same weights
    assert "Running stage 'finetune@lora'" in rerun.stdout
    assert (root / "models/lora/adapter_model.safetensors").read_bytes() == before
    assert stale(root, env) == set()

    # editing a module makes stale exactly the stages whose import closure holds it
    for module in ("src/lorascope/extract/store.py", "src/lorascope/config.py"):
        original = (root / module).read_bytes()
        (root / module).write_bytes(original + b"\n# edited\n")
        readers = {s.name for s in STAGES if module in code_deps(s)}
        assert {n.split("@")[0] for n in stale(root, env)} == readers, module
        (root / module).write_bytes(original)
    assert {"sae", "contexts"} <= {s.name for s in STAGES if "src/lorascope/extract/store.py" in code_deps(s)}

    # one params key: only the stages that read it
    params = (root / "params.yaml").read_text()
    for key, value, expected in (
        ("full_lr", "0.123", {"finetune@full"}),
        ("batch_size", "7", set()),  # ablate.batch_size only changes speed
    ):
        data = yaml.safe_load(params)
        section = {"full_lr": "finetune", "batch_size": "ablate"}[key]
        data[section][key] = float(value) if "." in value else int(value)
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        assert stale(root, env) == expected, key
    (root / "params.yaml").write_text(params)
    assert stale(root, env) == set()
