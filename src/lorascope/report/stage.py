"""Run the ``report`` stage: everything the paper shows, from whatever upstream outputs exist.

Writes ``reports/`` (temp directory, then rename):

* ``table1.{md,csv}`` (base / LoRA / full / recovery), ``table2.{md,csv}`` (ablated adapters),
  ``steering.{md,csv}`` (backtracking per 1000 tokens, length, accuracy per direction and alpha),
  ``attribution.{md,csv}`` + ``attribution.png`` (each generated ablation's Δaccuracy with its CI);
* ``figure1.png`` (category shares), ``figure2.png`` (the paper's Figure 2: category density of the SAE
  latents, overall with subcategories and by layer and type), ``figure2_lora.png`` (the same density of the
  LoRA directions by layer and type and of the MLP neurons by layer),
  ``figure3.png`` (ablation KL, layer x type), ``sae.png`` (FVU by layer and type, L0, alive
  latents), ``training.png`` (loss curves of the finetunes, read from their MLflow runs);
* ``plots/*.csv``: the loss curves and the ablation KL per layer and type, for ``dvc plots``;
* ``dashboard.html``: the offline feature dashboard;
* ``index.html``: all of it on one page, each number with the DVC md5 of the file it came from
  (``lorascope lineage <file>`` finds the run that produced it; the report's MLflow run records
  those run ids, which stay out of ``reports/`` so that equal inputs give equal bytes).

A missing upstream output is never an error: its table or figure is left out and named in the
index and the run (``report.missing``).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.config import Params
from lorascope.project import workspace_root
from lorascope.report.tables import Table, table1, table2

RECOVERY = paths.RECOVERY
FIGURE1 = paths.FIGURE1
FIGURE2 = paths.FIGURE2
FIGURE2_LORA = paths.FIGURE2_LORA
FIGURE3 = paths.FIGURE3
ABLATION = paths.ABLATION
SAE = paths.SAE_METRICS
STEER = paths.STEER_METRICS
ATTRIBUTE = paths.ATTRIBUTE_ACCURACY
FINETUNES = paths.FINETUNES


@dataclass
class Page:
    """What the index shows, in order, and what could not be shown."""

    sections: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    lineage: dict[str, str] = field(default_factory=dict)
    """Artefact (relative path) -> its DVC md5 (shown on the page)."""
    runs: dict[str, str] = field(default_factory=dict)
    """Artefact (relative path) -> the run that produced it (logged to MLflow only)."""

    def record(self, root: Path, rel: Path, md5: str | None = None) -> str | None:
        """Note ``rel``'s md5 and the run that logged it as an output; returns that run id."""
        from lorascope.tracking import dvc_md5, producer

        md5 = md5 or dvc_md5(root / rel)
        self.lineage[rel.as_posix()] = md5
        if made_by := producer(root / rel, md5):
            self.runs[rel.as_posix()] = made_by["run_id"]
            return made_by["run_id"]
        return None


def _load(root: Path, rel: Path, page: Page, what: str) -> Any | None:
    """The JSON at ``rel``; a missing or unreadable file is recorded on the page."""
    path = root / rel
    if not path.is_file():
        page.missing.append(f"{what}: {rel} not found")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        page.missing.append(f"{what}: {rel} unreadable ({e})")
        return None
    page.record(root, rel)
    return data


def _source(rel: Path, page: Page) -> str:
    md5 = page.lineage.get(rel.as_posix())
    return f"<p class='src'>data: <code>{html.escape(rel.as_posix())}</code>" + (
        f", md5 <code>{md5}</code></p>" if md5 else "</p>"
    )


def _html_table(table: Table) -> str:
    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return f"<table><tr>{head}</tr>{body}</table>" + (f"<ul class='notes'>{notes}</ul>" if notes else "")


def _write_table(out: Path, name: str, title: str, table: Table, rel: Path, page: Page) -> None:
    (out / f"{name}.md").write_text(f"# {title}\n\n{table.markdown()}")
    (out / f"{name}.csv").write_text(table.csv())
    page.sections.append(
        f"<h2>{html.escape(title)}</h2>{_html_table(table)}{_source(rel, page)}"
        f"<p class='files'><a href='{name}.md'>{name}.md</a> · <a href='{name}.csv'>{name}.csv</a></p>"
    )


def _figure(out: Path, name: str, title: str, draw: Callable[[Path], Any], rel: Path, page: Page) -> None:
    try:
        draw(out / f"{name}.png")
    except Exception as e:  # a figure that cannot be drawn must not cost the rest of the report
        page.missing.append(f"{title}: could not be drawn from {rel} ({type(e).__name__}: {e})")
        return
    page.sections.append(
        f"<h2>{html.escape(title)}</h2><img src='{name}.png' alt='{html.escape(title)}'>{_source(rel, page)}"
    )


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Table(header, rows, []).csv())


def loss_curves(root: Path, page: Page, digests: dict[Path, str]) -> dict[str, list[tuple[int, float]]]:
    """Per finetune variant, its logged training loss by step, from the MLflow run that logged the
    model's md5 (``digests``: md5 by path, already computed for the run's inputs)."""
    from lorascope.tracking import client

    curves = {}
    for variant, rel in FINETUNES.items():
        if root / rel not in digests:
            page.missing.append(f"training curve ({variant}): {rel} not found")
            continue
        run_id = page.record(root, rel, digests[root / rel])
        if run_id is None:
            page.missing.append(f"training curve ({variant}): no MLflow run logged {rel} as an output")
            continue
        try:
            history = client().get_metric_history(run_id, "loss")
        except Exception as e:  # the run lives in another store, or the store is unreachable
            page.missing.append(f"training curve ({variant}): run {run_id} not readable ({type(e).__name__})")
            continue
        if not history:
            page.missing.append(f"training curve ({variant}): run {run_id} logged no loss")
            continue
        curves[variant] = sorted((m.step, m.value) for m in history)
    return curves


def steering_table(steer: dict[str, Any]) -> Table:
    """Per direction and alpha: both backtracking counts (the paper's when recorded), length, accuracy."""
    sweeps = [(d, float(a), s) for d, sweep in steer["directions"].items()
              for a, s in sorted(sweep.items(), key=lambda kv: float(kv[0]))]  # fmt: skip
    paper = any("backtrack_pct_words" in s for *_, s in sweeps)
    rows = [
        [d, alpha, s["backtracks_per_1k"], *([s.get("backtrack_pct_words")] if paper else []),
         s["mean_tokens"], s["accuracy"]]
        for d, alpha, s in sweeps
    ]  # fmt: skip
    words = ", ".join(steer.get("backtrack_words", []))
    notes = [f"backtracking words: {words}; {steer.get('prompts', '?')} prompts"]
    notes += [f"{k}: {v}" for k, v in (steer.get("backtrack_counts") or {}).items()]
    notes += [f"{sel} chose {name}" for sel, name in (steer.get("selectors") or {}).items()]
    notes += [f"{sel}: {why}; nothing steered" for sel, why in (steer.get("unmatched") or {}).items()]
    header = ["direction", "alpha", "backtracks per 1000 tokens"]
    header += ["backtracking words per 100 words (paper's count)"] if paper else []
    return Table([*header, "mean tokens", "accuracy"], rows, notes)


def attribution_table(accuracy: dict[str, Any], exact: dict[str, Any] | None) -> Table:
    """The generated ablations (most accuracy lost first): why each was generated, its label, Δaccuracy
    with its CI, Δbacktracking, and its exact ΔCE and KL where ``exact.json`` has them."""
    measured = {u["unit"]: u for u in (exact or {}).get("units", [])}
    rows = []
    for name, u in sorted(accuracy.get("units", {}).items(), key=lambda kv: (kv[1]["delta_accuracy"], kv[0])):
        lo, hi = u.get("delta_accuracy_ci") or (None, None)
        m = measured.get(name, {})
        rows.append([name, ", ".join(u["sets"]), u.get("label"), u["accuracy"], u["delta_accuracy"], lo, hi,
                     u["delta_backtracks_per_1k"], m.get("delta_ce"), m.get("kl"), m.get("rank")])  # fmt: skip
    lora = accuracy.get("lora") or {}
    notes = [f"the adapter as trained: accuracy {lora.get('accuracy')}, backtracks per 1000 tokens "
             f"{lora.get('backtracks_per_1k')} on {accuracy.get('questions')} questions"]  # fmt: skip
    if exact:
        notes.append(
            f"screen vs exact ΔCE, Spearman: {exact.get('spearman_components')} over the components, "
            f"{exact.get('spearman_measured')} over the measured units; mean exact ΔCE top "
            f"{exact['mean_delta_ce'].get('top')}, random control {exact['mean_delta_ce'].get('control')}"
        )
    notes += [f"{sel}: {why}; nothing generated" for sel, why in (accuracy.get("unmatched") or {}).items()]
    header = ["unit", "generated as", "label", "accuracy", "Δaccuracy", "CI low", "CI high",
              "Δbacktracks per 1000 tokens", "exact ΔCE", "exact KL", "screen rank"]  # fmt: skip
    return Table(header, rows, notes)


def _attribution(root: Path, cfg: Any, tmp: Path, page: Page) -> None:
    """``attribute``'s table and figure, when its outputs are there."""
    from lorascope.report import figures

    if (accuracy := _load(root, ATTRIBUTE, page, "Attribution")) is None:
        return
    exact = _load(root, paths.ATTRIBUTE_EXACT, page, "Attribution (exact)")
    _write_table(tmp, "attribution", "Attribution: accuracy without each unit", attribution_table(accuracy, exact),
                 ATTRIBUTE, page)  # fmt: skip
    _figure(tmp, "attribution", "Attribution: Δaccuracy per ablated unit",
            _drawer(figures.attribution, accuracy, cfg.dpi), ATTRIBUTE, page)  # fmt: skip


def _ablation_plots(root: Path, out: Path) -> None:
    """Per-layer and per-type KL as CSV for ``dvc plots``."""
    for sweep, key in (("layers", "layer"), ("types", "type")):
        path = root / ABLATION / f"{sweep}.json"
        if path.is_file():
            ablations = json.loads(path.read_text())["ablations"]
            rows = [[name, a["kl"], a["delta_ce"]] for name, a in ablations.items()]
            if sweep == "layers":
                rows.sort(key=lambda r: int(r[0][1:]))
            _csv(out / "plots" / f"ablation_{sweep}.csv", [key, "kl", "delta_ce"], rows)


def index_html(page: Page, dashboard: bool) -> str:
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in page.missing)
    lineage = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td><code>{v}</code></td>"
        f"<td><code>lorascope lineage {html.escape(k)}</code></td></tr>"
        for k, v in sorted(page.lineage.items())
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lorascope report</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} img {{ max-width: 100%; }} .src, .files, .notes {{ color: #666; font-size: 13px; }}
.missing {{ background: #fff4e5; border-left: 4px solid #f0a020; padding: .5em 1em; }}
</style></head><body>
<h1>lorascope report</h1>
<p>Rank-1 LoRAs Encode Interpretable Reasoning Signals: tables and figures from this workspace's pipeline outputs.
{"<a href='dashboard.html'>Feature dashboard</a> (offline, one file)." if dashboard else ""}
Each number names the DVC md5 of the file it comes from; <code>lorascope lineage FILE</code> finds the MLflow run
that wrote it and walks back to the data.</p>
{f"<div class='missing'><b>Missing</b> (not rendered):<ul>{missing}</ul></div>" if missing else ""}
{"".join(page.sections)}
<h2>Lineage</h2><table><tr><th>artefact</th><th>md5</th><th>its runs</th></tr>{lineage}</table>
</body></html>
"""


def run(params: Params) -> Path:
    """Render ``reports/`` from what exists; returns the folder."""
    import mlflow

    from lorascope.atomic import atomic_path
    from lorascope.tracking import stage_run

    cfg, root = params.report, workspace_root()
    candidates = [
        RECOVERY, FIGURE1.parent, FIGURE3.parent, SAE, STEER, *FINETUNES.values(), paths.INTERP,
        paths.CONTEXTS, paths.activations("lora"), paths.activations("mlp"), paths.SAE,
    ]  # fmt: skip
    inputs = [root / p for p in candidates if (root / p).exists()]
    out = root / paths.REPORTS
    with stage_run("report", params, inputs) as sr:
        with atomic_path(out) as tmp:
            page = _render(root, cfg, tmp, sr.inputs_md5)
            for kept in paths.SEEDS_REPORT:  # not this stage's: `lorascope seeds` wrote it
                if (root / kept).is_file():
                    (tmp / kept.name).write_bytes((root / kept).read_bytes())
        mlflow.log_metric("missing_items", len(page.missing))
        mlflow.set_tags({f"upstream.{rel}": run_id for rel, run_id in page.runs.items()})
        mlflow.log_dict({"missing": page.missing, "lineage": page.lineage, "runs": page.runs}, "report.json")
        mlflow.log_artifacts(str(out), "reports")
        sr.log_outputs(out)
    return out


PAPER_FIGURES = (
    (FIGURE1, "Figure 1", "figure1", "Figure 1: category shares", "figure1"),
    (
        FIGURE2,
        "Figure 2",
        "figure2",
        "Figure 2: category density of the SAE latents (overall, subcategories, layer x component)",
        "figure2_sae",
    ),
    (
        FIGURE2_LORA,
        "Figure 2 (LoRA directions)",
        "figure2_lora",
        "Figure 2, LoRA-direction version: category density of LoRA directions and MLP neurons",
        "figure2",
    ),
    (FIGURE3, "Figure 3", "figure3", "Figure 3: ablation KL by layer and component type", "figure3"),
    (SAE, "SAE metrics", "sae", "SAE: FVU by layer and type, L0, alive latents", "sae_metrics"),
)
"""Each figure drawn from one JSON file, in page order: ``(its data, what a missing one is called, file
name, title, the ``report.figures`` function that draws it)``."""


def _tables(root: Path, tmp: Path, page: Page) -> None:
    """Tables 1 and 2 from ``metrics/recovery.json`` (Table 2: when an ablated adapter was evaluated)."""
    if (recovery := _load(root, RECOVERY, page, "Table 1")) is not None:
        _write_table(
            tmp, "table1", "Table 1: recovery of the full finetune", table1(recovery), RECOVERY, page
        )
        if (t2 := table2(recovery)) is not None:
            _write_table(tmp, "table2", "Table 2: ablated adapters", t2, RECOVERY, page)
        else:
            page.missing.append("Table 2: no ablated adapter was evaluated (evaluate.variants)")
    else:
        page.missing.append(f"Table 2: {RECOVERY} not found")


def _drawer(draw: Callable[[Any, Path, int], Any], data: Any, dpi: int) -> Callable[[Path], Any]:
    """``draw(data, path, dpi)`` as a function of the path alone (what ``_figure`` calls)."""
    return lambda path: draw(data, path, dpi)


def _paper_figures(root: Path, cfg: Any, tmp: Path, page: Page) -> None:
    """Every figure of ``PAPER_FIGURES`` whose data is there (Figure 3 with the ablation sweeps' plots)."""
    from lorascope.report import figures

    for rel, what, name, title, draw in PAPER_FIGURES:
        if (data := _load(root, rel, page, what)) is None:
            continue
        _figure(tmp, name, title, _drawer(getattr(figures, draw), data, cfg.dpi), rel, page)
        if name == "figure3":
            _ablation_plots(root, tmp)


def _training(root: Path, cfg: Any, tmp: Path, page: Page, digests: dict[Path, str]) -> None:
    """The finetunes' loss curves (CSV per variant, one figure), from their MLflow runs."""
    from lorascope.report import figures

    if curves := loss_curves(root, page, digests):
        for variant, points in curves.items():
            _csv(tmp / "plots" / f"loss_{variant}.csv", ["step", "loss"], [list(p) for p in points])
        _figure(
            tmp,
            "training",
            "Training loss",
            lambda p: figures.training_curves(curves, p, cfg.dpi),
            FINETUNES["lora"],
            page,
        )


def _render(root: Path, cfg: Any, tmp: Path, digests: dict[Path, str]) -> Page:
    """Write every table, figure and page into ``tmp``; returns what the index shows."""
    from lorascope.report.dashboard import build

    tmp.mkdir(parents=True)
    page = Page()
    _tables(root, tmp, page)
    _paper_figures(root, cfg, tmp, page)
    _training(root, cfg, tmp, page, digests)
    if (steer := _load(root, STEER, page, "Steering")) is not None:
        _write_table(
            tmp, "steering", "Steering: backtracking by magnitude", steering_table(steer), STEER, page
        )
    _attribution(root, cfg, tmp, page)
    info = build(root, cfg, tmp / "dashboard.html")
    page.missing += [f"dashboard: {m}" for m in info.missing]
    dashboard = (tmp / "dashboard.html").is_file()
    (tmp / "index.html").write_text(index_html(page, dashboard))
    return page
