"""The ``lorascope`` command: one sub-command per stage, plus params, lineage and ui.

Heavy libraries (torch, transformers, mlflow, great-expectations) are imported inside commands so
``lorascope --help`` stays fast. Bad input ends in ``error: <one line>`` and exit status 2; other
failures in one line and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer

if TYPE_CHECKING:
    from lorascope.config import Params

app = typer.Typer(
    help="lorascope: rank-1 LoRA adapters as a measurement device for reasoning finetunes.\n\n"
    "Each stage is a sub-command and a DVC stage of the same name; `dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
params_app = typer.Typer(help="Show and select params profiles.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(params_app, name="params")

ParamsOpt = Annotated[
    Path | None,
    typer.Option(
        "--params",
        help="Params file to read (default: params.yaml at the workspace root).",
        show_default=False,
    ),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Profile name in pipelines/profiles/ (tiny, qwen2.5-0.5b, qwen2.5-32b-paper) or a profile path; "
        "replaces --params.",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class ParamsChoice:
    """What ``--params`` / ``--profile`` chose, and the one way to load it."""

    params: Path | None = None
    profile: str | None = None
    loaded: Params | None = None
    """Set by ``takes_params``: the params as the command started, kernels pinned."""

    def load(self) -> Params:
        """The params, validated, with the CPU kernels they ask for pinned (``lorascope.kernels``)."""
        if self.loaded is not None:
            return self.loaded
        from lorascope.config import load_params
        from lorascope.kernels import pin

        params = load_params(self.params, self.profile)
        pin(params.kernels)
        return params


DEFAULT_CHOICE = ParamsChoice()

_C = TypeVar("_C", bound=Callable[..., Any])


def takes_params(fn: _C) -> _C:
    """Give a command the ``--params`` and ``--profile`` options in place of its ``choice: ParamsChoice``
    parameter (at the same place in its signature, so its options and their order stay as they were)."""
    sig = inspect.signature(fn, eval_str=True)
    at = list(sig.parameters).index("choice")
    pair = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=ann)
        for name, ann in (("params", ParamsOpt), ("profile", ProfileOpt))
    ]
    others = [p for p in sig.parameters.values() if p.name != "choice"]
    new = sig.replace(parameters=others[:at] + pair + others[at:])

    @functools.wraps(fn)
    def command(*args: Any, params: Path | None = None, profile: str | None = None, **kwargs: Any) -> Any:
        # loaded (and the kernels pinned) before the command imports its stage, and so torch
        choice = ParamsChoice(params, profile)
        return fn(*args, choice=ParamsChoice(params, profile, choice.load()), **kwargs)

    command.__signature__ = new  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in new.parameters.values()}
    return cast(_C, command)


_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    _state["debug"] = debug


# ------------------------------------------------------------------------------------------ stages
@app.command()
@takes_params
def base(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Build the tiny random Qwen2 + tokenizer, or pin a real base model, into models/base/."""
    from lorascope.base.stage import run

    out = run(choice.load())
    typer.echo(f"base: wrote {out}")


@app.command()
@takes_params
def prepare(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Load s1K-1.1 (hub, file or synthetic), format as s1, tokenize, validate into data/prepared/."""
    from lorascope.prepare.stage import run

    out = run(choice.load())
    typer.echo(f"prepare: wrote {out}")


class FinetuneVariant(str, Enum):
    lora = "lora"
    full = "full"


@app.command()
@takes_params
def finetune(
    variant: Annotated[
        FinetuneVariant,
        typer.Option("--variant", help="lora: rank-r adapter via peft; full: every parameter."),
    ] = FinetuneVariant.lora,
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Train the LoRA adapter or the full finetune on data/prepared/ into models/<variant>/."""
    from lorascope.finetune.stage import run

    out = run(choice.load(), variant.value)
    typer.echo(f"finetune: wrote {out}")


evaluate_app = typer.Typer(
    help="Benchmark one model variant through lm-eval into metrics/eval/<variant>.json (no sub-command), "
    "or collect the recovery table.",
    invoke_without_command=True,
    rich_markup_mode=None,
)
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.callback()
@takes_params
def evaluate(
    ctx: typer.Context,
    variant: Annotated[
        str, typer.Option("--variant", help="A name in evaluate.variants (base, lora, full, ...).")
    ] = "lora",
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task", help="Run only this task (repeatable; default: evaluate.tasks).", show_default=False
        ),
    ] = None,
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Benchmark one model variant (AIME'24 no-figures, MATH500, GPQA-Diamond) into metrics/eval/<variant>.json."""
    if ctx.invoked_subcommand is not None:
        return
    from lorascope.evaluate.stage import run

    out = run(choice.load(), variant, task or None)
    typer.echo(f"evaluate: wrote {out}")


@evaluate_app.command("recovery")
@takes_params
def evaluate_recovery(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Tables 1 and 2: per task every variant's score and its recovery (variant - base) / (reference - base):
    the LoRA against the full finetune, an ablated adapter against the LoRA."""
    from lorascope.evaluate.stage import run_recovery

    out = run_recovery(choice.load())
    typer.echo(out.with_suffix(".md").read_text(), nl=False)
    typer.echo(f"evaluate recovery: wrote {out}")


ablate_app = typer.Typer(
    help="Zero adapter components and measure KL(P_lora || P_ablated) into metrics/ablation/ (no "
    "sub-command), or export an ablated adapter.",
    invoke_without_command=True,
    rich_markup_mode=None,
)
app.add_typer(ablate_app, name="ablate")


@ablate_app.callback()
@takes_params
def ablate(ctx: typer.Context, choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """KL(P_lora || P_ablated) and delta CE per component, layer, type and group into metrics/ablation/."""
    if ctx.invoked_subcommand is not None:
        return
    from lorascope.ablate.stage import run

    out = run(choice.load())
    typer.echo(f"ablate: wrote {out}")


@ablate_app.command("export")
@takes_params
def ablate_export(
    group: Annotated[
        str,
        typer.Option(
            "--group",
            help="Components to remove: attn, mlp, all, a type (q_proj ...), L<layer> or L<layer>.<type>.",
        ),
    ],
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Write models/lora-<group>-ablated: a peft adapter without the group's components (Table 2)."""
    from lorascope.ablate.export import run_export

    out = run_export(choice.load(), group)
    typer.echo(f"ablate export: wrote {out}")


@app.command()
@takes_params
def steer(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Generate with alpha x a LoRA component or SAE feature added; backtracking per 1000 tokens into data/steer/."""
    from lorascope.steer.stage import run

    out = run(choice.load())
    typer.echo(f"steer: wrote {out}")


@app.command()
@takes_params
def attribute(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Screen every component and SAE latent, ablate the top ones exactly and on the benchmarks: metrics/attribute/."""
    from lorascope.attribute.stage import run

    out = run(choice.load())
    typer.echo(f"attribute: wrote {out}")


@app.command()
@takes_params
def report(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Tables, figures, index.html and the offline dashboard.html into reports/ (what exists; the rest is listed)."""
    from lorascope.report.stage import run

    out = run(choice.load())
    typer.echo(f"report: wrote {out}/index.html")


class ExtractSource(str, Enum):
    lora = "lora"
    mlp = "mlp"


@app.command()
@takes_params
def extract(
    source: Annotated[
        ExtractSource,
        typer.Option(
            "--source", help="lora: x.A of every adapter component; mlp: the base model's MLP neurons."
        ),
    ] = ExtractSource.lora,
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Record per-token activations over data/prepared/ into the sharded store data/activations/<source>/."""
    from lorascope.extract.stage import run

    out = run(choice.load(), source.value)
    typer.echo(f"extract: wrote {out}")


sae_app = typer.Typer(
    help="Train the BatchTopK SAE on data/activations/lora/, calibrate its threshold, write models/sae/ "
    "(no sub-command), or export it.",
    invoke_without_command=True,
    rich_markup_mode=None,
)
app.add_typer(sae_app, name="sae")


@sae_app.callback()
@takes_params
def sae(ctx: typer.Context, choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Train the BatchTopK SAE on data/activations/lora/, calibrate its threshold, write models/sae/."""
    if ctx.invoked_subcommand is not None:
        return
    from lorascope.sae.stage import run

    out = run(choice.load())
    typer.echo(f"sae: wrote {out}")


@sae_app.command("export")
def sae_export(
    output: Annotated[Path, typer.Option("--output", help="Directory to write.")],
    fmt: Annotated[
        str, typer.Option("--format", help="saelens: a directory sae_lens.SAE.load_from_disk loads.")
    ] = "saelens",
) -> None:
    """Export models/sae/ for another tool."""
    from lorascope import paths
    from lorascope.project import workspace_root
    from lorascope.sae.export import export

    out = export(workspace_root() / paths.SAE, output, fmt)
    typer.echo(f"sae export: wrote {out}")


class ContextsSource(str, Enum):
    lora = "lora"
    mlp = "mlp"
    sae = "sae"


@app.command()
@takes_params
def contexts(
    source: Annotated[
        ContextsSource,
        typer.Option(
            "--source",
            help="lora: adapter components (both signs); mlp: MLP neurons; sae: SAE latents of the LoRA store.",
        ),
    ] = ContextsSource.lora,
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Stream an activation store once: top-k windows, quantile and random samples, per-feature stats."""
    from lorascope.contexts.stage import run

    out = run(choice.load(), source.value)
    typer.echo(f"contexts: wrote {out}")


@app.command()
@takes_params
def autointerp(
    source: Annotated[
        ContextsSource,
        typer.Option(
            "--source", help="lora: adapter directions (each sign); mlp: MLP neurons; sae: live SAE latents."
        ),
    ] = ContextsSource.lora,
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Label every feature from its max-activating contexts (paper prompt B.1) and score the labels."""
    from lorascope.autointerp.stage import run

    out = run(choice.load(), source.value)
    typer.echo(f"autointerp: wrote {out}")


@app.command()
@takes_params
def categorize(choice: ParamsChoice = DEFAULT_CHOICE) -> None:
    """Generate shared categories (B.2a), assign every labelled feature one (B.2b), Figure 1/2 data."""
    from lorascope.categorize.stage import run

    out = run(choice.load())
    typer.echo(f"categorize: wrote {out}")


@app.command()
def seeds(
    n: Annotated[
        int | None,
        typer.Option("--n", help="Seed triples 0..N-1 (or name them with --seeds).", show_default=False),
    ] = None,
    seed_list: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated seeds, e.g. 0,3,7.", show_default=False)
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Experiments run at once (queue workers).")
    ] = 1,
    vary: Annotated[
        str, typer.Option("--vary", help="Sections whose seed each triple sets (comma-separated).")
    ] = "base,finetune,sae",
) -> None:
    """Run the pipeline of params.yaml for N seed triples as DVC experiments (dvc exp run --queue), then
    write reports/seeds.md and .json: Tables 1 and 2, the SAE and steering per seed and across seeds,
    direction and feature stability."""
    from lorascope.errors import LorascopeError
    from lorascope.project import workspace_root
    from lorascope.seeds.stage import REPORT_MD, run

    if (n is None) == (seed_list is None):
        raise LorascopeError("seeds: give --n N or --seeds LIST (one of them)")
    if seed_list is not None:
        try:
            chosen = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise LorascopeError(
                f"seeds: --seeds {seed_list!r}: expected integers separated by commas"
            ) from None
        if not chosen:
            raise LorascopeError(f"seeds: --seeds {seed_list!r} names no seed")
    else:
        chosen = list(range(n or 0))
    root = workspace_root()
    report = run(DEFAULT_CHOICE.load(), root, chosen, jobs, [v.strip() for v in vary.split(",") if v.strip()])
    failed = f"; failed: {', '.join(map(str, report['failed']))}" if report["failed"] else ""
    typer.echo(
        f"seeds: {len(report['seeds'])} of {len(chosen)} seeds finished{failed}; wrote {root / REPORT_MD}"
    )


sweep_app = typer.Typer(
    help="Optuna studies over the finetune (LoRA rank x lr) and SAE stages, one MLflow child run per trial.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(sweep_app, name="sweep")
StudyOpt = Annotated[
    str | None, typer.Option("--study", help="Study name to create, resume or join.", show_default=False)
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage: sqlite:///<repo>/optuna.db (default), journal:<file> (several processes on one "
        "machine) or an RDB URL (cluster).",
        show_default=False,
    ),
]


def _sweep(target: str, study: str | None, storage: str | None, n_trials: int | None, space: Path | None,
           choice: ParamsChoice, jobs: int = 1) -> None:  # fmt: skip
    from lorascope.project import workspace_root
    from lorascope.sweep.space import load_space
    from lorascope.sweep.study import optimize

    base = choice.load()
    path = space or workspace_root() / "pipelines" / "sweeps" / f"{target}.yaml"
    spec = load_space(path, base)
    if spec.target != target:
        from lorascope.errors import LorascopeError

        raise LorascopeError(f"{path}: target is {spec.target!r}, but `sweep {target}` was asked")
    name = study or f"{target}-sweep"
    result = optimize(name, spec, base, storage, n_trials, n_jobs=jobs)
    states: dict[str, int] = {}
    for t in result.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    typer.echo(f"sweep: study {name}: " + ", ".join(f"{n} {k}" for k, n in sorted(states.items())))


JobsOpt = Annotated[
    int,
    typer.Option(
        "--jobs",
        min=1,
        help="Trials this process runs at once, in threads (each in its own workspace; several processes "
        "on one journal or RDB study scale further).",
    ),
]
NTrialsOpt = Annotated[
    int | None,
    typer.Option(
        "--n-trials", help="Trials this process runs at most (the space's n_trials caps the study)."
    ),
]
SpaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--space", help="Search space file (default: pipelines/sweeps/<target>.yaml).", show_default=False
    ),
]


@sweep_app.command("lora")
@takes_params
def sweep_lora(study: StudyOpt = None, storage: StorageOpt = None, n_trials: NTrialsOpt = None,
               space: SpaceOpt = None, choice: ParamsChoice = DEFAULT_CHOICE,
               jobs: JobsOpt = 1) -> None:  # fmt: skip
    """Sweep LoRA rank x learning rate (x alpha); objective: held-out loss on prepared rows."""
    _sweep("lora", study, storage, n_trials, space, choice, jobs)


@sweep_app.command("sae")
@takes_params
def sweep_sae(study: StudyOpt = None, storage: StorageOpt = None, n_trials: NTrialsOpt = None,
              space: SpaceOpt = None, choice: ParamsChoice = DEFAULT_CHOICE,
              jobs: JobsOpt = 1) -> None:  # fmt: skip
    """Sweep SAE k, expansion, lr; objectives: FVU at the calibrated L0 and/or the splice KL."""
    _sweep("sae", study, storage, n_trials, space, choice, jobs)


@sweep_app.command("best")
@takes_params
def sweep_best(
    study: Annotated[str, typer.Option("--study", help="Study name.")],
    storage: StorageOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="Params file to write (default: sweeps/<study>.params.yaml).", show_default=False
        ),
    ] = None,
    choice: ParamsChoice = DEFAULT_CHOICE,
) -> None:
    """Print the best trial's params and write a params file with them (usable with --params)."""
    from lorascope.atomic import write_text
    from lorascope.config import dump_params
    from lorascope.project import workspace_root
    from lorascope.sweep.space import overrides
    from lorascope.sweep.study import best

    values, objective, number = best(study, storage)
    resolved = overrides(choice.load(), values, {}, f"study {study} trial {number}")
    target = output or workspace_root() / "sweeps" / f"{study}.params.yaml"
    header = f"# params.yaml with the best trial ({number}) of study {study!r}: {dict(values)}\n\n"
    write_text(target, header + dump_params(resolved, comments=True))
    typer.echo(f"best trial {number}: objective {objective}")
    for key, value in values.items():
        typer.echo(f"  {key} = {value}")
    typer.echo("dvc exp run " + " ".join(f"-S {k}={v}" for k, v in values.items()))
    typer.echo(f"params file: {target} (lorascope <stage> --params {target})")


# ------------------------------------------------------------------------------------------ params
@params_app.command("show")
@takes_params
def params_show(
    choice: ParamsChoice = DEFAULT_CHOICE,
    section: Annotated[
        str | None,
        typer.Option("--section", help="Print only this section (e.g. finetune).", show_default=False),
    ] = None,
    comments: Annotated[bool, typer.Option("--comments/--no-comments", help="Document each key.")] = False,
) -> None:
    """Print the resolved, validated params as YAML."""
    from lorascope.config import Params, dump_params
    from lorascope.errors import LorascopeError

    resolved = choice.load()
    text = dump_params(resolved, comments=comments)
    if section:
        if section not in Params.model_fields:
            raise LorascopeError(
                f"--section: unknown section {section!r} (expected one of: {', '.join(Params.model_fields)})"
            )
        import yaml

        text = yaml.safe_dump({section: yaml.safe_load(text)[section]}, sort_keys=False)
    typer.echo(text, nl=False)


@params_app.command("list")
def params_list() -> None:
    """List the profiles in pipelines/profiles/."""
    from lorascope.config import list_profiles

    for name in list_profiles():
        typer.echo(name)


@params_app.command("use")
def params_use(
    profile: Annotated[
        str, typer.Argument(help="Profile to resolve into params.yaml (what `dvc repro` reads).")
    ],
    output: Annotated[Path, typer.Option("--output", help="File to write.")] = Path("params.yaml"),
) -> None:
    """Write a profile, resolved and documented, to params.yaml so that `dvc repro` runs it."""
    from lorascope.atomic import write_text
    from lorascope.config import dump_params, load_params
    from lorascope.project import workspace_root

    resolved = load_params(profile=profile)
    header = (
        f"# Resolved from pipelines/profiles/{profile}.yaml by `lorascope params use {profile}`.\n"
        "# Edit the profile and re-run that command, or override single keys with `dvc exp run -S key=value`.\n\n"
    )
    target = output if output.is_absolute() else workspace_root() / output
    write_text(target, header + dump_params(resolved, comments=True))
    typer.echo(f"params: wrote {target} from profile {profile}")


# ------------------------------------------------------------------------------------ pipeline
pipeline_app = typer.Typer(
    help="dvc.yaml, generated from src/lorascope/pipeline.py (stages, code and params deps, outputs).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("write")
def pipeline_write() -> None:
    """Write dvc.yaml at the workspace root from the stage table in lorascope.pipeline."""
    from lorascope.atomic import write_text
    from lorascope.pipeline import render
    from lorascope.project import workspace_root

    target = workspace_root() / "dvc.yaml"
    write_text(target, render())
    typer.echo(f"pipeline: wrote {target}")


@pipeline_app.command("check")
def pipeline_check() -> None:
    """Exit 2 when dvc.yaml differs from what `lorascope pipeline write` would write."""
    from lorascope.errors import LorascopeError
    from lorascope.pipeline import render
    from lorascope.project import workspace_root

    target = workspace_root() / "dvc.yaml"
    if not target.is_file() or target.read_text() != render():
        raise LorascopeError(
            f"{target}: out of date with src/lorascope/pipeline.py; run `lorascope pipeline write`"
        )
    typer.echo(f"pipeline: {target} is up to date")


# ------------------------------------------------------------------------------------------ plan
@app.command()
@takes_params
def plan(
    choice: ParamsChoice = DEFAULT_CHOICE,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Device kind in pipelines/throughput.yaml (cpu, h100, h200; default: its default_device).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Per stage: GPU memory per device (weights, gradients, optimiser state, activations under the
    launcher's sharding), disk written and estimated time; flags what does not fit. Runs nothing."""
    import json

    from lorascope import paths
    from lorascope import plan as planner
    from lorascope.project import workspace_root

    root = workspace_root()
    # the measured token statistics belong to the active params' prepared data, not to another profile
    prepared = None if choice.profile else root / paths.PREPARE_METRICS
    result = planner.run(choice.load(), root, device, prepared)
    typer.echo(json.dumps(result, indent=2) if as_json else planner.render(result), nl=as_json)


# ------------------------------------------------------------------------------------ tracking
@app.command()
def lineage(
    target: Annotated[
        str, typer.Argument(help="MLflow run id of any stage run, or a DVC output (file or folder).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
) -> None:
    """Print the chain of stage runs behind a run or an output, back to the dataset.

    For an output, the run is the latest one that logged the output's current DVC md5."""
    import json

    from mlflow.exceptions import MlflowException

    from lorascope.errors import LorascopeError
    from lorascope.tracking import lineage as walk
    from lorascope.tracking import producer, tracking_uri

    run_id = target
    if Path(target).exists():
        made_by = producer(target)
        if made_by is None:
            raise LorascopeError(f"{target}: no run in {tracking_uri()} logged this content as an output")
        run_id = made_by["run_id"]
    try:
        chain = walk(run_id)
    except MlflowException as e:
        raise LorascopeError(f"run {run_id!r} not found in {tracking_uri()} ({e.error_code})") from None
    if as_json:
        typer.echo(json.dumps(chain, indent=2))
        return

    def label(node: dict) -> str:
        dirty = " (dirty)" if node["git_dirty"] == "true" else ""
        return (
            f"{node['stage']}  run {node['run_id']}  [{node['status']}]  "
            f"params {str(node['params_hash'])[:12]}  git {str(node['git_commit'])[:10]}{dirty}"
        )

    def show(node: dict, depth: int) -> None:
        pad = "    " * depth
        typer.echo(("" if depth == 0 else pad[:-4] + "<-  ") + label(node))
        for path, md5 in node["inputs_md5"].items():
            typer.echo(f"{pad}    input {path}  md5 {md5}")
        for d in node["datasets"]:
            typer.echo(
                f"{pad}    dataset {d['name']}  digest {d['digest']}  {d['source_type']}: {d['source']}"
            )
        for up in node["upstream"]:
            show(up, depth + 1)

    show(chain, 0)


@app.command()
def ui(
    port: Annotated[int, typer.Option("--port", help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "127.0.0.1",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the mlflow command instead of running it.")
    ] = False,
) -> None:
    """Open the MLflow UI on the project's store (mlflow.db + mlruns/ at the repo root) and print where
    each stage's runs table is: MLflow 3 opens experiments on a GenAI overview unless the URL asks for
    the model-training workflow (lorascope.experiments)."""
    import os
    import shlex
    import shutil

    from lorascope import experiments
    from lorascope.tracking import artifact_root, client, local_db, tracking_uri

    uri, artifacts = tracking_uri(), artifact_root()
    base = uri if artifacts is None else f"http://{host}:{port}"
    typer.echo(f"experiments: {experiments.home_url(base)}")
    db = local_db()
    if db is None or db.is_file():  # listing must not create a store (mlflow ui will)
        for stage, url in experiments.landings(client(), base):
            typer.echo(f"  {stage:<11} {url}")
    if artifacts is None:
        typer.echo(f"tracking server: {uri} (open it in a browser)")
        return
    beside = Path(sys.executable).parent / "mlflow"  # this environment's, activated or not
    mlflow_bin = str(beside) if beside.is_file() else shutil.which("mlflow") or "mlflow"
    cmd = [
        mlflow_bin, "ui", "--backend-store-uri", uri, "--default-artifact-root", artifacts.as_uri(),
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    typer.echo(shlex.join(cmd))
    if not dry_run:
        os.execv(mlflow_bin, cmd)


# ------------------------------------------------------------------------------------------ entry
def main() -> None:
    """Console entry point: run the app, turning errors into one line unless --debug."""
    import os

    from lorascope.errors import LorascopeError

    # One CPU thread unless the user says otherwise: CPU kernels reduce in an order that depends on
    # the thread count, so a pinned count is what makes outputs (and dvc.lock) equal on any machine.
    for var, value in (
        ("OMP_NUM_THREADS", "1"),
        ("MKL_NUM_THREADS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(var, value)

    try:
        app()
    except LorascopeError as e:
        if _state["debug"] or "--debug" in sys.argv:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if _state["debug"] or "--debug" in sys.argv:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        typer.echo(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
