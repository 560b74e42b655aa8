"""Typed params: the whole ``params.yaml`` (``Params``, one section per stage), profiles, and one-line errors.

Each section's model lives with its stage (``lorascope.<stage>.params``; their base class and shared
field types in ``lorascope.sections``); this module puts them together, loads and validates them.

``params.yaml`` holds the tiny profile (what ``dvc repro`` runs by default). Profiles live in
``pipelines/profiles/<name>.yaml``; a profile may start with ``extends: <other profile>`` and then
only lists what differs (a deep merge). Every key is checked: unknown keys and bad values are
rejected with the dotted key path and what was expected, e.g. ``finetune.lr: must be > 0, got -1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from lorascope.ablate.params import AblateSection
from lorascope.attribute.params import AttributeSection
from lorascope.autointerp.params import AutointerpSection
from lorascope.base.params import BaseSection
from lorascope.categorize.params import CategorizeSection
from lorascope.contexts.params import ContextsSection
from lorascope.errors import LorascopeError
from lorascope.evaluate.params import EvaluateSection
from lorascope.extract.params import ExtractSection
from lorascope.finetune.params import FinetuneSection
from lorascope.kernels import KernelsSection
from lorascope.prepare.params import PrepareSection
from lorascope.project import workspace_root
from lorascope.report.params import ReportSection
from lorascope.sae.params import SaeSection
from lorascope.sections import Section, trace_params
from lorascope.steer.params import SteerSection


# ------------------------------------------------------------------------------------- the file
class Params(Section):
    """The whole ``params.yaml``: one section per stage."""

    base: BaseSection = Field(default_factory=BaseSection)
    """The base model."""
    prepare: PrepareSection = Field(default_factory=PrepareSection)
    """Training data preparation."""
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    """LoRA and full finetunes."""
    extract: ExtractSection = Field(default_factory=ExtractSection)
    """Adapter activations and the MLP-neuron baseline."""
    contexts: ContextsSection = Field(default_factory=ContextsSection)
    """Max-activating contexts per feature."""
    sae: SaeSection = Field(default_factory=SaeSection)
    """Sparse autoencoder over adapter activations."""
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    """Benchmarks per model variant and the recovery table."""
    autointerp: AutointerpSection = Field(default_factory=AutointerpSection)
    """Feature labelling."""
    categorize: CategorizeSection = Field(default_factory=CategorizeSection)
    """Feature categorization."""
    ablate: AblateSection = Field(default_factory=AblateSection)
    """Component ablations (KL sweeps) and ablated-adapter exports."""
    steer: SteerSection = Field(default_factory=SteerSection)
    """Steering along adapter directions."""
    attribute: AttributeSection = Field(default_factory=AttributeSection)
    """Which components and SAE latents the gain depends on: screened, measured, generated."""
    report: ReportSection = Field(default_factory=ReportSection)
    """Tables, figures and the feature dashboard."""
    kernels: KernelsSection = Field(default_factory=KernelsSection)
    """The CPU float kernels every process pins before torch loads (read by every stage)."""

    @model_validator(mode="after")
    def _positions_fit(self) -> Params:
        if self.base.model == "tiny" and self.base.tiny.max_position_embeddings < self.prepare.block_size:
            raise ValueError(
                f"base.tiny.max_position_embeddings ({self.base.tiny.max_position_embeddings}) must be >= "
                f"prepare.block_size ({self.prepare.block_size})"
            )
        return self


# ------------------------------------------------------------------------------------- loading
def profiles_dir(root: Path | None = None) -> Path:
    """``pipelines/profiles/`` of the workspace."""
    return (root or workspace_root()) / "pipelines" / "profiles"


def list_profiles(root: Path | None = None) -> list[str]:
    """Names of the profiles shipped in ``pipelines/profiles/``."""
    return sorted(p.stem for p in profiles_dir(root).glob("*.yaml"))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorascopeError(f"{path}: params file not found") from None
    except OSError as e:
        raise LorascopeError(f"{path}: cannot read params file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LorascopeError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise LorascopeError(f"{path}: file is empty, expected a mapping of params sections")
    if not isinstance(data, dict):
        raise LorascopeError(f"{path}: expected a mapping of params sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _profile_path(name: str, root: Path | None) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = profiles_dir(root) / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(list_profiles(root)) or "none"
        raise LorascopeError(f"profile {name!r} not found in {profiles_dir(root)} (known: {known})")
    return candidate


def _raw_profile(name: str, root: Path | None, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    if name in seen:
        raise LorascopeError(f"profile {name!r}: 'extends' cycle {' -> '.join((*seen, name))}")
    path = _profile_path(name, root)
    data = read_yaml_mapping(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, path
    if not isinstance(parent, str):
        raise LorascopeError(f"{path}: extends: expected a profile name, got {parent!r}")
    parent_data, _ = _raw_profile(parent, root, (*seen, name))
    return deep_merge(parent_data, data), path


def load_params(params: str | Path | None = None, profile: str | None = None) -> Params:
    """Resolve and validate params: a profile by name (or path) when given, else a params file
    (default ``params.yaml`` at the workspace root)."""
    root = workspace_root()
    if profile:
        data, source = _raw_profile(profile, root)
    else:
        source = Path(params) if params else root / "params.yaml"
        data = read_yaml_mapping(source)
    resolved = validate_params(data, source)
    if trace := os.environ.get("LORASCOPE_TRACE"):
        trace_params(resolved, trace)
    return resolved


def validate_params(data: dict[str, Any], source: str | Path = "params") -> Params:
    """Validate a raw mapping; raise one ``LorascopeError`` naming each bad key."""
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(describe_error(err) for err in e.errors(include_url=False))
        raise LorascopeError(f"{source}: {problems}") from None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    return type(value).__name__


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def describe_error(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``dotted.key: what was expected, got <value>``."""
    loc, kind, ctx, got = tuple(err["loc"]), err["type"], err.get("ctx") or {}, err.get("input")
    key = _dotted(loc) or "params"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{key}: must be {_BOUNDS[kind]} {bound}, got {_show(got)}"
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        hint = f" (expected one of: {', '.join(known)})" if known else ""
        return f"{key}: unknown key{hint}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        return f"{key}: must be one of {ctx.get('expected')}, got {_show(got)}"
    if kind in ("too_short", "too_long"):
        return f"{key}: {err['msg'].lower()}"
    if kind in _EXPECTED:
        return f"{key}: {_EXPECTED[kind]}, got {_show(got)}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return f"{key}: {msg}"
    return f"{key}: {err['msg']}, got {_show(got)}"


# ------------------------------------------------------------------------------------- output
def section_dict(params: Params, section: str) -> dict[str, Any]:
    """One section as plain JSON-able data."""
    return getattr(params, section).model_dump(mode="json")


def section_hash(params: Params, section: str) -> str:
    """sha256 of the section's canonical JSON: equal params give equal hashes across runs."""
    blob = json.dumps(section_dict(params, section), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def dump_params(params: Params, comments: bool = True) -> str:
    """The resolved params as YAML; with ``comments`` each key is preceded by its docstring."""
    lines: list[str] = []
    _emit(params, lines, indent=0, comments=comments)
    return "\n".join(lines) + "\n"


def _emit(model: BaseModel, lines: list[str], indent: int, comments: bool) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = model.__dict__[name]
        if comments and field.description:
            if indent == 0 and lines:
                lines.append("")
            lines.extend(
                f"{pad}# {line}".replace("``", "`").rstrip() for line in field.description.splitlines()
            )
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 1, comments)
        else:
            plain = model.model_dump(mode="json", include={name})[name]  # nested models, tuples
            rendered = yaml.safe_dump(plain, default_flow_style=True, width=10_000).strip()
            rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {rendered}")
