"""The report's figures: each PNG is written, is not blank, and draws exactly its input data."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lorascope.config import LORA_TARGETS
from lorascope.report import figures

FIGURE1 = {
    "categories": [
        {"string_id": "digits", "name": "Digits", "counts": {"lora": 3, "mlp": 1, "sae": 6},
         "shares": {"lora": 0.3, "mlp": 0.1, "sae": 0.6}},
        {"string_id": "reasoning_word", "name": "Reasoning word", "counts": {"lora": 7, "mlp": 9, "sae": 4},
         "shares": {"lora": 0.7, "mlp": 0.9, "sae": 0.4}},
    ]
}  # fmt: skip


def _cell(layer: int, kind: str, digits: float) -> dict:
    return {
        "layer": layer,
        "component_type": kind,
        "density": {"digits": digits, "reasoning_word": 1 - digits},
    }


FIGURE2 = {
    "categories": ["digits", "reasoning_word"],
    "lora": {"cells": [_cell(n, k, (n + i) / 10) for n in range(3) for i, k in enumerate(LORA_TARGETS)]},
}


def looks_drawn(path: Path, info: figures.FigureInfo) -> None:
    """A real PNG of the reported size with more than a handful of colours."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == info.size_px
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
        assert min(im.size) > 200


def test_figure1_bars_are_the_shares(tmp_path: Path):
    info = figures.figure1(FIGURE1, tmp_path / "f1.png", dpi=100)
    looks_drawn(tmp_path / "f1.png", info)
    assert info.bars == 6 and info.ticks["categories"] == ["Digits", "Reasoning word"]
    assert info.values == {"lora": [0.3, 0.7], "mlp": [0.1, 0.9], "sae": [0.6, 0.4]}


def test_figure2_one_heatmap_per_category(tmp_path: Path):
    info = figures.figure2(FIGURE2, tmp_path / "f2.png", dpi=100)
    looks_drawn(tmp_path / "f2.png", info)
    assert info.panels == 2 and info.cells == 2 * 3 * 7 == info.non_null
    digits = next(grid for key, grid in info.values.items() if "digits" in key)
    assert digits == [[(n + i) / 10 for i in range(7)] for n in range(3)]


@pytest.mark.parametrize("spread", ["log", "linear"])
def test_figure3_grid_and_scale(tmp_path: Path, spread: str):
    kl = (
        [[1e-7, None, 3e-3], [2e-5, 4e-4, 1e-2]] if spread == "log" else [[0.1, None, 0.3], [0.2, 0.25, 0.15]]
    )
    data = {"direction": "KL(P_lora || P_ablated)", "unit": "nats per response token (mean ...)",
            "layers": [0, 1], "types": ["q_proj", "k_proj", "v_proj"], "kl": kl}  # fmt: skip
    info = figures.figure3(data, tmp_path / "f3.png", dpi=100)
    looks_drawn(tmp_path / "f3.png", info)
    assert info.cells == 6 and info.non_null == 5 and info.scale == spread
    assert info.values["kl"] == kl and info.ticks["layers"] == ["0", "1"]


def test_sae_panel_bars_are_the_fvus(tmp_path: Path):
    data = {"fvu": 0.12, "fvu_by_layer": {"L1": 0.2, "L0": 0.1}, "fvu_by_type": {"q_proj": 0.3, "down_proj": 0.05},
            "l0_train": 4.0, "l0_calibrated": 4.1, "alive_latents": 49, "dead_latents": 7}  # fmt: skip
    info = figures.sae_metrics(data, tmp_path / "sae.png", dpi=100)
    looks_drawn(tmp_path / "sae.png", info)
    assert info.bars == 4 and info.values["fvu_by_layer"] == [0.1, 0.2]  # layers in numeric order
    assert sorted(info.values["fvu_by_type"]) == [0.05, 0.3]
    assert any("49" in line for line in info.text) and any("0.12" in line for line in info.text)


def test_training_curves_one_line_per_variant(tmp_path: Path):
    curves = {"lora": [(1, 3.0), (2, 2.5), (3, 2.2)], "full": [(1, 3.1), (2, 2.0)]}
    info = figures.training_curves(curves, tmp_path / "t.png", dpi=100)
    looks_drawn(tmp_path / "t.png", info)
    assert info.lines == 2 and {k: [tuple(p) for p in v] for k, v in info.values.items()} == curves


@pytest.mark.parametrize(
    "draw, data",
    [
        (figures.figure1, {"categories": []}),
        (figures.figure2, {"categories": [], "lora": {"cells": []}}),
        (figures.figure3, {"layers": [0], "types": ["q_proj"], "kl": [[None]]}),
        (figures.figure3, {"layers": [], "types": [], "kl": []}),
        (figures.sae_metrics, {}),
        (figures.training_curves, {}),
    ],
)
def test_degenerate_inputs_draw_a_note(tmp_path: Path, draw, data):  # noqa: ANN001
    info = draw(data, tmp_path / "x.png", 100)
    assert (tmp_path / "x.png").stat().st_size > 0 and info.text
