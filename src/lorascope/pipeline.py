"""The one owner of the pipeline: stage names, commands, outputs and the params keys each reads.

``dvc.yaml`` is generated from ``STAGES`` (``lorascope pipeline write``; ``lorascope pipeline check``
and the tests fail when the committed file differs), so the code and DVC cannot drift:

* **code deps** are each stage's import closure inside ``src/lorascope`` (every module its stage
  module can import, found statically, plus the package data folders beside them), so editing a
  module a stage imports makes exactly the stages that import it stale. ``cli.py`` is left out: it
  only parses arguments (a stage's behaviour lives in its package), and including it would make
  every edit of any command re-run the whole pipeline;
* **params deps** are the keys each stage reads, declared here and checked against what the stage
  really reads (``LORASCOPE_TRACE``, see ``sections.trace_params``): a key a stage reads but does not
  declare fails the end-to-end test. Keys that change speed but never results are listed in
  ``speed`` instead (read, not DVC deps).

Outputs hold nothing run-specific (no run ids, timestamps, hostnames or absolute paths), so a
re-run with equal inputs writes equal bytes and leaves every later stage cached.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from lorascope import paths


def _s(path: Path) -> str:
    """A workspace path of :mod:`lorascope.paths` as ``dvc.yaml`` writes it."""
    return path.as_posix()


PACKAGE_DIR = Path(__file__).resolve().parent
NOT_A_DEP = frozenset({"lorascope.cli"})
"""Modules a command loads that are not deps of its stage (argument parsing only)."""
KERNELS = "kernels"
"""The params section every stage reads first: the CPU kernels its process pins (``lorascope.kernels``);
other kernels write other bytes, so it is a params dep of every stage."""


@dataclass(frozen=True)
class Stage:
    """One DVC stage (or a ``foreach`` family of them) and what it reads and writes."""

    name: str
    """Stage name = module = CLI command = params section (``evaluate``'s ``recovery`` aside)."""
    cmd: str
    """The command; ``${key}`` / ``${item...}`` inside a ``foreach``."""
    code: tuple[str, ...]
    """Entry modules: their import closure is the stage's code deps."""
    deps: tuple[str, ...] = ()
    """Data deps (outputs of earlier stages, inputs)."""
    params: tuple[str, ...] = ()
    """Params keys whose value changes the outputs."""
    speed: tuple[str, ...] = ()
    """Params keys read that change only speed or resources: not DVC deps."""
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    """Small summary files shown by ``dvc metrics show`` / ``dvc exp show``."""
    foreach: Any = None
    """A list, a mapping of items, or a ``${params key}`` the stage family iterates over."""
    item_params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per-item params keys (``foreach`` over a fixed mapping), beyond the shared ``params``."""
    items: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per-item template values (``${item.<name>}``) for a fixed mapping."""
    comment: str = ""


def keys_of(section: str, *exclude: str) -> tuple[str, ...]:
    """Every key of a params section but ``exclude`` (as ``section.key``)."""
    from lorascope.config import Params

    model = Params.model_fields[section].annotation
    return tuple(f"{section}.{k}" for k in model.model_fields if k not in exclude)  # type: ignore[union-attr]


EVAL_SPEED = ("evaluate.chunk_size", "evaluate.gpu_memory_utilization")
"""Checkpoint granularity and vLLM's memory share: never a result."""


def _llm_calls() -> tuple[str, ...]:
    from lorascope.llm.params import LlmClientSection

    fields = [k for k in LlmClientSection.model_fields if k != "concurrency"]
    return tuple(f"categorize.{role}.{k}" for role in ("generate", "assign") for k in fields)


LLM_CALLS = _llm_calls()
"""The two LLM clients of ``categorize``, less their concurrency (speed only)."""
FINETUNE_SPEED = ("finetune.checkpoint_steps", "finetune.logging_steps", "finetune.gradient_checkpointing")
"""Checkpoint and logging cadence, activation recomputation: equal weights either way."""

STAGES: tuple[Stage, ...] = (
    Stage("base", "lorascope base", ("lorascope.base.stage",), params=("base",), outs=(_s(paths.BASE),)),
    Stage(
        "prepare",
        "lorascope prepare",
        ("lorascope.prepare.stage",),
        deps=(_s(paths.BASE),),
        params=("prepare",),
        outs=(_s(paths.PREPARED),),
        metrics=(_s(paths.PREPARE_METRICS),),
    ),
    Stage(
        "finetune",
        "${finetune.launcher} finetune --variant ${key}",
        ("lorascope.finetune.stage",),
        deps=(_s(paths.PREPARED), _s(paths.BASE)),
        params=keys_of(
            "finetune", "lr", "full_lr", "lora", "launcher", *(k.split(".")[1] for k in FINETUNE_SPEED)
        ),
        speed=FINETUNE_SPEED,
        outs=(_s(paths.model("${key}")),),
        foreach=["lora", "full"],
        item_params={"lora": ("finetune.lr", "finetune.lora"), "full": ("finetune.full_lr",)},
    ),
    Stage(
        "evaluate",
        "lorascope evaluate --variant ${key}",
        ("lorascope.evaluate.stage",),
        deps=(_s(paths.PREPARED), _s(paths.BASE), "${item.model}"),
        params=(
            "evaluate.variants.${key}",
            *keys_of("evaluate", "variants", *(k.split(".")[1] for k in EVAL_SPEED)),
        ),
        speed=EVAL_SPEED,
        outs=(
            _s(paths.eval_scores("${key}")),
            _s(paths.eval_questions("${key}")),
        ),  # summary: metrics/recovery.json
        foreach="${evaluate.variants}",
        comment="base, lora, full and any variant added in params",
    ),
    Stage(
        "recovery",
        "lorascope evaluate recovery",
        ("lorascope.evaluate.stage",),
        deps=(_s(paths.EVAL),),
        params=("evaluate.tasks", "evaluate.variants", "evaluate.bootstrap_iters", "evaluate.seed"),
        outs=(_s(paths.RECOVERY_TABLE),),
        metrics=(_s(paths.RECOVERY),),
        comment="Tables 1 and 2: `lorascope evaluate recovery`",
    ),
    Stage(
        "extract",
        "${extract.launcher} extract --source ${key}",
        ("lorascope.extract.stage",),
        deps=(_s(paths.PREPARED), _s(paths.BASE), "${item.model}"),
        params=("extract",),
        outs=(_s(paths.activations("${key}")),),
        foreach={"lora": {"model": _s(paths.LORA)}, "mlp": {"model": _s(paths.BASE)}},
        comment="the adapter is an input of the LoRA store only",
    ),
    Stage(
        "sae",
        "lorascope sae",
        ("lorascope.sae.stage",),
        deps=(_s(paths.activations("lora")), _s(paths.BASE), _s(paths.LORA)),
        params=keys_of("sae", "checkpoint_steps", "device"),
        speed=("sae.checkpoint_steps", "sae.device"),
        outs=(_s(paths.SAE),),
        metrics=(_s(paths.SAE_METRICS),),
    ),
    Stage(
        "contexts",
        "lorascope contexts --source ${key}",
        ("lorascope.contexts.stage",),
        deps=("${item.store}", "${item.encoder}", _s(paths.BASE)),
        params=keys_of("contexts", "feature_chunk", "device"),
        speed=("contexts.feature_chunk", "contexts.device"),
        outs=(_s(paths.contexts("${key}")), _s(paths.features("${key}"))),
        foreach={
            "lora": {"store": _s(paths.activations("lora")), "encoder": _s(paths.activations("lora"))},
            "mlp": {"store": _s(paths.activations("mlp")), "encoder": _s(paths.activations("mlp"))},
            "sae": {"store": _s(paths.activations("lora")), "encoder": _s(paths.SAE)},
        },
        comment="sae: the LoRA store encoded with the trained SAE",
    ),
    Stage(
        "autointerp",
        "lorascope autointerp --source ${item}",
        ("lorascope.autointerp.stage",),
        deps=(_s(paths.contexts("${item}")), _s(paths.features("${item}"))),
        params=keys_of("autointerp", "concurrency"),
        speed=("autointerp.concurrency",),
        outs=(_s(paths.labels("${item}")),),
        foreach=["lora", "mlp", "sae"],
    ),
    Stage(
        "categorize",
        "lorascope categorize",
        ("lorascope.categorize.stage",),
        deps=(
            _s(paths.labels("lora")),
            _s(paths.labels("mlp")),
            _s(paths.labels("sae")),
            _s(paths.contexts("lora")),
            _s(paths.contexts("mlp")),
            _s(paths.contexts("sae")),
            _s(paths.activations("lora")),
            _s(paths.activations("mlp")),
            _s(paths.SAE),
        ),  # fmt: skip
        params=(*keys_of("categorize", "generate", "assign", "device"), "sae.exclude", *LLM_CALLS),
        speed=("categorize.generate.concurrency", "categorize.assign.concurrency", "categorize.device"),
        outs=(_s(paths.CATEGORIES),),
    ),
    Stage(
        "ablate",
        "lorascope ablate",
        ("lorascope.ablate.stage",),
        deps=(_s(paths.PREPARED), _s(paths.BASE), _s(paths.LORA)),
        params=(
            "ablate.sequences",
            "ablate.max_tokens",
            "ablate.seed",
            "ablate.sweeps",
            "ablate.custom",
            "ablate.precision",
        ),  # fmt: skip
        speed=("ablate.batch_size", "ablate.logit_chunk", "ablate.prefix_reuse", "ablate.device"),
        outs=(
            _s(paths.ABLATION_COMPONENTS),
            _s(paths.ABLATION_LAYERS),
            _s(paths.ABLATION_TYPES),
            _s(paths.FIGURE3),
        ),  # fmt: skip
        metrics=(_s(paths.ABLATION_GROUPS),),
    ),
    Stage(
        "ablate-export",
        "lorascope ablate export --group ${item}",
        ("lorascope.ablate.export",),
        deps=(_s(paths.LORA),),
        outs=(_s(paths.ablated_adapter("${item}")),),
        foreach="${ablate.export}",
        comment="Table 2: the ablated adapters, evaluated as evaluate@lora-<group>-ablated",
    ),
    Stage(
        "steer",
        "lorascope steer",
        ("lorascope.steer.stage",),
        deps=(
            _s(paths.PREPARED),
            _s(paths.BASE),
            _s(paths.LORA),
            _s(paths.SAE),
            _s(paths.features("lora")),
            _s(paths.features("sae")),
            _s(paths.labels("lora")),
            _s(paths.labels("sae")),
        ),  # fmt: skip
        params=(*keys_of("steer", "device"), "evaluate.data", "evaluate.choice_seed"),
        speed=("steer.device",),
        outs=(_s(paths.STEER), _s(paths.STEER_METRICS)),  # a curve per direction: the report's steering table
    ),
    Stage(
        "attribute",
        "lorascope attribute",
        ("lorascope.attribute.stage",),
        deps=(
            _s(paths.PREPARED),
            _s(paths.BASE),
            _s(paths.LORA),
            _s(paths.SAE),
            _s(paths.labels("lora")),
            _s(paths.labels("sae")),
        ),  # fmt: skip
        params=(*keys_of("attribute", "device"), "evaluate.data", "evaluate.choice_seed"),
        speed=("attribute.device",),
        outs=(_s(paths.ATTRIBUTE_SCREEN), _s(paths.ATTRIBUTE_EXACT)),
        metrics=(_s(paths.ATTRIBUTE_ACCURACY),),
    ),
    Stage(
        "report",
        "lorascope report",
        ("lorascope.report.stage",),
        deps=(
            _s(paths.BASE),
            _s(paths.LORA),
            _s(paths.FULL),
            _s(paths.RECOVERY),
            _s(paths.INTERP),
            _s(paths.CONTEXTS),
            _s(paths.activations("lora")),
            _s(paths.activations("mlp")),
            _s(paths.SAE),
            _s(paths.SAE_METRICS),
            _s(paths.FIGURE3),
            _s(paths.ABLATION_LAYERS),
            _s(paths.ABLATION_TYPES),
            _s(paths.STEER_METRICS),
            _s(paths.ATTRIBUTE_EXACT),
            _s(paths.ATTRIBUTE_ACCURACY),
        ),  # fmt: skip
        params=("report",),
        outs=(_s(paths.REPORTS),),
    ),
)

PLOTS: list[dict[str, Any]] = [
    {_s(paths.PLOTS / "loss_lora.csv"): {"x": "step", "y": "loss", "title": "LoRA training loss"}},
    {_s(paths.PLOTS / "loss_full.csv"): {"x": "step", "y": "loss", "title": "Full finetune training loss"}},
    {
        _s(paths.PLOTS / "ablation_layers.csv"): {
            "template": "bar_horizontal", "x": "kl", "y": "layer", "title": "KL(P_lora || P_ablated) per layer",
        }
    },
    {
        _s(paths.PLOTS / "ablation_types.csv"): {
            "template": "bar_horizontal", "x": "kl", "y": "type",
            "title": "KL(P_lora || P_ablated) per component type",
        }
    },
]  # fmt: skip

HEADER = """\
# GENERATED by `lorascope pipeline write` from src/lorascope/pipeline.py: edit that file, not this one
# (`lorascope pipeline check` and the tests fail when they differ).
# One stage per step, named as its module, CLI command, params section and MLflow experiment.
# params.yaml holds the tiny profile; `lorascope params use <profile>` switches profiles.
"""


# ------------------------------------------------------------------------------------ code deps
def module_file(module: str) -> Path | None:
    """The source file of a ``lorascope`` module (``__init__.py`` for a package), if it exists."""
    parts = module.split(".")
    if parts[0] != "lorascope":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _file_module(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _imports(path: Path) -> frozenset[str]:
    """Every ``lorascope`` module ``path`` imports anywhere (top level or inside functions)."""
    module = _file_module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return frozenset(m for m in found if m == "lorascope" or m.startswith("lorascope."))


CONFIG = "lorascope.config"
"""Assembles every stage's section model (``lorascope.<stage>.params``) into ``Params``. A stage reads
only its own sections' values, and those are its params deps: the other stages' section models
(and their packages) are not its code deps, and which sections it owns is stated by
``own_sections``. Without this cut every stage would depend on every package (and its data folders)."""


def _is_section_model(module: str) -> bool:
    parts = module.split(".")
    return len(parts) >= 3 and parts[2] == "params"


def closure(entries: tuple[str, ...], *, every_section: bool = False) -> list[Path]:
    """Source files of ``entries`` and every lorascope module they import, transitively, with
    the ``__init__.py`` of each enclosing package and the package data folders (sub-folders without
    ``__init__.py``) of each package reached; ``config.py``'s imports of the section models are
    followed only with ``every_section`` (see ``CONFIG``)."""
    config = module_file(CONFIG)
    todo = [m for e in entries for m in _with_parents(e)]
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_A_DEP:
            continue
        seen.add(module)
        path = module_file(module)
        if path is None:
            continue  # a name imported from a module, not a module
        files.add(path)
        for imported in _imports(path):
            if path == config and not every_section and _is_section_model(imported):
                continue
            todo.extend(_with_parents(imported))
    for package in [f.parent for f in files if f.name == "__init__.py"]:
        files.update(d for d in package.iterdir() if _is_data_dir(d))
    return sorted(f for f in files if not is_docstring_only(f))


@cache
def is_docstring_only(path: Path) -> bool:
    """A package ``__init__.py`` that holds only its docstring runs nothing, so it is not a dep (each
    one would add a lock entry to every stage: the no-op `dvc repro` parses the lock). One that
    gains a statement becomes a dep: `lorascope pipeline check` then fails until ``dvc.yaml`` is
    regenerated."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_data_dir(path: Path) -> bool:
    return path.is_dir() and not (path / "__init__.py").exists() and path.name != "__pycache__"


def own_sections(stage: Stage) -> tuple[str, ...]:
    """The section models of the stage's own packages (``lorascope.<package>.params``)."""
    packages = sorted({".".join(entry.split(".")[:2]) for entry in stage.code})
    return tuple(f"{p}.params" for p in packages if module_file(f"{p}.params") is not None)


def code_deps(stage: Stage) -> list[str]:
    """The stage's code deps as repository-relative paths (``src/lorascope/...``)."""
    root = PACKAGE_DIR.parent.parent
    return [p.relative_to(root).as_posix() for p in closure((*stage.code, *own_sections(stage)))]


def other_sections() -> frozenset[Path]:
    """What a command loads only because ``config.py`` assembles every section model (see
    ``CONFIG``): the section models, their packages' ``__init__.py`` and what only they import."""
    return frozenset(closure((CONFIG,), every_section=True)) - frozenset(closure((CONFIG,)))


# ------------------------------------------------------------------------------------- dvc.yaml
def _stage_body(stage: Stage) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": stage.cmd, "deps": [*code_deps(stage), *stage.deps]}
    params = [KERNELS, *stage.params]
    if stage.item_params:
        slots = max(len(v) for v in stage.item_params.values())
        params += [f"${{item.param{i}}}" for i in range(slots)]
    body["params"] = params
    if stage.outs:
        body["outs"] = list(stage.outs)
    if stage.metrics:
        body["metrics"] = list(stage.metrics)
    return body


def _foreach(stage: Stage) -> Any:
    if not stage.item_params:
        return stage.foreach
    out = {}
    for key, extra in stage.item_params.items():
        slots = max(len(v) for v in stage.item_params.values())
        padded = [*extra, *[extra[-1]] * (slots - len(extra))]  # DVC takes a repeated key once
        out[key] = {**stage.items.get(key, {}), **{f"param{i}": p for i, p in enumerate(padded)}}
    return out


def dvc_yaml() -> dict[str, Any]:
    """``dvc.yaml`` as data."""
    stages: dict[str, Any] = {}
    for stage in STAGES:
        body = _stage_body(stage)
        stages[stage.name] = {"foreach": _foreach(stage), "do": body} if stage.foreach is not None else body
    return {"stages": stages, "plots": PLOTS}


def render() -> str:
    """The text of ``dvc.yaml``."""
    import yaml

    return HEADER + yaml.safe_dump(dvc_yaml(), sort_keys=False, width=110, default_flow_style=False)


def by_name(name: str) -> Stage:
    """The stage (family) behind a DVC stage name such as ``evaluate@lora``."""
    family = name.split("@")[0]
    for stage in STAGES:
        if stage.name == family:
            return stage
    raise KeyError(name)


def covers(declared: list[str] | tuple[str, ...], key: str) -> bool:
    """Whether a declared params key (or one of its ancestors) covers ``key``."""
    return any(key == d or key.startswith(d + ".") for d in declared)
