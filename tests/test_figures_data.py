"""The categorize stage's figure data (``lorascope.categorize.figures``) against hand counts and numpy on
inputs made here: Figure 1's shares, Figure 2's per-cell masses and densities (orientation: cells keyed by
layer and component type, never swapped), the decoder shares of the SAE version. No pipeline, no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorascope.autointerp.prompts import Category
from lorascope.categorize.figures import component_cell, decoder_shares, figure1, figure2_source
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store, plan_shards, write_index, write_shard

CATS = [Category("digits", "Digits", "d", []), Category("words", "Words", "w", [])]


def test_figure1_shares_by_hand():
    rows = [
        *({"source": "lora", "status": "ok", "category": "digits", "subcategory": None} for _ in range(3)),
        {"source": "lora", "status": "ok", "category": "words", "subcategory": None},
        {"source": "lora", "status": "failed", "category": None, "subcategory": None},
        {"source": "mlp", "status": "uncategorized", "category": None, "subcategory": None},
        {"source": "mlp", "status": "ok", "category": "words", "subcategory": None},
        {"source": "sae", "status": "ok", "category": "words", "subcategory": "a"},
        {"source": "sae", "status": "ok", "category": "words", "subcategory": "a"},
        {"source": "sae", "status": "ok", "category": "words", "subcategory": "b"},
        {"source": "sae", "status": "ok", "category": "words", "subcategory": None},
    ]
    subs = {"words": [Category("a", "A", "", []), Category("b", "B", "", [])]}
    fig = figure1(rows, ["lora", "mlp", "sae"], CATS, subs)
    by = {r["string_id"]: r for r in fig["categories"]}
    assert [r["string_id"] for r in fig["categories"]] == ["digits", "words"]
    assert by["digits"]["counts"] == {"lora": 3, "mlp": 0, "sae": 0}
    assert by["words"]["counts"] == {"lora": 1, "mlp": 1, "sae": 4}
    assert by["digits"]["shares"] == {"lora": 0.75, "mlp": 0.0, "sae": 0.0}
    assert by["words"]["shares"] == {"lora": 0.25, "mlp": 1.0, "sae": 1.0}
    assert by["words"]["name"] == "Words"
    assert fig["totals"] == {
        "lora": {"assigned": 4, "uncategorized": 0, "failed": 1},
        "mlp": {"assigned": 1, "uncategorized": 1, "failed": 0},
        "sae": {"assigned": 4, "uncategorized": 0, "failed": 0},
    }
    (words,) = fig["sae_subcategories"]
    assert (words["category"], words["subcategorized"], words["not_subcategorized"]) == ("words", 3, 1)
    assert [(s["string_id"], s["count"], s["share"]) for s in words["subcategories"]] == [
        ("a", 2, pytest.approx(2 / 3)),
        ("b", 1, pytest.approx(1 / 3)),
    ]
    empty = figure1([], ["lora"], CATS, {})
    assert empty["categories"][0]["shares"] == {"lora": None} and empty["sae_subcategories"] == []


def test_component_cells():
    assert component_cell("L3.q_proj") == (3, "q_proj")
    assert component_cell("L12.down_proj.1") == (12, "down_proj")
    assert component_cell("L0.mlp.17") == (0, "mlp")
    for bad in ("L3.q_proj+", "q_proj", "sae.4"):
        with pytest.raises(LorascopeError, match="is not named L<layer>"):
            component_cell(bad)


def test_decoder_shares_by_hand():
    W = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    scale = torch.tensor([1.0, 2.0, 1.0])
    got = decoder_shares(W, scale)  # w = [3, 2, 0], [0, 0, 0], [1, 0.5, 2]
    assert got.dtype == torch.float64
    assert got[0].tolist() == pytest.approx([9 / 13, 4 / 13, 0.0])
    assert got[1].tolist() == [0.0, 0.0, 0.0]
    assert got[2].tolist() == pytest.approx([1 / 5.25, 0.25 / 5.25, 4 / 5.25])


def write_store(
    root: Path, acts: torch.Tensor, components: list[str], lengths: list[int], shard: int
) -> Store:
    folder = root / "store"
    folder.mkdir()
    shards = plan_shards(lengths, shard)
    for s in shards:
        write_shard(
            folder / s.file, acts[s.start : s.start + s.tokens], torch.zeros(s.tokens, dtype=torch.int32)
        )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    write_index(folder, {"source": "lora", "model": "m", "components": components, "dtype": "float32",
                         "tokens": sum(lengths), "documents": [[f"d{i}", s, n] for i, (s, n) in
                                                               enumerate(zip(starts, lengths, strict=True))],
                         "shards": [s.to_json() for s in shards]})  # fmt: skip
    return Store.open(folder)


@pytest.mark.parametrize("by_type", [True, False])
def test_figure2_cells_against_numpy(tmp_path: Path, by_type: bool):
    """Three layers x two types (and a rank-2 component): each cell's mass per category is the sum of
    relu(sign x activation) of its member features over the first n tokens (the cut inside a shard)."""
    components = ["L0.q_proj", "L0.down_proj", "L1.q_proj.0", "L1.q_proj.1", "L1.down_proj", "L2.q_proj",
                  "L2.down_proj"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(120, len(components), generator=g) * torch.arange(1, len(components) + 1)
    store = write_store(tmp_path, acts, components, [30, 30, 30, 30], shard=60)
    members = [("L0.q_proj+", 1, "digits"), ("L0.q_proj-", -1, "words"), ("L1.q_proj.1+", 1, "words"),
               ("L1.down_proj-", -1, "digits"), ("L2.down_proj+", 1, "words"), ("L2.q_proj+", 1, "digits"),
               ("L2.q_proj-", -1, "digits")]  # fmt: skip
    n = 75
    fig = figure2_source(store, members, ["digits", "words"], n, by_type)
    assert fig["tokens"] == n
    A = acts[:n].double().numpy()
    want: dict[tuple, dict[str, float]] = {}
    for name, sign, category in members:
        col = components.index(name[:-1])
        layer, kind = int(name[1]), name.split(".")[1].rstrip("+-")
        key = (layer, kind) if by_type else (layer,)
        want.setdefault(key, {"digits": 0.0, "words": 0.0})[category] += np.maximum(sign * A[:, col], 0).sum()
    keys = [(c["layer"], c["component_type"]) if by_type else (c["layer"],) for c in fig["cells"]]
    if by_type:  # every (layer, type) of the store, in store order; the rank-2 component is one cell
        assert keys == [(0, "q_proj"), (0, "down_proj"), (1, "q_proj"), (1, "down_proj"), (2, "q_proj"),
                        (2, "down_proj")]  # fmt: skip
    else:
        assert keys == [(0,), (1,), (2,)]
    for cell, key in zip(fig["cells"], keys, strict=True):
        mass = want.get(key, {"digits": 0.0, "words": 0.0})
        assert cell["mass"] == pytest.approx(mass, rel=1e-9)
        total = sum(mass.values())
        assert cell["total"] == pytest.approx(total)
        assert cell["density"] == ({c: pytest.approx(m / total) for c, m in mass.items()} if total else
                                   {"digits": None, "words": None})  # fmt: skip
        assert cell["features"] == sum(
            1 for name, *_ in members
            if ((int(name[1]), name.split(".")[1].rstrip("+-")) if by_type else (int(name[1]),)) == key
        )  # fmt: skip
    with pytest.raises(LorascopeError, match="feature L7.q_proj\\+ is not a component of the store"):
        figure2_source(store, [("L7.q_proj+", 1, "digits")], ["digits"], n, by_type)
