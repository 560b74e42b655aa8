"""The contexts stage: streaming selection against brute force over the whole store, windows at
document boundaries, samples, statistics, resume, the encoder (SAE) path, token rendering, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lorascope import tracking
from lorascope.contexts import selection
from lorascope.contexts.params import ContextsSection
from lorascope.contexts.selection import Selector, ShardView
from lorascope.contexts.stage import contexts_table, run, token_keys
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store, plan_shards, write_index, write_shard
from lorascope.sources import FeatureSource
from lorascope.tokens import TokenRenderer

from tests.conftest import QWEN_TOKENIZER, Prepared, run_of, tiny_params

CFG = {
    "top_k": 5,
    "window_before": 3,
    "window_after": 2,
    "quantile_bins": 3,
    "quantile_samples": 2,
    "random_samples": 3,
    "active_threshold": 0.5,
    "feature_chunk": 2,
    "exclude": {"first_position": False, "special_tokens": False},  # the outlier policy: tested on its own
}


def synthetic_store(
    root: Path, source: str = "lora", n_components: int = 5, seed: int = 0, outliers: bool = False
):
    """A store of random float32 values over documents of mixed lengths (some shorter than a window).
    ``outliers``: every document opens with an attention sink (x 100) and 7 other tokens are the special
    token id 1 (x 50), which the index records."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [2, 40, 1, 7, 130, 3, 60, 25, 90, 4, 55]
    tokens = sum(lengths)
    acts_TC = torch.randn(tokens, n_components, generator=gen)
    ids_T = torch.randint(2, 2000, (tokens,), generator=gen, dtype=torch.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    if outliers:
        acts_TC[starts] *= 100
        inner = [5, 17, 60, 150, 200, 301, 400]
        assert not set(inner) & set(starts)
        acts_TC[inner] *= 50
        ids_T[inner] = 1
    folder = root / "data" / "activations" / source
    folder.mkdir(parents=True)
    shards = plan_shards(lengths, 100)
    for s in shards:
        write_shard(
            folder / s.file, acts_TC[s.start : s.start + s.tokens], ids_T[s.start : s.start + s.tokens]
        )
    write_index(
        folder,
        {
            "source": source,
            "model": "models/base",
            "components": [f"L{c}.q_proj" for c in range(n_components)],
            "dtype": "float32",
            "tokens": tokens,
            "documents": [[f"doc{i}", s, n] for i, (s, n) in enumerate(zip(starts, lengths, strict=True))],
            "shards": [s.to_json() for s in shards],
            **({"special_token_ids": [1]} if outliers else {}),
        },
    )
    return acts_TC, ids_T, lengths, starts, shards


def expected_window(g: int, lengths, starts, ids_T, values_T, before: int, after: int):
    d = int(np.searchsorted(starts, g, side="right") - 1)
    lo, hi = max(starts[d], g - before), min(starts[d] + lengths[d], g + after + 1)
    return d, lo - starts[d], ids_T[lo:hi].tolist(), values_T[lo:hi].tolist()


def all_keys(shards) -> torch.Tensor:
    return torch.cat([token_keys(0, s) for s in shards])


def test_streaming_selection_equals_brute_force(with_base: Path):
    acts_TC, ids_T, lengths, starts, shards = synthetic_store(with_base)
    assert len(shards) > 3
    cfg = ContextsSection(**CFG)
    run(tiny_params(contexts=CFG), "lora")
    table = pq.read_table(with_base / "data/contexts/lora.parquet").to_pandas()
    keys_T = all_keys(shards)
    for f in range(acts_TC.shape[1]):
        for sign in (1, -1):
            signed_T = sign * acts_TC[:, f]
            rows = table[(table.feature == f) & (table.sign == sign)]
            assert set(rows.feature_name) == {f"L{f}.q_proj{'+' if sign > 0 else '-'}"}
            # top-k: brute-force torch.topk over the whole store
            top = rows[rows.kind == "top"].sort_values("rank")
            values, where = torch.topk(signed_T, cfg.top_k)
            assert top["rank"].tolist() == list(range(cfg.top_k))
            assert np.allclose(top.activation, sign * values.numpy())
            for row, g in zip(top.itertuples(), where.tolist(), strict=True):
                d, w0, w_ids, w_acts = expected_window(g, lengths, starts, ids_T, acts_TC[:, f], 3, 2)
                assert (row.doc_index, row.doc_id, row.position) == (d, f"doc{d}", g - starts[d])
                assert row.window_start == w0 and row.window_ids.tolist() == w_ids
                assert np.allclose(row.window_acts, w_acts) and row.quantile_bin == -1
            # quantile samples: the active tokens with the smallest keys, in equal-count bins
            active = (signed_T > cfg.active_threshold).nonzero().flatten()
            sample = active[torch.argsort(keys_T[active])][:6]
            quant = rows[rows.kind == "quantile"].sort_values("rank")
            got = (quant.position + [starts[d] for d in quant.doc_index]).tolist()
            assert sorted(got) == sorted(sample.tolist())
            assert (np.diff(sign * quant.activation.to_numpy()) >= 0).all()
            assert quant.quantile_bin.tolist() == [0, 0, 1, 1, 2, 2]
            # random windows: inactive tokens with the smallest keys
            inactive = (signed_T <= cfg.active_threshold).nonzero().flatten()
            rand = rows[rows.kind == "random"]
            got = sorted((rand.position + [starts[d] for d in rand.doc_index]).tolist())
            assert got == sorted(inactive[torch.argsort(keys_T[inactive])][:3].tolist())
    # windows never cross documents: the 1-token document's windows are that token alone
    lone = table[table.doc_index == 2]
    assert all(len(w) == 1 for w in lone.window_ids)


def test_feature_statistics(with_base: Path):
    acts_TC, *_ = synthetic_store(with_base)
    run(tiny_params(contexts=CFG), "lora")
    stats = pq.read_table(with_base / "data/contexts/lora.features.parquet").to_pandas()
    assert len(stats) == 10  # 5 components x 2 signs
    a = acts_TC.double().numpy()
    for row in stats.itertuples():
        col = a[:, row.feature] * row.sign
        assert row.max == pytest.approx(col.max(), rel=1e-6)
        assert row.min == pytest.approx(col.min(), rel=1e-6)
        assert row.density == pytest.approx((col > 0.5).mean())
        assert row.mean == pytest.approx(a[:, row.feature].mean(), abs=1e-9)
        assert row.std == pytest.approx(a[:, row.feature].std(), rel=1e-6)
        assert row.nonzero_density == 1.0 and row.tokens == a.shape[0]
    tags = tracking.client().get_run(run_of(with_base, "data/contexts/lora.parquet")).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("dvc.out.")} == {
        f"dvc.out.data/contexts/{name}": tracking.dvc_md5(with_base / "data/contexts" / name)
        for name in ("lora.features.parquet", "lora.parquet")
    }
    assert not (with_base / "data/contexts/lora.run.json").exists()


def test_kill_and_resume_gives_the_same_tables(with_base: Path, tmp_path: Path):
    synthetic_store(with_base)
    params = tiny_params(contexts=CFG)
    reference = pq.read_table(run(params, "lora"))

    def kill_after_two(shard):
        if shard.index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(params, "lora", on_shard=kill_after_two)
    seen = []
    resumed = pq.read_table(run(params, "lora", on_shard=lambda s: seen.append(s.index)))
    assert seen[0] == 2 and resumed.equals(reference)
    assert not (with_base / "checkpoints/contexts/lora.pt").exists()


def test_unsigned_source_and_the_encoder_path(with_base: Path, monkeypatch: pytest.MonkeyPatch):
    """An encoder (as the SAE plugs in) maps store rows to features; shards are scored in blocks."""
    monkeypatch.setattr(selection, "BLOCK_TOKENS", 16)  # several blocks per shard and per window gather
    acts_TC, ids_T, lengths, starts, shards = synthetic_store(with_base, n_components=4)
    W_CF = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def encode(x_TC):
        return torch.relu(x_TC @ W_CF)

    feats_TF = encode(acts_TC)
    store = Store.open(with_base / "data/activations/lora")
    source = FeatureSource("sae", store, [f"latent{i}" for i in range(6)], signed=False, encode=encode)
    cfg = ContextsSection(**{**CFG, "active_threshold": 0.0})
    selector = Selector(6, source.signs, cfg)
    for shard, acts, ids in store:
        doc_lengths = [d[2] for d in store.documents[shard.first_doc : shard.last_doc]]
        selector.update(ShardView.build(shard.start, acts, ids, doc_lengths), encode, token_keys(0, shard))
    from transformers import AutoTokenizer

    renderer = TokenRenderer(AutoTokenizer.from_pretrained(str(with_base / "models/base")))
    table = contexts_table(selector, source, renderer).to_pandas()
    assert set(table.sign) == {1}
    for f in range(6):
        top = table[(table.feature == f) & (table.kind == "top")].sort_values("rank")
        values, where = torch.topk(feats_TF[:, f], 5)
        assert np.allclose(top.activation, values.numpy(), atol=1e-5)
        for row, g in zip(top.itertuples(), where.tolist(), strict=True):
            _, w0, w_ids, w_acts = expected_window(g, lengths, starts, ids_T, feats_TF[:, f], 3, 2)
            assert row.window_ids.tolist() == w_ids and np.allclose(row.window_acts, w_acts, atol=1e-5)
        assert (table[(table.feature == f) & (table.kind == "random")].activation == 0).all()


def test_real_lora_store_end_to_end(with_prepared: Path):
    """extract -> contexts on the tiny model: texts decode, tokens add up to the text."""
    from lorascope.extract.stage import run as extract

    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    store = Store.open(extract(tiny_params(), "lora"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(with_prepared / "models/base"))
    special = store.index["special_token_ids"]
    assert special == sorted(tok.all_special_ids) and tok.convert_ids_to_tokens(special) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # fmt: skip
    import json

    record = json.loads((store.root / "outliers.json").read_text())
    assert [c["name"] for c in record["components"]] == store.components and record["tokens"] == store.tokens
    table = pq.read_table(run(tiny_params(), "lora")).to_pandas()
    assert (table.position > 0).all()  # the default policy: no context at a first position ...
    centre = [w[p - s] for w, p, s in zip(table.window_ids, table.position, table.window_start, strict=True)]
    assert not set(centre) & set(special)  # ... nor at a special token, though the windows hold them
    assert set(np.concatenate(table.window_ids.to_list()).tolist()) & set(special)
    assert set(table.kind) == {"top", "quantile", "random"}
    assert table.feature.nunique() == 14
    assert all("".join(t) == text for t, text in zip(table.tokens, table.text, strict=True))
    assert all(
        len(t) == len(w) == len(a)
        for t, w, a in zip(table.tokens, table.window_ids, table.window_acts, strict=True)
    )


def test_outlier_tokens_are_never_contexts_and_are_counted(with_base: Path):
    """The default policy (first position + special tokens) on planted sinks: they are never a top,
    quantile or random context, the statistics and the top-k are those of the kept tokens, and the
    counts are reported; with the policy off the sinks are every feature's top context."""
    import json

    from lorascope.contexts.tables import EXCLUDED_KEY

    acts_TC, ids_T, lengths, starts, shards = synthetic_store(with_base, outliers=True)
    out_T = torch.zeros(len(ids_T), dtype=torch.bool)
    out_T[starts] = True
    out_T |= ids_T == 1
    run(tiny_params(contexts={**CFG, "exclude": {}}), "lora")
    table = pq.read_table(with_base / "data/contexts/lora.parquet").to_pandas()
    where = table.position.to_numpy() + np.array(starts)[table.doc_index.to_numpy()]
    assert len(table) and not out_T[where].any()
    kept = acts_TC[~out_T].double()
    for f in range(acts_TC.shape[1]):
        for sign in (1, -1):
            top = table[(table.feature == f) & (table.sign == sign) & (table.kind == "top")].sort_values(
                "rank"
            )
            assert np.allclose(top.activation, sign * torch.topk(sign * kept[:, f], 5).values.numpy())
    features = pq.read_table(with_base / "data/contexts/lora.features.parquet")
    stats = features.to_pandas()
    for row in stats.itertuples():
        col = kept[:, row.feature].numpy() * row.sign
        assert row.max == pytest.approx(col.max(), rel=1e-6) and row.min == pytest.approx(col.min(), rel=1e-6)
        assert row.mean == pytest.approx(kept[:, row.feature].mean().item(), abs=1e-9)
        assert row.density == pytest.approx((col > 0.5).mean()) and row.tokens == len(kept)
    counts = json.loads(features.schema.metadata[EXCLUDED_KEY])
    assert counts == {"excluded": 18, "first_position": 11, "special_tokens": 7, "norm": 0}
    logged = tracking.client().get_run(run_of(with_base, "data/contexts/lora.parquet")).data.metrics
    assert (logged["excluded_tokens"], logged["excluded_first_position"], logged["excluded_special_tokens"]) == (
        18, 11, 7)  # fmt: skip
    run(tiny_params(contexts={**CFG, "exclude": {"first_position": False, "special_tokens": False}}), "lora")
    table = pq.read_table(with_base / "data/contexts/lora.parquet").to_pandas()
    first = table[(table.kind == "top") & (table["rank"] == 0)]
    assert out_T[first.position.to_numpy() + np.array(starts)[first.doc_index.to_numpy()]].all()


def test_a_policy_that_leaves_no_tokens(with_base: Path):
    synthetic_store(with_base, outliers=True)
    index_path = with_base / "data/activations/lora/index.json"
    import json

    index = json.loads(index_path.read_text())
    index["special_token_ids"] = list(range(2000))  # every token is special
    index_path.write_text(json.dumps(index))
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(contexts={**CFG, "exclude": {}}), "lora")
    assert str(e.value) == (
        f"contexts.exclude: leaves no tokens in {with_base}/data/activations/lora (417 of 417 excluded: "
        "first_position 11, special_tokens 417, norm 0)"
    )
    assert not (with_base / "data/contexts/lora.parquet").exists()


# ----------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_windows_render_without_broken_characters(which: str, prepared: Prepared):
    """On the tiny pipeline's byte-level BPE (always) and on the real Qwen2.5 tokenizer (when ../shared
    has it): characters split across byte-level tokens are never shown broken."""
    from transformers import AutoTokenizer

    if which == "qwen" and not (QWEN_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen2.5 tokenizer not found at {QWEN_TOKENIZER}")
    path = QWEN_TOKENIZER if which == "qwen" else prepared.root / "models/base"
    tok = AutoTokenizer.from_pretrained(str(path))
    renderer = TokenRenderer(tok)
    text = "<|im_start|>think\n数学 🤔 ≤ ∑ x² — café 😀👍🏽 done"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # single-token decoding breaks characters
    whole, pieces = renderer.render(ids)
    assert whole == tok.decode(ids) == text and len(pieces) == len(ids)
    for a in range(len(ids)):
        for b in range(a + 1, len(ids) + 1):
            window, pieces = renderer.render(ids[a:b])
            assert "\ufffd" not in window and "".join(pieces) == window and window in text


# ------------------------------------------------------------------------------------- bad input
def test_source_not_extracted(with_base: Path):
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(), "mlp")
    assert str(e.value) == (
        f"{with_base}/data/activations/mlp: no activation store (index.json missing); "
        "run `lorascope extract --source mlp` first"
    )
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(), "sae")
    assert (
        str(e.value)
        == f"{with_base}/models/sae: no trained SAE (cfg.json missing); run `lorascope sae` first"
    )


def test_store_of_the_wrong_source(with_base: Path):
    synthetic_store(with_base, source="mlp")
    (with_base / "data/activations/mlp").rename(with_base / "data/activations/lora")
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(), "lora")
    assert (
        str(e.value) == f"{with_base}/data/activations/lora/index.json: holds source 'mlp', expected 'lora'"
    )
