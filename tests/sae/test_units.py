"""The SAE's training and evaluation functions one by one, against numpy on data made here: threshold
calibration, FVU sums (centred variance), grouped FVU, folding the input scale, input scales, the run
plan, the held-out split and the dead-latent counters of a training step. Fast (no pipeline, no model)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.sae.model import BatchTopKSAE
from lorascope.sae.params import SaeSection
from lorascope.sae.train import (
    calibrate,
    check_sizes,
    evaluate,
    fold,
    grouped_fvu,
    heldout_batches,
    input_scale,
    plan,
    train_step,
)


def random_sae(d_in: int = 6, d_sae: int = 20, k: int = 3, seed: int = 0) -> BatchTopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = BatchTopKSAE(d_in, d_sae, k, generator=g)
    with torch.no_grad():
        sae.W_enc_DF.mul_(4.0)
        sae.b_enc_F.normal_(0, 0.3, generator=g)
        sae.b_dec_D.normal_(0, 0.5, generator=g)
    return sae


def data(n: int, d_in: int = 6, seed: int = 1, offset: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) * torch.linspace(0.5, 2.0, d_in) + offset


def numpy_pre(sae: BatchTopKSAE, x: torch.Tensor) -> np.ndarray:
    w = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    return np.maximum((x.double().numpy() - w["b_dec_D"]) @ w["W_enc_DF"] + w["b_enc_F"], 0.0)


def test_calibrated_threshold_is_the_k_times_n_th_largest_activation():
    sae, x = random_sae(), data(300)
    pre = numpy_pre(sae, x)
    want = np.sort(pre.ravel())[::-1][3 * 300 - 1]
    for cuts in ([300], [100, 200], [7, 93, 150, 50], [1] * 10 + [290]):
        parts = torch.split(x, cuts)
        threshold, n = calibrate(sae, iter(parts), 3)
        assert n == 300 and threshold == pytest.approx(want, rel=1e-5), cuts
        assert calibrate(sae, iter(torch.split(x, cuts)), 3, max_tokens=300) == (threshold, 300)
        assert calibrate(sae, iter(torch.split(x, cuts)), 3, max_tokens=1000) == (threshold, 300)
    assert (pre > want).sum(1).mean() == pytest.approx(3, abs=1.5 / 300)  # mean L0 = k at the threshold
    # fewer positive activations than k x N: every one of them is kept (threshold 0)
    with torch.no_grad():
        sae.b_enc_F.fill_(-1e3)
        sae.b_enc_F[0] = 1e3
    assert calibrate(sae, iter([x]), 3) == (0.0, 300)
    with pytest.raises(LorascopeError, match="more than max_tokens"):
        calibrate(sae, iter([x]), 3, max_tokens=299)
    with pytest.raises(LorascopeError, match="no held-out tokens to calibrate"):
        calibrate(sae, iter([]), 3)


def test_evaluate_sums_against_numpy():
    """Squared errors and squared deviations from the mean per component (the FVU's two sums), mean L0
    and the latents that fired, whatever the batches."""
    sae, x = random_sae(), data(250)
    sae.threshold.fill_(0.7)
    pre = numpy_pre(sae, x)
    f = np.where(pre > 0.7, pre, 0.0)
    w = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    X = x.double().numpy()
    err_D = ((f @ w["W_dec_FD"] + w["b_dec_D"] - X) ** 2).sum(0)
    var_D = ((X - X.mean(0)) ** 2).sum(0)
    for cuts in ([250], [100, 150], [1, 2, 247]):
        got = evaluate(sae, iter(torch.split(x, cuts)))
        assert got["tokens"] == 250
        np.testing.assert_allclose(got["err_D"].numpy(), err_D, rtol=1e-4)
        np.testing.assert_allclose(got["var_D"].numpy(), var_D, rtol=1e-9)
        assert got["l0"] == pytest.approx((f > 0).sum(1).mean())
        assert got["fired_F"].tolist() == (f > 0).any(0).tolist()
    assert (var_D < (X**2).sum(0) / 2).all()  # the data's offset: the centred variance is much smaller
    with pytest.raises(LorascopeError, match="no held-out tokens to evaluate"):
        evaluate(sae, iter([]))


def test_grouped_fvu_by_hand():
    err = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    var = torch.tensor([10.0, 10.0, 20.0, 40.0], dtype=torch.float64)
    got = grouped_fvu(err, var, ["L0", "L1", "L0", "L1"])
    assert list(got) == ["L0", "L1"]  # first-seen order
    assert got == {"L0": pytest.approx(4 / 30), "L1": pytest.approx(6 / 50)}
    assert grouped_fvu(err, var, ["q"] * 4) == {"q": pytest.approx(10 / 80)}
    # variances below 1 (the clamp only guards against zero)
    assert grouped_fvu(err * 1e-3, var * 1e-3, ["L0", "L1", "L0", "L1"]) == {
        "L0": pytest.approx(4 / 30),
        "L1": pytest.approx(6 / 50),
    }


def test_fold_moves_the_scale_into_the_weights():
    sae, x = random_sae(), data(50)
    sae.threshold.fill_(0.4)
    scale = torch.linspace(0.5, 4.0, 6)
    raw = fold(sae, scale)
    with torch.no_grad():
        f_scaled = sae.encode(x / scale)
        assert (f_scaled > 0).any() and (f_scaled == 0).any()
        assert torch.allclose(raw.encode(x), f_scaled, atol=1e-5)
        assert torch.allclose(raw.decode(f_scaled), sae.decode(f_scaled) * scale, atol=1e-5)
    assert float(raw.threshold) == pytest.approx(0.4) and (raw.d_in, raw.d_sae, raw.k) == (6, 20, 3)
    assert torch.equal(raw.b_enc_F, sae.b_enc_F)


def test_input_scales():
    rms = torch.tensor([0.0, 1e-9, 2.0, 3.0])
    per = input_scale(SaeSection(scaling="per_component"), rms, 13.0)
    assert per.tolist() == pytest.approx([1e-6, 1e-6, 2.0, 3.0])
    glob = input_scale(SaeSection(scaling="global"), rms, 16.0)  # E||x||^2 = 16 over 4 components: s = 2
    assert glob.tolist() == pytest.approx([2.0] * 4)
    assert input_scale(SaeSection(scaling="global"), rms, 36.0).tolist() == pytest.approx([3.0] * 4)
    assert input_scale(SaeSection(scaling="global"), rms, 0.0).tolist() == pytest.approx([1e-6] * 4)


def test_plan_and_sizes():
    cfg = SaeSection(k=4, expansion=3, batch_size=100, epochs=2.5, dead_fraction=0.1, aux_k=12)
    p = plan(cfg, 10, 1001)
    assert (p.d_in, p.d_sae, p.steps, p.dead_window, p.train_tokens) == (10, 30, 25, 100, 1001)
    assert plan(SaeSection(dead_fraction=1e-9, batch_size=10, k=2, aux_k=8), 4, 100).dead_window == 1
    assert check_sizes(SaeSection(k=29, expansion=3, aux_k=30), 10) == 30
    with pytest.raises(
        LorascopeError, match=r"sae.k: must be < d_sae = expansion x d_in = 3 x 10 = 30, got 30"
    ):
        check_sizes(SaeSection(k=30, expansion=3), 10)
    with pytest.raises(LorascopeError, match=r"sae.aux_k: must be <= d_sae \(30\), got 31"):
        check_sizes(SaeSection(k=4, expansion=3, aux_k=31), 10)
    with pytest.raises(LorascopeError, match="sae.batch_size: 1000 is more than epochs x training tokens"):
        plan(SaeSection(batch_size=1000, epochs=1, k=2, aux_k=8), 4, 999)
    assert plan(SaeSection(batch_size=1000, epochs=1, k=2, aux_k=8), 4, 1000).steps == 1


def test_heldout_batches_split_held_documents_by_parity(tmp_path: Path):
    """Part 0 (calibration) is the even-numbered held-out documents, part 1 (evaluation) the odd ones, in
    store order, up to max_tokens; one held-out document serves both."""
    from lorascope.extract.store import Store

    from tests.sae.test_sae import D_IN, write_store

    x = torch.arange(20 * 200 * D_IN, dtype=torch.float32).reshape(20 * 200, D_IN)
    write_store(tmp_path, x)
    store = Store.open(tmp_path / "data/activations/lora")
    held = torch.zeros(20, dtype=torch.bool)
    held[[2, 5, 6, 11, 17]] = True

    def rows(part: int, cap: int = 10**6) -> torch.Tensor:
        got = list(heldout_batches(store, held, part, cap))
        return torch.cat(got) if got else torch.empty(0, D_IN)

    docs = lambda ds: torch.cat([x[d * 200 : (d + 1) * 200] for d in ds])  # noqa: E731
    assert torch.equal(rows(0), docs([2, 6, 17]))
    assert torch.equal(rows(1), docs([5, 11]))
    assert torch.equal(rows(1, 250), docs([5, 11])[:250])
    assert torch.equal(rows(0, 200), docs([2]))
    one = torch.zeros(20, dtype=torch.bool)
    one[9] = True
    assert torch.equal(list(heldout_batches(store, one, 1, 10**6))[0], docs([9]))


def test_train_step_counts_tokens_since_each_latent_fired():
    sae, x = random_sae(d_sae=40, k=2), data(16, offset=0.0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    with torch.no_grad():
        pre = torch.relu(sae.hidden_pre(x)).flatten()
    top = pre.topk(2 * 16)
    fired = set((top.indices[top.values > 0] % 40).tolist())
    since = torch.arange(40, dtype=torch.long) * 3  # 0, 3, ..., 117
    metrics = train_step(sae, opt, x, since, dead_window=60, aux_k=4, aux_coef=0.5)
    assert metrics["dead_latents"] == float((torch.arange(40) * 3 >= 60).sum())
    expected = [0 if f in fired else 3 * f + 16 for f in range(40)]
    assert since.tolist() == expected and 0 < len(fired) < 40
    assert metrics["mse"] > 0 and "aux" in metrics
    norms = sae.W_dec_FD.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_init_is_seeded_with_unit_decoder_rows_and_a_tied_encoder():
    a = BatchTopKSAE(5, 12, 2, generator=torch.Generator().manual_seed(7))
    b = BatchTopKSAE(5, 12, 2, generator=torch.Generator().manual_seed(7))
    c = BatchTopKSAE(5, 12, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.W_dec_FD, b.W_dec_FD) and not torch.equal(a.W_dec_FD, c.W_dec_FD)
    g = torch.Generator().manual_seed(7)
    raw = torch.randn(12, 5, generator=g).double()
    want = raw / np.sqrt((raw**2).sum(1, keepdim=True))
    assert torch.allclose(a.W_dec_FD.double(), want, atol=1e-6)  # each row scaled to norm 1
    assert torch.equal(a.W_enc_DF, a.W_dec_FD.T)
    assert float(a.threshold) == 0.0 and not a.b_enc_F.any() and not a.b_dec_D.any()


def test_encode_keeps_only_activations_above_the_threshold():
    sae, x = random_sae(), data(40)
    np.testing.assert_allclose(
        sae.pre_acts(x).detach().double().numpy(), numpy_pre(sae, x), rtol=1e-4, atol=1e-4
    )
    with torch.no_grad():
        pre32 = sae.pre_acts(
            x
        ).numpy()  # the float32 values encode compares (their last bits are the kernels')
    t32 = float(
        np.sort(pre32[pre32 > 0])[len(pre32[pre32 > 0]) // 2]
    )  # a value that occurs: equal is not above
    sae.threshold.fill_(t32)
    with torch.no_grad():
        got = sae.encode(x).double().numpy()
    assert (pre32 == t32).any()
    np.testing.assert_array_equal(got, np.where(pre32 > t32, pre32, 0.0))


def test_batch_topk_is_exact_whatever_the_cached_cutoff():
    from lorascope.sae.model import _batch_topk

    g = torch.Generator().manual_seed(4)
    flat = torch.randn(200, generator=g)

    def want(n: int) -> list[int]:
        top = flat.topk(min(n, flat.numel()))
        return sorted(top.indices[top.values > 0].tolist())

    cutoffs: dict[str, float] = {}
    for n in (30, 5, 60, 90, 150, 200, 300):  # a cached cut from a smaller n sits above the new n-th value
        assert _batch_topk(flat, n, cutoffs, "h").tolist() == want(n), n
        assert cutoffs["h"] == pytest.approx(0.9 * float(flat[want(n)].min()))
    cutoffs = {"h": 0.9 * float(flat.max())}  # far too high: lowered until it holds n entries
    assert _batch_topk(flat, 40, cutoffs, "h").tolist() == want(40)
    cutoffs = {"h": 0.5}
    assert _batch_topk(flat, 80, cutoffs, "h").tolist() == want(80)  # more than are above 0.5
    assert _batch_topk(flat, 80, {"other": 5.0}, "h").tolist() == want(80)


def test_training_loss_aux_term_by_hand():
    """MSE (summed over dims, mean over tokens); the AuxK term only with dead latents and a positive
    coefficient, normalised by the residual's mean squared norm, however small."""
    from lorascope.sae.model import training_loss

    sae = random_sae(d_sae=30, k=2, seed=3).double()
    x = data(12, offset=0.0).double() * 0.01  # a small residual: its mean squared norm is below 1
    with torch.no_grad():
        sae.b_dec_D.mul_(0.01)
        sae.W_dec_FD.mul_(0.01)
    dead = torch.zeros(30, dtype=torch.bool)
    dead[::4] = True
    with torch.no_grad():
        pre = torch.relu((x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F)

        def masked(p: torch.Tensor, n: int) -> torch.Tensor:
            top = p.flatten().topk(n)
            m = torch.zeros(p.numel(), dtype=torch.bool)
            m[top.indices[top.values > 0]] = True
            return p * m.view_as(p)

        recon = masked(pre, 24) @ sae.W_dec_FD + sae.b_dec_D
        mse = (recon - x).square().sum(1).mean()
        residual = x - recon
        aux_recon = masked(pre * dead, 5 * 12) @ sae.W_dec_FD
        aux = (aux_recon - residual).square().sum(1).mean() / residual.square().sum(1).mean()
    assert residual.square().sum(1).mean() < 1 and aux_recon.abs().sum() > 0
    loss, parts, _ = training_loss(sae, x, dead, 5, 0.25)
    assert float(parts["mse"]) == pytest.approx(float(mse), rel=1e-9)
    assert float(parts["aux"]) == pytest.approx(float(aux), rel=1e-9)
    assert float(loss.detach()) == pytest.approx(float(mse + 0.25 * aux), rel=1e-9)
    for dead_F, coef in ((None, 0.25), (dead, 0.0), (torch.zeros(30, dtype=torch.bool), 0.25)):
        loss, parts, _ = training_loss(sae, x, dead_F, 5, coef)
        assert set(parts) == {"mse"} and float(loss.detach()) == pytest.approx(float(mse), rel=1e-9)


def test_heldout_batches_across_shards_with_an_exclusion_policy(tmp_path: Path):
    """Over several shards: tokens the policy excludes (first positions, a special id) are left out, the
    max_tokens cap counts what earlier shards gave, and a shard with nothing to give yields nothing."""
    from lorascope.exclusion import Exclusion
    from lorascope.extract.store import Store

    from tests.sae.test_sae import D_IN, write_store

    T, doc = 12_000, 1000  # 12 documents, 3 shards of 4
    x = torch.arange(T * D_IN, dtype=torch.float32).reshape(T, D_IN)
    ids = torch.zeros(T, dtype=torch.int32)
    ids[torch.arange(3, T, 17)] = 7
    write_store(tmp_path, x, doc_len=doc, ids_T=ids)
    store = Store.open(tmp_path / "data/activations/lora")
    assert len(store.shards) == 3
    held = torch.zeros(12, dtype=torch.bool)
    held[[1, 2, 5, 9, 10]] = True  # part 0: documents 1, 5, 10; part 1: 2, 9
    policy = Exclusion(first_position=True, special_ids=torch.tensor([7]), norm_limit=None)
    pos = torch.arange(T)
    keep = (pos % doc != 0) & (ids != 7)

    def want(docs: list[int], cap: int) -> torch.Tensor:
        rows = torch.isin(pos // doc, torch.tensor(docs)) & keep
        return x[rows][:cap]

    for part, docs in ((0, [1, 5, 10]), (1, [2, 9])):
        for cap in (10**6, 2500, 1500, 990):
            got = list(heldout_batches(store, held, part, cap, exclusion=policy))
            assert all(len(b) > 0 for b in got), (part, cap)
            assert torch.equal(torch.cat(got), want(docs, cap)), (part, cap)
    assert len(list(heldout_batches(store, held, 1, 10**6, exclusion=policy))) == 2  # shard 1 gives nothing


def count_reads(store) -> list[str]:  # type: ignore[no-untyped-def]
    """The files of the shards ``store`` reads from now on, in order (its ``read`` wrapped)."""
    reads: list[str] = []
    read = store.read

    def counted(shard):  # type: ignore[no-untyped-def]
        reads.append(shard.file)
        return read(shard)

    store.read = counted
    return reads


def test_heldout_batches_stop_reading_shards_once_the_budget_is_met(tmp_path: Path):
    """The token budget caps what is read, not only what is yielded: a calibration budget met by the first
    shard reads it and at most the one shard the prefetcher started, not the rest of the store (at paper
    scale, a budget of 100k tokens must not stream the whole store)."""
    from lorascope.extract.store import Store

    from tests.sae.test_sae import D_IN, write_store

    T, doc = 24_000, 1000  # 24 documents, 6 shards of 4
    write_store(tmp_path, torch.randn(T, D_IN), doc_len=doc)
    store = Store.open(tmp_path / "data/activations/lora")
    assert len(store.shards) == 6
    held = torch.ones(24, dtype=torch.bool)
    reads = count_reads(store)
    for budget, shards_needed in ((500, 1), (3000, 2), (9000, 5)):
        reads.clear()
        got = list(heldout_batches(store, held, 0, budget))  # part 0: every other document
        assert sum(len(b) for b in got) == budget
        time.sleep(0.05)  # let a started prefetch reach its read, so the count is not racy
        assert shards_needed <= len(reads) <= shards_needed + 1, (budget, reads)
    reads.clear()
    assert sum(len(b) for b in heldout_batches(store, held, 0, 10**6)) == T // 2
    assert len(reads) == 6


def test_splice_documents_read_each_shard_once_and_slice_every_document_exactly(tmp_path: Path):
    """The KL splice's documents come out in the order asked, each exactly its rows of the store, with one
    shard read per run of documents in that shard (it read the whole shard again for every document)."""
    from lorascope.extract.store import Store
    from lorascope.sae.downstream import documents

    from tests.sae.test_sae import D_IN, write_store

    T, doc = 12_000, 1000  # 12 documents, 3 shards of 4
    x = torch.arange(T * D_IN, dtype=torch.float32).reshape(T, D_IN)
    write_store(tmp_path, x, doc_len=doc, ids_T=torch.arange(T, dtype=torch.int32))
    store = Store.open(tmp_path / "data/activations/lora")
    reads = count_reads(store)
    docs = [0, 1, 3, 4, 5, 8, 11]  # 4 and 8: each the first document of its shard
    for d, (acts_TC, ids_T) in zip(docs, documents(store, docs), strict=True):
        assert torch.equal(acts_TC, x[d * doc : (d + 1) * doc])
        assert torch.equal(ids_T.long(), torch.arange(d * doc, (d + 1) * doc))
    assert len(reads) == 3 and len(set(reads)) == 3
    with pytest.raises(IndexError):
        list(documents(store, [12]))
    store.index["shards"] = store.index["shards"][:1]  # an index listing documents that no shard holds
    with pytest.raises(IndexError, match="^5$"):
        list(documents(store, [5]))


def test_select_and_decode_sparse_carry_the_dense_gradient():
    """`select` + `decode_sparse` (the BatchTopK forward the benchmarks use): the k x B largest positive
    pre-activations, sorted by row then latent, and every parameter's gradient equal to a dense masked
    computation's; with `columns` (a subset, as AuxK's dead latents) each pick is named by its own latent."""
    sae = random_sae(d_in=6, d_sae=24, k=2, seed=1).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.randn(24, generator=g, dtype=torch.float64) * 0.1)
        sae.b_dec_D.copy_(torch.randn(6, generator=g, dtype=torch.float64) * 0.1)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)

    sel = sae.select(x, 2)
    ((sae.decode_sparse(sel) - x).square().sum()).backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = torch.relu((x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F)
    top = pre.detach().flatten().topk(10)
    mask = torch.zeros(pre.numel(), dtype=torch.bool)
    mask[top.indices[top.values > 0]] = True
    rows, latents = mask.view_as(pre).nonzero(as_tuple=True)
    assert torch.equal(sel.rows_N, rows) and torch.equal(sel.latents_N, latents)
    assert torch.allclose(sel.values_N.detach(), pre.detach()[rows, latents], atol=1e-12)
    ((((pre * mask.view_as(pre)) @ sae.W_dec_FD + sae.b_dec_D) - x).square().sum()).backward()
    for name, p in sae.named_parameters():
        assert p.grad.abs().max() > 0 and torch.allclose(p.grad, sparse[name], atol=1e-12), name

    cols = torch.tensor([1, 4, 7, 20])
    with torch.no_grad():
        sub_pre = sae.pre_acts(x)[:, cols]
        sub = sae.select(x, 1, pre_BF=sub_pre, hint="aux", columns=cols)
    want = sub_pre.flatten().topk(5)
    flat = want.indices[want.values > 0].sort().values
    assert torch.equal(sub.rows_N, flat // 4) and torch.equal(sub.latents_N, cols[flat % 4])
    assert torch.allclose(sub.values_N, sub_pre.flatten()[flat])
