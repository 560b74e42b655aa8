"""Outlier tokens: the store's outlier record (``outliers.json``) against numpy, and the exclusion
policy (first position, special tokens, norm cut) on a tiny store with planted outliers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.exclusion import Exclusion
from lorascope.extract import outliers
from lorascope.extract.params import ExclusionSection
from lorascope.extract.store import Store, plan_shards, write_index, write_shard

DOC, DOCS, C = 50, 24, 6
SPECIAL = 3


def planted_outliers(
    root: Path, special: list[int] | None = (SPECIAL,)
) -> tuple[Store, np.ndarray, np.ndarray]:
    """Documents whose first token is an attention sink (x 1000 on every component) and 40 tokens of
    the special id ``SPECIAL`` elsewhere (x 300); ordinary tokens are N(0, 1) times per-component
    scales 1..10, with ordinary ids 10..49."""
    g = torch.Generator().manual_seed(0)
    T = DOC * DOCS
    x_TC = torch.randn(T, C, generator=g) * torch.logspace(0, 1, C)
    ids_T = torch.randint(10, 50, (T,), generator=g, dtype=torch.int32)
    firsts = torch.arange(0, T, DOC)
    x_TC[firsts] *= 1000
    inner = torch.tensor([t for t in range(T) if t % DOC])[torch.randperm(T - DOCS, generator=g)[:40]]
    ids_T[inner] = SPECIAL
    x_TC[inner] *= 300
    folder = root / "data" / "activations" / "lora"
    folder.mkdir(parents=True)
    shards = plan_shards([DOC] * DOCS, 300)
    for s in shards:
        write_shard(folder / s.file, x_TC[s.start : s.start + s.tokens], ids_T[s.start : s.start + s.tokens])
    index = {
        "source": "lora",
        "components": [f"L0.c{c}" for c in range(C)],
        "modules": [{"layer": 0, "kind": f"c{c}", "module": "m", "width": 1} for c in range(C)],
        "dtype": "float32",
        "tokens": T,
        "documents": [[f"doc{i}", i * DOC, DOC] for i in range(DOCS)],
        "shards": [s.to_json() for s in shards],
    }
    if special is not None:
        index["special_token_ids"] = list(special)
    write_index(folder, index)
    return Store.open(folder), x_TC.numpy().astype(np.float64), ids_T.numpy()


def test_outlier_record_against_numpy(tmp_path: Path):
    store, x, ids = planted_outliers(tmp_path)
    rec = outliers.record(store, 100.0, lambda ids: [f"tok{i}" for i in ids])
    a = np.abs(x)
    assert rec["outlier_ratio"] == 100.0 and rec["tokens"] == DOC * DOCS
    for c, comp in enumerate(rec["components"]):
        # a histogram bin spans <= 1/32 of its value: the median to within 1.6%
        assert comp["name"] == f"L0.c{c}" and comp["median_abs"] == pytest.approx(
            np.median(a[:, c]), rel=0.017
        )
        assert comp["max_abs"] == pytest.approx(a[:, c].max(), rel=1e-5)
        assert comp["max_over_median"] == pytest.approx(comp["max_abs"] / comp["median_abs"], rel=1e-5)
        assert comp["max_over_median"] > 1000
        assert comp["tokens_over"] == int((a[:, c] > 100 * comp["median_abs"]).sum())
    over = (a > 100 * np.array([c["median_abs"] for c in rec["components"]])).any(1)
    assert rec["tokens_over"] == over.sum() == 64  # the 24 sinks and the 40 special tokens
    assert rec["tokens_over_first_position"] == over[::DOC].sum() == DOCS
    assert rec["tokens_over_special"] == (over & (ids == SPECIAL)).sum() == 40
    top = rec["token_ids"][0]
    assert top == {
        "id": SPECIAL,
        "token": f"tok{SPECIAL}",
        "special": True,
        "tokens_over": 40,
        "occurrences": 40,
    }
    assert sum(t["tokens_over"] for t in rec["token_ids"]) == 64
    assert rec["token_norm_median"] == pytest.approx(np.median(np.linalg.norm(x, axis=1)), rel=0.017)
    metrics = outliers.metrics(rec)
    assert metrics["outliers.tokens_over"] == 64 and metrics["outliers.components_over"] == C


def test_exclusion_reasons_per_policy(tmp_path: Path):
    store, x, ids = planted_outliers(tmp_path)
    outliers_json = outliers.record(store, 100.0, lambda ids: [str(i) for i in ids])
    from lorascope.atomic import write_json

    write_json(store.root / outliers.FILE, outliers_json)
    shard = store.shards[1]
    acts, shard_ids = store.read(shard)
    starts = torch.tensor([d[1] - shard.start for d in store.documents[shard.first_doc : shard.last_doc]])
    lo, hi = shard.start, shard.start + shard.tokens
    norms = np.linalg.norm(x[lo:hi], axis=1)
    policy = ExclusionSection(first_position=True, special_tokens=True, norm_ratio=20.0)
    reasons = Exclusion.of(store, policy, "sae.exclude").reasons(acts, shard_ids, starts)
    assert reasons["first_position"].nonzero().flatten().tolist() == list(range(0, shard.tokens, DOC))
    assert np.array_equal(reasons["special_tokens"].numpy(), ids[lo:hi] == SPECIAL)
    assert np.array_equal(reasons["norm"].numpy(), norms > 20 * outliers_json["token_norm_median"])
    assert reasons["norm"].sum() == (reasons["first_position"] | reasons["special_tokens"]).sum() > 0
    off = ExclusionSection(first_position=False, special_tokens=False)
    assert Exclusion.of(store, off, "sae.exclude").reasons(acts, shard_ids, starts) == {}


def test_a_store_without_what_the_policy_needs(tmp_path: Path):
    store, _, _ = planted_outliers(tmp_path, special=None)
    with pytest.raises(LorascopeError) as e:
        Exclusion.of(store, ExclusionSection(), "contexts.exclude")
    assert str(e.value) == (
        f"contexts.exclude.special_tokens: {store.root}/index.json records no special token ids (re-run "
        "`lorascope extract --source lora`, or set contexts.exclude.special_tokens: false)"
    )
    with pytest.raises(LorascopeError) as e:
        Exclusion.of(store, ExclusionSection(special_tokens=False, norm_ratio=10), "sae.exclude")
    assert str(e.value) == (
        f"sae.exclude.norm_ratio: {store.root}/outliers.json not found (the median token norm; re-run "
        "`lorascope extract --source lora`, or set sae.exclude.norm_ratio: null)"
    )
