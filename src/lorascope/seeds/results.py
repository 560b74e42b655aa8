"""One seed's results, read from its DVC experiment (``dvc.api.DVCFileSystem`` at the experiment's rev):
the metrics behind Tables 1 and 2, the SAE's quality, the steering curve, and what the stability
measures need (the adapter's vectors, the SAE's live decoder rows, labels and categories)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorascope import paths
from lorascope.components import component_key
from lorascope.models import ADAPTER_WEIGHTS

_ADAPTER_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class SeedResult:
    """What one finished seed triple produced."""

    seed: int
    triple: dict[str, int]
    """The seeds it ran with (``base``, ``finetune``, ``sae``)."""
    experiment: str
    recovery: dict[str, Any]
    """``metrics/recovery.json``'s ``tasks``: each task's variant scores and recoveries."""
    sae: dict[str, Any]
    """``metrics/sae.json``."""
    steer: dict[str, Any]
    """``metrics/steer.json``: a curve per direction and what each ``label:`` selector chose."""
    adapter: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    """Component name -> (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r])."""
    components: list[str] = field(default_factory=list)
    """The SAE's input order (``cfg.json``)."""
    W_dec_FD: np.ndarray | None = field(default=None, repr=False)
    live: list[int] = field(default_factory=list)
    rms_D: np.ndarray | None = field(default=None, repr=False)
    """Each component's RMS over the store (``contexts`` statistics), in ``components`` order."""
    labels: dict[int, str] = field(default_factory=dict)
    """Live SAE latent -> its explanation."""
    categories: dict[int, str] = field(default_factory=dict)
    """Live SAE latent -> its category."""


def adapter_vectors(tensors: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``L{layer}.{kind}`` -> (A, B) from a peft adapter's state dict."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _ADAPTER_KEY.search(key)
        if m:
            parts.setdefault(component_key(int(m[1]), m[2]), {})[m[3]] = value.float().numpy()
    return {name: (ab["A"], ab["B"]) for name, ab in parts.items() if {"A", "B"} <= ab.keys()}


def read(root: Path, rev: str, seed: int, triple: dict[str, int]) -> SeedResult:
    """The results of experiment ``rev`` (a name or commit) of the repository at ``root``."""
    import pandas as pd
    import torch
    from dvc.api import DVCFileSystem
    from safetensors.torch import load as load_tensors

    from lorascope.sae import load as sae_files  # torch loads here, after the kernels are pinned

    fs = DVCFileSystem(repo=str(root), rev=rev)

    def data(path: Path | str) -> bytes:
        return bytes(fs.read_bytes(Path(path).as_posix()))

    def js(path: Path | str) -> Any:
        return json.loads(data(path))

    def table(path: Path | str) -> Any:
        return pd.read_parquet(io.BytesIO(data(path)))

    result = SeedResult(
        seed=seed,
        triple=triple,
        experiment=rev,
        recovery=js(paths.RECOVERY)["tasks"],
        sae=js(paths.SAE_METRICS),
        steer=js(paths.STEER_METRICS),
        adapter=adapter_vectors(load_tensors(data(paths.LORA / ADAPTER_WEIGHTS))),
    )
    cfg = js(paths.SAE / sae_files.CFG)
    sae = load_tensors(data(paths.SAE / sae_files.WEIGHTS))
    result.components = list(cfg["components"])
    result.W_dec_FD = sae["W_dec_FD"].to(torch.float64).numpy()
    result.live = sorted(int(i) for i in js(paths.SAE / sae_files.ALIVE)["alive_latents"])
    stats = table(paths.features("lora"))
    stats = stats[stats.sign == 1].assign(name=stats.feature_name.str.rstrip("+-")).set_index("name")
    result.rms_D = np.sqrt(
        stats.loc[result.components, "mean"].to_numpy() ** 2
        + stats.loc[result.components, "std"].to_numpy() ** 2
    )
    live = set(result.live)
    labels = table(paths.labels("sae"))
    result.labels = {
        int(r.feature): str(r.explanation)
        for r in labels.itertuples()
        if r.status == "ok" and int(r.feature) in live
    }
    assignments = table(paths.ASSIGNMENTS)
    assignments = assignments[(assignments.source == "sae") & (assignments.status == "ok")]
    result.categories = {
        int(r.feature): str(r.category) for r in assignments.itertuples() if int(r.feature) in live
    }
    return result
