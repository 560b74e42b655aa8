"""``sae.train.Trainer`` driven directly on small stores written here (no pipeline, no model): its start
from the training tokens, the learning-rate schedule and the decoder's own rate, the training loop
against a reference loop built from the documented pieces, dead-latent counts and AuxK, the batches it
trains on (training documents only, the exclusion policy, non-finite rows), the number of steps,
checkpoint cadence and a bit-for-bit resume, what ``on_step`` receives, and the CPU allocator setting.
Fast: about a second per test on one core."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.extract.store import Store
from lorascope.sae.data import geometric_median
from lorascope.sae.model import BatchTopKSAE
from lorascope.sae.params import SaeSection
from lorascope.sae.train import Trainer, train_step

from tests.sae.test_sae import D_IN, planted, write_store
from tests.sae.test_units import count_reads

DOC, DOCS = 200, 24  # 4800 tokens in two shards (20 + 4 documents)
HELD = [2, 7, 11, 18, 23]  # held-out documents: 19 x 200 = 3800 training tokens
CFG: dict[str, Any] = {
    "k": 2,
    "expansion": 2,
    "lr": 4e-3,
    "decoder_lr_scale": 3.0,
    "batch_size": 64,
    "epochs": 1.5,
    "warmup_ratio": 0.1,
    "decay_ratio": 0.3,
    "adam_betas": (0.8, 0.95),
    "aux_k": 6,
    "aux_coef": 0.5,
    "dead_fraction": 0.05,
    "checkpoint_steps": 7,
    "seed": 3,
    "exclude": {"first_position": False, "special_tokens": False},
}
"""89 steps (int(1.5 x 3800) // 64), dead after 190 tokens (3 batches) without firing."""


def held_docs() -> torch.Tensor:
    held = torch.zeros(DOCS, dtype=torch.bool)
    held[HELD] = True
    return held


def held_tokens() -> torch.Tensor:
    return torch.repeat_interleave(held_docs(), DOC)


def make_store(root: Path, seed: int = 5, **kw: Any) -> tuple[Store, torch.Tensor]:
    x = planted(DOC * DOCS, seed=seed)[0]
    return write_store(root, x, doc_len=DOC, **kw), x


def config(**over: Any) -> SaeSection:
    return SaeSection(**{**CFG, **over})


def wsd(step: int, n: int, warmup: int, decay: int) -> float:
    """The documented schedule's multiplier for 0-based optimiser step ``step`` of ``n``: linear warmup
    from 0 over ``warmup`` steps, 1, then a linear decay over the last ``decay`` steps (to 0 after them)."""
    if step < warmup:
        return step / warmup
    if step < n - decay:
        return 1.0
    if step < n:
        return 1.0 - (step - (n - decay)) / decay
    return 0.0


class Recorded:
    """Stands in for a trainer's stream and keeps a copy of every batch it hands out (unscaled)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.batches = stream, []

    @property
    def state(self) -> dict[str, Any]:
        return self.stream.state

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.stream:
            self.batches.append(batch.clone())
            yield batch


def recorded(trainer: Trainer) -> list[torch.Tensor]:
    rec = Recorded(trainer.stream)
    trainer.stream = rec  # type: ignore[assignment]
    return rec.batches


def rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.tolist()}


@pytest.mark.parametrize("scaling, b_dec_init", [("per_component", "mean"), ("global", "geometric_median")])
def test_start_from_the_training_tokens(tmp_path: Path, scaling: str, b_dec_init: str):
    """Before any step: the input scale (each component's RMS, or one scale with E||x / s||^2 = d_in) and
    the decoder bias (mean or geometric median, in scaled units) come from the training documents only;
    the weights are ``BatchTopKSAE``'s seeded init; Adam has the configured betas, fused; nothing has
    fired yet (int64 counts) and the step is 0."""
    store, x = make_store(tmp_path)
    cfg = config(scaling=scaling, b_dec_init=b_dec_init)
    trainer = Trainer(store, held_docs(), cfg)
    train = x[~held_tokens()].double()
    assert trainer.stats.tokens == len(train) == 3800
    p = trainer.plan
    assert (p.d_in, p.d_sae, p.steps, p.dead_window, p.train_tokens) == (D_IN, 48, 89, 190, 3800)
    if scaling == "per_component":
        want_scale = train.square().mean(0).sqrt()
        assert want_scale.max() > 5 * want_scale.min()  # components on different scales
    else:
        want_scale = (train.square().sum(1).mean() / D_IN).sqrt().expand(D_IN)
    torch.testing.assert_close(trainer.scale_D.double(), want_scale, rtol=1e-6, atol=0)
    centre = train.mean(0) if b_dec_init == "mean" else geometric_median(train.float()).double()
    assert (centre - train.mean(0)).norm() > 1e-3 or b_dec_init == "mean"  # the two inits differ
    torch.testing.assert_close(
        trainer.sae.b_dec_D.detach().double(), centre / want_scale, rtol=1e-5, atol=1e-6
    )
    seeded = BatchTopKSAE(D_IN, 48, 2, generator=torch.Generator().manual_seed(3))
    for name in ("W_dec_FD", "W_enc_DF", "b_enc_F"):
        assert torch.equal(getattr(trainer.sae, name), getattr(seeded, name)), name
    assert trainer.sae.k == 2 and float(trainer.sae.threshold) == 0.0
    for group in trainer.opt.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["fused"]  # fused: one pass over the parameters
    assert trainer.since_fired_F.dtype == torch.int64 and trainer.since_fired_F.tolist() == [0] * 48
    assert trainer.step == 0


def test_learning_rate_schedule_step_by_step_and_the_decoders_own_rate(tmp_path: Path):
    """Every optimiser step's learning rates: warmup over int(warmup_ratio x steps), stable, linear decay
    over the last int(decay_ratio x steps) to zero; W_dec alone in its group at lr x decoder_lr_scale,
    every other parameter at lr. ``on_step``'s ``lr`` is the encoder group's rate after the step's
    schedule update (the next step's; 0 after the last)."""
    store, _ = make_store(tmp_path)
    cfg = config(epochs=0.5, warmup_ratio=0.25, decay_ratio=0.3)  # 29 steps: 7 warmup, 8 decay
    trainer = Trainer(store, held_docs(), cfg)
    n = trainer.plan.steps
    assert n == 29
    rest, decoder = trainer.opt.param_groups
    assert decoder["params"] == [trainer.sae.W_dec_FD]
    assert {id(p) for p in rest["params"]} == {
        id(p) for p in trainer.sae.parameters() if p is not trainer.sae.W_dec_FD
    }
    used: list[tuple[float, float]] = []
    trainer.opt.register_step_pre_hook(lambda opt, *_: used.append((rest["lr"], decoder["lr"])))
    logged: list[tuple[int, float]] = []
    trainer.run(on_step=lambda step, m: logged.append((step, m["lr"])))
    want = [wsd(s, n, 7, 8) for s in range(n)]
    assert want[:8] == [0.0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1.0] and want[-1] == 1 / 8
    assert [u[0] for u in used] == pytest.approx([4e-3 * w for w in want], rel=1e-12, abs=0)
    assert [u[1] for u in used] == pytest.approx([3 * 4e-3 * w for w in want], rel=1e-12, abs=0)
    assert [s for s, _ in logged] == list(range(1, n + 1))
    assert [lr for _, lr in logged] == pytest.approx(
        [4e-3 * wsd(s, n, 7, 8) for s in range(1, n + 1)], rel=1e-12
    )
    assert logged[-1][1] == 0.0


def test_training_loop_against_a_reference_loop(tmp_path: Path):
    """The trainer's run equals, bit for bit on the CPU, a loop written from the documented pieces: its
    batches divided by the input scale, ``train_step`` with the plan's dead window and the AuxK params,
    Adam (lr, lr x decoder_lr_scale; betas; fused) under the warmup / stable / decay schedule. Every step's
    metrics are the step's losses and dead count plus the lr; the decoder rows stay at unit norm."""
    store, _ = make_store(tmp_path)
    cfg = config()
    trainer = Trainer(store, held_docs(), cfg)
    start = {k: v.clone() for k, v in trainer.sae.state_dict().items()}
    batches = recorded(trainer)
    metrics: list[dict[str, float]] = []

    def on_step(step: int, m: dict[str, float]) -> None:
        metrics.append(dict(m))
        norms = trainer.sae.W_dec_FD.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(48), atol=1e-6, rtol=0)

    trainer.run(on_step=on_step)
    n = trainer.plan.steps
    assert len(batches) == len(metrics) == trainer.step == n == 89
    assert all(b.shape == (64, D_IN) for b in batches)

    sae = BatchTopKSAE(D_IN, 48, 2)
    sae.load_state_dict(start)
    rest = [sae.W_enc_DF, sae.b_enc_F, sae.b_dec_D]
    opt = torch.optim.Adam(
        [{"params": rest, "lr": 4e-3}, {"params": [sae.W_dec_FD], "lr": 12e-3}], betas=(0.8, 0.95), fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd(s, n, 8, 26))  # int(0.1 x 89), int(0.3 x 89)
    since = torch.zeros(48, dtype=torch.long)
    want = []
    for x in batches:
        m = train_step(sae, opt, x / trainer.scale_D, since, 190, 6, 0.5)
        sched.step()
        want.append({**m, "lr": sched.get_last_lr()[0]})
    assert metrics == want
    assert any("aux" in m for m in metrics) and any(m["dead_latents"] == 0 for m in metrics)
    for name, value in sae.state_dict().items():
        assert torch.equal(trainer.sae.state_dict()[name], value), name
    assert torch.equal(trainer.since_fired_F, since)
    assert set(metrics[0]) == {"mse", "dead_latents", "lr"}  # nothing is dead at the first step


@pytest.mark.parametrize("aux_coef", [0.5, 0.0])
def test_dead_latents_are_those_silent_for_the_dead_window(tmp_path: Path, aux_coef: float):
    """Step by step, against the batch top-k recomputed here from the weights before the step: a latent's
    count of tokens since it fired grows by the batch size and returns to 0 when it is among the batch's
    k x B largest positive pre-activations; ``dead_latents`` is the number of latents whose count had
    reached the dead window (190 tokens: 3 batches) before the step. The AuxK loss is logged exactly
    when it is on (``aux_coef`` > 0) and some latent is dead."""
    store, _ = make_store(tmp_path)
    cfg = config(epochs=0.5, aux_coef=aux_coef)
    trainer = Trainer(store, held_docs(), cfg)
    with torch.no_grad():
        trainer.sae.W_enc_DF[:, ::3] *= 0.05  # a third of the latents too weak to win at first
    batches = recorded(trainer)
    before = [{k: v.clone() for k, v in trainer.sae.state_dict().items()}]
    metrics: list[dict[str, float]] = []
    since: list[torch.Tensor] = []

    def on_step(step: int, m: dict[str, float]) -> None:
        metrics.append(m)
        since.append(trainer.since_fired_F.clone())
        before.append({k: v.clone() for k, v in trainer.sae.state_dict().items()})

    trainer.run(on_step=on_step)
    count = torch.zeros(48, dtype=torch.long)
    dead_steps = 0
    for s, x in enumerate(batches):
        w = {k: v.double() for k, v in before[s].items()}
        pre = torch.relu(
            (x.double() / trainer.scale_D.double() - w["b_dec_D"]) @ w["W_enc_DF"] + w["b_enc_F"]
        )
        top = pre.flatten().topk(2 * 64)
        fired = torch.zeros(48, dtype=torch.bool)
        fired[top.indices[top.values > 0] % 48] = True
        dead = int((count >= 190).sum())
        assert metrics[s]["dead_latents"] == dead, s
        assert ("aux" in metrics[s]) == (aux_coef > 0 and dead > 0), s
        count = torch.where(fired, 0, count + 64)
        assert torch.equal(since[s], count), s
        dead_steps += dead > 0
    assert dead_steps >= 5 and len(batches) == 29
    assert torch.equal(trainer.since_fired_F, count)


def test_resume_from_a_checkpoint_gives_the_same_run_bit_for_bit(tmp_path: Path):
    """``save`` runs every ``checkpoint_steps`` and at the last step; a trainer stopped after its
    checkpoint at step 42 and a fresh one loaded from that checkpoint (through ``torch.save``) continue
    at step 43 and end with the uninterrupted run's weights, optimiser state, counters and stream
    position. Without ``on_step`` / ``save`` the run trains all the same."""
    store, _ = make_store(tmp_path)
    cfg = config()

    def weakened() -> Trainer:  # a third of the latents start too weak to win: some are dead at step 42
        trainer = Trainer(store, held_docs(), cfg)
        with torch.no_grad():
            trainer.sae.W_enc_DF[:, ::3] *= 0.05
        return trainer

    whole = weakened()
    whole.run()
    assert whole.step == 89

    first = weakened()
    saved: dict[int, bytes] = {}

    def save() -> None:
        buf = io.BytesIO()
        torch.save({"trainer": first.state_dict()}, buf)
        saved[first.step] = buf.getvalue()
        if first.step == 42:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(save=save)
    assert list(saved) == [7, 14, 21, 28, 35, 42]

    resumed = Trainer(store, held_docs(), cfg)
    state = torch.load(io.BytesIO(saved[42]), weights_only=False)["trainer"]
    assert set(state) == {"sae", "opt", "sched", "stream", "since_fired", "step"} and state["step"] == 42
    assert (state["since_fired"] >= 190).any()  # the dead latents' counts matter after the resume
    resumed.load_state_dict(state)
    assert resumed.step == 42
    steps: list[int] = []
    ends: list[int] = []
    resumed.run(on_step=lambda s, m: steps.append(s), save=lambda: ends.append(resumed.step))
    assert steps == list(range(43, 90)) and ends == [49, 56, 63, 70, 77, 84, 89]
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    assert torch.equal(resumed.since_fired_F, whole.since_fired_F) and resumed.step == 89
    a, b = whole.opt.state_dict(), resumed.opt.state_dict()
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)
    assert [g["lr"] for g in b["param_groups"]] == [g["lr"] for g in a["param_groups"]] == [0.0, 0.0]
    assert whole.sched.state_dict()["last_epoch"] == resumed.sched.state_dict()["last_epoch"] == 89
    for key in ("epoch", "cursor", "offset"):
        assert whole.stream.state[key] == resumed.stream.state[key], key
    assert torch.equal(whole.stream.state["carry"], resumed.stream.state["carry"])


def test_batches_hold_kept_finite_training_tokens_only(tmp_path: Path):
    """Training batches: tokens of the training documents only, none the exclusion policy names (first
    positions, special ids), no non-finite row (dropped and counted with ``drop_nonfinite``, an error
    without); each kept token once per epoch; as many steps as int(epochs x kept tokens) // batch_size."""
    ids = torch.zeros(DOC * DOCS, dtype=torch.int32)
    ids[torch.arange(5, DOC * DOCS, 13)] = 9
    x = planted(DOC * DOCS, seed=5)[0]
    bad = torch.tensor([3, 250, 2 * DOC + 5, 4001])  # training rows 3, 250, 4001; row 405 is held out
    x[bad[:2], 4] = float("nan")
    x[bad[2:], 0] = float("inf")
    store = write_store(tmp_path, x, doc_len=DOC, ids_T=ids, special=[9])
    pos = torch.arange(DOC * DOCS)
    excluded = (pos % DOC == 0) | (ids == 9)
    finite = torch.isfinite(x).all(1)
    keep = ~held_tokens() & ~excluded & finite
    exclude = {"first_position": True, "special_tokens": True}
    cfg = config(epochs=1.25, drop_nonfinite=True, exclude=exclude)
    trainer = Trainer(store, held_docs(), cfg)
    n_keep = int(keep.sum())
    assert trainer.stats.tokens == n_keep and trainer.stats.nonfinite_tokens == 3
    assert trainer.stats.excluded["excluded"] == int(excluded.sum())
    assert trainer.plan.steps == int(1.25 * n_keep) // 64
    batches = recorded(trainer)
    trainer.run()
    assert len(batches) == trainer.plan.steps
    seen = torch.cat(batches)
    first_epoch = seen[:n_keep]
    assert len(rows_of(first_epoch)) == n_keep  # each kept token once in the first epoch
    assert rows_of(seen) == rows_of(x[keep])
    with pytest.raises(LorascopeError, match="training tokens with NaN/inf activations"):
        Trainer(store, held_docs(), config(exclude=exclude))


def test_sizes_and_the_exclusion_policy_are_checked_before_reading_the_store(tmp_path: Path):
    """A k that does not fit d_sae is an error before the pass over the store (no shard read); a policy
    asking for special tokens a store does not record names the params key."""
    store, _ = make_store(tmp_path)
    reads = count_reads(store)
    with pytest.raises(
        LorascopeError, match=r"sae.k: must be < d_sae = expansion x d_in = 2 x 24 = 48, got 48"
    ):
        Trainer(store, held_docs(), config(k=48))
    assert reads == []
    index = json.loads((store.root / "index.json").read_text())
    del index["special_token_ids"]
    (store.root / "index.json").write_text(json.dumps(index))
    bare = Store.open(store.root)
    with pytest.raises(
        LorascopeError, match=r"^sae\.exclude\.special_tokens: .* records no special token ids"
    ):
        Trainer(bare, held_docs(), config(exclude={"first_position": False, "special_tokens": True}))


def test_cpu_training_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """On the CPU the run sets glibc's allocator to keep freed memory (before the first step):
    M_MMAP_THRESHOLD (-3 in malloc.h) at its 32 MiB maximum and M_TRIM_THRESHOLD (-1) at 256 MiB, in
    libc.so.6; nothing on another platform; a libc that cannot be loaded or lacks mallopt is skipped."""
    import ctypes
    import sys

    from lorascope.sae import train

    calls: list[Any] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    def cdll(name: str) -> Libc:
        calls.append(name)
        return Libc()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    train.keep_freed_memory()
    assert calls == ["libc.so.6", (-3, 32 * 2**20), (-1, 256 * 2**20)]

    for error in (OSError, AttributeError):

        def failing(name: str, error: type[Exception] = error) -> Any:
            raise error(name)

        monkeypatch.setattr(ctypes, "CDLL", failing)
        train.keep_freed_memory()  # no error

    calls.clear()
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", "darwin")
    train.keep_freed_memory()
    assert calls == []
    monkeypatch.undo()

    called: list[int] = []
    store, _ = make_store(tmp_path)
    trainer = Trainer(store, held_docs(), config(epochs=0.1))
    monkeypatch.setattr(train, "keep_freed_memory", lambda: called.append(trainer.step))
    trainer.run()
    assert called == [0] and trainer.step == trainer.plan.steps == 5


def test_fold_and_a_loaded_checkpoint_follow_the_device(tmp_path: Path):
    """Device placement checked without a GPU, PyTorch's data-less ``meta`` device standing in for a
    second device: ``fold`` builds the raw SAE on the trained SAE's device, and a checkpoint's dead-latent
    counters (saved on another device) are moved to the trainer's. (The trainer's own SAE, counters and
    batches on ``device`` need a real GPU: ``device: auto`` trains there.)"""
    from lorascope.sae.train import fold

    sae = BatchTopKSAE(D_IN, 48, 2).to("meta")
    raw = fold(sae, torch.ones(D_IN, device="meta"))
    assert {p.device.type for p in [*raw.parameters(), raw.threshold]} == {"meta"}

    store, _ = make_store(tmp_path)
    trainer = Trainer(store, held_docs(), config(epochs=0.1))
    trainer.run()
    buf = io.BytesIO()
    torch.save(trainer.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert state["since_fired"].device.type == "cpu"
    trainer.device = torch.device("meta")
    trainer.load_state_dict(state)
    assert trainer.since_fired_F.device.type == "meta" and trainer.since_fired_F.dtype == torch.int64
