"""The paper's figures as PNG files, drawn from the JSON documents the pipeline already writes.

* ``figure1``: category shares of LoRA directions vs MLP neurons vs SAE latents
  (``data/interp/categories/figure1.json``);
* ``figure2_sae``: the paper's Figure 2, category activation density of the SAE latents: overall with
  subcategories, and by layer and component type (``data/interp/categories/figure2.json``);
* ``figure2``: the same density of the LoRA directions (by layer and component type) and MLP neurons (by
  layer) themselves (``data/interp/categories/figure2_lora.json``);
* ``figure3``: single-component ablation KL, layer x component type (``metrics/ablation/figure3.json``);
* ``sae_metrics``: SAE reconstruction panel (``metrics/sae.json``);
* ``training_curves``: loss vs step, one line per variant.

Each function draws on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), writes the PNG
atomically and returns a ``FigureInfo`` that says what was drawn, so tests can check a figure against its
data. Degenerate inputs (no categories, one layer, an all-null grid, missing keys) give a figure with a
note instead of an error; only contradictory shapes raise ``LorascopeError``. matplotlib is imported inside
the functions so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope.atomic import atomic_path
from lorascope.errors import LorascopeError
from lorascope.sections import LORA_TARGETS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Grid = list[list[float | None]]
"""Rows x columns of a heatmap; ``None`` is a missing cell (drawn grey)."""

SOURCE_NAMES = {"lora": "LoRA directions", "mlp": "MLP neurons", "sae": "SAE latents"}
SOURCE_COLORS = {"lora": "#1f77b4", "mlp": "#ff7f0e", "sae": "#2ca02c"}
KL_DIRECTION = "KL(P_lora || P_ablated)"
MAX_TICKS = 16  # more rows/columns than this get every k-th tick label
LOG_DECADES = 2.0  # positive values spanning more decades than this get a log scale
LOG_FLOOR_DECADES = 6.0  # a log scale spans at most this many decades below its maximum
NULL_COLOR = "#d9d9d9"
DENSITY_LABEL = "Activation density\n(fraction of the cell's categorized mass, 0-1)"


@dataclass
class FigureInfo:
    """What a figure function drew, for checks against its input data."""

    path: Path
    figsize_in: tuple[float, float]
    dpi: int
    size_px: tuple[int, int]
    """(width, height) read back from the written PNG's header: ``figsize_in * dpi`` up to the tight
    bounding box (a few pixels of padding or trimmed margin)."""
    panels: int = 0
    """Axes that show data (heatmaps, bar charts, line plots); note-only axes are not counted."""
    cells: int = 0
    """Heatmap cells drawn in all panels (rows x columns each), null cells included."""
    non_null: int = 0
    """Heatmap cells with a value."""
    bars: int = 0
    lines: int = 0
    scale: str = "none"
    """Colour or y scale of the main panel: ``linear``, ``log`` or ``none`` (nothing to scale)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Plotted numbers by series or panel: bar heights in order, heatmap grids (rows x columns, None for
    null), line points ``[(x, y), ...]``."""
    ticks: dict[str, list[str]] = field(default_factory=dict)
    """Tick labels shown on named axes (e.g. ``layers``, ``types``, ``categories``)."""
    text: list[str] = field(default_factory=list)
    """Notes and summary lines drawn as text (e.g. ``no categories``)."""
    colorbar: str = ""
    """The colorbar's label (empty when there is no colorbar)."""


# ------------------------------------------------------------------------------------------- helpers
def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None (null, NaN, inf, bool, strings)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _new_figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(round(width_in, 2), round(height_in, 2)), layout="constrained")


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    with path.open("rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise LorascopeError(f"{path}: matplotlib did not write a PNG")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _save(fig: Figure, out: Path, dpi: int, **info: Any) -> FigureInfo:
    """Write ``fig`` to ``out`` atomically and describe it."""
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)  # no clipped label
        size_px = _png_size(tmp)
    w, h = fig.get_size_inches()
    return FigureInfo(path=out, figsize_in=(float(w), float(h)), dpi=dpi, size_px=size_px, **info)


def _note(ax: Axes, text: str) -> None:
    """A centred grey note on ``ax`` (an empty panel or a missing input)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.35")


def _thin(n: int, max_ticks: int = MAX_TICKS) -> list[int]:
    """Indices to label among ``n``: all when few, else every k-th starting at 0."""
    step = max(1, math.ceil(n / max_ticks))
    return list(range(0, n, step))


def _short_type(kind: str) -> str:
    return kind.removesuffix("_proj")


def _type_order(kinds: Sequence[str]) -> list[str]:
    """Component types in the fixed order q, k, v, o, gate, up, down; unknown ones after, as met."""
    seen = list(dict.fromkeys(kinds))
    return [k for k in LORA_TARGETS if k in seen] + [k for k in seen if k not in LORA_TARGETS]


def _category_name(string_id: str) -> str:
    """``whitespace_or_newline`` -> ``Whitespace or newline`` (the names categorize writes)."""
    text = string_id.replace("_", " ")
    return text[:1].upper() + text[1:]


def _short_unit(unit: str) -> str:
    """``nats per response token (mean over ...)`` -> ``nats/response token``."""
    head = unit.split(" (")[0].strip()
    return re.sub(r"^(\S+) per (.+)$", r"\1/\2", head)


def _wide_positive(values: Sequence[float]) -> bool:
    """All positive and spanning more than ``LOG_DECADES`` decades."""
    return bool(values) and min(values) > 0 and math.log10(max(values) / min(values)) > LOG_DECADES


def _heatmap(
    ax: Axes,
    grid_RC: Grid,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    cmap: Any,
    norm: Any,
    floor: float | None = None,
) -> Any:
    """Draw ``grid_RC`` (None -> grey) with thinned tick labels; values below ``floor`` show as the floor."""
    import numpy as np

    vals_RC = np.array([[np.nan if v is None else v for v in row] for row in grid_RC], dtype=float)
    vals_RC = vals_RC.reshape(len(row_labels), len(col_labels))
    if floor is not None:
        vals_RC = np.where(np.isnan(vals_RC), np.nan, np.maximum(vals_RC, floor))
    image = ax.imshow(
        np.ma.masked_invalid(vals_RC), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest"
    )
    rows, cols = _thin(len(row_labels)), _thin(len(col_labels))
    ax.set_yticks(rows, [row_labels[i] for i in rows])
    ax.set_xticks(cols, [col_labels[i] for i in cols])
    ax.tick_params(length=2, labelsize=8)
    return image


def _cmap(name: str = "viridis") -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=NULL_COLOR)


# ------------------------------------------------------------------------------------------ Figure 1
def figure1(data: Mapping[str, Any], out: Path, dpi: int = 150) -> FigureInfo:
    """Figure 1: per category, one horizontal bar per source with that source's share of its categorized
    features (``shares``), annotated with the share and count. Null shares (a source with nothing
    categorized) get no bar."""
    from matplotlib.ticker import PercentFormatter

    rows = list(data.get("categories") or [])
    sources = list(data.get("sources") or dict.fromkeys(s for r in rows for s in (r.get("shares") or {})))
    totals = data.get("totals") or {}
    names = [r.get("name") or _category_name(str(r.get("string_id", "?"))) for r in rows]
    shares = {s: [_num((r.get("shares") or {}).get(s)) for r in rows] for s in sources}
    counts = {s: [(r.get("counts") or {}).get(s) for r in rows] for s in sources}

    fig = _new_figure(9.0, 1.6 + len(rows) * (0.2 + 0.22 * max(1, len(sources))))
    ax = fig.add_subplot()
    ax.set_title("Figure 1: Category shares of LoRA directions, MLP neurons and SAE latents", fontsize=10)
    text: list[str] = []
    bars = 0
    if not rows or not sources:
        text.append("no categories" if not rows else "no sources")
        _note(ax, text[-1])
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        height = 0.8 / len(sources)
        for j, s in enumerate(sources):
            ys = [i - 0.4 + height * (j + 0.5) for i in range(len(rows))]
            drawn = [(y, v, n) for y, v, n in zip(ys, shares[s], counts[s], strict=True) if v is not None]
            assigned = (totals.get(s) or {}).get("assigned")
            label = SOURCE_NAMES.get(s, s) + (f" (n={assigned})" if assigned is not None else "")
            ax.barh(
                [y for y, _, _ in drawn],
                [v for _, v, _ in drawn],
                height=height * 0.9,
                color=SOURCE_COLORS.get(s, f"C{j + 3}"),
                label=label,
            )
            for y, v, n in drawn:
                tag = f"{100 * v:.1f}%" + (f" ({n})" if n is not None else "")
                ax.text(v, y, " " + tag, va="center", ha="left", fontsize=7)
            bars += len(drawn)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()  # first category on top
        top = max((v for vs in shares.values() for v in vs if v is not None), default=0.0)
        ax.set_xlim(0, min(1.0, top * 1.25) if top > 0 else 1.0)
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.legend(  # beside the axes: the bars may reach any corner
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            title="Source (features categorized)",
            title_fontsize=8,
        )
    ax.set_xlabel("Share of the source's categorized features (%)")
    ax.set_ylabel("Category")
    return _save(
        fig,
        out,
        dpi,
        panels=1 if bars else 0,
        bars=bars,
        scale="linear" if bars else "none",
        values=shares,
        ticks={"categories": names if bars else [], "sources": sources},
        text=text,
    )


# ------------------------------------------------------------------------------------------ Figure 2
def _density_grids(data: Mapping[str, Any], categories: Sequence[str]) -> tuple[list[int], list[str], dict]:
    """LoRA cells as ``(layers, types, {category: grid layers x types})``."""
    return _cell_grids(list((data.get("lora") or {}).get("cells") or []), categories)


def _cell_grids(cells: list[dict[str, Any]], categories: Sequence[str]) -> tuple[list[int], list[str], dict]:
    """(layer, component type) cells as ``(layers, types, {category: grid layers x types})``."""
    layers = sorted({int(c["layer"]) for c in cells})
    kinds = _type_order([str(c["component_type"]) for c in cells])
    at = {(int(c["layer"]), str(c["component_type"])): c.get("density") or {} for c in cells}
    grids = {cat: [[_num(at.get((n, k), {}).get(cat)) for k in kinds] for n in layers] for cat in categories}
    return layers, kinds, grids


Panel = tuple[str, str, Grid, list[str], list[str], str]
"""One heatmap of Figure 2: ``(values key, title, grid, row labels, column labels, x label)``."""


def _save_note(fig: Figure, out: Path, dpi: int, note: str) -> FigureInfo:
    """Save ``fig`` as one empty panel that says why nothing is drawn."""
    ax = fig.add_subplot()
    _note(ax, note)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out, dpi, text=[note])


def _density_ticks(layers: list[int], kinds: list[str], categories: list[str]) -> dict[str, list[str]]:
    """The tick labels a density figure shows: thinned layers and types, every category."""
    return {
        "layers": [str(layers[i]) for i in _thin(len(layers))],
        "types": [_short_type(kinds[i]) for i in _thin(len(kinds))],
        "categories": [_category_name(c) for c in categories],
    }


def _figure2_panels(
    data: Mapping[str, Any], categories: list[str]
) -> tuple[list[Panel], list[int], list[str], list[int]]:
    """One LoRA panel per category (layers x types) and, when the MLP store is present, one MLP panel
    (layers x categories): ``(panels, lora layers, lora types, mlp layers)``."""
    layers, kinds, lora = _density_grids(data, categories)
    if not layers:
        lora = {}
    mlp_cells = sorted((data.get("mlp") or {}).get("cells") or [], key=lambda c: int(c["layer"]))
    mlp_layers = [int(c["layer"]) for c in mlp_cells]
    mlp = [[_num((c.get("density") or {}).get(cat)) for cat in categories] for c in mlp_cells]
    panels: list[Panel] = [
        (
            f"lora/{cat}",
            _category_name(cat),
            grid,
            [str(n) for n in layers],
            [_short_type(k) for k in kinds],
            "",
        )
        for cat, grid in lora.items()
    ]
    if mlp_cells and categories:
        short = [_category_name(c) for c in categories]
        panels.append(
            ("mlp", "MLP neurons, all categories", mlp, [str(n) for n in mlp_layers], short, "Category")
        )
    return panels, layers, kinds, mlp_layers


def _figure2_title(panels: list[Panel]) -> str:
    """What the figure shows, and what grey means when a cell is null."""
    title = (
        "Figure 2, LoRA-direction version: category activation density\n(LoRA directions by layer and type"
    )
    title += "; MLP neurons by layer)" if panels[-1:] and panels[-1][0] == "mlp" else ")"
    if any(v is None for _, _, grid, *_ in panels for row in grid for v in row):
        title += "\ngrey: no categorized feature fired in the cell"
    return title


def _draw_panels(fig: Figure, panels: list[Panel], nrows: int, ncols: int) -> tuple[int, int]:
    """The panels' heatmaps on one shared 0-1 colour scale (unused axes hidden); returns ``(cells,
    non-null cells)``."""
    from matplotlib.colors import Normalize

    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    norm, cmap = Normalize(0.0, 1.0), _cmap()
    image = None
    cells = non_null = 0
    for ax, (_key, title, grid, rows, cols, xlabel) in zip(axes, panels, strict=False):
        image = _heatmap(ax, grid, rows, cols, cmap, norm)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("Layer", fontsize=8)
        ax.set_xlabel(xlabel or "Component type", fontsize=8)
        if xlabel:
            ax.tick_params(axis="x", labelrotation=45)
        cells += len(rows) * len(cols)
        non_null += sum(v is not None for row in grid for v in row)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    assert image is not None  # panels is not empty
    fig.colorbar(image, ax=list(axes[: len(panels)]), label=DENSITY_LABEL, shrink=0.9)
    return cells, non_null


def figure2(data: Mapping[str, Any], out: Path, dpi: int = 150) -> FigureInfo:
    """Figure 2: one heatmap per category for the LoRA store (rows: layers, columns: component types q, k,
    v, o, gate, up, down; colour: density), plus, when the MLP store is present, one heatmap of its
    density by layer (rows) and category (columns). Null densities are grey. One shared 0-1 colour
    scale. ``FigureInfo.values``: ``lora/<category>`` and ``mlp`` grids."""
    categories = list(data.get("categories") or [])
    if not categories:  # older files: the categories named in any cell
        old_cells = [c for s in ("lora", "mlp") for c in (data.get(s) or {}).get("cells") or []]
        categories = list(dict.fromkeys(k for c in old_cells for k in c.get("density") or {}))
    panels, layers, kinds, mlp_layers = _figure2_panels(data, categories)

    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    n_rows_max = max([len(layers), len(mlp_layers), 1])
    panel_h = min(7.0, 1.6 + 0.12 * n_rows_max)
    # at least wide enough for the title and tall enough for the colorbar's label
    fig = _new_figure(max(7.5, 1.4 + 3.3 * ncols), max(4.5, 1.0 + panel_h * nrows))
    fig.suptitle(_figure2_title(panels), fontsize=11)
    if not panels:
        return _save_note(fig, out, dpi, "no categories" if not categories else "no density cells")

    cells, non_null = _draw_panels(fig, panels, nrows, ncols)
    return _save(
        fig,
        out,
        dpi,
        panels=len(panels),
        cells=cells,
        non_null=non_null,
        scale="linear",
        values={key: grid for key, _, grid, *_ in panels},
        ticks=_density_ticks(layers, kinds, categories),
        colorbar=DENSITY_LABEL,
    )


def _figure2_sae_title(data: Mapping[str, Any]) -> str:
    """The title, with how many latents are categorized, live and dead when the data says."""
    title = "Figure 2: Category activation density of the SAE latents"
    latents = data.get("latents") or {}
    if latents:
        title += (
            f"\n({latents.get('categorized', '?')} categorized of {latents.get('alive', '?')} live latents; "
        )
        title += f"{latents.get('dead', '?')} dead latents left out)"
    return title


def _overall_bars(
    ax: Axes,
    categories: list[str],
    overall: Mapping[str, Any],
    subs: Mapping[Any, Any],
    values: dict[str, Any],
) -> int:
    """A bar per category with its share of the mass, split into its subcategories' parts when it has
    them (their widths into ``values``); returns the bars drawn."""
    from matplotlib.ticker import PercentFormatter

    bars = 0
    for i, c in enumerate(categories):
        share = _num(overall.get(c)) or 0.0
        sub = subs.get(c)
        densities = [(k, _num(v)) for k, v in ((sub or {}).get("density") or {}).items()]
        parts = [(k, v * share) for k, v in densities if v is not None]
        if parts:
            left = 0.0
            for j, (k, w) in enumerate(parts):
                ax.barh(i, w, left=left, color=f"C{j}", edgecolor="white", linewidth=0.5, height=0.7)
                if w > 0.04:
                    ax.text(left + w / 2, i, _category_name(k), ha="center", va="center", fontsize=6)
                left += w
                bars += 1
            values[f"sub/{c}"] = [w for _, w in parts]
        else:
            ax.barh(i, share, color="0.55", height=0.7)
            bars += 1
        ax.text(share, i, f" {100 * share:.1f}%", va="center", ha="left", fontsize=7)
    ax.set_yticks(range(len(categories)), [_category_name(c) for c in categories])
    ax.invert_yaxis()
    top = max((v for v in values["overall"] if v is not None), default=0.0)
    ax.set_xlim(0, min(1.0, top * 1.25) if top > 0 else 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_xlabel("Share of the categorized latents' activation mass (segments: subcategories)", fontsize=8)
    ax.tick_params(labelsize=8)
    return bars


def _category_heatmaps(
    fig: Figure,
    gs: Any,
    grids: dict[str, Grid],
    layers: list[int],
    kinds: list[str],
    ncols: int,
    values: dict[str, Any],
) -> tuple[int, int, int, bool]:
    """One heatmap per category below the bars (grids into ``values``), one shared colour bar; returns
    ``(panels, cells, non-null cells, whether a colour bar was drawn)``."""
    from matplotlib.colors import Normalize

    norm, cmap = Normalize(0.0, 1.0), _cmap()
    image, cells, non_null, heat_axes = None, 0, 0, []
    for n, (c, grid) in enumerate(grids.items()):
        hx = fig.add_subplot(gs[1 + n // ncols, n % ncols])
        image = _heatmap(hx, grid, [str(x) for x in layers], [_short_type(k) for k in kinds], cmap, norm)
        hx.set_title(_category_name(c), fontsize=9)
        hx.set_ylabel("Layer", fontsize=8)
        hx.set_xlabel("Component type", fontsize=8)
        values[f"sae/{c}"] = grid
        cells += len(layers) * len(kinds)
        non_null += sum(v is not None for row in grid for v in row)
        heat_axes.append(hx)
    if image is not None:
        fig.colorbar(image, ax=heat_axes, label=DENSITY_LABEL, shrink=0.9)
    return len(heat_axes), cells, non_null, image is not None


def figure2_sae(data: Mapping[str, Any], out: Path, dpi: int = 150) -> FigureInfo:
    """The paper's Figure 2 from the SAE latents: a bar per category with its share of the categorized
    latents' activation mass (``overall.density``), split into its subcategories' parts (share within the
    category x the category's share), then one heatmap per category of its density by layer (rows) and
    component type (columns q, k, v, o, gate, up, down), the mass attributed to cells through each latent's
    decoder row (``attribution``, quoted under the title). ``FigureInfo.values``: ``overall`` (densities
    in category order), ``sub/<category>`` (segment widths), ``sae/<category>`` (grids)."""
    categories = list(data.get("categories") or [])
    overall = (data.get("overall") or {}).get("density") or {}
    layers, kinds, grids = _cell_grids(list(data.get("cells") or []), categories)
    subs = {s.get("category"): s for s in data.get("subcategories") or []}
    ncols = min(3, max(1, len(grids)))
    nrows = 1 + max(1, math.ceil(len(grids) / ncols)) if grids else 1
    panel_h = min(6.0, 1.6 + 0.12 * max(len(layers), 1))
    bar_h = 0.9 + 0.3 * max(len(categories), 1)
    fig = _new_figure(max(7.5, 1.4 + 3.3 * ncols), 1.2 + bar_h + panel_h * (nrows - 1))
    fig.suptitle(_figure2_sae_title(data), fontsize=11)
    if not categories or not overall:
        note = str(data.get("missing") or ("no categories" if not categories else "no SAE densities"))
        return _save_note(fig, out, dpi, note)

    gs = fig.add_gridspec(nrows, ncols, height_ratios=[bar_h] + [panel_h] * (nrows - 1))
    values: dict[str, Any] = {"overall": [_num(overall.get(c)) for c in categories]}
    bars = _overall_bars(fig.add_subplot(gs[0, :]), categories, overall, subs, values)
    heatmaps, cells, non_null, colorbar = _category_heatmaps(fig, gs, grids, layers, kinds, ncols, values)
    text = [str(data["attribution"]).split(":")[0]] if data.get("attribution") else []
    return _save(
        fig,
        out,
        dpi,
        panels=1 + heatmaps,
        cells=cells,
        non_null=non_null,
        bars=bars,
        scale="linear",
        values=values,
        ticks=_density_ticks(layers, kinds, categories),
        text=text,
        colorbar=DENSITY_LABEL if colorbar else "",
    )


# ------------------------------------------------------------------------------------------ Figure 3
def _kl_grid(data: Mapping[str, Any]) -> tuple[list[Any], list[str], Grid]:
    """``(layers, types, kl[layer][type])`` with non-finite values as None; shape checked."""
    raw = data.get("kl")
    layers = list(data["layers"] if data.get("layers") is not None else range(len(raw or [])))
    kinds = [str(k) for k in data.get("types") or []]
    if raw is None:
        raw = [[None] * len(kinds) for _ in layers]
    if not kinds and raw:
        kinds = [f"type {j}" for j in range(len(raw[0]))]
    if len(raw) != len(layers) or any(len(row) != len(kinds) for row in raw):
        raise LorascopeError(
            f"figure3: kl must be {len(layers)} layers x {len(kinds)} types, got rows of "
            f"{sorted({len(r) for r in raw})} x {len(raw)}"
        )
    return layers, kinds, [[_num(v) for v in row] for row in raw]


def figure3(data: Mapping[str, Any], out: Path, dpi: int = 150) -> FigureInfo:
    """Figure 3: single-component ablation KL as a layer x component-type heatmap. Null cells are grey;
    a log colour scale (values under ``max / 10**LOG_FLOOR_DECADES`` shown at that floor) when the values
    are all positive and span more than ``LOG_DECADES`` decades, linear otherwise. The colorbar names
    the KL direction and unit; cells are annotated with their value when the grid is small."""
    from matplotlib.colors import LogNorm, Normalize

    layers, kinds, kl_LT = _kl_grid(data)
    direction = str(data.get("direction") or KL_DIRECTION)
    unit = _short_unit(str(data.get("unit") or "nats/token"))
    present = [v for row in kl_LT for v in row if v is not None]
    row_labels, col_labels = [str(n) for n in layers], [_short_type(k) for k in kinds]

    fig = _new_figure(2.6 + 0.75 * max(len(kinds), 4), 2.4 + min(7.5, 0.3 * max(len(layers), 4)))
    ax = fig.add_subplot()
    title = "Figure 3: Single-component ablation KL by layer and component type"
    if present and len(present) < len(layers) * len(kinds):
        title += "\ngrey: not measured"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("Component type")
    ax.set_ylabel("Layer")
    text: list[str] = []
    colorbar = f"{direction}\n{unit}" if present and layers and kinds else ""
    norm: Normalize | None = None
    scale, floor = "none", None
    if present:
        top = max(present)
        if _wide_positive(present):
            scale, floor = "log", max(min(present), top / 10**LOG_FLOOR_DECADES)
            norm = LogNorm(floor, top)
        else:
            low = min(0.0, min(present))
            scale, norm = "linear", Normalize(low, top if top > low else low + 1.0)
    if not layers or not kinds:
        text.append("no KL grid")
        _note(ax, text[-1])
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        image = _heatmap(ax, kl_LT, row_labels, col_labels, _cmap("magma_r"), norm or Normalize(0, 1), floor)
        if present:
            fig.colorbar(image, ax=ax, label=colorbar)
            if len(layers) * len(kinds) <= 120:
                _annotate(ax, kl_LT, norm)
        else:
            text.append(f"no {direction} values measured")
            _note(ax, text[-1])
    return _save(
        fig,
        out,
        dpi,
        panels=1 if layers and kinds else 0,
        cells=len(layers) * len(kinds),
        non_null=len(present),
        scale=scale,
        values={"kl": kl_LT},
        ticks={
            "layers": [row_labels[i] for i in _thin(len(row_labels))],
            "types": [col_labels[i] for i in _thin(len(col_labels))],
        },
        text=text,
        colorbar=colorbar,
    )


def _annotate(ax: Axes, grid_RC: Grid, norm: Any) -> None:
    """Write each non-null value in its cell, white on dark cells."""
    for i, row in enumerate(grid_RC):
        for j, v in enumerate(row):
            if v is not None:
                dark = float(norm(max(v, norm.vmin))) > 0.55  # magma_r: high values are dark
                ax.text(
                    j, i, f"{v:.1e}", ha="center", va="center", fontsize=6, color="white" if dark else "black"
                )


# --------------------------------------------------------------------------------------- SAE metrics
def _layer_key(name: str) -> tuple[int, str]:
    """``L12`` -> (12, ""), for sorting layer groups numerically; other names after, by name."""
    match = re.fullmatch(r"L(\d+)", name)
    return (int(match[1]), "") if match else (1 << 30, name)


def _sae_summary(data: Mapping[str, Any]) -> list[str]:
    """One line per metric present in ``metrics/sae.json``."""
    lines = []

    def get(key: str) -> float | None:
        return _num(data.get(key))

    if (fvu := get("fvu")) is not None:
        lines.append(f"FVU (all components): {fvu:.4g}")
    if (mean := get("fvu_mean_component")) is not None:
        lines.append(f"FVU (mean over components): {mean:.4g}")
    l0 = [
        f"{name} {v:.3g}"
        for name, key in (("train", "l0_train"), ("calibrated", "l0_calibrated"))
        if (v := get(key)) is not None
    ]
    if l0:
        lines.append("L0: " + ", ".join(l0))
    alive, dead = get("alive_latents"), get("dead_latents")
    if alive is not None or dead is not None:
        parts = [f"{int(v)} {name}" for name, v in (("alive", alive), ("dead", dead)) if v is not None]
        lines.append("Latents: " + ", ".join(parts))
    if (rec := get("lora_effect_recovered")) is not None:
        lines.append(f"LoRA effect recovered: {100 * rec:.1f}%")
    for key, label in (
        ("kl_lora_base", "KL(P_lora || P_base)"),
        ("kl_lora_spliced", "KL(P_lora || P_spliced)"),
    ):
        if (v := get(key)) is not None:
            lines.append(f"{label}: {v:.3g} nats/token")
    return lines


def _fvu_bars(
    ax: Axes, values: Sequence[float | None], labels: Sequence[str], title: str, xlabel: str
) -> int:
    """FVU bars with a dashed FVU = 1 reference; log y when the values span widely. Returns bars drawn."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    drawn = [(i, v) for i, v in enumerate(values) if v is not None]
    if not drawn:
        _note(ax, "not reported")
        ax.set_xticks([])
        ax.set_yticks([])
        return 0
    ax.bar([i for i, _ in drawn], [v for _, v in drawn], color="#4c72b0")
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8, label="FVU = 1 (mean predictor)")
    if _wide_positive([v for _, v in drawn]):
        ax.set_yscale("log")
    shown = _thin(len(labels))
    ax.set_xticks(shown, [labels[i] for i in shown])
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.legend(fontsize=7, loc="upper left")
    return len(drawn)


def sae_metrics(data: Mapping[str, Any], out: Path, dpi: int = 150) -> FigureInfo:
    """SAE metrics panel: FVU by layer (bars), FVU by component type (bars, q..down order) and a text box
    with overall FVU, L0 (train and calibrated), alive/dead latents and the LoRA effect recovered.
    Missing keys leave their panel or line out (or show ``not reported``)."""
    by_layer = data.get("fvu_by_layer") or {}
    by_type = data.get("fvu_by_type") or {}
    layer_keys = sorted(by_layer, key=_layer_key)
    type_keys = _type_order(list(by_type))
    layer_vals = [_num(by_layer[k]) for k in layer_keys]
    type_vals = [_num(by_type[k]) for k in type_keys]
    layer_labels = [k[1:] if re.fullmatch(r"L\d+", k) else k for k in layer_keys]
    summary = _sae_summary(data)

    widths_in = [1.2 + min(8.0, 0.3 * max(len(layer_keys), 4)), 1.2 + 0.35 * max(len(type_keys), 7), 3.0]
    fig = _new_figure(sum(widths_in), 4.2)
    fig.suptitle("SAE on LoRA activations: reconstruction metrics")
    grid = fig.add_gridspec(1, 3, width_ratios=widths_in)
    ax_layer, ax_type, ax_text = (fig.add_subplot(grid[0, i]) for i in range(3))
    bars_layer = _fvu_bars(ax_layer, layer_vals, layer_labels, "FVU by layer", "Layer")
    bars_type = _fvu_bars(
        ax_type, type_vals, [_short_type(k) for k in type_keys], "FVU by component type", "Component type"
    )
    ax_text.axis("off")
    lines = summary or ["no summary metrics"]
    ax_text.text(
        0.0,
        0.95,
        "\n".join(lines),
        transform=ax_text.transAxes,
        va="top",
        ha="left",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "#f4f4f4", "edgecolor": "0.6"},
        wrap=True,
    )
    scale = "log" if ax_layer.get_yscale() == "log" or ax_type.get_yscale() == "log" else "linear"
    return _save(
        fig,
        out,
        dpi,
        panels=(bars_layer > 0) + (bars_type > 0),
        bars=bars_layer + bars_type,
        scale=scale if bars_layer + bars_type else "none",
        values={"fvu_by_layer": layer_vals, "fvu_by_type": type_vals},
        ticks={
            "layers": [layer_labels[i] for i in _thin(len(layer_labels))],
            "types": [_short_type(type_keys[i]) for i in _thin(len(type_keys))],
        },
        text=lines,
    )


# ----------------------------------------------------------------------------------- training curves
def training_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    out: Path,
    dpi: int = 150,
    log_y: bool | None = None,
    ylabel: str = "Training loss (cross-entropy, nats/token)",
) -> FigureInfo:
    """Loss vs optimizer step, one line per variant with at least one finite point (points sorted by step,
    non-finite losses dropped). ``log_y=None``: log y when the losses are positive and span more than
    ``LOG_DECADES`` decades."""
    series = {
        name: sorted((int(s), float(v)) for s, v in points if _num(v) is not None and _num(s) is not None)
        for name, points in curves.items()
    }
    series = {name: pts for name, pts in series.items() if pts}
    losses = [v for pts in series.values() for _, v in pts]
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    ax.set_title("Training loss by variant")
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel(ylabel)
    text: list[str] = []
    for j, (name, pts) in enumerate(series.items()):
        few = len(pts) <= 30
        ax.plot(
            [s for s, _ in pts],
            [v for _, v in pts],
            label=name,
            color=f"C{j % 10}",
            marker="o" if few else None,
            markersize=3,
            linewidth=1.2,
        )
    use_log = _wide_positive(losses) if log_y is None else (log_y and bool(losses) and min(losses) > 0)
    if use_log:
        ax.set_yscale("log")
    if series:
        ax.legend(title="Variant", fontsize=8)
        ax.grid(alpha=0.3)
    else:
        text.append("no training curves")
        _note(ax, text[-1])
    return _save(
        fig,
        out,
        dpi,
        panels=1 if series else 0,
        lines=len(series),
        scale=("log" if use_log else "linear") if series else "none",
        values=series,
        ticks={"variants": list(series)},
        text=text,
    )


def attribution(data: Mapping[str, Any], out: Path, dpi: int = 150) -> FigureInfo:
    """The generated ablations of ``attribute`` (``accuracy.json``), ranked by Δaccuracy: one bar per unit
    with its paired-bootstrap 95% CI, labelled with the unit, why it was generated and its label."""
    units = sorted(data.get("units", {}).items(), key=lambda kv: (kv[1]["delta_accuracy"], kv[0]))
    fig = _new_figure(8.0, 1.4 + 0.45 * max(len(units), 2))
    ax = fig.add_subplot()
    ax.set_title("Accuracy change when one unit is ablated (95% CI, paired bootstrap)", fontsize=10)
    ax.set_xlabel(f"Δaccuracy vs the adapter as trained ({data.get('questions', '?')} questions)")
    text: list[str] = []
    values = {name: u["delta_accuracy"] for name, u in units}
    if units:
        y = list(range(len(units)))
        deltas = [u["delta_accuracy"] for _, u in units]
        ci = [u.get("delta_accuracy_ci") or [d, d] for (_, u), d in zip(units, deltas, strict=True)]
        err = [
            [d - lo for d, (lo, _) in zip(deltas, ci, strict=True)],
            [hi - d for d, (_, hi) in zip(deltas, ci, strict=True)],
        ]
        ax.barh(y, deltas, xerr=err, color=["C3" if d < 0 else "C0" for d in deltas], capsize=3)
        labels = [
            f"{name} ({', '.join(u['sets'])}): {(u.get('label') or 'no label')[:48]}" for name, u in units
        ]
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()  # the most accuracy lost on top
        ax.axvline(0, color="black", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
    else:
        text.append("no unit was generated")
        _note(ax, text[-1])
    return _save(fig, out, dpi, panels=1 if units else 0, bars=len(units), values=values,
                 ticks={"units": [n for n, _ in units]}, text=text)  # fmt: skip
