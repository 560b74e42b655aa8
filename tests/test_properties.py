"""Property-based tests (hypothesis) of formulas with an invariant: recovery is 0 at the base and 1 at
the reference (and linear between), BatchTopK keeps exactly k x B entries (the largest), a context window
never crosses a document boundary. The extractor's property (it never reads the thinking part) is in
tests/evaluate/test_answers.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorascope.bootstrap import rng
from lorascope.evaluate.recovery import recovery
from lorascope.evaluate.uncertainty import recovery_ci


# ----------------------------------------------------------------------------------------- recovery
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 500), a=st.integers(0, 500), b=st.integers(0, 500), c=st.integers(0, 500))
def test_recovery_is_zero_at_base_one_at_reference_and_linear(n: int, a: int, b: int, c: int) -> None:
    """Scores are shares of n questions: base a/n, reference b/n, variant c/n; recovery is (c - a) / (b - a)
    exactly, and no value at all when the reference did not beat the base."""
    base, reference, variant = min(a, n) / n, min(b, n) / n, min(c, n) / n
    a, b, c = min(a, n), min(b, n), min(c, n)
    if b <= a:
        value, reason = recovery(base, variant, reference)
        assert value is None and "gained nothing" in reason
        return
    assert recovery(base, base, reference) == (0.0, None)
    assert recovery(base, reference, reference) == (1.0, None)
    value, reason = recovery(base, variant, reference)
    assert reason is None and value == pytest.approx((c - a) / (b - a), rel=1e-9, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_paired_recovery_ci_is_exact_at_base_and_reference(data: list[tuple[bool, bool]], seed: int) -> None:
    """Per question scores of base and reference; a variant that answers exactly as the base recovers 0
    in every resample, one that answers as the reference recovers 1."""
    base = np.array([float(b) for b, _ in data])
    ref = np.array([float(r) for _, r in data])
    assume(ref.sum() > base.sum())
    for variant, expected in ((base, 0.0), (ref, 1.0)):
        got = recovery_ci(base, variant, ref, 200, rng(seed, "p"))
        assert got is not None
        lo, hi, dropped = got
        assert lo == pytest.approx(expected) and hi == pytest.approx(expected) and 0 <= dropped < 1


# ---------------------------------------------------------------------------------------- BatchTopK
@settings(max_examples=200, deadline=None)
@given(
    B=st.integers(1, 12),
    d_sae=st.integers(2, 40),
    k=st.integers(1, 6),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    hint=st.floats(0.0, 5.0),
)
def test_batch_topk_keeps_exactly_k_times_b_of_the_largest(
    B: int, d_sae: int, k: int, density: float, seed: int, hint: float
) -> None:
    """Exactly min(k x B, positive entries) entries, the largest positive ones (ties by index), whatever the
    cached cut-off from an earlier step; integer-valued scores make ties common."""
    from lorascope.sae.model import _batch_topk

    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(-3, 6, (B, d_sae), generator=g).float() * (
        torch.rand(B, d_sae, generator=g) < density
    )
    flat = pre.flatten()
    n = k * B
    cutoffs = {"main": hint} if hint else {}
    picked = _batch_topk(flat, n, cutoffs, "main")
    positive = int((flat > 0).sum())
    assert picked.numel() == min(n, positive)
    assert torch.equal(picked, picked.sort().values)  # ascending: grouped by row
    assert bool((flat[picked] > 0).all())
    # the largest: a stable sort by value (descending), ties by index, then the first min(n, positive)
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    expected = sorted(i for i in order[: min(n, positive)])
    assert picked.tolist() == expected


@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 16), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_select_keeps_k_times_b_entries_with_their_values(B: int, k: int, seed: int) -> None:
    """The SAE's BatchTopK selection on real pre-activations: k x B (row, latent) pairs, the values are
    the pre-activations there, the offsets index the rows."""
    from lorascope.sae.model import BatchTopKSAE

    g = torch.Generator().manual_seed(seed)
    sae = BatchTopKSAE(6, 24, k, generator=g)
    with torch.no_grad():
        sae.b_enc_F.fill_(1.0)  # every pre-activation positive: exactly k x B are kept
    x = torch.randn(B, 6, generator=g)
    with torch.no_grad():
        pre = sae.pre_acts(x)
    sel = sae.select(x, k)
    assert sel.rows_N.numel() == k * B
    assert torch.allclose(sel.values_N.detach(), pre[sel.rows_N, sel.latents_N])
    assert float(sel.values_N.detach().min()) >= float(pre.flatten().topk(k * B).values.min())
    counts = torch.bincount(sel.rows_N, minlength=B)
    assert torch.equal(sel.offsets_B, torch.cumsum(counts, 0) - counts)


# ------------------------------------------------------------------------------- context windows
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=10),
    before=st.integers(0, 4),
    after=st.integers(0, 4),
    seed=st.integers(0, 2**16),
    cut=st.integers(1, 9),
)
def test_a_window_never_crosses_a_document_boundary(
    lengths: list[int], before: int, after: int, seed: int, cut: int
) -> None:
    """Token id = global position, so each kept window shows which tokens it holds: exactly the
    tokens of the centre's document within [centre - before, centre + after], at their offsets, PAD
    elsewhere, over documents of any length and shards cut at any document boundary."""
    from lorascope.contexts.params import ContextsSection
    from lorascope.contexts.selection import PAD_ID, Selector, ShardView

    cfg = ContextsSection(top_k=4, window_before=before, window_after=after, quantile_bins=2,
                          quantile_samples=2, random_samples=3, active_threshold=0.3, feature_chunk=2)  # fmt: skip
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(T, 3, generator=g)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    selector = Selector(3, (1, -1), cfg)
    split = min(cut, len(lengths))  # two shards of whole documents (the second may be empty)
    for lo, docs in ((0, lengths[:split]), (sum(lengths[:split]), lengths[split:])):
        if not docs:
            continue
        n = sum(docs)
        view = ShardView.build(lo, acts[lo : lo + n], torch.arange(lo, lo + n, dtype=torch.int32), docs)
        selector.update(view, None, torch.rand(n, generator=g))
    st_ = selector.state
    for group in ("top", "quantile", "random"):
        pos, ids = st_[f"{group}.pos"], st_[f"{group}.ids"]
        for idx in (pos >= 0).nonzero().tolist():
            centre = int(pos[tuple(idx)])
            d = int(np.searchsorted(starts, centre, side="right") - 1)
            doc_lo, doc_hi = int(starts[d]), int(starts[d]) + lengths[d]
            window = ids[tuple(idx)].tolist()
            want = [p if doc_lo <= p < doc_hi else PAD_ID for p in range(centre - before, centre + after + 1)]
            assert window == want, (group, centre, (doc_lo, doc_hi))
        assert bool((ids[pos < 0] == PAD_ID).all())


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    cut=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    chunk=st.integers(1, 3),
)
def test_streaming_selection_equals_brute_force_however_the_store_is_cut(
    lengths: list[int], cut: int, seed: int, chunk: int
) -> None:
    """Top-k per feature sign, the quantile sample (active tokens with the smallest keys), the random
    negatives (inactive tokens with the smallest keys) and the running statistics, against torch over the
    whole store at once, for any cut of the store into shards and of the features into chunks."""
    from lorascope.contexts.params import ContextsSection
    from lorascope.contexts.selection import Selector, ShardView

    cfg = ContextsSection(top_k=3, window_before=1, window_after=1, quantile_bins=2, quantile_samples=2,
                          random_samples=2, active_threshold=0.5, feature_chunk=chunk)  # fmt: skip
    T, F = sum(lengths), 3
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(T, F, generator=g)
    keys = torch.rand(T, generator=g)
    selector = Selector(F, (1, -1), cfg)
    split = min(cut, len(lengths))
    for lo, docs in ((0, lengths[:split]), (sum(lengths[:split]), lengths[split:])):
        if docs:
            n = sum(docs)
            view = ShardView.build(lo, acts[lo : lo + n], torch.arange(lo, lo + n, dtype=torch.int32), docs)
            selector.update(view, None, keys[lo : lo + n])
    s = selector.state
    assert int(s["tokens"]) == T
    assert torch.allclose(s["sum"], acts.double().sum(0)) and torch.allclose(
        s["sumsq"], acts.double().square().sum(0)
    )
    assert torch.equal(s["min"], acts.amin(0)) and torch.equal(s["max"], acts.amax(0))
    assert torch.equal(s["nonzero"], (acts != 0).sum(0))
    for si, sign in enumerate((1, -1)):
        signed = sign * acts
        active = signed > 0.5
        assert torch.equal(s["active"][si], active.sum(0))
        for f in range(F):
            want_top = torch.topk(signed[:, f], min(3, T)).indices
            got_top = s["top.pos"][si, f][s["top.pos"][si, f] >= 0]
            assert torch.equal(got_top, want_top), ("top", sign, f)
            assert torch.allclose(s["top.score"][si, f][: len(got_top)], signed[want_top, f])
            act_idx = active[:, f].nonzero().flatten()
            want_q = act_idx[torch.argsort(keys[act_idx])][:4]
            got_q = s["quantile.pos"][si, f][s["quantile.pos"][si, f] >= 0]
            assert sorted(got_q.tolist()) == sorted(want_q.tolist()), ("quantile", sign, f)
            inact = (~active[:, f]).nonzero().flatten()
            want_r = inact[torch.argsort(keys[inact])][:2]
            got_r = s["random.pos"][si, f][s["random.pos"][si, f] >= 0]
            assert sorted(got_r.tolist()) == sorted(want_r.tolist()), ("random", sign, f)
            # each kept entry's window activations are the feature's values around it
            for group in ("top", "quantile", "random"):
                for slot, p in enumerate(s[f"{group}.pos"][si, f].tolist()):
                    if p >= 0:
                        assert float(s[f"{group}.acts"][si, f, slot, 1]) == float(acts[p, f])
