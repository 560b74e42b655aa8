"""The report's figures: each PNG is written atomically, has the size its dpi implies, is not blank, and
its ``FigureInfo`` matches the input data (checked against numbers computed here, independently)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from lorascope.errors import LorascopeError
from lorascope.report import figures

TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CATEGORIES = [
    "digits",
    "punctuation",
    "whitespace_or_newline",
    "special_marker",
    "reasoning_word",
    "other_word",
]
NAMES = ["Digits", "Punctuation", "Whitespace or newline", "Special marker", "Reasoning word", "Other word"]

# Copies of the tiny pipeline's outputs (data/interp/categories/figure1.json, metrics/ablation/figure3.json,
# metrics/sae.json), trimmed to what the figures read.
COUNTS = {  # category -> (lora, mlp, sae) features assigned
    "digits": (3, 3, 6),
    "punctuation": (4, 2, 6),
    "whitespace_or_newline": (2, 1, 3),
    "special_marker": (1, 0, 0),
    "reasoning_word": (3, 3, 4),
    "other_word": (15, 23, 37),
}
TOTALS = {"lora": 28, "mlp": 32, "sae": 56}
FIGURE1 = {
    "sources": ["lora", "mlp", "sae"],
    "totals": {s: {"assigned": n, "failed": 0, "uncategorized": 0} for s, n in TOTALS.items()},
    "categories": [
        {
            "string_id": cat,
            "name": name,
            "counts": dict(zip(TOTALS, COUNTS[cat], strict=True)),
            "shares": {s: n / TOTALS[s] for s, n in zip(TOTALS, COUNTS[cat], strict=True)},
        }
        for cat, name in zip(CATEGORIES, NAMES, strict=True)
    ],
}
FIGURE3 = {
    "direction": "KL(P_lora || P_ablated)",
    "unit": "nats per response token (mean over every response token of the sampled sequences)",
    "layers": [0, 1],
    "types": TYPES,
    "kl": [
        [1.385e-07, 3.720e-08, 6.848e-04, 5.018e-04, 4.884e-05, 8.562e-05, 4.672e-05],
        [5.457e-08, 3.999e-08, 1.591e-03, 9.873e-05, 3.163e-05, 4.716e-05, 6.676e-05],
    ],
}
SAE = {
    "alive_latents": 49,
    "dead_latents": 7,
    "fvu": 0.11386744774141731,
    "fvu_by_layer": {"L0": 0.09315026563255278, "L1": 0.14423382417932634},
    "fvu_by_type": {
        "down_proj": 24.147161831477714,
        "gate_proj": 0.10221529017660633,
        "k_proj": 0.12726043948342405,
        "o_proj": 6.5159337987755555,
        "q_proj": 0.09573469017868534,
        "up_proj": 0.10356653701879152,
        "v_proj": 0.12447233670999541,
    },
    "l0_calibrated": 4.129793510324483,
    "l0_train": 4.0,
    "lora_effect_recovered": 0.6154174322756052,
}
DPI = 60  # small PNGs keep the file fast; labels stay legible at 150 dpi (the report's default)


def assert_png(info: figures.FigureInfo, out: Path, dpi: int = DPI) -> Image.Image:
    """``out`` is the only file in its folder (no temporary left), a PNG of ``info.size_px`` close to
    ``figsize * dpi`` (tight bounding box), and not blank."""
    assert info.path == out and info.dpi == dpi
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert out.stat().st_size > 0
    with Image.open(out) as im:
        im.load()
    assert im.format == "PNG" and im.size == info.size_px
    for px, inches in zip(im.size, info.figsize_in, strict=True):
        assert abs(px - inches * dpi) <= 0.5 * dpi
    rgb = im.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 10
    assert ImageStat.Stat(rgb.convert("L")).stddev[0] > 5
    return im


def density_cell(layer: int, mass: dict[str, float], kind: str | None = None) -> dict[str, Any]:
    """A figure2 cell as categorize writes it: density = mass / the cell's total, null when nothing fired."""
    total = sum(mass.values())
    cell: dict[str, Any] = {"layer": layer, "mass": mass, "total": total}
    cell["density"] = {c: (m / total if total > 0 else None) for c, m in mass.items()}
    return cell | ({"component_type": kind} if kind else {})


# ------------------------------------------------------------------------------------------ Figure 1
def test_figure1_bars_are_the_shares(tmp_path: Path):
    out = tmp_path / "figure1.png"
    info = figures.figure1(FIGURE1, out, dpi=DPI)
    assert_png(info, out)
    expected = {s: [COUNTS[c][j] / sum(COUNTS[x][j] for x in CATEGORIES) for c in CATEGORIES]
                for j, s in enumerate(TOTALS)}  # fmt: skip
    assert info.values.keys() == expected.keys()
    for s, shares in expected.items():
        assert info.values[s] == pytest.approx(shares)
        assert sum(info.values[s]) == pytest.approx(1.0)
    assert info.bars == 3 * 6 and info.panels == 1 and info.scale == "linear"
    assert info.ticks == {"categories": NAMES, "sources": ["lora", "mlp", "sae"]}


def test_figure1_null_shares_get_no_bar(tmp_path: Path):
    data = {"categories": [{"string_id": "digits", "counts": {"lora": 2, "mlp": 0},
                            "shares": {"lora": 1.0, "mlp": None}}]}  # fmt: skip
    out = tmp_path / "f.png"
    info = figures.figure1(data, out, dpi=DPI)
    assert_png(info, out)
    assert info.bars == 1 and info.values == {"lora": [1.0], "mlp": [None]}
    assert info.ticks["categories"] == ["Digits"]  # the name from the string id when none is given


def test_figure_size_follows_dpi(tmp_path: Path):
    small = figures.figure1(FIGURE1, tmp_path / "a" / "f.png", dpi=50)
    large = figures.figure1(FIGURE1, tmp_path / "b" / "f.png", dpi=100)
    assert small.figsize_in == large.figsize_in
    for a, b in zip(small.size_px, large.size_px, strict=True):
        assert abs(b - 2 * a) <= 4


# ------------------------------------------------------------------------------------------ Figure 2
def test_figure2_one_heatmap_per_category_in_component_order(tmp_path: Path):
    layers, cats = [0, 1, 2], ["digits", "reasoning_word"]
    mass = {(n, k): {"digits": float(n + j), "reasoning_word": float(7 - j)} for n in layers
            for j, k in enumerate(TYPES)}  # fmt: skip
    mass[(2, "o_proj")] = {"digits": 0.0, "reasoning_word": 0.0}  # nothing fired: null densities
    cells = [density_cell(n, mass[n, k], k) for n in reversed(layers) for k in reversed(TYPES)]
    mlp = [density_cell(n, {"digits": 1.0, "reasoning_word": 3.0 * n}) for n in (1, 0)]
    data = {"categories": cats, "lora": {"cells": cells}, "mlp": {"cells": mlp}}
    out = tmp_path / "figure2.png"
    info = figures.figure2(data, out, dpi=DPI)
    assert_png(info, out)

    def density(n: int, k: str, c: str) -> float | None:
        total = sum(mass[n, k].values())
        return mass[n, k][c] / total if total else None

    for c in cats:  # rows: layers ascending, columns: q, k, v, o, gate, up, down
        assert info.values[f"lora/{c}"] == [[density(n, k, c) for k in TYPES] for n in layers]
    assert info.values["mlp"] == [[1.0, 0.0], [0.25, 0.75]]  # layers x categories
    assert info.panels == 3 and info.cells == 2 * 3 * 7 + 2 * 2
    assert info.non_null == info.cells - 2  # the one silent LoRA cell, in both category panels
    assert info.ticks["types"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert info.ticks["layers"] == ["0", "1", "2"] and info.ticks["categories"] == [
        "Digits",
        "Reasoning word",
    ]
    assert "density" in info.colorbar.lower() and "0-1" in info.colorbar


def test_figure2_many_layers_thin_the_tick_labels(tmp_path: Path):
    cells = [density_cell(n, {"digits": 1.0}, k) for n in range(64) for k in TYPES]
    out = tmp_path / "f.png"
    info = figures.figure2({"categories": ["digits"], "lora": {"cells": cells}}, out, dpi=DPI)
    assert_png(info, out)
    assert info.cells == info.non_null == 64 * 7 and info.panels == 1
    shown = [int(t) for t in info.ticks["layers"]]
    assert (
        shown[0] == 0
        and 8 <= len(shown) <= 16
        and len({b - a for a, b in zip(shown, shown[1:], strict=False)}) == 1
    )


def test_figure2_zero_densities_and_a_single_layer(tmp_path: Path):
    cells = [{"layer": 5, "component_type": k, "density": {"digits": 0.0, "other_word": 0.0}} for k in TYPES]
    out = tmp_path / "f.png"
    info = figures.figure2({"categories": ["digits", "other_word"], "lora": {"cells": cells}}, out, dpi=DPI)
    assert_png(info, out)
    assert info.values == {"lora/digits": [[0.0] * 7], "lora/other_word": [[0.0] * 7]}
    assert info.ticks["layers"] == ["5"] and info.cells == info.non_null == 14


def test_figure2_sae_overall_subcategories_and_cell_orientation(tmp_path: Path):
    """The paper's Figure 2 from SAE latents: bars are the overall densities, split into subcategory segments
    (share within the category x the category's share); heatmaps are layers (rows) x types (columns)."""
    cats = ["digits", "reasoning_word"]
    layers = [0, 1, 2]
    # one hot cell per category: digits in (layer 2, o_proj), reasoning_word in (layer 0, gate_proj)
    mass = {(n, k): {"digits": 9.0 if (n, k) == (2, "o_proj") else 0.5,
                     "reasoning_word": 4.0 if (n, k) == (0, "gate_proj") else 0.25}
            for n in layers for k in TYPES}  # fmt: skip
    cells = [density_cell(n, mass[n, k], k) for n in reversed(layers) for k in reversed(TYPES)]
    overall = {"digits": 30.0, "reasoning_word": 10.0}
    data = {
        "features": "sae", "attribution": "activation x share: ...", "categories": cats,
        "latents": {"d_sae": 64, "alive": 40, "dead": 24, "categorized": 31},
        "overall": {"mass": overall, "density": {c: m / 40.0 for c, m in overall.items()}},
        "subcategories": [{"category": "reasoning_word", "mass": {"wait": 7.5, "hmm": 2.5},
                           "density": {"wait": 0.75, "hmm": 0.25}, "not_subcategorized_mass": 0.0}],
        "cells": cells,
    }  # fmt: skip
    out = tmp_path / "figure2.png"
    info = figures.figure2_sae(data, out, dpi=DPI)
    assert_png(info, out)
    assert info.values["overall"] == [0.75, 0.25]
    assert info.values["sub/reasoning_word"] == pytest.approx([0.75 * 0.25, 0.25 * 0.25])
    assert "sub/digits" not in info.values and info.bars == 1 + 2
    for c in cats:
        grid = info.values[f"sae/{c}"]
        assert len(grid) == 3 and all(len(row) == 7 for row in grid)  # rows: layers, columns: types
        for i, n in enumerate(layers):
            for j, k in enumerate(TYPES):
                total = sum(mass[n, k].values())
                assert grid[i][j] == pytest.approx(mass[n, k][c] / total)
    hot = info.values["sae/digits"]
    assert max(max(r) for r in hot) == hot[2][TYPES.index("o_proj")]
    rw = info.values["sae/reasoning_word"]
    assert max(max(r) for r in rw) == rw[0][TYPES.index("gate_proj")]
    assert info.ticks["types"] == ["q", "k", "v", "o", "gate", "up", "down"] and info.ticks["layers"] == [
        "0",
        "1",
        "2",
    ]
    assert info.panels == 3 and info.cells == 2 * 3 * 7 and "density" in info.colorbar.lower()
    missing = figures.figure2_sae({"features": "sae", "categories": cats, "missing": "no SAE labels"},
                                  tmp_path / "m.png", DPI)  # fmt: skip
    assert missing.text == ["no SAE labels"] and missing.panels == 0


# ------------------------------------------------------------------------------------------ Figure 3
def test_figure3_real_grid_uses_a_log_scale_and_names_the_direction(tmp_path: Path):
    out = tmp_path / "figure3.png"
    info = figures.figure3(FIGURE3, out, dpi=DPI)
    assert_png(info, out)
    values = [v for row in FIGURE3["kl"] for v in row]
    assert math.log10(max(values) / min(values)) > 2 and info.scale == "log"
    assert info.cells == 2 * 7 and info.non_null == 14 and info.values["kl"] == FIGURE3["kl"]
    assert info.ticks == {"layers": ["0", "1"], "types": ["q", "k", "v", "o", "gate", "up", "down"]}
    assert "KL(P_lora || P_ablated)" in info.colorbar and "nats/response token" in info.colorbar


@pytest.mark.parametrize(
    "kl, scale",
    [
        ([[0.1, None, 0.3], [0.2, 0.25, 0.15]], "linear"),  # within a decade
        ([[0.0, 1e-6, 0.3], [0.2, None, 0.15]], "linear"),  # wide, but not all positive
        ([[1e-7, None, 3e-3], [2e-5, 4e-4, 1e-2]], "log"),
        ([[-1e-9, 0.0, 0.0], [0.0, 0.0, None]], "linear"),  # rounding below zero, all-zero otherwise
    ],
)
def test_figure3_nulls_and_scale(tmp_path: Path, kl: list, scale: str):
    data = {"layers": [3, 7], "types": ["v_proj", "q_proj", "down_proj"], "kl": kl}
    out = tmp_path / "f.png"
    info = figures.figure3(data, out, dpi=DPI)
    assert_png(info, out)
    assert info.cells == 6 and info.non_null == sum(v is not None for row in kl for v in row)
    assert info.scale == scale and info.values["kl"] == kl
    assert info.ticks == {"layers": ["3", "7"], "types": ["v", "q", "down"]}  # the file's type order
    assert info.colorbar.startswith("KL(P_lora || P_ablated)")  # the default direction


def test_figure3_many_layers_and_non_finite_values(tmp_path: Path):
    kl = [[10.0 ** -(1 + (n + j) % 6) for j in range(7)] for n in range(64)]
    kl[10][2] = float("nan")
    out = tmp_path / "f.png"
    info = figures.figure3({**FIGURE3, "layers": list(range(64)), "kl": kl}, out, dpi=DPI)
    assert_png(info, out)
    assert info.cells == 64 * 7 and info.non_null == 64 * 7 - 1 and info.values["kl"][10][2] is None
    assert len(info.ticks["layers"]) <= 16 and info.ticks["layers"][:2] == ["0", "4"]


def test_figure3_all_null_grid_is_an_empty_heatmap_with_a_note(tmp_path: Path):
    out = tmp_path / "f.png"
    info = figures.figure3({**FIGURE3, "kl": [[None] * 7, [None] * 7]}, out, dpi=DPI)
    assert_png(info, out)
    assert info.cells == 14 and info.non_null == 0 and info.scale == "none" and info.colorbar == ""
    assert info.text == ["no KL(P_lora || P_ablated) values measured"]


def test_figure3_grid_that_contradicts_its_axes_is_an_error(tmp_path: Path):
    with pytest.raises(LorascopeError, match="2 layers x 7 types"):
        figures.figure3({**FIGURE3, "kl": [[0.1] * 7]}, tmp_path / "f.png", dpi=DPI)
    assert not any(tmp_path.iterdir())  # nothing half-written


# --------------------------------------------------------------------------------------- SAE metrics
def test_sae_panel_bars_are_the_fvus_and_the_text_the_summary(tmp_path: Path):
    out = tmp_path / "sae.png"
    info = figures.sae_metrics(SAE, out, dpi=DPI)
    assert_png(info, out)
    assert info.values["fvu_by_layer"] == [SAE["fvu_by_layer"]["L0"], SAE["fvu_by_layer"]["L1"]]
    assert info.values["fvu_by_type"] == [SAE["fvu_by_type"][k] for k in TYPES]  # q..down, not file order
    assert info.bars == 2 + 7 and info.panels == 2
    assert info.scale == "log"  # FVU by type spans 0.096 .. 24
    assert info.ticks == {"layers": ["0", "1"], "types": ["q", "k", "v", "o", "gate", "up", "down"]}
    text = "\n".join(info.text)
    for part in ("0.1139", "train 4", "calibrated 4.13", "49 alive", "7 dead", "61.5%"):
        assert part in text


def test_sae_layers_sort_numerically_and_missing_keys_are_left_out(tmp_path: Path):
    data = {"fvu_by_layer": {"L10": 0.3, "L2": 0.2, "L0": None}, "dead_latents": 3}
    out = tmp_path / "sae.png"
    info = figures.sae_metrics(data, out, dpi=DPI)
    assert_png(info, out)
    assert info.values == {"fvu_by_layer": [None, 0.2, 0.3], "fvu_by_type": []}
    assert info.ticks["layers"] == ["0", "2", "10"] and info.bars == 2 and info.panels == 1
    assert info.text == ["Latents: 3 dead"]


# ----------------------------------------------------------------------------------- training curves
def test_training_curves_one_line_per_variant(tmp_path: Path):
    curves = {"lora": [(3, 2.2), (1, 3.0), (2, 2.5)], "full": [(1, 3.1), (2, float("nan")), (3, 2.0)],
              "diverged": [(1, float("inf"))]}  # fmt: skip
    out = tmp_path / "training.png"
    info = figures.training_curves(curves, out, dpi=DPI)
    assert_png(info, out)
    assert info.lines == 2 and info.ticks == {"variants": ["lora", "full"]}
    assert info.values == {"lora": [(1, 3.0), (2, 2.5), (3, 2.2)], "full": [(1, 3.1), (3, 2.0)]}
    assert info.scale == "linear"


@pytest.mark.parametrize("log_y, scale", [(None, "log"), (False, "linear"), (True, "log")])
def test_training_curves_log_y_when_wide(tmp_path: Path, log_y: bool | None, scale: str):
    out = tmp_path / "t.png"
    info = figures.training_curves({"lora": [(1, 10.0), (50, 0.5), (100, 0.01)]}, out, dpi=DPI, log_y=log_y)
    assert_png(info, out)
    assert info.scale == scale and info.lines == 1


# ------------------------------------------------------------------------------------ degenerate input
@pytest.mark.parametrize(
    "draw, data, note",
    [
        (figures.figure1, {"categories": []}, "no categories"),
        (figures.figure1, {}, "no categories"),
        (figures.figure2, {"categories": [], "lora": {"cells": []}}, "no categories"),
        (figures.figure2, {"categories": ["digits"]}, "no density cells"),
        (figures.figure3, {"layers": [0], "types": ["q_proj"], "kl": [[None]]}, "values measured"),
        (figures.figure3, {"layers": [], "types": [], "kl": []}, "no KL grid"),
        (figures.figure3, {}, "no KL grid"),
        (figures.sae_metrics, {}, "no summary metrics"),
        (figures.training_curves, {}, "no training curves"),
        (figures.training_curves, {"lora": []}, "no training curves"),
    ],
)
def test_degenerate_inputs_draw_a_note(tmp_path: Path, draw, data: dict, note: str):  # noqa: ANN001
    out = tmp_path / "x.png"
    info = draw(data, out, DPI)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == info.size_px
    assert info.bars == info.lines == info.non_null == 0  # an all-null heatmap is still drawn, as a panel
    assert any(note in line for line in info.text)


def test_single_points_draw(tmp_path: Path):
    """One layer, one type, one category, one step: every figure still draws its datum."""
    one = {
        "categories": [
            {"string_id": "digits", "name": "Digits", "counts": {"lora": 1}, "shares": {"lora": 1.0}}
        ]
    }
    assert figures.figure1(one, tmp_path / "1" / "f.png", DPI).bars == 1
    cell = density_cell(0, {"digits": 2.0}, "q_proj")
    assert figures.figure2({"lora": {"cells": [cell]}}, tmp_path / "2" / "f.png", DPI).values == {
        "lora/digits": [[1.0]]
    }
    info = figures.figure3(
        {"layers": [0], "types": ["q_proj"], "kl": [[0.02]]}, tmp_path / "3" / "f.png", DPI
    )
    assert (info.cells, info.non_null, info.scale) == (1, 1, "linear")
    assert figures.sae_metrics({"fvu_by_type": {"q_proj": 0.1}}, tmp_path / "4" / "f.png", DPI).bars == 1
    assert figures.training_curves({"lora": [(7, 1.5)]}, tmp_path / "5" / "f.png", DPI).values == {
        "lora": [(7, 1.5)]
    }


def test_import_does_not_load_matplotlib():
    code = "import sys, lorascope.report.figures; assert 'matplotlib' not in sys.modules, 'matplotlib loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_attribution_figure_and_table_rank_units_by_accuracy_lost(tmp_path: Path):
    from lorascope.report.figures import attribution
    from lorascope.report.stage import attribution_table

    acc = {
        "questions": 128, "lora": {"accuracy": 1.0, "backtracks_per_1k": 0.0},
        "unmatched": {"label:zzz": "no ok label matches it"},
        "units": {
            "sae.17": {"accuracy": 1.0, "delta_accuracy": 0.0, "delta_accuracy_ci": [0.0, 0.0], "sets": ["named"],
                       "label": "Wait lines", "delta_backtracks_per_1k": 0.6, "backtracks_per_1k": 0.6},
            "L1.down_proj": {"accuracy": 0.125, "delta_accuracy": -0.875, "delta_accuracy_ci": [-0.93, -0.81],
                             "sets": ["top"], "label": None, "delta_backtracks_per_1k": 7.7, "backtracks_per_1k": 7.7},
        },
    }  # fmt: skip
    exact = {"spearman_components": 0.88, "spearman_measured": 0.94, "mean_delta_ce": {"top": 0.15, "control": 0.01},
             "units": [{"unit": "L1.down_proj", "delta_ce": 0.31, "kl": 0.3, "rank": 1}]}  # fmt: skip
    info = attribution(acc, tmp_path / "a.png", dpi=50)
    assert info.path.is_file() and info.bars == 2 and info.ticks["units"] == ["L1.down_proj", "sae.17"]
    assert info.values == {"L1.down_proj": -0.875, "sae.17": 0.0}
    assert attribution({"units": {}}, tmp_path / "b.png", dpi=50).text == ["no unit was generated"]
    table = attribution_table(acc, exact)
    assert [r[0] for r in table.rows] == ["L1.down_proj", "sae.17"]
    assert table.rows[0][4:11] == [-0.875, -0.93, -0.81, 7.7, 0.31, 0.3, 1]
    assert table.rows[1][8:] == [None, None, None]  # not measured exactly
    assert any("0.88 over the components" in n for n in table.notes)
    assert "label:zzz: no ok label matches it; nothing generated" in table.notes
