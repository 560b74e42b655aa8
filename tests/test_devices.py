"""Device and precision resolution (one place for every stage) and the shard prefetcher."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml

from lorascope.devices import prefetched, resolve, resolve_device, resolve_dtype
from lorascope.errors import LorascopeError

from tests.conftest import REPO, cli

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


@no_gpu
def test_auto_is_the_cpu_and_a_missing_gpu_is_one_line():
    assert resolve_device("auto", "sae.device") == torch.device("cpu")
    assert resolve_device("cpu", "sae.device") == torch.device("cpu")
    for value in ("cuda", "cuda:1"):
        with pytest.raises(LorascopeError) as e:
            resolve_device(value, "sae.device")
        assert str(e.value).startswith(f"sae.device: {value!r} asks for a CUDA GPU but torch sees none")
        assert str(e.value).endswith("use 'auto' or 'cpu'") and "\n" not in str(e.value)
    with pytest.raises(LorascopeError, match=r"^ablate\.device: expected auto, cpu, cuda or cuda:<index>"):
        resolve_device("gpu0", "ablate.device")


def test_the_cpu_runs_every_precision():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "extract.precision") == torch.float32
    assert resolve_dtype("float32", cpu, "extract.precision") == torch.float32
    assert resolve_dtype("bfloat16", cpu, "extract.precision") == torch.bfloat16
    assert resolve_dtype("float16", cpu, "extract.precision") == torch.float16


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch: pytest.MonkeyPatch):
    """A pre-Ampere GPU (faked: the checks only ask torch.cuda): auto falls back to float32, an
    explicit bfloat16 names the key."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    gpu = torch.device("cuda")
    assert resolve_dtype("auto", gpu, "steer.precision") == torch.float32
    assert resolve_dtype("float16", gpu, "steer.precision") == torch.float16
    with pytest.raises(LorascopeError) as e:
        resolve_dtype("bfloat16", gpu, "steer.precision")
    assert str(e.value) == (
        "steer.precision: bfloat16 is not supported on Tesla V100-SXM2-16GB (compute capability 7.0; "
        "bfloat16 needs 8.0+); use float16 or float32"
    )


@no_gpu
def test_float16_training_needs_a_gpu():
    from lorascope.finetune.stage import training_dtype, weights_dtype

    assert training_dtype("bfloat16") == torch.bfloat16 and training_dtype("auto") == torch.float32
    assert weights_dtype("bfloat16", "full") == torch.bfloat16
    with pytest.raises(LorascopeError) as e:
        training_dtype("float16")
    assert str(e.value).startswith("finetune.precision: float16 training needs a CUDA GPU")


@pytest.mark.parametrize("background", [False, True])
def test_prefetch_yields_every_item_in_order(background: bool):
    loaded_in: list[str] = []

    def load(i: int) -> tuple[torch.Tensor, int]:
        loaded_in.append(threading.current_thread().name)
        return torch.full((3,), float(i)), i * i

    out = list(prefetched(range(5), load, "cpu", background=background))
    assert [i for i, _ in out] == list(range(5))
    assert all(bool((t == i).all()) and sq == i * i for i, (t, sq) in out)
    main = threading.main_thread().name
    assert (set(loaded_in) == {main}) != background  # the plain loop loads in the caller's thread


def test_prefetch_raises_the_loaders_error_in_the_caller():
    def load(i: int) -> int:
        if i == 2:
            raise LorascopeError("shard-00002.safetensors: truncated")
        return i

    got = []
    with pytest.raises(LorascopeError, match="truncated"):
        for i, _ in prefetched(range(4), load, "cpu", background=True):
            got.append(i)
    assert got == [0, 1]


@no_gpu
def test_cli_device_cuda_without_a_gpu(workspace: Path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["contexts"]["device"] = "cuda"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    res = cli("contexts", "--source", "lora", cwd=workspace, env={"LORASCOPE_ROOT": str(workspace)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: contexts.device: 'cuda' asks for a CUDA GPU but torch sees none")
    assert len(res.stderr.strip().splitlines()) == 1


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
