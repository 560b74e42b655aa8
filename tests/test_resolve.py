"""One resolution of ``<section>.device`` and ``<section>.precision`` (``devices.resolve``) for every
stage: a launcher's device passes through, a stage without a precision key gets no dtype."""

from __future__ import annotations

import pytest
import torch

from lorascope.devices import resolve, resolve_device, resolve_dtype
from lorascope.errors import LorascopeError


def test_resolve_is_resolve_device_then_resolve_dtype():
    for precision in ("auto", "float32", "bfloat16", "float16"):
        device = resolve_device("auto", "steer.device")
        assert resolve("auto", precision, "steer") == (
            device,
            resolve_dtype(precision, device, "steer.precision"),
        )
    assert resolve("cpu", "auto", "sae") == (torch.device("cpu"), torch.float32)


def test_a_launchers_device_passes_through_and_no_precision_gives_no_dtype():
    cpu = torch.device("cpu")
    assert resolve(cpu, "bfloat16", "extract")[0] is cpu  # accelerate's process device, as it is
    assert resolve("cpu", None, "contexts") == (cpu, None)


def test_errors_name_the_sections_keys():
    with pytest.raises(LorascopeError, match=r"^categorize\.device: expected auto, cpu"):
        resolve("gpu0", None, "categorize")
    with pytest.raises(LorascopeError, match=r"^finetune\.precision: expected auto, float32"):
        resolve("cpu", "fp8", "finetune")
