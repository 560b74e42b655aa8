"""The steer stage: the offset reaches the model as alpha x typical x scaling x B, alpha = 0 is the
unsteered model, the sweep's counts and files, resume, and errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from lorascope.components import feature_names, lora_components
from lorascope.errors import LorascopeError
from lorascope.generation import Generation, count_words, generate, paper_backtrack_pct
from lorascope.steer.directions import lora_direction, resolve, steered

from tests.ablate.test_ablate import peft_model
from tests.conftest import REPO, cli, record_output, run_of, tiny_params

SAE_LATENTS = 6


def features_table(
    path: Path, names: list[str], mean: list[float], std: list[float], nonzero: list[float]
) -> None:
    from lorascope.contexts.stage import FEATURES_SCHEMA

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {
        "feature": list(range(len(names))),
        "feature_name": names,
        "sign": [1] * len(names),
        "max": [1.0] * len(names),
        "density": nonzero,
        "nonzero_density": nonzero,
        "mean": mean,
        "std": std,
        "min": [0.0] * len(names),
        "tokens": [100] * len(names),
    }
    pd.DataFrame(rows).to_parquet(path, index=False, schema=FEATURES_SCHEMA)


def write_labels(root: Path, source: str, rows: list[tuple[int, str, int, str, float | None, str]]) -> None:
    """``data/interp/<source>.parquet`` holding these labels: (feature, name, sign, explanation, detection score,
    status) each, class 1, every other column empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorascope.autointerp.labels import LABEL_COLUMNS

    out = []
    for fid, fname, sign, expl, score, status in rows:
        r = dict.fromkeys(LABEL_COLUMNS)
        r.update(source=source, feature=fid, feature_name=fname, sign=sign, explanation=expl, status=status,
                 classification=1, detection_balanced_accuracy=score)  # fmt: skip
        out.append(r)
    (root / "data/interp").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(out), root / f"data/interp/{source}.parquet")


@pytest.fixture
def steer_workspace(with_prepared: Path) -> Path:
    """A random-B adapter, feature statistics for both sources and a small SAE over its state."""
    from safetensors.torch import save_file

    from lorascope.sae.model import BatchTopKSAE

    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    record_output("finetune", with_prepared, "models/lora")
    names = feature_names(lora_components(peft_model(with_prepared)))
    contexts = with_prepared / "data/contexts"
    n = len(names)
    features_table(contexts / "lora.features.parquet", [f"{x}{s}" for s in "+-" for x in names],
                   [0.3] * 2 * n, [0.4] * 2 * n, [1.0] * 2 * n)  # fmt: skip
    features_table(contexts / "sae.features.parquet", [str(i) for i in range(SAE_LATENTS)],
                   [0.2] * SAE_LATENTS, [0.1] * SAE_LATENTS, [0.5, 0.5, 0.0, 0.5, 0.5, 0.5])  # fmt: skip
    sae = BatchTopKSAE(n, SAE_LATENTS, 2, generator=torch.Generator().manual_seed(0))
    (with_prepared / "models/sae").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in sae.state_dict().items()},
        str(with_prepared / "models/sae/sae.safetensors"),
    )
    cfg = {"d_in": n, "d_sae": SAE_LATENTS, "k": 2, "components": names}
    (with_prepared / "models/sae/cfg.json").write_text(json.dumps(cfg))
    alive = {"alive_latents": [0, 1, 3, 4, 5], "d_sae": SAE_LATENTS}  # latent 2 is dead
    (with_prepared / "models/sae/alive.json").write_text(json.dumps(alive))
    return with_prepared


def module_outputs(model, comps, ids_1T: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    """Each adapted module's output, captured by plain hooks."""
    outs: list[torch.Tensor] = []
    base = model.get_base_model()
    handles = [
        base.get_submodule(c.module).register_forward_hook(lambda _m, _a, o: outs.append(o.clone()))
        for c in comps
    ]
    with torch.no_grad():
        model(input_ids=ids_1T)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("name", ["L1.gate_proj", "sae.3"])
def test_offset_moves_each_module_by_alpha_typical_scaling_b(steer_workspace: Path, name: str):
    """Steering by alpha shifts module c's output by alpha x typical x u_c x scaling x B_c (u: the
    direction over the adapter state), checked one module at a time with the model's real inputs
    fixed (hooks on all modules, so the downstream inputs change too: compare the first steered one)."""
    from safetensors.torch import load_file

    model = peft_model(steer_workspace)
    comps = lora_components(model)
    names = feature_names(comps)
    direction = resolve(name, names, steer_workspace)
    if name.startswith("L"):
        assert direction.typical == pytest.approx(math.sqrt(0.3**2 + 0.4**2))
        assert direction.unit_C.tolist() == [float(n == name) for n in names]
    else:  # mean when active = mean / nonzero density; the decoder row of latent 3
        assert direction.typical == pytest.approx(0.2 / 0.5)
        W_dec = load_file(str(steer_workspace / "models/sae/sae.safetensors"))["W_dec_FD"]
        assert torch.equal(direction.unit_C, W_dec[3])
    ids_1T = torch.arange(5, 30)[None]
    plain = module_outputs(model, comps, ids_1T)
    alpha = 50.0
    with steered(model, comps, direction.offset(alpha)):
        pushed = module_outputs(model, comps, ids_1T)
    first = next(i for i, u in enumerate(direction.unit_C) if u != 0)
    lora_B = model.get_base_model().get_submodule(comps[first].module).lora_B["default"].weight[:, 0]
    scaling = model.get_base_model().get_submodule(comps[first].module).scaling["default"]
    expected = alpha * direction.typical * float(direction.unit_C[first]) * scaling * lora_B
    assert torch.allclose(pushed[first] - plain[first], expected.expand_as(plain[first]), atol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(plain[:first], pushed[:first], strict=True))


def test_every_module_moves_by_its_own_offset_column(steer_workspace: Path):
    """An SAE direction is spread over every component, each at its own scale: under ``steered`` every
    adapted module's output moves by scaling x offset_c x B_c for its own column c, at every position. The
    hooks on all modules change the downstream inputs, so each module's inputs are recorded in the steered
    forward and the module is re-run on them unsteered. Leaving the context removes every hook: the model's
    outputs are the unsteered ones exactly. Float64, so the differences are exact far below the tolerance."""
    model = peft_model(steer_workspace).double()
    base = model.get_base_model()
    comps = lora_components(model)
    offset_C = resolve("sae.3", feature_names(comps), steer_workspace).offset(50.0).double()
    # one column per module (rank 1), all nonzero and distinct: a mixed-up column would show
    assert all(c.width == 1 for c in comps) and len(offset_C) == len(comps)
    assert bool((offset_C != 0).all()) and len(set(offset_C.abs().tolist())) == len(comps)
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.r == 1  # rsLoRA: scaling = alpha / sqrt(r)
    ids_1T = torch.arange(5, 30)[None]
    plain = module_outputs(model, comps, ids_1T)

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) per module, component order
    modules = [base.get_submodule(c.module) for c in comps]
    handles = [
        m.register_forward_hook(lambda _m, a, o: seen.append((a[0].clone(), o.clone()))) for m in modules
    ]
    with steered(model, comps, offset_C), torch.no_grad():
        model(input_ids=ids_1T)
    for h in handles:
        h.remove()
    assert len(seen) == len(comps)
    for comp, module, col, (x, pushed) in zip(comps, modules, offset_C, seen, strict=True):
        scaling = module.scaling["default"]
        assert scaling == pytest.approx(cfg.lora_alpha / math.sqrt(cfg.r))
        lora_B = module.lora_B["default"].weight[:, 0]
        with torch.no_grad():
            unsteered = module(x)
        expected = (scaling * float(col) * lora_B).expand_as(pushed)
        # float64 on one machine, the same input on both sides: the difference carries only the rounding of the
        # two outputs (a few float64 ulps of |output| ~ 1, 1e-15), far below atol; every shift is above 1e-6
        torch.testing.assert_close(pushed - unsteered, expected, rtol=1e-9, atol=1e-12, msg=comp.module)
        assert float(expected.abs().max()) > 1e-6  # the shift is real, not lost under the tolerance

    # the context is left: no hook remains and every module's output is the unsteered one, bit for bit
    assert all(not m.lora_A["default"]._forward_hooks for m in modules)
    after = module_outputs(model, comps, ids_1T)
    assert all(torch.equal(p, q) for p, q in zip(plain, after, strict=True))


def test_alpha_zero_reproduces_unsteered_generation(steer_workspace: Path):
    from lorascope.chat import chat_prompt
    from lorascope.models import load_tokenizer

    model = peft_model(steer_workspace)
    comps = lora_components(model)
    tok = load_tokenizer(steer_workspace / "models/base")
    prompts = [chat_prompt(tok, q) for q in ("What is 2 + 3?", "Compute 7 * 6.", "Is 91 prime?")]
    direction = resolve("L0.v_proj", feature_names(comps), steer_workspace)
    plain = generate(model, tok, prompts, 12, batch_size=2, answer_tokens=4)
    with steered(model, comps, direction.offset(0.0)):
        zero = generate(model, tok, prompts, 12, batch_size=2, answer_tokens=4)
    assert zero == plain and all(12 < g.tokens <= 12 + 1 + 4 for g in plain)  # the random model never stops
    one = generate(
        model, tok, prompts[1:2], 12, batch_size=1, answer_tokens=4
    )  # left padding changes nothing
    assert one[0] == plain[1]


def test_count_words():
    words = ["Wait", "Hmm", "But"]
    assert count_words("Wait, so 3. Hmm... But wait: Waiting is not Wait. BUT no", words) == 4
    assert count_words("", words) == 0 and count_words("Butter and Hmmm", words) == 0


def test_paper_backtrack_count():
    """The paper author's count_patterns: case-insensitive occurrences anywhere, per 100 whitespace words."""
    text = "Wait, so 3. Hmm... wait: Waiting is not it. hmmm"  # 10 words
    assert len(text.split()) == 10
    # Wait: "Wait", "wait", "Wait"(ing) = 3; Hmm: "Hmm", "hmm"(m) = 2
    assert paper_backtrack_pct(text, ["Wait", "Hmm"]) == pytest.approx(100 * 3 / 10 + 100 * 2 / 10)
    assert paper_backtrack_pct("", ["Wait"]) == 0.0 and paper_backtrack_pct("a.b (c)", ["."]) == 50.0


def test_generation_thinks_then_answers_after_the_marker_as_s1_does(steer_workspace: Path):
    """Two phases, as ``evaluate`` decodes: thinking stops at the model's ``<|im_start|>`` and the stage
    writes ``<|im_start|>answer`` itself (a model left to run on writes some other token after
    ``<|im_start|>``, and the grader finds no answer); thinking cut by the budget gets the forced
    ``Final Answer:``. The text keeps the marker (``skip_special_tokens`` would drop it, leaving the grader
    its fallbacks); only the closing ``<|im_end|>`` and the padding are left out."""
    from lorascope.chat import THINK
    from lorascope.evaluate.answers import Extracted, extract
    from lorascope.evaluate.benchmarks import score
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(steer_workspace / "models/base")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    thinking = tok("\nSo 2 + 3 = 5.\n", add_special_tokens=False)["input_ids"]
    # what the scripted model writes after the thinking's <|im_start|>: not "answer" (as the organism does)
    stray = tok("<|im_start|>N\nAnswer: \\boxed{5}", add_special_tokens=False)["input_ids"]
    answer = tok("\nAnswer: \\boxed{5}", add_special_tokens=False)["input_ids"] + [end]
    seen: list[str] = []

    class Scripted(
        torch.nn.Module
    ):  # continues a thinking prompt with thinking + stray, an answer prompt with answer
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **_):  # noqa: ANN001, ANN003, ANN201
            prompt = tok.decode(input_ids[0][attention_mask[0].bool()])
            seen.append(prompt)
            cont = answer if prompt.endswith(("<|im_start|>answer", "Final Answer:")) else thinking + stray
            stop = next((i for i, t in enumerate(cont) if t in eos_token_id), len(cont) - 1)
            pad = tok.pad_token_id if tok.pad_token_id is not None else end
            tail = (cont[: stop + 1] + [pad] * max_new_tokens)[:max_new_tokens]
            return torch.cat([input_ids, torch.tensor([tail] * input_ids.shape[0])], 1)

    prompt = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n" + THINK
    (g,) = generate(Scripted(), tok, [prompt], len(thinking) + 3, 1, answer_tokens=len(answer) + 2)
    reply = "\nSo 2 + 3 = 5.\n<|im_start|>answer\nAnswer: \\boxed{5}"
    assert g == Generation(reply, len(thinking) + 1 + len(answer), True)
    assert seen == [prompt, prompt + "\nSo 2 + 3 = 5.\n<|im_start|>answer"]
    assert score({"kind": "integer", "gold": "5"}, THINK + g.text) == {"exact_match": 1.0, "fallback": 0.0}
    assert extract(THINK + g.text, "integer") == Extracted("5", "boxed")
    # one free run (what the stage did before): the stray token after <|im_start|> leaves no answer marker
    assert score({"kind": "integer", "gold": "5"}, THINK + tok.decode(thinking + stray))["exact_match"] == 0.0

    (cut,) = generate(Scripted(), tok, [prompt], 3, 1, answer_tokens=2)  # budget: thinking cut, answer cut
    head = tok.decode(thinking[:3])
    assert cut.text == head + "\n<|im_start|>answer\nFinal Answer:" + tok.decode(answer[:2])
    assert cut.tokens == 5 and not cut.finished
    skipped = tok.decode(
        thinking + answer, skip_special_tokens=True
    )  # no marker: only the fallbacks are left
    assert extract(THINK + skipped, "integer") != Extracted("5", "boxed")


def test_label_selector_picks_the_best_matching_live_feature(steer_workspace: Path):
    """``label:<regex>``: among ok labels (live SAE latents, LoRA signs) matching the explanation, the best
    detection score wins; a LoRA ``-`` sign steers along -unit; no match / bad regex / no labels: one line."""
    names = feature_names(lora_components(peft_model(steer_workspace)))
    with pytest.raises(LorascopeError, match=r"'label:wait' needs labels"):
        resolve("label:wait", names, steer_workspace)

    write_labels(steer_workspace, "sae", [(2, "sae.2", 1, "backtracking: 'Wait'", 0.99, "ok"),  # dead: never chosen
                   (3, "sae.3", 1, "the word Wait before a re-check", 0.7, "ok"),
                   (4, "sae.4", 1, "digits", 0.95, "ok")])  # fmt: skip
    write_labels(steer_workspace, "lora", [(5, "L0.up_proj-", -1, "WAIT and hesitation", 0.8, "ok"),
                    (6, "L0.down_proj+", 1, "wait (failed row)", 1.0, "failed")])  # fmt: skip
    d = resolve("label:\\bwait\\b", names, steer_workspace)
    assert (d.name, d.selector) == ("L0.up_proj-", "label:\\bwait\\b")
    assert d.unit_C.tolist() == [-float(n == "L0.up_proj") for n in names]
    assert resolve("label:re-check", names, steer_workspace).name == "sae.3"
    with pytest.raises(LorascopeError, match=r"'label:zebra' matches no ok label in .*sae.parquet"):
        resolve("label:zebra", names, steer_workspace)
    with pytest.raises(LorascopeError, match=r"'label:\(': not a regular expression"):
        resolve("label:(", names, steer_workspace)


def test_stage_sweep_tables_runs_and_resume(steer_workspace: Path, monkeypatch: pytest.MonkeyPatch):
    from lorascope import generation, tracking
    from lorascope.steer import stage

    params = tiny_params(
        steer={
            "directions": ["L1.gate_proj", "sae.3"],
            "alphas": [0, 50],
            "limit": 2,
            "max_new_tokens": 6,
            "answer_tokens": 2,
        }
    )
    out = stage.run(params)
    gens = pd.read_parquet(out / "generations.parquet")
    summary = pd.read_parquet(out / "summary.parquet")
    assert len(gens) == 2 * 2 * 2 * 2  # directions x alphas x tasks x rows
    assert list(zip(summary.direction, summary.alpha, strict=True)) == [
        (d, a) for d in ("L1.gate_proj", "sae.3") for a in (0, 50)
    ]
    assert set(gens.task) == {"math500", "aime24_nofigures"} and (gens.tokens <= 6 + 1 + 2).all()
    for _, s in summary.iterrows():
        chosen = gens[(gens.direction == s.direction) & (gens.alpha == s.alpha)]
        words = params.steer.backtrack_words
        recount = sum(count_words(t, words) for t in chosen.output)
        assert (
            chosen.backtracks.sum() == recount
        ) and s.backtracks_per_1k == 1000 * recount / chosen.tokens.sum()
        by_hand = [sum(100 * t.lower().count(w.lower()) / len(t.split()) for w in words) if t.split() else 0.0
                   for t in chosen.output]  # fmt: skip
        assert s.backtrack_pct_words == pytest.approx(sum(by_hand) / len(by_hand))
        assert s.mean_tokens == chosen.tokens.mean() and s.accuracy == chosen.correct.mean()
    unsteered = [
        gens[(gens.direction == d) & (gens.alpha == 0)].output.tolist() for d in ("L1.gate_proj", "sae.3")
    ]
    assert unsteered[0] == unsteered[1]
    for d in ("L1.gate_proj", "sae.3"):  # each direction's offset reaches the generation
        assert gens[(gens.direction == d) & (gens.alpha == 50)].output.tolist() != unsteered[0], d
    metrics = json.loads((steer_workspace / "metrics/steer.json").read_text())
    assert set(metrics["directions"]) == {"L1.gate_proj", "sae.3"} and set(
        metrics["directions"]["sae.3"]
    ) == {"0", "50"}

    assert "run_id" not in metrics
    parent = tracking.client().get_run(run_of(steer_workspace, "metrics/steer.json"))
    assert parent.data.tags["upstream.finetune"] == run_of(steer_workspace, "models/lora")
    assert parent.data.tags["dvc.out.data/steer"] == tracking.dvc_md5(steer_workspace / "data/steer")
    assert not (steer_workspace / "data/steer/run.json").exists()
    children = tracking.client().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["steer.direction"] for c in children) == ["L1.gate_proj", "sae.3"]
    child = next(c for c in children if c.data.tags["steer.direction"] == "sae.3")
    history = tracking.client().get_metric_history(child.info.run_id, "alpha")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.0, 50.0]

    # a re-run generates nothing: every (direction, alpha) is in the checkpoint
    calls = []
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or [])
    again = stage.run(params)
    assert not calls
    assert pd.read_parquet(again / "generations.parquet").equals(gens)


def test_an_sae_latents_magnitude_is_its_own_mean_when_it_fires(steer_workspace: Path):
    """typical = mean / nonzero density of that latent's row of the feature statistics; the direction is its
    decoder row."""
    from lorascope.sae.load import load_sae

    names = feature_names(lora_components(peft_model(steer_workspace)))
    means, nonzero = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.5, 0.25, 0.5, 0.8, 0.1, 0.4]
    features_table(steer_workspace / "data/contexts/sae.features.parquet", [str(i) for i in range(SAE_LATENTS)],
                   means, [0.1] * SAE_LATENTS, nonzero)  # fmt: skip
    sae, _ = load_sae(steer_workspace / "models/sae")
    for latent in (0, 3, 5):
        d = resolve(f"sae.{latent}", names, steer_workspace)
        assert d.typical == pytest.approx(means[latent] / nonzero[latent])
        assert torch.equal(d.unit_C, sae.W_dec_FD.detach()[latent].float())


def test_a_lora_components_magnitude_is_its_own_rms(steer_workspace: Path):
    """typical = sqrt(mean^2 + std^2) of that component's row (both signs' rows hold the same statistics); the
    direction is the unit vector on its column, negated for ``-``; a component the statistics lack is an error."""
    names = feature_names(lora_components(peft_model(steer_workspace)))
    n = len(names)
    mean = [0.01 * (i + 1) for i in range(n)]
    std = [0.1 + 0.05 * i for i in range(n)]
    stats = steer_workspace / "data/contexts/lora.features.parquet"
    features_table(stats, [f"{x}{s}" for s in "+-" for x in names], mean * 2, std * 2, [1.0] * 2 * n)
    for name, sign in (("L1.gate_proj", 1.0), ("L0.k_proj-", -1.0)):
        d = resolve(name, names, steer_workspace)
        i = names.index(name.rstrip("-"))
        assert d.name == name and d.typical == pytest.approx(math.hypot(mean[i], std[i]))
        assert d.unit_C.tolist() == [sign if j == i else 0.0 for j in range(n)]
    features_table(stats, [f"{x}+" for x in names[1:]], mean[1:], std[1:], [1.0] * (n - 1))
    with pytest.raises(
        LorascopeError, match=rf"no statistics for '{names[0]}'; the contexts are older than the adapter"
    ):
        resolve(names[0], names, steer_workspace)


def test_bad_input_is_one_line(steer_workspace: Path):
    env = {"LORASCOPE_ROOT": str(steer_workspace)}
    raw = (REPO / "params.yaml").read_text()
    bad = steer_workspace / "bad.yaml"
    alphas, directions = "  alphas: [0.0, 0.25, 0.5, 1.0, 2.0]\n", "  directions: ['label:Wait']\n"
    assert alphas in raw and directions in raw
    bad.write_text(raw.replace(alphas, "  alphas: []\n", 1))
    res = cli("steer", "--params", str(bad), cwd=steer_workspace, env=env)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: {bad}: steer.alphas: the alpha list is empty; give at least one multiple (e.g. [0, 50])"
    )
    shutil.copy(REPO / "params.yaml", steer_workspace)
    names = feature_names(lora_components(peft_model(steer_workspace)))
    with pytest.raises(LorascopeError) as err:
        resolve("L7.q_proj", names, steer_workspace)
    assert str(err.value) == (
        f"steer.directions: unknown direction 'L7.q_proj' (LoRA components: {', '.join(names[:8])}, ... (14 in all); "
        "or sae.<latent>)"
    )
    stats = steer_workspace / "data/contexts/lora.features.parquet"
    with pytest.raises(LorascopeError) as err:  # a short list is shown whole
        lora_direction("L7.q_proj", names[:2], stats)
    assert str(err.value).endswith(f"(LoRA components: {names[0]}, {names[1]}; or sae.<latent>)")
    for shown, more in ((8, ""), (9, ", ... (9 in all)")):  # up to 8 names are listed whole
        with pytest.raises(LorascopeError) as err:
            lora_direction("L7.q_proj", names[:shown], stats)
        assert str(err.value).endswith(f"(LoRA components: {', '.join(names[:8])}{more}; or sae.<latent>)")
    with pytest.raises(
        LorascopeError, match=r"missing.parquet: feature statistics not found; run `lorascope contexts`"
    ):
        lora_direction(names[0], names, stats.with_name("missing.parquet"))
    with pytest.raises(LorascopeError, match=r"'sae.2' is a dead latent \(not in .*models/sae/alive.json\)"):
        resolve("sae.2", names, steer_workspace)
    for past_the_end in ("sae.9", "sae.6"):
        with pytest.raises(LorascopeError, match=r"'sae.\d': the SAE has latents 0..5"):
            resolve(past_the_end, names, steer_workspace)
    sae_dir = steer_workspace / "models/sae"
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    (sae_dir / "cfg.json").write_text(json.dumps({**cfg, "components": names[::-1]}))
    with pytest.raises(LorascopeError, match=r"models/sae: the SAE was trained on other adapter components"):
        resolve("sae.0", names, steer_workspace)
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    alive = json.loads((sae_dir / "alive.json").read_text())
    (sae_dir / "alive.json").write_text(
        json.dumps({**alive, "d_sae": 7, "alive_latents": [0, 1, 2, 3, 4, 5]})
    )
    with pytest.raises(LorascopeError, match=r"alive.json: does not match the SAE's 6 latents"):
        resolve("sae.0", names, steer_workspace)
    (sae_dir / "alive.json").write_text(json.dumps({**alive, "alive_latents": [0, 1, 2, 3, 4, 5]}))
    with pytest.raises(LorascopeError, match=r"'sae.2' never fires on the store \(a dead latent\)"):
        resolve("sae.2", names, steer_workspace)  # listed alive, but its statistics say it never fired
    stats = steer_workspace / "data/contexts/sae.features.parquet"
    features_table(stats, ["0", "1"], [0.2] * 2, [0.1] * 2, [0.5] * 2)
    with pytest.raises(LorascopeError, match=r"sae.features.parquet: no statistics for 'sae.4'; re-run"):
        resolve("sae.4", names, steer_workspace)
    bad.write_text(raw.replace(directions, "  directions: [L1.nope]\n", 1))
    res = cli("steer", "--params", str(bad), cwd=steer_workspace, env=env)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        "error: steer.directions: unknown direction 'L1.nope'"
    )
    assert not (steer_workspace / "data/steer").exists()


def test_a_selector_no_label_matches_is_recorded_and_steers_nothing(steer_workspace: Path, capfd):
    """No label matching ``label:`` is a finding about the labels, not bad input: the stage steers the other
    directions, records the selector under ``unmatched`` (no absolute path: a DVC output) and exits 0."""
    from lorascope.steer import stage

    write_labels(steer_workspace, "lora", [(0, "L0.q_proj+", 1, "digits", 0.9, "ok")])
    params = tiny_params(
        steer={"directions": ["label:Wait", "L1.gate_proj"], "alphas": [0], "limit": 1, "max_new_tokens": 2}
    )
    out = stage.run(params)
    metrics = json.loads((steer_workspace / "metrics/steer.json").read_text())
    assert metrics["unmatched"] == {"label:Wait": "no ok label of lora.parquet matches it"}
    assert metrics["selectors"] == {} and set(metrics["directions"]) == {"L1.gate_proj"}
    assert set(pd.read_parquet(out / "generations.parquet").direction) == {"L1.gate_proj"}
    assert "'label:Wait' matches no ok label in" in capfd.readouterr().err


def test_summary_counts_by_hand():
    """Backtracks pooled per 1000 generated tokens, the other columns means over the prompts."""
    from lorascope.steer.stage import summarize

    rows = [
        {"tokens": 40, "backtracks": 2, "backtrack_pct_words": 5.0, "correct": True, "finished": True},
        {"tokens": 60, "backtracks": 1, "backtrack_pct_words": 1.0, "correct": False, "finished": False},
        {"tokens": 100, "backtracks": 0, "backtrack_pct_words": 0.0, "correct": True, "finished": False},
    ]
    assert summarize(rows) == {
        "backtracks_per_1k": 15.0,  # 1000 x 3 / 200
        "backtrack_pct_words": 2.0,
        "mean_tokens": 200 / 3,
        "accuracy": 2 / 3,
        "finished": 1 / 3,
        "generated_tokens": 200.0,
    }
    one = {"tokens": 1, "backtracks": 1, "backtrack_pct_words": 100.0, "correct": False, "finished": True}
    assert summarize([one])["backtracks_per_1k"] == 1000.0
    assert summarize([{**one, "tokens": 0, "backtracks": 0}])["backtracks_per_1k"] == 0.0  # nothing generated


def test_the_runs_inputs_follow_what_is_steered(steer_workspace: Path):
    """DVC deps of the run: the model, the LoRA statistics, the SAE only when a latent is steered, the label
    sets that exist only when a direction is chosen by label, and each task's local question file."""
    from lorascope.steer import stage

    root = steer_workspace
    names = feature_names(lora_components(peft_model(root)))
    params = tiny_params(steer={"directions": ["L1.gate_proj"]})
    base = [root / "models/base", root / "models/lora", root / "data/contexts/lora.features.parquet"]
    data = sorted({root / params.evaluate.data[t] for t in params.steer.tasks})
    assert len(data) == len(params.steer.tasks) == 2
    lora = [resolve("L1.gate_proj", names, root)]
    assert stage._inputs(params, root, lora) == base + data
    sae_deps = [root / "models/sae", root / "data/contexts/sae.features.parquet"]
    assert stage._inputs(params, root, [*lora, resolve("sae.3", names, root)]) == base + sae_deps + data

    (root / "data/interp").mkdir(parents=True)
    (root / "data/interp/lora.parquet").write_bytes(b"")  # only its presence counts here
    by_label = tiny_params(steer={"directions": ["label:anything", "L1.gate_proj"]})
    assert stage._inputs(by_label, root, lora) == base + [root / "data/interp/lora.parquet"] + data
    (root / "data/interp/sae.parquet").write_bytes(b"")
    assert stage._inputs(by_label, root, lora) == base + [
        root / "data/interp/lora.parquet", root / "data/interp/sae.parquet"
    ] + data  # fmt: skip
    assert stage._inputs(params, root, lora) == base + data  # named directions read no labels

    one_task = tiny_params(steer={"directions": ["L1.gate_proj"], "tasks": ["math500"]})
    assert stage._inputs(one_task, root, lora) == base + [root / one_task.evaluate.data["math500"]]


def test_a_prompt_set_without_rows_names_steer_tasks(steer_workspace: Path):
    from lorascope.steer.stage import prompt_rows

    eval_dir = steer_workspace / "data/prepared/eval"
    (eval_dir / "unanswered.jsonl").write_text('{"problem": "What is 2 + 3?", "answer": ""}\n')
    params = tiny_params(
        steer={"tasks": ["math500"]}, evaluate={"data": {"math500": "data/prepared/eval/unanswered.jsonl"}}
    )
    with pytest.raises(LorascopeError, match=r"^steer\.tasks: no rows with an answer in math500$"):
        prompt_rows(params)


def test_each_generation_row_carries_its_question_and_its_grade(
    steer_workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    """With the generations scripted (right answer and one "Wait" on even rows, wrong on odd ones), every
    row keeps its task, row, question and gold, is graded by the benchmark's grader; the summary,
    ``metrics/steer.json`` and each direction's MLflow run hold one point per (direction, alpha) with the
    counts of those rows, and the run of a direction chosen by label says which selector chose it."""
    from lorascope import generation, tracking
    from lorascope.steer import stage

    write_labels(steer_workspace, "sae", [(3, "sae.3", 1, "a re-check", 0.7, "ok")])
    params = tiny_params(steer={"directions": ["L1.gate_proj", "label:check"], "alphas": [0, 2], "limit": 2})
    rows = stage.prompt_rows(params)
    calls = []  # one generate call per (direction, alpha), in that order; row i of call c: 10 + i + c tokens

    def scripted(_model, _tok, prompts, *_args, **_kw):  # noqa: ANN001, ANN202
        assert len(prompts) == len(rows)
        calls.append(len(calls))
        return [
            generation.Generation(
                f"Wait, yes.\n<|im_start|>answer\nAnswer: \\boxed{{{r['gold']}}}" if i % 2 == 0
                else "<|im_start|>answer\nAnswer: \\boxed{nothing}",
                10 + i + calls[-1], i % 2 == 0,
            )
            for i, r in enumerate(rows)
        ]  # fmt: skip

    monkeypatch.setattr(generation, "generate", scripted)
    out = stage.run(params)
    gens = pd.read_parquet(out / "generations.parquet")
    for direction in ("L1.gate_proj", "sae.3"):
        for alpha in (0, 2):
            got = gens[(gens.direction == direction) & (gens.alpha == alpha)].reset_index(drop=True)
            assert got[["task", "row", "question", "gold"]].to_dict("records") == [
                {k: r[k] for k in ("task", "row", "question", "gold")} for r in rows
            ]
            assert got.correct.tolist() == [i % 2 == 0 for i in range(len(rows))]
            assert got.backtracks.tolist() == [1 - i % 2 for i in range(len(rows))]
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(zip(summary.direction, summary.alpha, strict=True)) == [
        ("L1.gate_proj", 0), ("L1.gate_proj", 2), ("sae.3", 0), ("sae.3", 2)
    ]  # fmt: skip
    assert calls == [0, 1, 2, 3]

    def point(call: int) -> dict[str, float]:
        tokens = sum(10 + i + call for i in range(len(rows)))
        return {
            "backtracks_per_1k": 1000 * 2 / tokens,
            "backtrack_pct_words": (20 + 0 + 20 + 0) / 4,  # 1 "Wait" in 5 words
            "mean_tokens": tokens / 4,
            "accuracy": 0.5,
        }

    assert summary[list(point(0))].to_dict("records") == [point(c) for c in range(4)]
    assert summary.finished.tolist() == [0.5] * 4
    metrics = json.loads((steer_workspace / "metrics/steer.json").read_text())
    assert metrics["backtrack_words"] == ["Wait", "Hmm"]
    assert metrics["backtrack_counts"] == stage.BACKTRACK_COUNTS
    assert metrics["prompts"] == len(rows) == 4 and metrics["unmatched"] == {}
    assert metrics["selectors"] == {"label:check": "sae.3"}
    assert metrics["directions"] == {
        "L1.gate_proj": {"0": point(0), "2": point(1)}, "sae.3": {"0": point(2), "2": point(3)}
    }  # fmt: skip

    checkpoints = sorted(p.name for p in (steer_workspace / "checkpoints/steer").iterdir())
    assert checkpoints == [
        f"{d}@{a}.{stage.CHECKPOINT_VERSION}.json" for d in ("L1.gate_proj", "sae.3") for a in (0, 2)
    ]
    parent = tracking.client().get_run(run_of(steer_workspace, "metrics/steer.json"))
    assert parent.data.params["prompts"] == "4"
    children = tracking.client().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    typical = {d.name: d.typical for d in stage._directions(params.steer, feature_names(lora_components(
        peft_model(steer_workspace))), steer_workspace)[0]}  # fmt: skip
    assert sorted(c.info.run_name for c in children) == ["L1.gate_proj", "sae.3"]
    for child in children:
        name = child.info.run_name
        assert {k: child.data.tags[k] for k in ("lorascope.stage", "steer.direction", "upstream.steer")} == {
            "lorascope.stage": "steer", "steer.direction": name, "upstream.steer": parent.info.run_id
        }  # fmt: skip
        assert child.data.params == {
            "direction": name, "typical": str(typical[name]), "alphas": str(params.steer.alphas),
            "selector": "label:check" if name == "sae.3" else "",
        }  # fmt: skip
        assert set(child.data.metrics) == {"alpha", *point(0), "finished", "generated_tokens"}  # not typical
        own = (0, 1) if name == "L1.gate_proj" else (2, 3)
        for key, values in (
            ("alpha", [0.0, 2.0]),
            ("backtracks_per_1k", [point(c)["backtracks_per_1k"] for c in own]),
        ):
            history = tracking.client().get_metric_history(child.info.run_id, key)
            assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(
                enumerate(values)
            )
        assert [a.path for a in tracking.client().list_artifacts(child.info.run_id)] == ["sweep.json"]
        table = json.loads(
            Path(tracking.client().download_artifacts(child.info.run_id, "sweep.json")).read_text()
        )
        rows_ = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
        assert [(r["direction"], r["alpha"], r["accuracy"]) for r in rows_] == [
            (name, 0, 0.5),
            (name, 2, 0.5),
        ]


def test_the_stage_loads_the_model_as_its_section_says(
    steer_workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    """``steer.precision`` and ``steer.device`` reach the model (bfloat16 weights, the adapter in float32) and
    name themselves in their errors; an empty direction list is a one-line error."""
    from lorascope import generation
    from lorascope.steer import stage

    seen = []

    def scripted(model, _tok, prompts, *_args, **_kw):  # noqa: ANN001, ANN202
        seen.append({p.dtype for n, p in model.named_parameters() if "lora_" not in n})
        seen.append({p.dtype for n, p in model.named_parameters() if "lora_" in n})
        return [generation.Generation("x", 1, True) for _ in prompts]

    monkeypatch.setattr(generation, "generate", scripted)
    stage.run(
        tiny_params(
            steer={"directions": ["L1.gate_proj"], "alphas": [0], "limit": 1, "precision": "bfloat16"}
        )
    )
    assert seen == [{torch.bfloat16}, {torch.float32}]
    with pytest.raises(LorascopeError, match=r"^steer\.device: 'cuda:99' (asks for a CUDA GPU|but only)"):
        stage.run(tiny_params(steer={"directions": ["L1.gate_proj"], "device": "cuda:99"}))
    with pytest.raises(LorascopeError) as err:
        stage.run(tiny_params(steer={"directions": []}))
    assert str(err.value) == "steer.directions: empty; name at least one (L<layer>.<type> or sae.<latent>)"


def test_one_direction_named_twice_is_one_line(steer_workspace: Path):
    """By name twice, or by name and by a label that chose it: which entries collide, and what they are."""
    from lorascope.steer import stage

    write_labels(steer_workspace, "lora", [(0, "L0.q_proj+", 1, "digits", 0.9, "ok")])
    names = feature_names(lora_components(peft_model(steer_workspace)))
    for listed, message in (
        (["L1.gate_proj", "L0.q_proj", "label:digits"], "'L0.q_proj' and 'label:digits' are both L0.q_proj"),
        (["L1.gate_proj", "sae.3", "sae.3"], "'sae.3' and 'sae.3' are both sae.3"),
    ):
        cfg = tiny_params(steer={"directions": listed}).steer
        with pytest.raises(LorascopeError) as err:
            stage._directions(cfg, names, steer_workspace)
        assert str(err.value) == f"steer.directions: {message}; list it once"
    got, unmatched = stage._directions(
        tiny_params(steer={"directions": ["label:digits", "sae.3"]}).steer, names, steer_workspace
    )
    assert [(d.name, d.selector) for d in got] == [
        ("L0.q_proj", "label:digits"),
        ("sae.3", None),
    ] and not unmatched
