"""The attribute stage: exact ablations against independently ablated models, the screen against the exact
effect it integrates, generation with a unit ablated (a component: the model without it; a latent: the
unablated activation of every generated token), the tables, the stage's files, resume and errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lorascope.attribute.hooks import ablated_generation
from lorascope.attribute.measure import exact, screen
from lorascope.attribute.units import Unit, component_units, latent_units
from lorascope.components import lora_components
from lorascope.interventions import State
from lorascope.sae.model import BatchTopKSAE

from tests.ablate.test_ablate import peft_model
from tests.conftest import cli, record_output, run_of, tiny_params, tiny_raw

LATENTS = 6
ALIVE = [0, 1, 3, 4, 5]  # latent 2 is dead


def strong(model, factor: float = 60):  # noqa: ANN001, ANN201
    """The random test adapter's B is tiny (the model stays at the base's scale); ablations need effects."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(factor)
    return model


def small_sae(n: int, gain: float = 3.0) -> BatchTopKSAE:
    sae = BatchTopKSAE(n, LATENTS, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # latents that fire on most tokens: every ablation below has an effect
        sae.W_enc_DF.mul_(gain)
    return sae.eval().requires_grad_(False)


@pytest.fixture
def attribute_workspace(with_prepared: Path) -> Path:
    """A random adapter, a small SAE over its state (latent 2 dead) and labels naming a "Wait" feature."""
    from safetensors.torch import save_file

    from lorascope.autointerp.labels import LABEL_COLUMNS
    from lorascope.components import feature_names

    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    record_output("finetune", with_prepared, "models/lora")
    names = feature_names(lora_components(peft_model(with_prepared)))
    sae = small_sae(len(names))
    (with_prepared / "models/sae").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in sae.state_dict().items()},
        str(with_prepared / "models/sae/sae.safetensors"),
    )
    cfg = {"d_in": len(names), "d_sae": LATENTS, "k": 2, "components": names}
    (with_prepared / "models/sae/cfg.json").write_text(json.dumps(cfg))
    (with_prepared / "models/sae/alive.json").write_text(
        json.dumps({"alive_latents": ALIVE, "d_sae": LATENTS})
    )
    (with_prepared / "data/interp").mkdir(parents=True)
    for source, rows in (
        ("sae", [(3, "sae.3", 1, "the word Wait before a re-check", 0.7), (4, "sae.4", 1, "digits", 0.9)]),
        ("lora", [(5, "L0.up_proj-", -1, "closing brackets", 0.8)]),
    ):
        out = []
        for fid, fname, sign, expl, score in rows:
            r = dict.fromkeys(LABEL_COLUMNS)
            r.update(source=source, feature=fid, feature_name=fname, sign=sign, explanation=expl, status="ok",
                     classification=1, detection_balanced_accuracy=score)  # fmt: skip
            out.append(r)
        pq.write_table(pa.Table.from_pylist(out), with_prepared / f"data/interp/{source}.parquet")
    return with_prepared


def sequence(root: Path, i: int = 0) -> tuple[torch.Tensor, int]:
    from lorascope.prepare import table

    _, ids, first = table.sample(root / "data/prepared", 2, 96, 0, "attribute.max_tokens")[i]
    return torch.tensor([ids]), first


def ce_kl(
    logits_ref: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, first: int
) -> tuple[float, float]:
    """Summed CE of ``logits`` and KL(P_ref || P) over the response tokens, in float64 (independent code)."""
    lp = logits_ref[0, first - 1 : -1].double().log_softmax(-1)
    lq = logits[0, first - 1 : -1].double().log_softmax(-1)
    labels = ids[0, first:]
    ce = -lq.gather(-1, labels[:, None]).sum()
    return float(ce), float((lp.exp() * (lp - lq)).sum())


def lora_outputs_replaced(model, comps, edit):  # noqa: ANN001, ANN201
    """Plain forward hooks (not the stage's) applying ``edit(k, out)`` to every lora_A output."""
    base = model.get_base_model()
    return [
        base.get_submodule(c.module)
        .lora_A["default"]
        .register_forward_hook(lambda _m, _a, o, k=k: edit(k, o))
        for k, c in enumerate(comps)
    ]


def recorded_state(model, comps, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The adapter state ``[T, C]`` of one unablated forward, read by plain hooks."""
    recorded: dict[int, torch.Tensor] = {}
    handles = lora_outputs_replaced(model, comps, lambda k, o: recorded.__setitem__(k, o.clone()))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return torch.cat([recorded[k][0] for k in range(len(comps))], -1)


def logits_without(model, comps, ids: torch.Tensor, removed_TC: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Logits with ``removed_TC`` added to the adapter state (plain hooks, one component's columns each)."""
    cols = np.cumsum([0] + [c.width for c in comps])
    handles = lora_outputs_replaced(model, comps, lambda k, o: o + removed_TC[None, :, cols[k] : cols[k + 1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    return logits


def test_exact_ablation_matches_independently_ablated_models(attribute_workspace: Path):
    """A component: the same model with that component's lora_B zeroed (a weight edit); a latent: the state
    recorded by plain hooks, its activation from the SAE, its decoded contribution taken off by plain hooks.
    ΔCE and KL per unit, batched three to a forward, agree with both (float32 logits vs float64 sums)."""
    model = strong(peft_model(attribute_workspace))
    comps = lora_components(model)
    sae = small_sae(sum(c.width for c in comps))
    units = component_units(comps)[::3] + latent_units(ALIVE)
    ids, first = sequence(attribute_workspace)
    state = State(model, comps)
    with state.attach():
        delta_ce, kl = exact(state, model, sae, units, ids, first, batch_size=3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ce_lora, _ = ce_kl(ref, ref, ids, first)
        acts_TC = recorded_state(model, comps, ids)
        for u in units:
            if u.kind == "component":
                other = copy.deepcopy(model)
                other.get_base_model().get_submodule(comps[u.index].module).lora_B["default"].weight.zero_()
                logits = other(input_ids=ids).logits
            else:
                f_T = torch.relu((acts_TC - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F)[:, u.index]
                f_T = f_T * (f_T > sae.threshold)
                logits = logits_without(model, comps, ids, -f_T[:, None] * sae.W_dec_FD[u.index])
            ce, want_kl = ce_kl(ref, logits, ids, first)
            # float32 log-softmax summed over ~60 tokens vs float64: measured 3e-5 nats apart on a CE of ~300
            assert delta_ce[u.name] == pytest.approx(ce - ce_lora, abs=1e-3), u
            assert kl[u.name] == pytest.approx(want_kl, rel=1e-4, abs=1e-5), u
            assert abs(ce - ce_lora) > 0.01 or want_kl > 1e-3, u  # every ablation has an effect to compare


def test_the_screen_integrates_each_units_gate_to_its_exact_effect(attribute_workspace: Path):
    """With each unit alone on its path (as many groups as units) and many midpoints, the screen is the
    integral of dCE/dg from as-trained to ablated: the exact ΔCE of every component and latent (the midpoint
    rule's error shrinks as 1/steps^2, and a random model's path has sharp turns: 32 midpoints leave latent 4
    30% off, 128 agree to 1e-3; float64, so the comparison is not float noise). A gate's gradient is
    the finite difference of the CE."""
    model = strong(peft_model(attribute_workspace), 3).double()  # a path smooth enough for 32 midpoints
    comps = lora_components(model)
    sae = small_sae(sum(c.width for c in comps), gain=1.0)
    units = component_units(comps)[::3] + latent_units(ALIVE)  # both kinds, every layer; the rest alike
    ids, first = sequence(attribute_workspace)
    state = State(model, comps)
    with state.attach():
        delta_ce, _ = exact(state, model, sae, units, ids, first, batch_size=8)
        _, fine = screen(state, model, sae, units, ids, first, groups=len(units), steps=128, seed=0)
        _, coarse = screen(state, model, sae, units, ids, first, groups=1, steps=1, seed=0)
        keep, ce = torch.ones(1, len(comps)), []
        for g in (0.5 - 1e-4, 0.5 + 1e-4):  # component 0 alone at g = 0.5 +- h
            keep[0, 0] = g
            with state.changed(keep, None), torch.no_grad():
                logits = model(input_ids=ids).logits
            ce.append(ce_kl(logits, logits, ids, first)[0])
        _, one = screen(state, model, sae, units[:1], ids, first, groups=1, steps=1, seed=0)
    for u, value in zip(units, fine, strict=True):
        assert value == pytest.approx(delta_ce[u.name], rel=0.02, abs=0.01), u
    # the screen's cross-entropy is float32 (as the stage computes it), the finite difference float64: ~1% apart
    assert -one[0] == pytest.approx((ce[1] - ce[0]) / 2e-4, rel=3e-2)
    # one shared path and one midpoint is a different (cheaper, interaction-laden) estimate, not the same
    assert max(abs(a - b) for a, b in zip(fine, coarse, strict=True)) > 0.05


def test_generation_without_a_component_is_the_model_without_it(attribute_workspace: Path):
    from lorascope.chat import chat_prompt
    from lorascope.generation import generate
    from lorascope.models import load_tokenizer

    model = strong(peft_model(attribute_workspace))
    comps = lora_components(model)
    tok = load_tokenizer(attribute_workspace / "models/base")
    prompts = [chat_prompt(tok, q) for q in ("a=1\nb=2\nLast digit of a+b?", "Is 91 prime?")]
    unit = component_units(comps)[4]
    with ablated_generation(model, comps, unit):
        got = generate(model, tok, prompts, 16, 2, answer_tokens=4)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_base_model().get_submodule(comps[4].module).lora_B["default"].weight.zero_()
    assert got == generate(other, tok, prompts, 16, 2, answer_tokens=4)
    assert got != generate(model, tok, prompts, 16, 2, answer_tokens=4)  # the hooks are gone; it mattered


def test_generation_without_a_latent_removes_its_unablated_activation_at_every_token(
    attribute_workspace: Path,
):
    """Left-padded batch, key/value caches: every generated token is the argmax of a forward (no cache, plain
    hooks) in which the latent's activation on the *unablated* state of the same tokens is taken off."""
    from lorascope.models import load_tokenizer

    model = strong(peft_model(attribute_workspace))
    comps = lora_components(model)
    sae = small_sae(sum(c.width for c in comps))
    tok = load_tokenizer(attribute_workspace / "models/base")
    rows = [
        tok("a=1\nb=2\nLast digit", add_special_tokens=False)["input_ids"],
        tok("Hi", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    unit = latent_units(ALIVE)[1]
    with ablated_generation(model, comps, unit, sae), torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad
        )
    plain = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad
    )
    assert not torch.equal(out, plain)  # the ablation changes what is written
    for r, row in enumerate(rows):
        seq = torch.tensor([row + out[r, width:].tolist()])
        f_T = sae.encode(recorded_state(model, comps, seq))[:, unit.index]
        logits = logits_without(model, comps, seq, -f_T[:, None] * sae.W_dec_FD[unit.index])
        assert logits[0, len(row) - 1 : -1].argmax(-1).tolist() == out[r, width:].tolist(), r


def test_exact_set_spearman_and_accuracy_effects_by_hand():
    from lorascope.attribute.accuracy import effect
    from lorascope.attribute.stage import exact_set, spearman

    ranked = [Unit(f"L{i}.q_proj", "component", i) for i in range(3)] + [
        Unit(f"sae.{i}", "latent", i) for i in range(7)
    ]
    sets = exact_set(ranked, [ranked[-1]], exact=2, seed=5, components=True)
    assert sets["top"] == ["L0.q_proj", "L1.q_proj"] and sets["named"] == ["sae.6"]
    assert len(sets["control"]) == 2 and not set(sets["control"]) & set(sets["top"])
    assert sets["control"] == exact_set(ranked, [], 2, 5, True)["control"]  # seeded
    assert any(exact_set(ranked, [], 2, seed, True)["control"] != sets["control"] for seed in range(6, 12))
    assert sets["components"] == ["L0.q_proj", "L1.q_proj", "L2.q_proj"]
    assert exact_set(ranked, [], 2, 5, components=False)["components"] == []
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None

    def rows(correct: list[int], backtracks: list[int]) -> list[dict]:
        return [{"task": "t" if i < 2 else "u", "row": i, "correct": c, "tokens": 100, "backtracks": b}
                for i, (c, b) in enumerate(zip(correct, backtracks, strict=True))]  # fmt: skip

    lora, ablated = rows([1, 1, 1, 0], [0, 0, 1, 0]), rows([0, 1, 0, 0], [2, 1, 1, 0])
    e = effect(lora, ablated, iters=0, seed=0, key="x")
    assert e["accuracy"] == 0.25 and e["delta_accuracy"] == -0.5 and e["delta_accuracy_ci"] is None
    assert e["backtracks_per_1k"] == 10.0 and e["delta_backtracks_per_1k"] == 7.5
    assert e["by_task"] == {"t": 0.5, "u": 0.0}
    lo, hi = effect(lora, ablated, iters=2000, seed=0, key="x")["delta_accuracy_ci"]
    # paired: a question's two answers move together; the per-question differences are 0, -1, -1, 0 (range -1..0)
    assert -1.0 <= lo < -0.5 < hi <= 0.0


SMALL = {
    "sequences": 2, "max_tokens": 96, "screen_groups": 2, "screen_steps": 1, "exact": 2, "generate": 1,
    "named": ["label:Wait", "label:nothing matches this"], "limit": 2, "max_new_tokens": 4, "answer_tokens": 2,
    "bootstrap_iters": 50, "batch_size": 4,
}  # fmt: skip


def test_stage_files_lineage_and_resume(attribute_workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """Every unit ranked; the top, control, every component and the label-named unit measured exactly (the
    values the measuring functions give); the top and named units generated against the adapter; a selector
    no label matches recorded, not steered into an error. Killed after the exact ablations, a re-run reads them
    back (screening and measuring again would fail) and writes the same bytes as the uninterrupted run."""
    from lorascope import tracking
    from lorascope.attribute import measure, stage

    params = tiny_params(attribute=SMALL)
    out = stage.run(params)
    files = {f: (out / f).read_bytes() for f in ("screen.json", "exact.json", "accuracy.json")}
    screen_doc, exact_doc, acc = (json.loads(b) for b in files.values())
    units = [u["unit"] for u in screen_doc["units"]]
    assert len(units) == 14 + len(ALIVE) and "sae.2" not in units  # every component, the live latents
    values = [u["screened_delta_ce"] for u in screen_doc["units"]]
    assert values == sorted(values, reverse=True) and [u["rank"] for u in screen_doc["units"]] == list(
        range(1, 20)
    )
    measured = {u["unit"]: u for u in exact_doc["units"]}
    assert {u for u in units if u.startswith("L")} <= set(
        measured
    ) and "sae.3" in measured  # label:Wait -> sae.3
    assert set(units[:2]) <= set(measured) and "named" in measured["sae.3"]["sets"]
    assert sum("control" in u["sets"] for u in measured.values()) == 2
    assert exact_doc["components_measured"] == 14 and -1 <= exact_doc["spearman_components"] <= 1
    assert set(acc["units"]) == {units[0], "sae.3"} and acc["questions"] == 4
    assert acc["unmatched"] == {
        "label:nothing matches this": "no ok label of sae.parquet or lora.parquet matches it"
    }
    lo, hi = acc["units"]["sae.3"]["delta_accuracy_ci"]
    assert lo <= acc["units"]["sae.3"]["delta_accuracy"] <= hi
    parent = tracking.client().get_run(run_of(attribute_workspace, "metrics/attribute/exact.json"))
    assert parent.data.tags["upstream.finetune"] == run_of(attribute_workspace, "models/lora")
    children = tracking.client().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["attribute.unit"] for c in children) == sorted([units[0], "sae.3"])
    assert not (attribute_workspace / "checkpoints/attribute").exists()  # released once the outputs are in

    def killed(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    for f in files:
        (out / f).unlink()
    with monkeypatch.context() as m:
        m.setattr(stage, "generate_answers", killed)
        with pytest.raises(KeyboardInterrupt):
            stage.run(params)
    assert not (out / "exact.json").exists()
    monkeypatch.setattr(measure, "screen", killed)
    monkeypatch.setattr(measure, "exact", killed)
    stage.run(params)
    assert {f: (out / f).read_bytes() for f in files} == files


def test_bad_units_are_one_line_errors_and_write_nothing(attribute_workspace: Path):
    import yaml

    env = {"LORASCOPE_ROOT": str(attribute_workspace)}
    for change, message in (
        ({"named": ["L7.q_proj"]}, "attribute.named: unknown unit 'L7.q_proj' (components: L0.q_proj, "),
        ({"named": ["sae.2"]}, "attribute.named: 'sae.2' is not a live SAE latent (models/sae/alive.json)"),
        (
            {"named": ["sae.3"], "units": ["components"]},
            "attribute.named: 'sae.3' is an SAE latent, but no latents",
        ),
        ({"exact": 40}, "attribute.exact: 40 is more than the 19 units screened"),
        ({"units": []}, "attribute.units: no unit kind; give components, latents or both"),
    ):
        bad = attribute_workspace / "bad.yaml"
        bad.write_text(yaml.safe_dump(tiny_raw(attribute={**SMALL, **change})))
        res = cli("attribute", "--params", str(bad), cwd=attribute_workspace, env=env)
        last = res.stderr.strip().splitlines()[-1]  # (after the weights' loading bar)
        assert res.returncode == 2 and res.stderr.count("error:") == 1 and message in last, (
            change,
            res.stderr,
        )
    (attribute_workspace / "models/sae/sae.safetensors").unlink()
    bad.write_text(yaml.safe_dump(tiny_raw(attribute=SMALL)))
    res = cli("attribute", "--params", str(bad), cwd=attribute_workspace, env=env)
    assert res.returncode == 2 and "models/sae" in res.stderr.strip().splitlines()[-1]
    assert not (attribute_workspace / "metrics/attribute").exists()
