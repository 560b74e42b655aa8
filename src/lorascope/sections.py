"""The base of every params section: unknown keys are errors, field docstrings are descriptions, and
reads are traced (``LORASCOPE_TRACE``); the field types the sections share.

Each stage's section lives with its stage (``lorascope.<stage>.params``); ``lorascope.config`` puts
them together into ``Params`` and loads, validates and documents them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven projections of a Qwen2 decoder layer, in the fixed component order (DESIGN.md)."""

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Precision = Literal["auto", "float32", "bfloat16", "float16"]
"""Model compute dtype: ``auto`` is bfloat16 on a GPU that supports it, float32 otherwise."""


def _device(value: str) -> str:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", value):
        raise ValueError(f"expected auto, cpu, cuda or cuda:<index>, got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_device)]
"""Where a stage computes: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``,
``cuda`` or ``cuda:<index>`` (resolved by ``lorascope.devices``)."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _TRACE is not None and (path := _TRACE.paths.get(id(self))) is not None:
            return _TRACE.read(f"{path}.{name}" if path else name, value, type(self).model_fields.get(name))
        return value


# ------------------------------------------------------------------------------------- tracing
class _ParamsTrace:
    """Which params keys a process reads (``LORASCOPE_TRACE=<file>``): each stage's DVC params deps
    are checked against it (``lorascope.pipeline``). Validation, hashing and logging read the
    sections without going through attribute access, so only the stage's own reads are recorded."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.keys: set[str] = set()
        self.keep: list[Any] = []  # the traced objects stay alive, so their ids stay theirs

    def attach(self, model: Any, path: str) -> None:
        self.paths[id(model)] = path
        self.keep.append(model)

    def read(self, key: str, value: Any, field: Any) -> Any:
        if field is None:
            return value
        if isinstance(value, Section) and id(value) in self.paths:
            return value  # a subsection: its leaves are recorded when read
        if isinstance(value, dict):
            return _TracedDict(key, value, self)
        self.keys.add(key)
        return value


class _TracedDict(dict):
    """A params mapping (e.g. ``evaluate.variants``) that records ``<path>.<key>`` for one key
    looked up and ``<path>`` when iterated as a whole."""

    def __init__(self, path: str, data: dict[str, Any], trace: _ParamsTrace) -> None:
        super().__init__(data)
        self._path, self._trace = path, trace
        for k, v in data.items():
            if isinstance(v, Section) and id(v) not in trace.paths:
                _attach(v, f"{path}.{k}", trace)

    def _one(self, key: Any) -> None:
        self._trace.keys.add(f"{self._path}.{key}")

    def _all(self) -> None:
        self._trace.keys.add(self._path)

    def __getitem__(self, key: Any) -> Any:
        self._one(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._one(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._one(key)
        return super().__contains__(key)

    def __iter__(self) -> Any:
        self._all()
        return super().__iter__()

    def __len__(self) -> int:
        self._all()
        return super().__len__()

    def keys(self) -> Any:
        self._all()
        return super().keys()

    def values(self) -> Any:
        self._all()
        return super().values()

    def items(self) -> Any:
        self._all()
        return super().items()


_TRACE: _ParamsTrace | None = None


def _attach(model: Section, path: str, trace: _ParamsTrace) -> None:
    trace.attach(model, path)
    for name in type(model).model_fields:
        value = model.__dict__[name]
        if isinstance(value, Section):
            _attach(value, f"{path}.{name}" if path else name, trace)


def trace_params(params: Section, out: str) -> None:
    """Record the keys of ``params`` this process reads; at exit, append them (and the lorascope
    modules it imported) to ``out`` as one JSON line with the command line."""
    import atexit
    import sys

    global _TRACE
    _TRACE = _TRACE or _ParamsTrace()
    _attach(params, "", _TRACE)
    trace = _TRACE

    def dump() -> None:
        modules = sorted(m for m in sys.modules if m == "lorascope" or m.startswith("lorascope."))
        line = {"argv": sys.argv[1:], "keys": sorted(trace.keys), "modules": modules}
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    if not getattr(trace, "registered", False):
        atexit.register(dump)
        trace.registered = True  # type: ignore[attr-defined]
