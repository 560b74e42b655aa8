"""The SAE stage: sparse gradients, planted-feature recovery, calibration, AuxK, folding, resume,
downstream splice, the encoder used by contexts, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorascope import tracking
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store, plan_shards, write_index, write_shard
from lorascope.sae.data import heldout_documents
from lorascope.sae.model import BatchTopKSAE, training_loss
from lorascope.sae.params import SaeSection
from lorascope.sae.stage import run
from lorascope.sae.train import Trainer, fold

from tests.conftest import REPO, cli, run_of, tiny_params

D_IN, N_TRUE = 24, 48


def planted(tokens: int, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that are sparse non-negative combinations (3 of 48) of known unit directions + noise,
    with per-component scales that differ by 10x. Its own generator: never the SAE's init seed."""
    g = torch.Generator().manual_seed(seed)
    dirs_TD = torch.randn(N_TRUE, D_IN, generator=g)
    dirs_TD /= dirs_TD.norm(dim=1, keepdim=True)
    which = torch.stack([torch.randperm(N_TRUE, generator=g)[:3] for _ in range(tokens)])
    coef = torch.rand(tokens, 3, generator=g) * 2 + 0.5
    x = (coef[..., None] * dirs_TD[which]).sum(1) + 0.01 * torch.randn(tokens, D_IN, generator=g)
    scale_D = torch.logspace(0, 1, D_IN)
    return x * scale_D, dirs_TD * scale_D


def write_store(
    root: Path,
    x_TD: torch.Tensor,
    doc_len: int = 200,
    ids_T: torch.Tensor | None = None,
    special: list[int] | None = None,
) -> Store:
    """A LoRA store of ``x_TD`` in documents of ``doc_len`` tokens (token ids ``ids_T``, zeros by default;
    ``special``: the special token ids its index records, none by default)."""
    folder = root / "data" / "activations" / "lora"
    folder.mkdir(parents=True)
    lengths = [doc_len] * (x_TD.shape[0] // doc_len)
    shards = plan_shards(lengths, 4000)
    ids_T = torch.zeros(x_TD.shape[0], dtype=torch.int32) if ids_T is None else ids_T
    for s in shards:
        write_shard(folder / s.file, x_TD[s.start : s.start + s.tokens], ids_T[s.start : s.start + s.tokens])
    write_index(
        folder,
        {
            "source": "lora",
            "model": "models/base",
            "components": [
                f"L{i // 4}.{['q_proj', 'k_proj', 'gate_proj', 'down_proj'][i % 4]}" for i in range(D_IN)
            ],
            "modules": [
                {
                    "layer": i // 4,
                    "kind": ["q_proj", "k_proj", "gate_proj", "down_proj"][i % 4],
                    "module": "m",
                    "width": 1,
                }
                for i in range(D_IN)
            ],
            "dtype": "float32",
            "tokens": sum(lengths),
            "documents": [[f"doc{i}", i * doc_len, doc_len] for i in range(len(lengths))],
            "shards": [s.to_json() for s in shards],
            "special_token_ids": special or [],
        },
    )
    return Store.open(folder)


SAE = {"k": 3, "expansion": 4, "lr": 3e-3, "batch_size": 256, "epochs": 6, "aux_k": 32, "checkpoint_steps": 100,
       "heldout_fraction": 0.1, "kl_sequences": 0, "exclude": {"first_position": False}}  # fmt: skip
"""Training tests: no token is excluded (the outlier policy has its own tests below)."""


@pytest.mark.parametrize("dead_step", [3, 1])  # 1: every latent dead, so AuxK re-selects the main entries too
def test_sparse_backward_equals_the_dense_gradient(dead_step: int):
    sae = BatchTopKSAE(10, 40, 3, torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        sae.b_enc_F.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        sae.b_dec_D.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    x = torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::dead_step] = True
    loss, _, sel = training_loss(sae, x, dead, 5, 0.5)
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    def batch_topk_mask(pre: torch.Tensor, n: int) -> torch.Tensor:
        top = pre.detach().flatten().topk(n)
        mask = torch.zeros(pre.numel(), dtype=torch.bool)
        mask[top.indices[top.values > 0]] = True
        return mask.view_as(pre)

    pre = torch.relu((x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F)  # dense reference
    recon = (pre * batch_topk_mask(pre, 21)) @ sae.W_dec_FD + sae.b_dec_D
    residual = (x - recon).detach()
    aux_recon = (pre * batch_topk_mask(pre * dead, 35)) @ sae.W_dec_FD
    dense = (recon - x).square().sum(-1).mean() + 0.5 * (aux_recon - residual).square().sum(
        -1
    ).mean() / residual.square().sum(-1).mean()
    dense.backward()
    assert loss.item() == pytest.approx(dense.item(), rel=1e-12)
    # the main selection it returns (the trainer counts fired latents on it): rows, latents, values, bags
    rows, latents = batch_topk_mask(pre, 21).nonzero(as_tuple=True)
    assert torch.equal(sel.rows_N, rows) and torch.equal(sel.latents_N, latents)
    assert torch.allclose(sel.values_N.detach(), pre.detach()[rows, latents], atol=1e-12)
    counts = torch.bincount(rows, minlength=7)
    assert torch.equal(sel.offsets_B, torch.cumsum(counts, 0) - counts)
    for name, p in sae.named_parameters():
        assert torch.allclose(p.grad, sparse[name], atol=1e-12), name
        assert p.grad.abs().max() > 0


def test_planted_features_are_recovered_and_l0_is_calibrated(workspace: Path):
    x, true_dirs = planted(24_000)
    write_store(workspace, x)
    out = run(tiny_params(sae=SAE))
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["scaling"]) == (D_IN, 96, 3, "per_component")
    from safetensors.torch import load_file

    W_dec = load_file(str(out / "sae.safetensors"))["W_dec_FD"]
    cos = torch.nn.functional.normalize(true_dirs, dim=1) @ torch.nn.functional.normalize(W_dec, dim=1).T
    matched = (cos.max(1).values >= 0.9).float().mean()
    assert matched >= 0.8, f"only {matched:.0%} of the planted directions found"
    metrics = json.loads((workspace / "metrics/sae.json").read_text())
    assert abs(metrics["l0_calibrated"] - 3) <= 0.3  # evaluation documents, not the calibration ones
    assert metrics["fvu"] < 0.15 and set(metrics["fvu_by_type"]) == {
        "q_proj",
        "k_proj",
        "gate_proj",
        "down_proj",
    }
    assert set(metrics["fvu_by_layer"]) == {f"L{i}" for i in range(6)}
    alive = json.loads((out / "alive.json").read_text())["alive_latents"]
    assert len(alive) == metrics["alive_latents"] >= matched * N_TRUE  # a live latent per found direction


def test_saved_weights_encode_raw_inputs(workspace: Path):
    """Scaling is folded in: the saved SAE on x equals the trained SAE on x / scale."""
    x, _ = planted(2_000)
    write_store(workspace, x)
    store = Store.open(workspace / "data/activations/lora")
    cfg = SaeSection(**{**SAE, "epochs": 1})
    trainer = Trainer(store, heldout_documents(store, 0.1), cfg)
    trainer.run()
    norms = trainer.sae.W_dec_FD.norm(dim=1)  # the training constraint: unit decoder rows
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    trainer.sae.threshold.fill_(0.2)
    raw = fold(trainer.sae, trainer.scale_D)
    scaled_f = trainer.sae.encode(x / trainer.scale_D)
    assert (scaled_f > 0).any() and torch.allclose(raw.encode(x), scaled_f, atol=1e-5)
    assert torch.allclose(raw.decode(scaled_f), trainer.sae.decode(scaled_f) * trainer.scale_D, atol=1e-4)
    assert torch.allclose(trainer.scale_D, x[: len(x)].square().mean(0).sqrt(), rtol=0.1)


def test_decoder_rows_learn_at_their_own_rate(workspace: Path):
    """``decoder_lr_scale``: W_dec is in its own Adam group at lr x scale, every other parameter at lr; the
    first step (Adam moves each weight by about its lr) moves the decoder rows ~scale x as far as at 1."""
    x, _ = planted(2_000)
    write_store(workspace, x)
    store = Store.open(workspace / "data/activations/lora")
    moved = {}
    for scale in (1.0, 10.0):
        cfg = SaeSection(**{**SAE, "epochs": 1, "decoder_lr_scale": scale, "warmup_ratio": 0.0})
        trainer = Trainer(store, heldout_documents(store, 0.1), cfg)
        rest, decoder = trainer.opt.param_groups
        assert len(decoder["params"]) == 1 and decoder["params"][0] is trainer.sae.W_dec_FD
        assert decoder["initial_lr"] == cfg.lr * scale and rest["initial_lr"] == cfg.lr
        assert all(p is not trainer.sae.W_dec_FD for p in rest["params"])
        assert len(rest["params"]) == len(list(trainer.sae.parameters())) - 1
        before = trainer.sae.W_dec_FD.detach().clone()
        trainer.plan.steps = 1
        trainer.run()
        moved[scale] = float((trainer.sae.W_dec_FD.detach() - before).norm())
    assert 5 < moved[10.0] / moved[1.0] < 11  # unit-norm rows: a larger step turns them a little less


def test_fvu_overall_by_layer_and_type_against_numpy(workspace: Path):
    """metrics/sae.json against a direct numpy computation from the saved weights on the evaluation
    documents (the odd-numbered held-out ones, chosen here by the documented hash): FVU = sum of squared
    errors / sum of squared deviations from the *mean* (the data sit far from zero, so an uncentred
    variance would be far off), pooled, per component, per layer and per matrix type; L0 at the threshold."""
    import hashlib

    import numpy as np
    from safetensors.numpy import load_file

    x, _ = planted(4_000, seed=7)
    x = x + torch.linspace(-20.0, 30.0, D_IN)  # per-component means much larger than the spread
    write_store(workspace, x)
    run(tiny_params(sae={**SAE, "epochs": 6, "heldout_fraction": 0.2}))  # tied init: FVU < 1 needs ~70 steps
    metrics = json.loads((workspace / "metrics/sae.json").read_text())

    cut = int(0.2 * 2**32)
    held = [
        i for i in range(20) if int.from_bytes(hashlib.sha1(f"doc{i}".encode()).digest()[:4], "big") < cut
    ]
    assert held == [0, 8, 9, 11, 12, 13, 14]
    X = np.concatenate([x[i * 200 : (i + 1) * 200].numpy() for i in held[1::2]]).astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in load_file(str(workspace / "models/sae/sae.safetensors")).items()}
    pre = np.maximum((X - w["b_dec_D"]) @ w["W_enc_DF"] + w["b_enc_F"], 0.0)
    f = np.where(pre > float(w["threshold"]), pre, 0.0)
    err_D = ((f @ w["W_dec_FD"] + w["b_dec_D"] - X) ** 2).sum(0)
    var_D = ((X - X.mean(0)) ** 2).sum(0)
    assert metrics["eval_tokens"] == len(X) == 600
    assert metrics["l0_calibrated"] == pytest.approx((f > 0).sum(1).mean(), abs=0.02)
    assert metrics["fvu"] == pytest.approx(err_D.sum() / var_D.sum(), rel=1e-3)
    assert metrics["fvu_mean_component"] == pytest.approx((err_D / var_D).mean(), rel=1e-3)
    kinds = ["q_proj", "k_proj", "gate_proj", "down_proj"]
    for n in range(6):
        cols = [n * 4 + j for j in range(4)]
        assert metrics["fvu_by_layer"][f"L{n}"] == pytest.approx(
            err_D[cols].sum() / var_D[cols].sum(), rel=1e-3
        )
    for j, kind in enumerate(kinds):
        cols = [n * 4 + j for n in range(6)]
        assert metrics["fvu_by_type"][kind] == pytest.approx(err_D[cols].sum() / var_D[cols].sum(), rel=1e-3)
    assert set(metrics["fvu_by_type"]) == set(kinds) and set(metrics["fvu_by_layer"]) == {
        f"L{n}" for n in range(6)
    }
    assert 0 < metrics["fvu"] < 1  # the SAE explains something; an uncentred variance gives ~1e-3 here


def test_fvu_in_raw_and_normalised_units_against_numpy(workspace: Path):
    """Globally scaled training: metrics/sae.json's normalised FVU (overall, by layer, by type) is the
    FVU in per-component RMS units of the training tokens, where the raw one is dominated by the
    largest components; both recomputed here from the saved weights."""
    import numpy as np
    from safetensors.numpy import load_file

    x, _ = planted(4_000, seed=3)
    x = x * torch.logspace(0, 2, D_IN)  # scales 10 x 100 apart: raw and normalised FVU differ
    write_store(workspace, x)
    run(tiny_params(sae={**SAE, "scaling": "global", "heldout_fraction": 0.2}))
    metrics = json.loads((workspace / "metrics/sae.json").read_text())
    held = held_out_docs(20, 0.2)
    docs = np.arange(4_000) // 200
    X = x.numpy().astype(np.float64)
    rms_D = np.sqrt((X[~np.isin(docs, held)] ** 2).mean(0))
    E = X[np.isin(docs, held[1::2])]
    w = {k: v.astype(np.float64) for k, v in load_file(str(workspace / "models/sae/sae.safetensors")).items()}
    pre = np.maximum((E - w["b_dec_D"]) @ w["W_enc_DF"] + w["b_enc_F"], 0.0)
    f = np.where(pre > float(w["threshold"]), pre, 0.0)
    err_D = ((f @ w["W_dec_FD"] + w["b_dec_D"] - E) ** 2).sum(0)
    var_D = ((E - E.mean(0)) ** 2).sum(0)
    assert metrics["fvu"] == pytest.approx(err_D.sum() / var_D.sum(), rel=1e-3)
    norm_err, norm_var = err_D / rms_D**2, var_D / rms_D**2
    assert metrics["fvu_normalised"] == pytest.approx(norm_err.sum() / norm_var.sum(), rel=1e-3)
    for j, kind in enumerate(["q_proj", "k_proj", "gate_proj", "down_proj"]):
        cols = [n * 4 + j for n in range(6)]
        got = metrics["fvu_normalised_by_type"][kind]
        assert got == pytest.approx(norm_err[cols].sum() / norm_var[cols].sum(), rel=1e-3)
    for n in range(6):
        cols = list(range(n * 4, n * 4 + 4))
        got = metrics["fvu_normalised_by_layer"][f"L{n}"]
        assert got == pytest.approx(norm_err[cols].sum() / norm_var[cols].sum(), rel=1e-3)
    assert abs(metrics["fvu_normalised"] - metrics["fvu"]) > 0.05  # the units matter here


def test_geometric_median_ignores_outliers():
    from lorascope.sae.data import geometric_median

    points = torch.cat(
        [torch.randn(99, 3, generator=torch.Generator().manual_seed(0)) * 0.1, torch.full((1, 3), 1e3)]
    )
    assert points.mean(0).norm() > 5 and geometric_median(points).norm() < 0.1


def test_auxk_revives_dead_latents(workspace: Path):
    """As many latents as planted directions, half of them too weak at the start (a bad init: their
    encoder columns x 0.05) to ever win the batch top-k: without AuxK they stay dead and the directions
    they should cover go unexplained; with it they come back. Alive as the stage counts it (fired on
    the held-out evaluation tokens at the calibrated threshold, or within the last dead window)."""
    from lorascope.sae.train import calibrate, evaluate, heldout_batches

    x, _ = planted(8_000)
    write_store(workspace, x)
    store = Store.open(workspace / "data/activations/lora")
    held = heldout_documents(store, 0.1)
    alive, fvu = {}, {}
    for coef in (0.0, 1.0):
        cfg = SaeSection(**{**SAE, "expansion": 2, "epochs": 10, "aux_coef": coef, "dead_fraction": 0.1})
        trainer = Trainer(store, held, cfg)
        assert trainer.plan.d_sae == N_TRUE
        with torch.no_grad():
            trainer.sae.W_enc_DF[:, ::2] *= 0.05
        weak = torch.arange(N_TRUE) % 2 == 0
        trainer.run()
        raw = fold(trainer.sae, trainer.scale_D)
        raw.threshold.fill_(calibrate(raw, heldout_batches(store, held, 0, 10**6), cfg.k)[0])
        ev = evaluate(raw, heldout_batches(store, held, 1, 10**6))
        alive_F = ev["fired_F"] | (trainer.since_fired_F < trainer.plan.dead_window)
        alive[coef] = (int(alive_F[weak].sum()), int(alive_F[~weak].sum()))
        fvu[coef] = float(ev["err_D"].sum() / ev["var_D"].sum())
    assert alive[0.0][0] <= 2 and alive[0.0][1] >= N_TRUE // 2 - 2  # the weak half stays dead
    assert alive[1.0][0] >= N_TRUE // 2 - 4 and alive[1.0][1] >= N_TRUE // 2 - 2  # AuxK revives it
    assert fvu[1.0] < 0.8 * fvu[0.0]  # and the revived latents explain what the dead ones left


def test_kill_and_resume_gives_the_same_weights(workspace: Path):
    from safetensors.torch import load_file

    x, _ = planted(6_000)
    write_store(workspace, x)
    params = tiny_params(sae={**SAE, "epochs": 2, "checkpoint_steps": 10})
    reference = load_file(str(run(params) / "sae.safetensors"))

    def kill(step, metrics):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(params, on_step=kill)
    steps = []
    resumed = load_file(str(run(params, on_step=lambda s, m: steps.append(s)) / "sae.safetensors"))
    assert steps[0] == 21  # from the checkpoint at step 20
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    sae_run = tracking.client().get_run(run_of(workspace, "models/sae"))
    store = Store.open(workspace / "data/activations/lora")
    plan = Trainer(store, heldout_documents(store, 0.1), params.sae).plan
    assert {k: sae_run.data.params[k] for k in ("d_in", "d_sae", "steps", "dead_window_tokens", "train_tokens")} == {
        "d_in": str(D_IN), "d_sae": str(params.sae.expansion * D_IN), "steps": str(plan.steps),
        "dead_window_tokens": str(plan.dead_window), "train_tokens": str(plan.train_tokens),
    }  # fmt: skip
    assert sae_run.data.params["resumed_from_step"] == "20"
    # every 10th step's training metrics and the last step's, at their step: the resumed run's from step 21 on
    history = tracking.client().get_metric_history(sae_run.info.run_id, "train_dead_latents")
    assert sorted(m.step for m in history) == sorted({*range(30, plan.steps + 1, 10), plan.steps})


def test_splice_of_the_recorded_state_changes_nothing(with_prepared: Path):
    """Downstream check on the tiny model: splicing the stored values back is (almost) the LoRA
    itself; splicing the SAE reconstruction recovers most of the LoRA's effect."""
    from lorascope.extract.stage import run as extract
    from lorascope.sae.downstream import splice_kl

    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    store = Store.open(extract(tiny_params(extract={"dtype": "float32"}), "lora"))
    identity = splice_kl(
        with_prepared / "models/base", with_prepared / "models/lora", store, [0, 1], lambda a: a
    )
    # float32 recomputation noise only: a millionth of the adapter's own effect (zero splice: all of it)
    assert identity["kl_lora_base"] > 1e-3 and identity["kl_lora_spliced"] < 1e-5 * identity["kl_lora_base"]
    zero = splice_kl(
        with_prepared / "models/base",
        with_prepared / "models/lora",
        store,
        [0, 1],
        lambda a: torch.zeros_like(a),
    )
    assert zero["kl_lora_spliced"] == pytest.approx(
        zero["kl_lora_base"], rel=1e-4
    )  # x.A = 0 is the base model
    out = run(tiny_params())
    metrics = json.loads((with_prepared / "metrics/sae.json").read_text())
    assert 0 < metrics["lora_effect_recovered"] <= 1 and metrics["kl_tokens"] > 0
    import pyarrow.parquet as pq

    from lorascope.contexts.stage import run as contexts

    table = pq.read_table(contexts(tiny_params(), "sae")).to_pandas()
    assert table.feature_name.iloc[0].startswith("sae.") and (table[table.kind == "top"].activation > 0).all()
    sae_run = tracking.client().get_run(run_of(with_prepared, "models/sae"))
    assert sae_run.data.tags["upstream.extract"] == run_of(with_prepared, "data/activations/lora")
    metrics_md5 = tracking.dvc_md5(with_prepared / "metrics/sae.json")
    assert sae_run.data.tags["dvc.out.metrics/sae.json"] == metrics_md5
    assert "run_id" not in json.loads((out / "cfg.json").read_text()) and not (out / "run.json").exists()


def test_saelens_export_loads_and_encodes_identically(workspace: Path, tmp_path: Path):
    from sae_lens import SAE as SaeLens

    from lorascope.sae.load import load_sae

    x, _ = planted(3_000)
    write_store(workspace, x)
    run(tiny_params(sae={**SAE, "epochs": 1}))
    shutil.copy(REPO / "params.yaml", workspace)
    res = cli("sae", "export", "--format", "saelens", "--output", str(tmp_path / "lens"), cwd=workspace)
    assert res.returncode == 0, res.stderr
    theirs = SaeLens.load_from_disk(str(tmp_path / "lens"))
    ours, cfg = load_sae(workspace / "models/sae")
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x[:500]), theirs.encode(x[:500])
        assert (f_ours > 0).sum(1).float().mean() == pytest.approx(3, rel=0.3)
        assert torch.equal(f_ours > 0, f_theirs > 0) and torch.allclose(f_ours, f_theirs, atol=1e-5)
        assert torch.allclose(ours.decode(f_ours), theirs.decode(f_theirs), atol=1e-5)
    res = cli("sae", "export", "--format", "onnx", "--output", str(tmp_path / "x"), cwd=workspace)
    assert (
        res.returncode == 2
        and res.stderr == "error: --format: unknown export format 'onnx' (expected one of: saelens)\n"
    )


# ------------------------------------------------------------------------------------- bad input
def test_bad_input(workspace: Path):
    with pytest.raises(
        LorascopeError, match="no activation store .* run `lorascope extract --source lora` first"
    ):
        run(tiny_params(sae=SAE))
    x, _ = planted(2_000)
    x[1234, 5] = float("nan")
    x[1500, 0] = float("inf")
    write_store(workspace, x)
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(sae=SAE))
    assert str(e.value) == (
        f"{workspace}/data/activations/lora/shard-00000.safetensors: 2 training tokens with NaN/inf activations "
        "(first: document doc6 token 34); set sae.drop_nonfinite: true to skip them"
    )
    run(tiny_params(sae={**SAE, "drop_nonfinite": True, "epochs": 1}))
    assert json.loads((workspace / "metrics/sae.json").read_text())["nonfinite_tokens_dropped"] >= 1
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(sae={**SAE, "k": 96}))
    assert str(e.value) == "sae.k: must be < d_sae = expansion x d_in = 4 x 24 = 96, got 96"
    from lorascope.config import validate_params

    with pytest.raises(LorascopeError, match="sae.expansion: must be > 0, got 0"):
        validate_params({"sae": {"expansion": 0}}, "params.yaml")


# -------------------------------------------------------------------------------- outlier tokens
def sinks_and_specials(tokens: int = 6_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planted data whose documents open with an attention sink (x 1000) and hold 40 special tokens
    (id 3, x 300) elsewhere: ``(x, ids, first_T, special_T)``."""
    x, _ = planted(tokens)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(10, 50, (tokens,), generator=g, dtype=torch.int32)
    first_T = torch.arange(tokens) % 200 == 0
    special_T = torch.zeros(tokens, dtype=torch.bool)
    special_T[
        torch.tensor([t for t in range(tokens) if t % 200])[
            torch.randperm(tokens - tokens // 200, generator=g)[:40]
        ]
    ] = True
    x[first_T] *= 1000
    x[special_T] *= 300
    ids[special_T] = 3
    return x, ids, first_T, special_T


def held_out_docs(n_docs: int, fraction: float) -> list[int]:
    """The documented split: a document is held out when the first 4 bytes of sha1(doc id) < fraction x 2^32."""
    import hashlib

    cut = int(fraction * 2**32)
    return [
        i for i in range(n_docs) if int.from_bytes(hashlib.sha1(f"doc{i}".encode()).digest()[:4], "big") < cut
    ]


def test_outlier_tokens_are_left_out_of_training_and_evaluation_and_counted(workspace: Path):
    x, ids, first_T, special_T = sinks_and_specials()
    write_store(workspace, x, ids_T=ids, special=[3])
    held = held_out_docs(30, 0.1)
    doc_T = torch.arange(6_000) // 200
    train_T = ~torch.isin(doc_T, torch.tensor(held))
    out_T = first_T | special_T
    params = tiny_params(sae={**SAE, "epochs": 1, "exclude": {}})  # the default policy
    out = run(params)
    metrics = json.loads((workspace / "metrics/sae.json").read_text())
    assert (metrics["excluded_tokens"], metrics["excluded_first_position"], metrics["excluded_special_tokens"],
            metrics["excluded_norm"]) == (70, 30, 40, 0)  # fmt: skip
    # the scale is the RMS of the kept training tokens: one outlier left in would multiply it
    kept = x[train_T & ~out_T].double()
    scale = torch.tensor(json.loads((out / "cfg.json").read_text())["scale"], dtype=torch.float64)
    assert torch.allclose(scale, kept.square().mean(0).sqrt(), rtol=1e-5)
    assert (x[train_T].double().square().mean(0).sqrt() > 10 * scale).all()
    eval_docs = torch.tensor(held[1::2])
    assert metrics["eval_tokens"] == int((torch.isin(doc_T, eval_docs) & ~out_T).sum())
    # the threshold is calibrated on the kept tokens of the other held-out half, under the same policy
    cal_T = torch.isin(doc_T, torch.tensor(held[0::2])) & ~out_T
    assert metrics["calibration_tokens"] == int(cal_T.sum()) < params.sae.calibration_tokens
    from safetensors.torch import load_file

    w = load_file(str(out / "sae.safetensors"))  # folded: it encodes raw inputs
    pre = torch.relu(
        (x[cal_T].double() - w["b_dec_D"].double()) @ w["W_enc_DF"].double() + w["b_enc_F"].double()
    )
    by_hand = pre.flatten().topk(params.sae.k * int(cal_T.sum())).values.min()
    assert metrics["threshold"] == pytest.approx(float(by_hand), rel=1e-5)
    # every training batch of an epoch: kept tokens only
    store = Store.open(workspace / "data/activations/lora")
    trainer = Trainer(store, heldout_documents(store, 0.1), params.sae)
    assert trainer.stats.tokens == int((train_T & ~out_T).sum())
    batches = iter(trainer.stream)
    seen = torch.cat([next(batches) for _ in range(trainer.stats.tokens // params.sae.batch_size)])
    assert seen.abs().max() < x[~out_T].abs().max() * 1.0001
    # the policy turned off: nothing excluded, and the outliers dominate the scale
    run(tiny_params(sae={**SAE, "epochs": 1, "exclude": {"first_position": False, "special_tokens": False}}))
    off = json.loads((workspace / "metrics/sae.json").read_text())
    assert off["excluded_tokens"] == 0 and off["eval_tokens"] == int(torch.isin(doc_T, eval_docs).sum())
    assert (torch.tensor(json.loads((out / "cfg.json").read_text())["scale"]) > 10 * scale).all()


def test_norm_cut_and_policies_that_leave_nothing(workspace: Path):
    from lorascope.atomic import write_json
    from lorascope.extract import outliers

    x, ids, first_T, special_T = sinks_and_specials()
    store = write_store(workspace, x, ids_T=ids, special=[3])
    rec = outliers.record(store, 100.0, lambda i: [str(t) for t in i])
    write_json(store.root / outliers.FILE, rec)
    norm_T = x.double().norm(dim=1) > 20 * rec["token_norm_median"]
    assert torch.equal(norm_T, first_T | special_T)  # the planted outliers, and only they
    run(tiny_params(sae={**SAE, "epochs": 1, "exclude": {"first_position": False, "special_tokens": False,
                                                          "norm_ratio": 20}}))  # fmt: skip
    metrics = json.loads((workspace / "metrics/sae.json").read_text())
    assert (metrics["excluded_tokens"], metrics["excluded_norm"], metrics["excluded_first_position"]) == (
        70,
        70,
        0,
    )
    write_json(store.root / outliers.FILE, {**rec, "token_norm_median": 1e-9})  # every token over the cut
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(sae={**SAE, "exclude": {"norm_ratio": 20}}))
    assert str(e.value) == (
        f"sae.exclude: leaves no training tokens in {store.root} (6000 of 6000 excluded: first_position 30, "
        "special_tokens 40, norm 6000)"
    )


def test_a_store_without_special_token_ids_is_a_one_line_error(workspace: Path):
    x, _ = planted(2_000)
    store = write_store(workspace, x)
    index = json.loads((store.root / "index.json").read_text())
    del index["special_token_ids"]
    (store.root / "index.json").write_text(json.dumps(index))
    shutil.copy(REPO / "params.yaml", workspace)
    res = cli("sae", cwd=workspace)
    assert res.returncode == 2 and res.stderr == (
        f"error: sae.exclude.special_tokens: {store.root}/index.json records no special token ids (re-run "
        "`lorascope extract --source lora`, or set sae.exclude.special_tokens: false)\n"
    )
