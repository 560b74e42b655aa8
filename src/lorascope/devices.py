"""Devices and precisions: the one place every stage resolves ``<section>.device`` and
``<section>.precision``, and streams activation shards to the device.

``resolve`` is what the stages call: ``(device, dtype)`` of one section.

* ``device``: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
  ``cuda:<index>``. Asking for a GPU that is not there is a one-line error naming the key.
* ``precision`` (model compute dtype): ``auto`` (bfloat16 on a GPU that supports it, float32
  otherwise), ``float32``, ``bfloat16`` or ``float16``. A dtype the device cannot run (bfloat16 on a
  GPU older than Ampere) is a one-line error naming the key. The CPU runs all three.
* ``stream_to``: shards of an activation store on the device, one at a time. On a GPU the next shard
  is read from disk into pinned host memory by a background thread while the current one is used,
  then copied with ``non_blocking``; the device holds one shard. On the CPU it is the plain loop.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from lorascope.errors import LorascopeError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
"""What a ``device`` key accepts (checked by the params models)."""

T = TypeVar("T")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(value: str, key: str) -> Any:
    """The ``torch.device`` for a ``device`` key; a GPU that is not there is a one-line error."""
    import torch

    if not re.match(DEVICE_PATTERN, value):
        raise LorascopeError(f"{key}: expected auto, cpu, cuda or cuda:<index>, got {value!r}")
    if value == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        raise LorascopeError(
            f"{key}: {value!r} asks for a CUDA GPU but torch sees none (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use 'auto' or 'cpu'"
        )
    device = torch.device(value)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise LorascopeError(f"{key}: {value!r} but only {count} CUDA device(s) are visible")
    return device


def supports(dtype: Any, device: Any) -> bool:
    """Whether ``device`` runs models in ``dtype`` (the CPU runs float32, bfloat16 and float16)."""
    import torch

    if torch.device(device).type != "cuda":
        return True
    if dtype == torch.bfloat16:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return True


def resolve_dtype(precision: str, device: Any, key: str) -> Any:
    """The compute dtype for a ``precision`` key on ``device``: ``auto`` is bfloat16 on a GPU that
    supports it, float32 otherwise; an unsupported explicit dtype is a one-line error."""
    import torch

    if precision == "auto":
        dev = torch.device(device)
        return torch.bfloat16 if dev.type == "cuda" and supports(torch.bfloat16, dev) else torch.float32
    if precision not in ("float32", "bfloat16", "float16"):
        raise LorascopeError(f"{key}: expected auto, float32, bfloat16 or float16, got {precision!r}")
    dtype = getattr(torch, precision)
    if not supports(dtype, device):
        name = torch.cuda.get_device_name(torch.device(device))
        raise LorascopeError(
            f"{key}: {precision} is not supported on {name} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(torch.device(device))))}; bfloat16 needs 8.0+); "
            "use float16 or float32"
        )
    return dtype


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve(device: Any, precision: str | None, section: str) -> tuple[Any, Any]:
    """``(device, dtype)`` for ``<section>.device`` and ``<section>.precision``: the one resolution
    every stage calls, so a key means the same thing in every section. ``device`` is the key's value,
    or the ``torch.device`` a launcher already put the process on (accelerate's, under ``extract``);
    ``precision`` is None for a stage that has no such key (the dtype is then None)."""
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device, f"{section}.device")
    return dev, None if precision is None else resolve_dtype(precision, dev, f"{section}.precision")


def to_device(tensor: Any, device: Any) -> Any:
    """``tensor`` on ``device``: a pinned host tensor is copied asynchronously."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.is_pinned())


def _pin(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, tuple):
        return tuple(_pin(v) for v in value)
    return value


def _move(value: Any, device: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return to_device(value, device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def prefetched(
    items: Iterable[T], load: Callable[[T], Any], device: Any, background: bool | None = None
) -> Iterator[tuple[T, Any]]:
    """``(item, load(item) on device)`` for each item in order.

    CPU (``background`` None or False): ``load`` runs in the loop, exactly as a plain ``for``. CUDA
    (or ``background=True``): ``load(next item)`` runs in a background thread while the caller works
    on the current one; on CUDA its tensors are pinned and copied to the device only when the caller
    asks for the item, so the device holds the current item's tensors (the previous one is freed as
    soon as the caller drops it). An exception in ``load`` is raised in the caller.
    """
    import torch

    items = list(items)
    cuda = torch.device(device).type == "cuda"
    if not (cuda if background is None else background):
        for item in items:
            yield item, load(item)
        return

    def fetch(i: int, slot: dict[str, Any]) -> None:
        try:
            value = load(items[i])
            slot["value"] = _pin(value) if cuda else value
        except BaseException as e:  # re-raised in the caller's thread
            slot["error"] = e

    pending: tuple[threading.Thread, dict[str, Any]] | None = None

    def start(i: int) -> tuple[threading.Thread, dict[str, Any]]:
        slot: dict[str, Any] = {}
        thread = threading.Thread(target=fetch, args=(i, slot), daemon=True)
        thread.start()
        return thread, slot

    if items:
        pending = start(0)
    for i, item in enumerate(items):
        assert pending is not None
        thread, slot = pending
        thread.join()
        if "error" in slot:
            raise slot["error"]
        value = _move(slot.pop("value"), device)
        pending = start(i + 1) if i + 1 < len(items) else None
        yield item, value
        del value


def stream_to(store: Any, device: Any, shards: Iterable[Any] | None = None) -> Iterator[tuple[Any, Any, Any]]:
    """``(shard, acts_TC, token_ids_T)`` of ``store`` (or of ``shards``) with the tensors on ``device``."""
    for shard, (acts_TC, ids_T) in prefetched(store.shards if shards is None else shards, store.read, device):
        yield shard, acts_TC, ids_T
