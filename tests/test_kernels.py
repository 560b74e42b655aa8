"""Pinned CPU kernels (``lorascope.kernels``): what each ``kernels.pin`` asks for, that loading params pins
them before torch loads (in a fresh process), the warning where torch came first, and the IEEE square
root."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lorascope import kernels
from lorascope.kernels import ENV, KernelsSection, gpu_visible, in_force, pin, wanted

from tests.conftest import REPO

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}


# ------------------------------------------------------------------------------ what is wanted
@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible: `auto` leaves the kernels alone")
def test_wanted_by_default_on_this_machine() -> None:
    assert wanted(KernelsSection()) == PINNED


def test_wanted_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "gpu_visible", lambda: False)
    assert wanted(KernelsSection()) == PINNED
    assert wanted(KernelsSection(pin="on")) == PINNED
    assert wanted(KernelsSection(pin="off")) == {}
    custom = KernelsSection(aten="avx512", onednn="AVX512_CORE", mkl_cbwr="AVX2")
    assert wanted(custom) == {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_CBWR": "AVX2",
    }


def test_wanted_with_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "gpu_visible", lambda: True)
    assert wanted(KernelsSection(pin="auto")) == {}
    assert wanted(KernelsSection(pin="off")) == {}
    assert wanted(KernelsSection(pin="on")) == PINNED


class DevicesPresent(type(Path())):  # type: ignore[misc]
    """A ``Path`` for which /dev/kfd and /dev/nvidia0 exist."""

    def exists(self, **_: object) -> bool:
        return True

    def glob(self, pattern: str, **_: object):  # noqa: ANN201
        return iter([self / "nvidia0"])


@pytest.mark.parametrize("value", ["", "-1", " -1 "])
def test_gpu_hidden_by_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setattr(kernels, "Path", DevicesPresent)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert gpu_visible() is False


def test_gpu_seen_through_device_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "Path", DevicesPresent)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_visible() is True
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_visible() is True


def test_gpu_visible_judges_by_device_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    devices = os.path.exists("/dev/kfd") or bool(glob.glob("/dev/nvidia[0-9]*"))
    assert gpu_visible() is devices


# ------------------------------------------------------------------------------ pinned in a fresh process
PROBE = """
import json, os, sys
from lorascope.cli import ParamsChoice
ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
out = {"torch_before": "torch" in sys.modules}
ParamsChoice(params=sys.argv[1]).load()
out["torch_after_load"] = "torch" in sys.modules
out["env_after_load"] = {k: os.environ.get(k) for k in ENV}
import torch
out["capability"] = torch.backends.cpu.get_cpu_capability()
out["env"] = {k: os.environ.get(k) for k in ENV}
print(json.dumps(out))
"""


def probe(tmp_path: Path, kernels_section: dict | None) -> dict:
    """Load a copy of the repo's params (``kernels`` replaced when given) in a fresh interpreter whose
    environment holds none of the pinning variables and no GPU, then import torch."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if kernels_section is not None:
        raw["kernels"] = kernels_section
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["CUDA_VISIBLE_DEVICES"] = "-1"
    env["LORASCOPE_ROOT"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(params)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_params_pins_kernels_before_torch(tmp_path: Path) -> None:
    got = probe(tmp_path, None)
    assert got["torch_before"] is False
    assert got["torch_after_load"] is False  # loading params must not import torch
    assert got["env_after_load"] == PINNED
    assert got["env"] == PINNED
    assert got["env"]["MKL_CBWR"] == "COMPATIBLE"
    assert got["capability"] == "AVX2"


def test_pin_off_sets_nothing(tmp_path: Path) -> None:
    got = probe(tmp_path, {"pin": "off"})
    assert got["env_after_load"] == dict.fromkeys(ENV)
    assert got["env"] == dict.fromkeys(ENV)


# ------------------------------------------------------------------------------ in this process
def test_pin_after_torch_warns_and_changes_nothing() -> None:
    assert "torch" in sys.modules
    before = dict(os.environ)
    other = KernelsSection(pin="on", aten="avx512", onednn="AVX512_CORE", mkl_cbwr="AVX2")
    with pytest.warns(RuntimeWarning, match="ATEN_CPU_CAPABILITY=avx512") as caught:
        got = pin(other)
    text = str(caught[0].message)
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE" in text and "MKL_CBWR=AVX2" in text
    assert dict(os.environ) == before
    assert got == in_force()
    assert got["ATEN_CPU_CAPABILITY"] != "avx512"


def test_pin_after_torch_is_quiet_when_already_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in PINNED.items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pin(KernelsSection(pin="on"))
    assert {k: got[k] for k in ENV} == PINNED


def test_in_force_reports_variables_and_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    got = in_force()
    assert set(got) == {*ENV, "aten.capability"}
    assert got["ATEN_CPU_CAPABILITY"] == "avx2"
    assert got["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert got["MKL_CBWR"] == "native"
    assert got["aten.capability"] == str(torch.backends.cpu.get_cpu_capability())


# ------------------------------------------------------------------------------ the square root
def correctly_rounded(x: float, y: float, dtype: type) -> bool:
    """Whether ``y`` is the float of ``dtype`` nearest to sqrt(x): (y - ulp/2)^2 <= x <= (y + ulp/2)^2,
    exactly in rationals."""
    y_ = dtype(y)
    lo = Fraction(float(np.nextafter(y_, dtype(0)))) if y_ > 0 else Fraction(0)
    hi = Fraction(float(np.nextafter(y_, dtype(np.inf))))
    fy, fx = Fraction(float(y_)), Fraction(float(x))
    return ((fy + lo) / 2) ** 2 <= fx <= ((fy + hi) / 2) ** 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sqrt_is_the_ieee_square_root(dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.uniform(0, 4, size=2002),
            10.0 ** rng.uniform(-30, 30, size=2002),
            [0.0, 1.0, 2.0, 4.0, 0.25, float(np.finfo(dtype).tiny), float(np.finfo(dtype).max)],
        ]
    ).astype(dtype)
    x = x.reshape(-1, 7)
    t = torch.from_numpy(x.copy())
    got = kernels.sqrt(t)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == t.dtype and got.shape == t.shape
    y = got.numpy()
    np.testing.assert_array_equal(y, np.sqrt(x))
    if dtype is np.float32:
        # via x87 extended precision (64-bit significand): rounding twice is harmless for a square root
        # when the wider format has at least 2p + 2 bits (50 for float32), not for float64 (108), whose
        # longdouble detour is off by an ulp for about one value in a thousand
        np.testing.assert_array_equal(y, np.sqrt(x.astype(np.longdouble)).astype(dtype))
    flat_x, flat_y = x.ravel(), y.ravel()
    for i in range(flat_x.size):
        assert correctly_rounded(flat_x[i], flat_y[i], dtype), (flat_x[i], flat_y[i])
    # the exact check tells the nearest float from its neighbours
    for i in (1, 2003, 4006):
        assert flat_y[i] > 0
        assert not correctly_rounded(flat_x[i], np.nextafter(flat_y[i], dtype(np.inf)), dtype)
        assert not correctly_rounded(flat_x[i], np.nextafter(flat_y[i], dtype(0)), dtype)


def test_sqrt_of_zero() -> None:
    for dtype in (torch.float32, torch.float64):
        got = kernels.sqrt(torch.zeros(3, dtype=dtype))
        assert got.dtype == dtype
        assert torch.equal(got, torch.zeros(3, dtype=dtype))
