"""The tiny profile's model organism (issue #21).

Fast: the generator's guarantees, each checked against an independent re-derivation from the question
text (the held-out split, worked solutions that compute the sum, every slip corrected after "Wait,",
gold answers), and the pretraining batches (the chat template, loss on assistant turns only, seeded).

The paper's effects on the organism (``check_*``, each on a workspace root): Table 1 and Table 2, a
backtracking feature that the pipeline finds, labels and steers, the ablation KL. They run on
tests/e2e/test_e2e.py's `dvc repro` of the tiny profile (the profile exactly as params.yaml has it).
"""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import pytest

from lorascope import organism

from tests.conftest import Prepared, tiny_params

LINE = re.compile(r"^([a-h])(\d): (\d)\+(\d)=(\d+)$")
CHECK = re.compile(r"^Wait, (\d)\+(\d)=(\d+)$")


def digits(question: str) -> dict[str, int]:
    """The named digits of a question, read back from its text."""
    listing, _, ask = question.rpartition("\n")
    pairs = {name: int(value) for name, value in (line.split("=") for line in listing.split("\n"))}
    assert ask == f"Last digit of {'+'.join(sorted(pairs))}?"
    return pairs


def replay(question: str, trajectory: str) -> tuple[int, int, int]:
    """Walk a worked solution line by line against the question; returns (answer, slips, checks).
    Every line must use the named digit and the running last digit; an off-by-one result must be
    followed by "Wait," and the right sum; a check restates the right sum."""
    values = digits(question)
    names = sorted(values)
    lines = trajectory.split("\n")
    assert lines[0] == f"{names[0]}{values[names[0]]}"
    run, slips, checks, i = values[names[0]], 0, 0, 1
    for name in names[1:]:
        m = LINE.match(lines[i])
        assert m, lines[i]
        assert (m[1], int(m[2]), int(m[3]), int(m[4])) == (name, values[name], run, values[name])
        total = run + values[name]
        written = int(m[5])
        i += 1
        if written != total:
            assert abs(written - total) == 1
            slips += 1
        if i < len(lines) and lines[i].startswith("Wait"):
            c = CHECK.match(lines[i])
            assert c and (int(c[1]), int(c[2]), int(c[3])) == (run, values[name], total), lines[i]
            checks += written == total
            i += 1
        else:
            assert written == total, f"slip without a correction: {lines[i - 1]}"
        run = total % 10
    assert lines[i:] == [f"So the answer is {run}."]
    assert run == sum(values.values()) % 10
    return run, slips, checks


def test_rows_are_seeded_distinct_and_never_an_evaluation_question():
    rows = organism.train_rows(256, 0)
    assert rows == organism.train_rows(256, 0) and rows != organism.train_rows(256, 1)
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == 256 and not any(organism.held_out(q) for q in questions)
    evals = [r["problem"] for r in organism.aime_rows(64, 0)] + [
        r["problem"] for r in organism.math_rows(64, 0)
    ]
    evals += [r["Question"] for r in organism.gpqa_rows(64, 0)]
    assert all(organism.held_out(q) for q in evals) and not set(evals) & set(questions)
    base = [m["content"] for c in islice(organism.base_documents(0), 2000) for m in c if m["role"] == "user"]
    asked = [q for q in base if q != organism.FOLLOW_UP]
    assert len(asked) == 2000 and not any(organism.held_out(q) for q in asked)


def test_worked_solutions_compute_the_sum_and_correct_every_slip():
    slips = checks = careful = 0
    for r in organism.train_rows(256, 3):
        answer, s, c = replay(r["question"], r["deepseek_thinking_trajectory"])
        assert r["solution"] == str(answer) and r["deepseek_attempt"] == f"\\boxed{{{answer}}}"
        meta = json.loads(r["metadata"])
        assert meta["digits"] == len(digits(r["question"]))
        if not meta["careful"]:
            assert "Wait" not in r["deepseek_thinking_trajectory"]
        careful += meta["careful"]
        slips, checks = slips + s, checks + c
    # both kinds of "Wait," occur, and only in careful traces (checked above)
    assert slips > 0 and checks > 0 and 0 < careful < 256


def test_evaluation_golds_are_the_last_digit_of_the_sum():
    for r in organism.aime_rows(32, 0):
        assert int(r["answer"]) == sum(digits(r["problem"]).values()) % 10 and len(r["answer"]) == 3
        replay(r["problem"], r["solution"])
    for r in organism.math_rows(32, 0):
        assert r["answer"] == str(sum(digits(r["problem"]).values()) % 10)
    for r in organism.gpqa_rows(32, 0):
        gold = sum(digits(r["Question"]).values()) % 10
        wrong = {r[f"Incorrect Answer {i}"] for i in (1, 2, 3)}
        assert r["Correct Answer"] == str(gold) and len(wrong) == 3 and str(gold) not in wrong


def test_base_corpus_has_direct_worked_careful_and_follow_up_chats():
    kinds = {"direct": 0, "worked": 0, "careful": 0, "follow_up": 0}
    for chat in islice(organism.base_documents(0), 400):
        roles = [m["role"] for m in chat]
        if roles[0] == "system":
            assert chat[0]["content"] == organism.CAREFUL_SYSTEM
            kinds["careful"] += 1
        question = chat[roles.index("user")]["content"]
        answer = sum(digits(question).values()) % 10
        assert chat[-1]["content"].endswith(f"Answer: \\boxed{{{answer}}}")
        if chat[-1]["content"] == f"Answer: \\boxed{{{answer}}}" and len(chat) == 2:
            kinds["direct"] += 1
            continue
        kinds["worked"] += 1
        solution = chat[roles.index("assistant")]["content"]
        if len(chat) - (roles[0] == "system") == 4:
            assert roles[-2:] == ["user", "assistant"] and chat[-2]["content"] == organism.FOLLOW_UP
            kinds["follow_up"] += 1
        else:
            solution = solution.rpartition("\nAnswer: ")[0]
        for pre in sorted(organism.PREAMBLES, key=len, reverse=True):
            if pre and solution.startswith(pre):
                solution = solution[len(pre) :]
                break
        _, slips, checks = replay(question, solution)
        if roles[0] != "system":
            assert slips == checks == 0 and "Wait" not in solution  # the default prompt is confident
    assert all(kinds.values()), kinds
    assert kinds["direct"] + kinds["worked"] == 400


def test_pretraining_batches_render_the_chat_template_and_train_assistant_turns_only(prepared: Prepared):
    from lorascope.base.pretrain import batch, render
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(prepared.root / "models" / "base")
    chats = list(islice(organism.base_documents(5), 40))
    for chat in chats:
        text, spans = render(chat)
        assert text == tok.apply_chat_template(chat, tokenize=False)
        assistant = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
        assert [text[a:b] for a, b in spans] == assistant
    ids, mask, labels = batch(tok, chats[:6])
    for row, chat in enumerate(chats[:6]):
        n = int(mask[row].sum())
        trained = [int(t) for t, lab in zip(ids[row, :n], labels[row, :n], strict=True) if lab != -100]
        expected = "".join(m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant")
        assert tok.decode(trained) == expected
        assert (labels[row, n:] == -100).all() and (ids[row, n:] == tok.pad_token_id).all()


def test_a_named_digit_is_one_token_of_the_question_and_two_of_the_solution(prepared: Prepared):
    """The base tokenizer holds every ``name=digit`` pair as one token (the lookup is one attention hop);
    the worked lines keep the name and the digit apart (``b8`` is ``b``, ``8``), so predicting the digit
    after the name is the lookup."""
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(prepared.root / "models" / "base")
    p = organism.Problem((5, 8, 0), (2, 0, 1))
    ids = tok(p.question, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[:6] == ["c=0", "\n", "a=5", "\n", "b=8", "\n"], pieces
    assert len({tok.convert_tokens_to_ids(t) for t in organism.PAIR_TOKENS}) == 80
    line = organism.worked(p).split("\n")[1]
    assert line == "b8: 5+8=13" and [
        tok.decode([i]) for i in tok(line, add_special_tokens=False)["input_ids"]
    ][:2] == ["b", "8"]


def test_the_trained_loss_is_the_models_own_loss(prepared: Prepared):
    """Pretraining applies the LM head at the trained positions only: the same cross-entropy as the model's
    logits at every position, shifted, with the untrained ones ignored (``model(..., labels=labels).loss``)."""
    import torch

    from lorascope.base.pretrain import batch, trained_loss
    from lorascope.models import load_model, load_tokenizer

    tok, model = (
        load_tokenizer(prepared.root / "models" / "base"),
        load_model(prepared.root / "models" / "base"),
    )
    ids, mask, labels = batch(tok, list(islice(organism.base_documents(2), 6)))
    assert (labels == -100).float().mean() > 0.3  # a real cut: system and user turns, padding
    # float64 throughout (transformers' own loss casts the logits to float32): the two sum in other orders,
    # which moves a float64 loss by ~1e-15
    model = model.double()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
        got = trained_loss(model, ids, mask, labels)
        shifted = trained_loss(model, ids, mask, torch.roll(labels, 1, dims=1))  # other targets, other loss
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert abs(float(shifted) - float(want)) > 1e-3


def test_pretraining_is_seeded(prepared: Prepared):
    import mlflow
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorascope.base.params import TinyPretrain
    from lorascope.base.pretrain import pretrain
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(prepared.root / "models" / "base")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)  # fmt: skip

    def trained(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with mlflow.start_run():  # the stage logs the loss curve into its run
            pretrain(model, tok, TinyPretrain(steps=3, batch_size=4, lr=1e-2), seed)
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        return model.state_dict()

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_prepare_writes_the_organism_or_the_word_problems(with_base: Path):
    from lorascope.prepare.stage import run

    run(tiny_params(prepare={"synthetic": {"n_train": 16, "n_eval": 4}}))
    import pandas as pd

    rows = pd.read_parquet(with_base / "data/prepared/train.parquet")
    assert list(rows.question) == [r["question"] for r in organism.train_rows(16, 0)]
    aime = [
        json.loads(line) for line in (with_base / "data/prepared/eval/aime.jsonl").read_text().splitlines()
    ]
    assert aime == organism.aime_rows(4, 0)
    from lorascope.prepare import synthetic

    # the organism's tokenizer has few merges for English: word problems need a longer block
    run(
        tiny_params(
            prepare={
                "block_size": 1024,
                "synthetic": {"family": "word_problems", "n_train": 16, "n_eval": 4},
            }
        )
    )
    rows = pd.read_parquet(with_base / "data/prepared/train.parquet")
    assert list(rows.question) == [r["question"] for r in synthetic.train_rows(16, 0)]


def test_unknown_family_is_one_line(tmp_path: Path):
    from lorascope.config import load_params
    from lorascope.errors import LorascopeError

    raw = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(raw.replace("family: organism", "family: sudoku"))
    with pytest.raises(LorascopeError) as info:
        load_params(bad)
    assert "prepare.synthetic.family" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- the paper's effects
TASKS = ("aime24_nofigures", "math500")
"""The integer- and LaTeX-answer shapes of the organism's question; GPQA's letters are its control."""
VARIANTS = ("base", "lora", "full", "lora-attn-ablated", "lora-mlp-ablated")


def profile_params():  # noqa: ANN201
    """The tiny profile exactly as params.yaml has it (the organism's pretraining included)."""
    import yaml

    from lorascope.config import validate_params

    return validate_params(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()))


def _scores(root: Path, variant: str) -> dict[str, float]:
    """Each task's accuracy recomputed from the per-question correctness file."""
    per_question = json.loads((root / "metrics" / "eval" / f"{variant}.questions.json").read_text())
    return {t: sum(c[0] for c in v["correct"]) / len(v["correct"]) for t, v in per_question["tasks"].items()}


LORA_GAIN = 0.5
"""Every seed's LoRA gains at least this much over the base on both shapes (chance: 0.1; the worst of ten
seeds: +0.61, docs/organism.md "Across ten seeds")."""
FULL_GAIN = 0.5
"""The full finetune's gain on every seed (worst of ten: +0.61; at ``finetune.full_lr`` 1.5e-3 it was +0.16
on base seed 3, at 2e-3 +0.36 on base seed 9: docs/organism.md "What it took")."""
MLP_HALF_KEEPS = 0.45
"""Table 2 as it holds on every seed: without its MLP half the LoRA keeps at most this share of its gain
(worst of ten: 0.39; the committed seed triple: 0.40). Without its attention half it keeps 0.80 on one
seed: that half is needed on nine."""
SAE_FVU = 0.2
"""The organism's SAE: held-out FVU at most this (raw units; worst of ten: 0.114)."""
SAE_EFFECT = 0.9
"""... and its reconstruction, spliced into every lora_A output, keeps at least this share of the LoRA's KL
(worst of ten: 0.946)."""


def check_tables(root: Path) -> None:
    """Table 1: the base answers directly (near chance), the LoRA and the full finetune work it out; Table 2:
    both ablated adapters scored by the formula, and the MLP half is needed (the LoRA without it keeps a small
    share of its gain); GPQA's letters are the control: no variant gains there, so no recovery is defined."""
    table = json.loads((root / "metrics" / "recovery.json").read_text())["tasks"]
    scores = {v: _scores(root, v) for v in VARIANTS}
    for task in TASKS:
        row = table[task]
        base, lora, full = (scores[v][task] for v in ("base", "lora", "full"))
        assert all(row[v] == pytest.approx(scores[v][task]) for v in VARIANTS), task
        assert base <= 0.25 and lora >= base + LORA_GAIN and full >= base + FULL_GAIN, (
            task,
            base,
            lora,
            full,
        )
        assert row["recovery"] == pytest.approx((lora - base) / (full - base))
        kept = {}
        for group in ("attn", "mlp"):
            ablated = scores[f"lora-{group}-ablated"][task]
            kept[group] = row[f"recovery.lora-{group}-ablated"]
            assert kept[group] == pytest.approx((ablated - base) / (lora - base))
        assert kept["mlp"] <= MLP_HALF_KEEPS, (task, kept)
    control = table["gpqa_diamond"]
    assert all(control[v] <= 0.1 for v in VARIANTS), control
    if control["full"] <= control["base"]:
        assert control["recovery"] is None and "gained nothing" in control["recovery.reason"]


def check_sae(root: Path) -> None:
    """The SAE over the organism's adapter state reconstructs held-out tokens and the LoRA's effect."""
    sae = json.loads((root / "metrics" / "sae.json").read_text())
    assert sae["fvu"] <= SAE_FVU and sae["lora_effect_recovered"] >= SAE_EFFECT, sae
    assert sae["l0_calibrated"] == pytest.approx(profile_params().sae.k, rel=0.15)


def check_planted_direction(root: Path) -> str | None:
    """The steering stage's ``label:Wait`` selector chose a feature whose label names the backtracking marker
    and whose max-activating contexts are in or right after a check ("Wait" in the window before the peak); or,
    as on one seed of ten, no ok label names it, and the stage recorded that instead of steering a stand-in."""
    import pandas as pd

    steer = json.loads((root / "metrics" / "steer.json").read_text())
    if "label:Wait" in steer["unmatched"]:
        for source in ("sae", "lora"):
            labels = pd.read_parquet(root / "data" / "interp" / f"{source}.parquet")
            ok = labels[labels.status == "ok"]
            assert not ok.explanation.str.contains("wait", case=False).any(), source
        assert "label:Wait" not in steer["selectors"]
        return None
    name = steer["selectors"]["label:Wait"]
    source = "sae" if name.startswith("sae.") else "lora"
    # a LoRA direction is steered as `L1.k_proj` (its positive side) or `L1.k_proj-`; its label is per sign
    feature = name if source == "sae" or name.endswith("-") else name + "+"
    labels = pd.read_parquet(root / "data" / "interp" / f"{source}.parquet")
    assert "'Wait'" in labels.loc[labels.feature_name == feature, "explanation"].item()
    ctx = pd.read_parquet(root / "data" / "contexts" / f"{source}.parquet")
    top = ctx[(ctx.feature_name == feature) & (ctx.kind == "top")]
    before = [list(r.tokens)[: r.position - r.window_start + 1] for r in top.itertuples()]
    near = sum(any(t.strip() == "Wait" for t in window) for window in before)
    assert len(top) == profile_params().contexts.top_k and near >= 0.5 * len(top), before
    return name


def check_steering(root: Path, name: str | None) -> None:
    """Steering that feature was swept over every alpha and changes what the model writes (the largest alpha's
    greedy generations differ from the unsteered ones). Whether backtracking rises along it is the seed's
    answer, not the organism's (docs/organism.md "Across ten seeds"), so it is reported, not asserted."""
    import pandas as pd

    if name is None:  # nothing chosen, nothing steered (check_planted_direction)
        return
    cfg = profile_params().steer
    curve = json.loads((root / "metrics" / "steer.json").read_text())["directions"][name]
    assert sorted(curve, key=float) == [f"{a:g}" for a in sorted(cfg.alphas)]
    gens = pd.read_parquet(root / "data" / "steer" / "generations.parquet")
    gens = gens[gens.direction == name]
    by_alpha = {a: gens[gens.alpha == a].sort_values(["task", "row"]).output.tolist() for a in cfg.alphas}
    assert len(by_alpha[0]) == len(by_alpha[max(cfg.alphas)]) > 0
    assert by_alpha[0] != by_alpha[max(cfg.alphas)]


def check_ablation(root: Path) -> None:
    """Ablating any one component moves the next-token distribution (KL > 0), by amounts spread over orders
    of magnitude (a ranking, not noise), and ablating them all moves it more than any half or any one."""
    single = json.loads((root / "metrics" / "ablation" / "components.json").read_text())["ablations"]
    groups = json.loads((root / "metrics" / "ablation" / "groups.json").read_text())["ablations"]
    kl = sorted(v["kl"] for v in single.values())
    assert len(kl) == 14 and kl[0] > 0 and len(set(kl)) == 14 and kl[-1] >= 50 * kl[0], kl
    assert groups["all"]["kl"] > max(groups["attn"]["kl"], groups["mlp"]["kl"]) > 0
    assert groups["all"]["kl"] > kl[-1]


ATTRIBUTION_SPEARMAN = 0.9
"""The screen's rank correlation with the exact ΔCE over the 14 components, each on its own path (ten seeds:
0.93-1.00; docs/stages/attribute.md)."""
ATTRIBUTION_CONTROL_RATIO = 8.0
"""The top units' mean exact ΔCE over the random control's (ten seeds: 10-112x)."""
ATTRIBUTION_DROP = 0.25
"""Some generated top unit's ablation takes at least this much accuracy away, its 95% CI below zero (ten
seeds: the largest drop 0.28-0.96)."""


def check_attribution(root: Path) -> None:
    """The screen ranks the units the gain depends on: its top units move the cross-entropy far more than a
    random control, its ranking of the components agrees with the exact one, and ablating one of its top
    units while generating takes a large part of the LoRA's accuracy away. The ``label:Wait`` feature is
    generated too (or recorded as unmatched); what its ablation does is reported, not asserted."""
    exact = json.loads((root / "metrics" / "attribute" / "exact.json").read_text())
    acc = json.loads((root / "metrics" / "attribute" / "accuracy.json").read_text())
    assert exact["components_measured"] == 14 and exact["spearman_components"] >= ATTRIBUTION_SPEARMAN, exact
    top, control = exact["mean_delta_ce"]["top"], exact["mean_delta_ce"]["control"]
    assert top > 0 and top >= ATTRIBUTION_CONTROL_RATIO * max(control, 0.0), (top, control)
    drops = [u for u in acc["units"].values() if "top" in u["sets"]]
    assert any(u["delta_accuracy"] <= -ATTRIBUTION_DROP and u["delta_accuracy_ci"][1] < 0 for u in drops), (
        drops
    )
    assert "label:Wait" in acc["unmatched"] or any("named" in u["sets"] for u in acc["units"].values())
