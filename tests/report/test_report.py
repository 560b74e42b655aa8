"""The report stage: tables against the recovery table, what exists is rendered, what is missing is
listed, loss curves from the finetune runs, lineage of each number."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from lorascope.report.tables import table1, table2

from tests.conftest import record_output, run_of, tiny_params

RECOVERY = {
    "tasks": {
        "math500": {
            "base": 0.2, "lora": 0.5, "full": 0.6, "lora-attn-ablated": 0.3, "lora-mlp-ablated": 0.55,
            "recovery": 0.75, "recovery.lora-attn-ablated": 0.25, "recovery.lora-mlp-ablated": 0.875,
        },
        "aime24_nofigures": {
            "base": 0.1, "lora": 0.1, "full": 0.1, "lora-attn-ablated": 0.0, "lora-mlp-ablated": 0.1,
            "recovery": None, "recovery.reason": "full (0.1) <= base (0.1): the full finetune gained nothing to recover",
            "recovery.lora-attn-ablated": None, "recovery.lora-attn-ablated.reason": "full (0.1) <= base (0.1): x",
            "recovery.lora-mlp-ablated": None, "recovery.lora-mlp-ablated.reason": "full (0.1) <= base (0.1): x",
        },
    },
}  # fmt: skip


def report_record(root: Path) -> tuple[str, dict]:
    """The report run that logged ``root/reports`` and its ``report.json`` (missing, lineage, runs)."""
    import mlflow

    from lorascope import tracking

    run_id = run_of(root, "reports")
    tracking.client()  # points mlflow at the store
    return run_id, mlflow.artifacts.load_dict(f"runs:/{run_id}/report.json")


def test_tables_follow_the_recovery_table():
    t1 = table1(RECOVERY)
    assert t1.header == ["task", "base", "lora", "full", "recovery"]
    assert t1.rows == [["math500", 0.2, 0.5, 0.6, 0.75], ["aime24_nofigures", 0.1, 0.1, 0.1, None]]
    assert t1.notes == [
        f"aime24_nofigures, recovery: {RECOVERY['tasks']['aime24_nofigures']['recovery.reason']}"
    ]
    md = t1.markdown()
    assert (
        "| math500 | 0.200 | 0.500 | 0.600 | 0.750 |" in md
        and "| aime24_nofigures | 0.100 | 0.100 | 0.100 | — |" in md
    )
    parsed = list(csv.reader(io.StringIO(t1.csv())))
    assert parsed[0] == t1.header and parsed[2] == ["aime24_nofigures", "0.1", "0.1", "0.1", ""]

    t2 = table2(RECOVERY)
    assert t2 is not None
    assert t2.header == ["task", "lora", "lora-attn-ablated", "lora-mlp-ablated", "recovery",
                         "recovery.lora-attn-ablated", "recovery.lora-mlp-ablated"]  # fmt: skip
    assert t2.rows[0] == ["math500", 0.5, 0.3, 0.55, 0.75, 0.25, 0.875]
    assert len(t2.notes) == 3
    plain = {
        "tasks": {t: {k: v for k, v in r.items() if "ablated" not in k} for t, r in RECOVERY["tasks"].items()}
    }
    assert table2(plain) is None


def test_empty_workspace_renders_and_lists_everything_missing(workspace: Path):
    from lorascope.report.stage import run

    out = run(tiny_params())
    index = (out / "index.html").read_text()
    _, record = report_record(workspace)
    missing = record["missing"]
    assert not (out / "run.json").exists() and record["lineage"] == record["runs"] == {}
    for what in ("Table 1: metrics/recovery.json not found", "Figure 1: data/interp/categories/figure1.json not found",
                 "Figure 3: metrics/ablation/figure3.json not found", "SAE metrics: metrics/sae.json not found",
                 "training curve (lora): models/lora not found"):  # fmt: skip
        assert what in missing and what in index
    assert any(m.startswith("dashboard: ") for m in missing)
    assert not list(out.glob("*.png")) and not (out / "table1.md").exists()


def test_stage_renders_what_exists_with_lineage(workspace: Path):
    from lorascope import tracking
    from lorascope.report.stage import run

    def put(rel: str, data: dict, stage: str | None = None) -> str | None:
        """Write ``rel``; with ``stage``, a run of it that logged the file (its lineage record)."""
        path = workspace / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return record_output(stage, workspace, rel) if stage else None

    recovery_run = put("metrics/recovery.json", RECOVERY, "evaluate")
    fig3 = {"direction": "KL(P_lora || P_ablated)", "unit": "nats", "layers": [0, 1],
            "types": ["q_proj", "k_proj"], "kl": [[0.1, None], [0.02, 0.3]]}  # fmt: skip
    ablate_run = put("metrics/ablation/figure3.json", fig3, "ablate")
    put(
        "metrics/ablation/layers.json",
        {"ablations": {"L1": {"kl": 0.4, "delta_ce": 0.2}, "L0": {"kl": 0.1, "delta_ce": 0.05}}},
    )
    put("metrics/steer.json", {"backtrack_words": ["Wait"], "prompts": 4,
                               "directions": {"L1.gate_proj": {"0": {"backtracks_per_1k": 0.0, "mean_tokens": 30.0, "accuracy": 0.25},
                                                               "50": {"backtracks_per_1k": 12.5, "mean_tokens": 20.0, "accuracy": 0.0}}}})  # fmt: skip
    (workspace / "models/lora").mkdir(parents=True)
    (workspace / "models/lora/adapter_config.json").write_text(
        json.dumps({"r": 1, "made_in": str(workspace)})
    )
    run_id = record_output("finetune", workspace, "models/lora")
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.25)):
        tracking.client().log_metric(run_id, "loss", loss, step=step)

    out = run(tiny_params())
    assert (out / "table1.md").read_text().startswith("# Table 1") and (out / "table2.csv").is_file()
    steering = list(csv.reader(io.StringIO((out / "steering.csv").read_text())))
    assert steering[1:] == [
        ["L1.gate_proj", "0.0", "0.0", "30.0", "0.25"],
        ["L1.gate_proj", "50.0", "12.5", "20.0", "0.0"],
    ]
    assert (out / "plots/loss_lora.csv").read_text() == "step,loss\n1,3.0\n2,2.5\n3,2.25\n"
    assert (out / "plots/ablation_layers.csv").read_text() == "layer,kl,delta_ce\nL0,0.1,0.05\nL1,0.4,0.2\n"
    for png in ("figure3.png", "training.png"):
        assert (out / png).stat().st_size > 1000
    index = (out / "index.html").read_text()
    for rel in (
        "metrics/recovery.json",
        "metrics/ablation/figure3.json",
        "models/lora",
        "metrics/steer.json",
    ):
        assert tracking.dvc_md5(workspace / rel) in index and f"lorascope lineage {rel}" in index
    for rid in (recovery_run, ablate_run, run_id):  # run ids stay out of the DVC output
        assert rid not in index
    assert (
        "<img src='figure3.png'" in index
        and "Figure 1: data/interp/categories/figure1.json not found" in index
    )
    assert not (out / "run.json").exists()
    report_id, record = report_record(workspace)
    assert record["lineage"]["metrics/recovery.json"] == tracking.dvc_md5(workspace / "metrics/recovery.json")
    assert record["lineage"]["models/lora"] == tracking.dvc_md5(workspace / "models/lora")
    assert record["runs"]["metrics/recovery.json"] == recovery_run
    assert record["runs"]["metrics/ablation/figure3.json"] == ablate_run
    assert record["runs"]["models/lora"] == run_id
    assert "metrics/steer.json" in record["lineage"] and "metrics/steer.json" not in record["runs"]  # no run
    report_run = tracking.client().get_run(report_id)
    assert report_run.data.tags["upstream.finetune"] == run_id
    assert report_run.data.tags["upstream.models/lora"] == run_id
    assert report_run.data.tags["upstream.metrics/recovery.json"] == recovery_run
    assert report_run.data.tags["dvc.out.reports"] == tracking.dvc_md5(out)
    artifacts = {a.path for a in tracking.client().list_artifacts(report_id, "reports")}
    assert {"reports/index.html", "reports/figure3.png"} <= artifacts


def test_a_figure_that_fails_is_listed_not_fatal(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    from lorascope.report import figures
    from lorascope.report.stage import run

    def broken(*_args: object) -> None:
        raise ValueError("no layers")

    monkeypatch.setattr(figures, "figure3", broken)
    path = workspace / "metrics/ablation/figure3.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"layers": [], "types": [], "kl": []}))
    out = run(tiny_params())
    missing = report_record(workspace)[1]["missing"]
    assert (
        "Figure 3: ablation KL by layer and component type: could not be drawn from "
        "metrics/ablation/figure3.json (ValueError: no layers)" in missing
    )
    assert not (out / "figure3.png").exists() and (out / "index.html").is_file()


@pytest.mark.parametrize("bad", ["{not json", "[]"])
def test_unreadable_inputs_are_listed(workspace: Path, bad: str):
    from lorascope.report.stage import run

    (workspace / "metrics").mkdir()
    (workspace / "metrics/sae.json").write_text(bad)
    run(tiny_params())
    missing = report_record(workspace)[1]["missing"]
    assert any(m.startswith(("SAE metrics: ", "SAE: FVU")) for m in missing)
