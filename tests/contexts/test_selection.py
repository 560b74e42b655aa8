"""The contexts stage's streaming selection (`contexts/selection.py`) at its edges, against brute force:
a fresh state, the strict activation threshold, short samples that excluded tokens must not fill, a random
sample without a quantile sample, blocks shorter than a sample, exact float64 statistics, an encoder with
exclusions over several blocks, and per-token encoding in blocks of one. (Any cut of the store into shards:
the hypothesis tests in tests/test_properties.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorascope.contexts import selection
from lorascope.contexts.params import ContextsSection
from lorascope.contexts.selection import GROUPS, PAD_ID, Selector, ShardView
from lorascope.exclusion import REASONS

INF = float("inf")


def config(**overrides: int | float) -> ContextsSection:
    base = dict(top_k=3, window_before=1, window_after=1, quantile_bins=2, quantile_samples=2, random_samples=2,
                active_threshold=0.5, feature_chunk=2)  # fmt: skip
    return ContextsSection(**{**base, **overrides})


def select(acts_TF, cfg, keys_T, signs=(1, -1), excluded=None, encode=None, n_features=None):
    """The state after one shard holding one document of all the tokens."""
    T = acts_TF.shape[0]
    selector = Selector(n_features or acts_TF.shape[1], signs, cfg)
    view = ShardView.build(0, acts_TF, torch.arange(T, dtype=torch.int32), [T])
    selector.update(view, encode, keys_T, excluded)
    return selector.state


def assert_unfilled_slots_are_empty(s: dict) -> None:
    """A slot no token filled: score -inf, position -1, PAD ids, NaN activations."""
    for g in GROUPS:
        empty = s[f"{g}.score"] == -INF
        assert bool((s[f"{g}.pos"][empty] == -1).all()), g
        assert bool((s[f"{g}.pos"][~empty] >= 0).all()), g
        assert bool((s[f"{g}.ids"][empty] == PAD_ID).all()) and bool(s[f"{g}.acts"][empty].isnan().all()), g


def test_a_fresh_selection_is_empty_with_exact_dtypes():
    """Counts are int64 (exact past 2**24 tokens, as float32 would not be), sums float64, positions int64,
    ids int32; every slot empty, min/max at +-inf."""
    s = Selector(3, (1, -1), config()).state
    for key in ("tokens", "active", "nonzero", "excluded", *(f"excluded.{r}" for r in REASONS)):
        assert s[key].dtype == torch.int64 and not bool(s[key].any()), key
    for key in ("sum", "sumsq"):
        assert s[key].dtype == torch.float64 and not bool(s[key].any()), key
    assert bool((s["min"] == INF).all()) and bool((s["max"] == -INF).all())
    for g, n in (("top", 3), ("quantile", 4), ("random", 2)):
        assert s[f"{g}.score"].shape == (2, 3, n) and bool((s[f"{g}.score"] == -INF).all())
        assert s[f"{g}.pos"].dtype == torch.int64 and s[f"{g}.ids"].dtype == torch.int32
        assert s[f"{g}.ids"].shape == (2, 3, n, 3)
    assert_unfilled_slots_are_empty(s)


def test_the_threshold_is_strict_and_short_samples_leave_slots_empty():
    """A token activates a feature sign when sign x activation *exceeds* the threshold: values exactly at
    +-0.5 count for neither sign; fewer active tokens than the quantile sample leave empty slots."""
    acts = torch.tensor([0.5, -0.5, 0.9, 0.0, -0.7, 0.5]).unsqueeze(1)
    keys = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    s = select(acts, config(), keys)
    assert s["active"].tolist() == [[1], [1]]
    assert s["quantile.pos"][0, 0].tolist() == [2, -1, -1, -1]  # the 0.5s are not active
    assert s["quantile.pos"][1, 0].tolist() == [4, -1, -1, -1]
    assert s["random.pos"][0, 0].tolist() == [0, 1]  # inactive, smallest keys: 0.5 itself is inactive
    assert s["random.pos"][1, 0].tolist() == [0, 1]
    assert s["top.pos"][0, 0].tolist() == [2, 0, 5] and s["top.pos"][1, 0].tolist() == [4, 1, 3]
    assert_unfilled_slots_are_empty(s)


def test_excluded_tokens_never_fill_a_short_sample():
    """Two active tokens for a quantile sample of 4 and one inactive kept token for a random sample of 2:
    the excluded tokens (half the shard) fill neither sample's empty slots."""
    acts = torch.tensor([0.9, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0]).unsqueeze(1)
    keys = torch.linspace(0.05, 0.95, 8)
    out = torch.tensor([False, False, False, True, True, True, True, True])
    s = select(acts, config(), keys, signs=(1,), excluded={"norm": out})
    assert int(s["excluded"]) == 5 and int(s["tokens"]) == 3
    assert s["quantile.pos"][0, 0].tolist() == [0, 2, -1, -1]
    assert s["random.pos"][0, 0].tolist() == [1, -1]
    assert s["top.pos"][0, 0].tolist() == [0, 2, 1]
    assert_unfilled_slots_are_empty(s)


def test_random_negatives_without_a_quantile_sample():
    """`quantile_samples: 0` turns the quantile sample off, not the random negatives."""
    g = torch.Generator().manual_seed(3)
    acts, keys = torch.randn(20, 2, generator=g), torch.rand(20, generator=g)
    s = select(acts, config(quantile_samples=0, random_samples=3), keys)
    assert s["quantile.pos"].shape[-1] == 0
    for si, sign in enumerate((1, -1)):
        for f in range(2):
            inactive = (sign * acts[:, f] <= 0.5).nonzero().flatten()
            want = inactive[torch.argsort(keys[inactive])][:3]
            assert s["random.pos"][si, f].tolist() == want.tolist(), (sign, f)


def test_a_last_block_shorter_than_every_sample(monkeypatch: pytest.MonkeyPatch):
    """Blocks of 4 tokens over 9 tokens: the last block holds one token, fewer than any sample size."""
    monkeypatch.setattr(selection, "BLOCK_TOKENS", 4)
    g = torch.Generator().manual_seed(4)
    acts, keys = torch.randn(9, 2, generator=g), torch.rand(9, generator=g)
    acts[8, 0] = 5.0  # the last block's token is feature 0's top token
    s = select(acts, config(), keys)
    for si, sign in enumerate((1, -1)):
        for f in range(2):
            assert s["top.pos"][si, f].tolist() == torch.topk(sign * acts[:, f], 3).indices.tolist(), (
                sign,
                f,
            )
    assert int(s["top.pos"][0, 0, 0]) == 8


def test_statistics_accumulate_exactly_in_float64():
    """2**12 squared is 2**24: adding 1 to it is exact in float64 and lost in float32, in the sum and the
    sum of squares alike."""
    acts = torch.tensor([[2.0**24, 2.0**12], [1.0, 1.0]])
    s = select(acts, config(), torch.tensor([0.1, 0.2]))
    assert s["sum"].tolist() == [2.0**24 + 1, 2.0**12 + 1]
    assert s["sumsq"].tolist() == [2.0**48 + 1, 2.0**24 + 1]


def test_encoded_windows_in_blocks_of_one_token(monkeypatch: pytest.MonkeyPatch):
    """With an encoder, window activations are encoded token by token in blocks (here of one token, so a
    block can hold a single (token, feature) cell): each equals the encoder's output at its token."""
    monkeypatch.setattr(selection, "BLOCK_TOKENS", 1)
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(7, 3, generator=g)
    W = torch.randn(3, 1, generator=g)
    cfg = config(top_k=2, window_before=0, window_after=0, quantile_samples=0, random_samples=0)
    s = select(acts, cfg, torch.rand(7, generator=g), signs=(1,), encode=lambda x: x @ W, n_features=1)
    feats = (acts @ W)[:, 0]
    top = torch.topk(feats, 2).indices
    assert s["top.pos"][0, 0].tolist() == top.tolist()
    assert s["top.acts"][0, 0, :, 0].tolist() == feats[top].tolist()


@pytest.mark.parametrize("random_samples", [3, 0])
def test_selection_with_an_encoder_exclusions_and_blocks_against_brute_force(
    monkeypatch: pytest.MonkeyPatch, random_samples: int
) -> None:
    """An encoder (store rows -> features), excluded tokens (never selected, not in the statistics,
    counted per reason, still inside their neighbours' windows) and shards scored in several blocks:
    the state against torch over the kept tokens of the whole store."""
    monkeypatch.setattr(selection, "BLOCK_TOKENS", 8)
    cfg = ContextsSection(top_k=3, window_before=2, window_after=1, quantile_bins=2, quantile_samples=2,
                          random_samples=random_samples, active_threshold=0.4, feature_chunk=2)  # fmt: skip
    lengths, T, F = [7, 12, 5, 9, 6], 39, 5
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(T, 3, generator=g)
    W = torch.randn(3, F, generator=g)
    encode = lambda x: x @ W  # noqa: E731
    feats = acts @ W
    keys = torch.rand(T, generator=g)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    first = torch.zeros(T, dtype=torch.bool)
    first[starts.tolist()] = True
    special = torch.zeros(T, dtype=torch.bool)
    special[[0, 3, 20, 21, 30]] = True  # overlaps first_position at 0
    out = first | special
    selector = Selector(F, (1, -1), cfg)
    for lo, docs in ((0, lengths[:3]), (24, lengths[3:])):
        n = sum(docs)
        view = ShardView.build(lo, acts[lo : lo + n], torch.arange(lo, lo + n, dtype=torch.int32), docs)
        excluded = {"first_position": first[lo : lo + n], "special_tokens": special[lo : lo + n]}
        selector.update(view, encode, keys[lo : lo + n], excluded)
    s = selector.to("cpu").state
    assert s["min"].device.type == "cpu" and selector.device == torch.device("cpu")
    assert int(s["excluded"]) == int(out.sum()) == 9
    assert (
        int(s["excluded.first_position"]),
        int(s["excluded.special_tokens"]),
        int(s["excluded.norm"]),
    ) == (5, 5, 0)
    assert int(s["tokens"]) == T - 9
    kept = feats[~out]
    assert torch.allclose(s["sum"], kept.double().sum(0)) and torch.allclose(
        s["sumsq"], kept.double().square().sum(0)
    )
    assert torch.allclose(s["min"], kept.amin(0)) and torch.allclose(s["max"], kept.amax(0))
    assert torch.equal(s["nonzero"], (kept != 0).sum(0))
    kept_idx = (~out).nonzero().flatten()
    for si, sign in enumerate((1, -1)):
        signed = sign * feats
        active = signed > 0.4
        assert torch.equal(s["active"][si], (active & ~out[:, None]).sum(0))
        for f in range(F):
            want_top = kept_idx[torch.topk(signed[kept_idx, f], 3).indices]
            assert s["top.pos"][si, f].tolist() == want_top.tolist(), ("top", sign, f)
            assert torch.allclose(s["top.score"][si, f], signed[want_top, f])
            act = kept_idx[active[kept_idx, f]]
            want_q = act[torch.argsort(keys[act])][:4]
            got_q = s["quantile.pos"][si, f]
            assert sorted(got_q[got_q >= 0].tolist()) == sorted(want_q.tolist()), ("quantile", sign, f)
            assert torch.allclose(
                s["quantile.score"][si, f][got_q >= 0].sort().values, (-keys[want_q]).sort().values
            )
            assert bool((s["quantile.score"][si, f][got_q < 0] == float("-inf")).all())
            inact = kept_idx[~active[kept_idx, f]]
            want_r = inact[torch.argsort(keys[inact])][:random_samples]
            got_r = s["random.pos"][si, f]
            assert sorted(got_r[got_r >= 0].tolist()) == sorted(want_r.tolist()), ("random", sign, f)
            assert s["random.score"][si, f].tolist() == pytest.approx(
                sorted((-keys[want_r]).tolist(), reverse=True), abs=1e-6
            )
            for group in ("top", "quantile", "random"):
                for slot, p in enumerate(s[f"{group}.pos"][si, f].tolist()):
                    window_ids = s[f"{group}.ids"][si, f, slot].tolist()
                    window_acts = s[f"{group}.acts"][si, f, slot]
                    if p < 0:
                        assert window_ids == [PAD_ID] * 4 and bool(window_acts.isnan().all())
                        continue
                    d = int(np.searchsorted(starts, p, side="right") - 1)
                    lo, hi = int(starts[d]), int(starts[d]) + lengths[d]
                    for w, q in enumerate(range(p - 2, p + 2)):
                        if lo <= q < hi:  # excluded neighbours too, with their feature values
                            assert window_ids[w] == q and float(window_acts[w]) == pytest.approx(
                                float(feats[q, f]), abs=1e-5
                            )
                        else:
                            assert window_ids[w] == PAD_ID and bool(window_acts[w].isnan())
