"""The categorize stage's figure data (``lorascope.categorize.figures``) against hand counts and numpy on
inputs made here: Figure 1's shares, Figure 2's per-cell masses and densities (orientation: cells keyed by
layer and component type, never swapped), the decoder shares of the SAE version. No pipeline, no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorascope.categorize.figures import (
    DensitySample,
    component_cell,
    decoder_shares,
    figure1,
    figure2_source,
)
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store, plan_shards, write_index, write_shard
from lorascope.labelling.prompts import Category

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
        {"source": "sae", "status": "ok", "category": "words", "subcategory": None},
    ]
    subs = {"words": [Category("a", "A", "", []), Category("b", "B", "", [])]}
    fig = figure1(rows, ["lora", "mlp", "sae"], CATS, subs)
    assert fig["sources"] == ["lora", "mlp", "sae"] and fig["share_definition"].startswith("share = features")
    by = {r["string_id"]: r for r in fig["categories"]}
    assert [r["string_id"] for r in fig["categories"]] == ["digits", "words"]
    assert by["digits"]["counts"] == {"lora": 3, "mlp": 0, "sae": 0}
    assert by["words"]["counts"] == {"lora": 1, "mlp": 1, "sae": 5}
    assert by["digits"]["shares"] == {"lora": 0.75, "mlp": 0.0, "sae": 0.0}
    assert by["words"]["shares"] == {"lora": 0.25, "mlp": 1.0, "sae": 1.0}
    assert by["words"]["name"] == "Words"
    assert fig["totals"] == {
        "lora": {"assigned": 4, "uncategorized": 0, "failed": 1},
        "mlp": {"assigned": 1, "uncategorized": 1, "failed": 0},
        "sae": {"assigned": 5, "uncategorized": 0, "failed": 0},
    }
    (words,) = fig["sae_subcategories"]
    assert (words["category"], words["subcategorized"], words["not_subcategorized"]) == ("words", 3, 2)
    assert [(s["string_id"], s["name"], s["count"], s["share"]) for s in words["subcategories"]] == [
        ("a", "A", 2, pytest.approx(2 / 3)),
        ("b", "B", 1, pytest.approx(1 / 3)),
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


def drawn(sample: DensitySample) -> torch.Tensor:
    """The store rows a sample drew, from its documents and how much of each it took (no exclusion)."""
    mask = torch.zeros(sample.store.tokens, dtype=torch.bool)
    for doc, n in sample.take.items():
        start = sample.store.documents[doc][1]
        mask[start : start + n] = True
    return mask


def test_density_sample_draws_whole_documents_at_random_less_the_excluded_tokens(tmp_path: Path):
    """Figure 2's tokens: whole documents in a seeded random order (not the first ones in store order), the last
    one cut to the budget; the SAE's exclusion policy leaves out first positions and special tokens, counted by
    reason; only the shards holding drawn documents are read."""
    from lorascope.exclusion import Exclusion

    lengths = [10] * 12  # 12 documents, 3 shards of 4
    T = sum(lengths)
    acts = torch.arange(T, dtype=torch.float32)[:, None].repeat(1, 2)
    store = write_store(tmp_path, acts, ["L0.q_proj", "L0.down_proj"], lengths, 40)
    sample = DensitySample(store, 25, seed=0, exclusion=None)
    assert sorted(sample.take.values()) == [5, 10, 10] and sample.drawn == 25
    assert sample.take != {0: 10, 1: 10, 2: 5}  # a random draw, not the store's first documents
    assert DensitySample(store, 25, seed=0, exclusion=None).take == sample.take
    assert any(DensitySample(store, 25, seed=s, exclusion=None).take != sample.take for s in (1, 2, 3))
    got = torch.cat(list(sample.blocks("cpu", "t")))
    assert torch.equal(got, acts[drawn(sample)]) and sample.used == 25
    assert sample.summary()["excluded"] == {} and sample.summary()["tokens"] == 25
    # the exclusion: first position of every document and token id 7, which the store never holds here but
    # for one token per document (position 3); the cut document keeps its first 5 tokens
    ids = torch.zeros(T, dtype=torch.int32)
    ids[3::10] = 7
    folder = store.root
    for sh in store.shards:
        write_shard(
            folder / sh.file, acts[sh.start : sh.start + sh.tokens], ids[sh.start : sh.start + sh.tokens]
        )
    store = Store.open(folder)
    policy = Exclusion(first_position=True, special_ids=torch.tensor([7]), norm_limit=None)
    sample = DensitySample(store, 25, seed=0, exclusion=policy)
    reads: list[str] = []
    read = store.read
    store.read = lambda sh: (reads.append(sh.file), read(sh))[1]  # type: ignore[method-assign]
    got = torch.cat(list(sample.blocks("cpu", "t")))
    pos = torch.arange(T)
    want = drawn(sample) & (pos % 10 != 0) & (pos % 10 != 3)
    assert torch.equal(got, acts[want])
    assert sample.summary() == {
        "sample": sample.summary()["sample"],
        "documents": 3,
        "drawn_tokens": 25,
        "tokens": 25 - 3 - 3,
        "excluded": {"excluded": 6, "first_position": 3, "norm": 0, "special_tokens": 3},
    }
    holding = {sh.file for sh in store.shards if any(sh.first_doc <= d < sh.last_doc for d in sample.take)}
    assert sorted(reads) == sorted(holding)


@pytest.mark.parametrize("by_type", [True, False])
def test_figure2_cells_against_numpy(tmp_path: Path, by_type: bool):
    """Three layers x two types (and a rank-2 component): each cell's mass per category is the sum of
    relu(sign x activation) of its member features over the sampled tokens (a cut document)."""
    components = ["L0.q_proj", "L0.down_proj", "L1.q_proj.0", "L1.q_proj.1", "L1.down_proj", "L2.q_proj",
                  "L2.down_proj"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(120, len(components), generator=g) * torch.arange(1, len(components) + 1)
    store = write_store(tmp_path, acts, components, [30, 30, 30, 30], shard=60)
    members = [("L0.q_proj+", 1, "digits"), ("L0.q_proj-", -1, "words"), ("L1.q_proj.1+", 1, "words"),
               ("L1.down_proj-", -1, "digits"), ("L2.down_proj+", 1, "words"), ("L2.q_proj+", 1, "digits"),
               ("L2.q_proj-", -1, "digits")]  # fmt: skip
    sample = DensitySample(store, 75, 0, None)
    fig = figure2_source(sample, members, ["digits", "words"], by_type)
    assert fig["tokens"] == 75 and fig["documents"] == 3
    A = acts[drawn(sample)].double().numpy()
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
        figure2_source(sample, [("L7.q_proj+", 1, "digits")], ["digits"], by_type)


def test_figure2_member_names_small_masses_and_positive_mass(tmp_path: Path):
    """A member named without a sign suffix is its component as is (``L0.mlp.12`` is not ``L0.mlp.1`` + "2");
    a cell whose mass is below 1 still gets densities; positive_mass's sums against torch."""
    from lorascope.categorize.figures import positive_mass

    components = ["L0.mlp.1", "L0.mlp.12", "L1.mlp.3"]
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(30, 3, generator=g).abs() * 1e-3 * torch.tensor([1.0, -1.0, 1.0])
    store = write_store(tmp_path, acts, components, [10, 20], 10)
    sample = DensitySample(store, 25, 0, None)
    a = acts[drawn(sample)]
    pos, neg = positive_mass(sample)
    assert sample.used == 25 and pos.dtype == neg.dtype == torch.float64
    # float64 sums of <= 30 float32 values (exact in float64), in another order: the bound is ~30 float64 ulps
    # (3e-15), independent of the CPU's kernels; rel 1e-12 leaves a wide margin
    assert pos.tolist() == pytest.approx(a.double().clamp(min=0).sum(0).tolist(), rel=1e-12)
    assert neg.tolist() == pytest.approx((-a).double().clamp(min=0).sum(0).tolist(), rel=1e-12)
    whole = DensitySample(store, 40, 0, None)
    positive_mass(whole)
    assert whole.used == whole.drawn == 30  # a budget beyond the store: all of it
    members = [("L0.mlp.12", -1, "words"), ("L0.mlp.1", 1, "digits"), ("L1.mlp.3+", 1, "words")]
    fig = figure2_source(sample, members, ["digits", "words"], by_type=False)
    want0 = {"digits": a[:, 0].double().sum().item(), "words": -a[:, 1].double().sum().item()}
    (c0, c1) = fig["cells"]
    assert c0["mass"] == pytest.approx(want0, rel=1e-9) and 0 < c0["total"] < 1
    assert c0["density"] == pytest.approx({k: v / sum(want0.values()) for k, v in want0.items()}, rel=1e-9)
    assert c1["density"] == {"digits": 0.0, "words": 1.0} and 0 < c1["total"] < 1


def test_figure2_routes_each_sources_ok_members_and_orients_its_cells(tmp_path: Path):
    """figure2: the LoRA store's cells are (layer, component type), the MLP store's layers; each store gets
    only its own source's features with status ok."""
    from lorascope.categorize.figures import figure2

    g = torch.Generator().manual_seed(1)
    lora_c, mlp_c = ["L0.q_proj", "L0.down_proj", "L1.q_proj"], ["L0.mlp.0", "L0.mlp.1", "L1.mlp.0"]
    lora_a, mlp_a = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    (tmp_path / "l").mkdir(), (tmp_path / "m").mkdir()
    stores = {"lora": write_store(tmp_path / "l", lora_a, lora_c, [20, 20], 20),
              "mlp": write_store(tmp_path / "m", mlp_a, mlp_c, [20, 20], 20)}  # fmt: skip
    rows = [
        {
            "source": "lora",
            "status": "ok",
            "feature_name": "L0.down_proj-",
            "sign": "-1",
            "category": "digits",
        },
        {"source": "lora", "status": "failed", "feature_name": "L0.q_proj+", "sign": 1, "category": "words"},
        {"source": "mlp", "status": "ok", "feature_name": "L1.mlp.0+", "sign": 1, "category": "words"},
        {"source": "mlp", "status": "ok", "feature_name": "L0.mlp.1-", "sign": -1, "category": "words"},
        {"source": "sae", "status": "ok", "feature_name": "L0.mlp.0+", "sign": 1, "category": "digits"},
    ]
    samples = {k: DensitySample(v, 30, 0, None) for k, v in stores.items()}
    fig = figure2(samples, rows, ["digits", "words"], 30)
    assert fig["normalisation"].startswith("mass = sum over the density sample's tokens")
    assert fig["density_tokens"] == 30 and fig["categories"] == ["digits", "words"]
    assert set(fig) == {"normalisation", "density_tokens", "categories", "lora", "mlp"}
    lora_a, mlp_a = lora_a[drawn(samples["lora"])], mlp_a[drawn(samples["mlp"])]
    relu = lambda t: t.clamp(min=0).sum().item()  # noqa: E731
    lora = [(c["layer"], c["component_type"], c["features"], c["mass"]) for c in fig["lora"]["cells"]]
    assert lora == [
        (0, "q_proj", 0, {"digits": 0.0, "words": 0.0}),
        (0, "down_proj", 1, {"digits": pytest.approx(relu(-lora_a[:, 1])), "words": 0.0}),
        (1, "q_proj", 0, {"digits": 0.0, "words": 0.0}),
    ]
    mlp = [(set(c), c["layer"], c["features"], c["mass"]) for c in fig["mlp"]["cells"]]
    keys = {"layer", "features", "total", "mass", "density"}
    assert mlp == [
        (keys, 0, 1, {"digits": 0.0, "words": pytest.approx(relu(-mlp_a[:, 1]))}),
        (keys, 1, 1, {"digits": 0.0, "words": pytest.approx(relu(mlp_a[:, 2]))}),
    ]
    assert fig["lora"]["tokens"] == fig["mlp"]["tokens"] == 30


def test_figure2_sae_against_numpy(tmp_path: Path):
    """The SAE's Figure 2: per-latent mass (thresholded encoding over the sampled tokens), split over the
    cells by the squared unit-scale decoder row; overall, subcategory and per-cell densities; live,
    dead and unassigned mass."""
    from lorascope.categorize.figures import figure2_sae, latent_mass
    from lorascope.sae.load import save
    from lorascope.sae.model import BatchTopKSAE

    components = ["L0.q_proj", "L0.down_proj", "L1.q_proj.0", "L1.q_proj.1"]
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(50, 4, generator=g) + 0.3
    store = write_store(tmp_path, acts, components, [25, 25], 20)
    sae = BatchTopKSAE(4, 8, 2, generator=g)
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.linspace(-0.2, 0.3, 8))
        sae.b_dec_D.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
        sae.W_dec_FD.mul_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        sae.threshold.fill_(0.15)
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    scale = [1.0, 0.3, 0.7, 4.0]  # not float32 numbers: the shares are float64 throughout
    save(sae, sae_dir, {"d_in": 4, "d_sae": 8, "k": 2, "components": components, "scale": scale})
    n = 45
    sample = DensitySample(store, n, 0, None)
    a = acts[drawn(sample)]
    We, be, bd = (sae.W_enc_DF.detach().double().numpy(), sae.b_enc_F.detach().double().numpy(),
                  sae.b_dec_D.detach().double().numpy())  # fmt: skip
    pre = np.maximum((a.double().numpy() - bd) @ We + be, 0)
    mass = (pre * (pre > 0.15)).sum(0)
    assert (mass > 0).all()
    got = latent_mass(sample, sae, block=7)
    assert sample.used == n and got.dtype == torch.float64 and got.numpy() == pytest.approx(mass, rel=1e-5)
    # summed in float64 (the float32 activations, exactly; the default block is a whole shard's kept rows)
    with torch.no_grad():
        exact = sum(
            sae.encode(b).double().sum(0) for b in DensitySample(store, n, 0, None).blocks("cpu", "t")
        )
    # the same float32 codes on both sides (one process), summed in float64 in another grouping: <= 50
    # non-negative terms, so the error is below ~50 float64 ulps (6e-15)
    assert latent_mass(sample, sae).tolist() == pytest.approx(exact.tolist(), rel=1e-12)
    gm = latent_mass(sample, sae).numpy()  # as figure2_sae encodes it (one block a shard)
    w = sae.W_dec_FD.detach().double().numpy() / np.array(scale)
    share = w**2 / (w**2).sum(1, keepdims=True)
    share_cells = np.stack([share[:, 0], share[:, 1], share[:, 2] + share[:, 3]], 1)
    subs = {"words": [Category("a", "A", "", []), Category("b", "B", "", [])]}
    members = [(0, "digits", None), (1, "words", "a"), (2, "words", None), (4, "digits", None),
               (6, "words", "a"), (7, "words", None)]  # fmt: skip
    alive = [0, 1, 2, 3, 4, 6, 7]  # 5 dead; 3 live but not categorized
    fig = figure2_sae(sample, sae_dir, alive, members, ["digits", "words"], subs, n)
    assert (fig["features"], fig["density_tokens"], fig["tokens"]) == ("sae", n, n)
    assert fig["categories"] == ["digits", "words"]
    assert fig["attribution"].startswith("activation x share") and fig["normalisation"].startswith("overall:")
    assert fig["latents"] == {"d_sae": 8, "alive": 7, "dead": 1, "categorized": 6}
    assert fig["mass_total"] == pytest.approx(gm[alive].sum(), rel=1e-12)
    assert fig["unassigned_mass"] == pytest.approx(gm[3], rel=1e-12)
    assert fig["dead_mass"] == pytest.approx(gm[5], rel=1e-12)
    by_cat = {c: [f for f, cat, _ in members if cat == c] for c in ("digits", "words")}
    overall = {c: gm[fs].sum() for c, fs in by_cat.items()}
    assert fig["overall"]["mass"] == pytest.approx(overall, rel=1e-12)
    tot = sum(overall.values())
    assert fig["overall"]["density"] == pytest.approx({c: m / tot for c, m in overall.items()}, rel=1e-12)
    (words,) = fig["subcategories"]
    assert words["category"] == "words"
    assert words["mass"] == pytest.approx({"a": gm[1] + gm[6], "b": 0.0}, rel=1e-12)
    assert words["density"] == pytest.approx({"a": 1.0, "b": 0.0})
    assert words["not_subcategorized_mass"] == pytest.approx(gm[2] + gm[7], rel=1e-12)
    cells = fig["cells"]
    assert [(c["layer"], c["component_type"]) for c in cells] == [
        (0, "q_proj"),
        (0, "down_proj"),
        (1, "q_proj"),
    ]
    for k, cell in enumerate(cells):
        want = {c: float((gm[fs] * share_cells[fs, k]).sum()) for c, fs in by_cat.items()}
        t = sum(want.values())
        assert cell["mass"] == pytest.approx(want, rel=1e-12) and cell["total"] == pytest.approx(t, rel=1e-12)
        assert cell["density"] == pytest.approx({c: m / t for c, m in want.items()}, rel=1e-12)
    # no categorized latent: every density is null, never a division by zero
    empty = figure2_sae(sample, sae_dir, alive, [], ["digits"], {"digits": []}, n)
    assert empty["overall"]["density"] == {"digits": None}
    assert empty["cells"][0]["density"] == {"digits": None}
    assert empty["subcategories"] == [
        {"category": "digits", "mass": {}, "density": {}, "not_subcategorized_mass": 0.0}
    ]
    with pytest.raises(LorascopeError, match=r"sae\.5 is a dead latent"):
        figure2_sae(sample, sae_dir, alive, [(5, "digits", None)], ["digits"], {}, n)
    # masses below 1 still have densities; without a scale in cfg.json the decoder rows are the units
    small = tmp_path / "small"
    small.mkdir()
    with torch.no_grad():
        sae.W_enc_DF.mul_(1e-4)
        sae.b_enc_F.fill_(1e-4)
        sae.threshold.fill_(0.0)
    save(sae, small, {"d_in": 4, "d_sae": 8, "k": 2, "components": components})
    with torch.no_grad():
        sm = sae.encode(a).double().sum(0).numpy()
    fig = figure2_sae(sample, small, alive, members, ["digits", "words"], subs, n)
    overall = {c: sm[fs].sum() for c, fs in by_cat.items()}
    tot = sum(overall.values())
    assert 0 < tot < 1
    assert fig["overall"]["density"] == pytest.approx({c: m / tot for c, m in overall.items()}, rel=1e-9)
    w = sae.W_dec_FD.detach().double().numpy()
    share = w**2 / (w**2).sum(1, keepdims=True)
    want = {c: float((sm[fs] * share[fs, 1]).sum()) for c, fs in by_cat.items()}
    assert fig["cells"][1]["mass"] == pytest.approx(want, rel=1e-9)
    assert fig["cells"][1]["density"] == pytest.approx(
        {c: m / sum(want.values()) for c, m in want.items()}, rel=1e-9
    )
    save(sae, sae_dir, {"d_in": 4, "d_sae": 8, "k": 2, "components": components[::-1]})
    with pytest.raises(
        LorascopeError, match="trained on other components than .*; retrain it with `lorascope sae`"
    ):
        figure2_sae(sample, sae_dir, alive, [], ["digits"], {}, n)
