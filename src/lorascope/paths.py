"""The one owner of every stage's output paths, relative to the workspace root.

Stages, the report, the dashboard, sweeps and the stage table that generates ``dvc.yaml``
(:mod:`lorascope.pipeline`) all name their inputs and outputs through this module, so the code and
``dvc.yaml`` agree. Each name is a relative :class:`~pathlib.Path`; join it to
:func:`lorascope.project.workspace_root` (or a sweep trial's workspace) to use it. The functions also
take DVC template strings (``"${key}"``), which is how :mod:`lorascope.pipeline` writes ``foreach`` stages.
"""

from __future__ import annotations

from pathlib import Path

# ------------------------------------------------------------------------------------------ models
MODELS = Path("models")
BASE = MODELS / "base"
"""``base``: the tiny random Qwen2 + tokenizer, or a real base model's ``reference.json``."""


def model(variant: str) -> Path:
    """``models/<variant>/``: a finetune (``lora``, ``full``) or an evaluated model variant."""
    return MODELS / variant


LORA = model("lora")
FULL = model("full")
FINETUNES = {"lora": LORA, "full": FULL}


def ablated_adapter(group: str) -> Path:
    """``models/lora-<group>-ablated/``: ``ablate export``'s adapter without the group's components."""
    return MODELS / f"lora-{group}-ablated"


SAE = MODELS / "sae"
"""``sae``: weights, cfg and calibration of the BatchTopK SAE."""

# ------------------------------------------------------------------------------------------ data
DATA = Path("data")
PREPARED = DATA / "prepared"
ACTIVATIONS = DATA / "activations"


def activations(source: str) -> Path:
    """``data/activations/<source>/``: the sharded activation store of ``extract --source``."""
    return ACTIVATIONS / source


CONTEXTS = DATA / "contexts"


def contexts(source: str) -> Path:
    """``data/contexts/<source>.parquet``: the contexts table."""
    return CONTEXTS / f"{source}.parquet"


def features(source: str) -> Path:
    """``data/contexts/<source>.features.parquet``: the per-feature statistics table."""
    return CONTEXTS / f"{source}.features.parquet"


INTERP = DATA / "interp"


def labels(source: str) -> Path:
    """``data/interp/<source>.parquet``: the label set of ``autointerp --source``."""
    return INTERP / f"{source}.parquet"


CATEGORIES = INTERP / "categories"
CATEGORY_SET = CATEGORIES / "categories.json"
ASSIGNMENTS = CATEGORIES / "assignments.parquet"
FIGURE1 = CATEGORIES / "figure1.json"
FIGURE2 = CATEGORIES / "figure2.json"
FIGURE2_LORA = CATEGORIES / "figure2_lora.json"
STEER = DATA / "steer"

# ------------------------------------------------------------------------------------------ metrics
METRICS = Path("metrics")
PREPARE_METRICS = METRICS / "prepare.json"
EVAL = METRICS / "eval"


def eval_scores(variant: str) -> Path:
    """``metrics/eval/<variant>.json``."""
    return EVAL / f"{variant}.json"


def eval_questions(variant: str) -> Path:
    """``metrics/eval/<variant>.questions.json``: per-question correctness of ``variant``."""
    return EVAL / f"{variant}.questions.json"


RECOVERY = METRICS / "recovery.json"
RECOVERY_TABLE = METRICS / "recovery.md"
SAE_METRICS = METRICS / "sae.json"
ABLATION = METRICS / "ablation"
ABLATION_COMPONENTS = ABLATION / "components.json"
ABLATION_LAYERS = ABLATION / "layers.json"
ABLATION_TYPES = ABLATION / "types.json"
ABLATION_GROUPS = ABLATION / "groups.json"
FIGURE3 = ABLATION / "figure3.json"
STEER_METRICS = METRICS / "steer.json"
ATTRIBUTE = METRICS / "attribute"
"""``attribute``: ``screen.json`` (every unit), ``exact.json`` (the top and control units), ``accuracy.json``."""
ATTRIBUTE_SCREEN = ATTRIBUTE / "screen.json"
ATTRIBUTE_EXACT = ATTRIBUTE / "exact.json"
ATTRIBUTE_ACCURACY = ATTRIBUTE / "accuracy.json"

# ------------------------------------------------------------------------------------------ reports
REPORTS = Path("reports")
PLOTS = REPORTS / "plots"
SEEDS_REPORT = (REPORTS / "seeds.md", REPORTS / "seeds.json")
"""``lorascope seeds``' report: beside the ``report`` stage's output but not part of it (``.dvcignore``
lists it; the ``report`` stage keeps it when it rewrites the folder)."""

# ------------------------------------------------------------------------------------------ work
CHECKPOINTS = Path("checkpoints")
"""Resumable work in progress (not a DVC output): ``checkpoints/<stage>/...``."""


def checkpoints(stage: str) -> Path:
    """``checkpoints/<stage>/``."""
    return CHECKPOINTS / stage
