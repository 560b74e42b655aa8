"""The evaluate stage: benchmark data, budget forcing, backends, metrics, recovery, resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorascope.config import EvaluateSection
from lorascope.errors import LorascopeError
from lorascope.evaluate import benchmarks
from lorascope.evaluate.backend import ModelSpec, lm_class, resolve, vllm_args
from lorascope.evaluate.forcing import ANSWER, THINK, Budget, BudgetForcing
from lorascope.evaluate.recovery import recovery, table

from conftest import SHARED_DATA, cli, tiny_params, tiny_raw

AIME = SHARED_DATA / "benchmarks" / "aime24.jsonl"
needs_data = pytest.mark.skipif(not AIME.is_file(), reason="../shared/data/benchmarks is not checked out")


def gpqa_rows(n: int) -> list[dict[str, str]]:
    """GPQA-schema rows with distinct answers (the real set is not redistributable)."""
    return [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which value does quantity {i} take?",
            "Correct Answer": f"right-{i}",
            "Incorrect Answer 1": f"wrong-{i}-1",
            "Incorrect Answer 2": f"wrong-{i}-2",
            "Incorrect Answer 3": f"wrong-{i}-3",
        }
        for i in range(n)
    ]


def write_gpqa(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ data
@needs_data
def test_aime_no_figures_filter_on_the_real_file():
    raw = [json.loads(line) for line in AIME.read_text().splitlines()]
    figures = {r["id"] for r in raw if "[asy]" in r["problem"]}
    assert figures == {81, 88}  # the data README's list: the filter has something to remove
    rows = benchmarks.process("aime24_nofigures", benchmarks.read_local(AIME), {})
    assert sorted(rows["id"]) == sorted(r["id"] for r in raw if r["id"] not in figures)
    assert rows["gold"] == [r["answer"] for r in raw if r["id"] not in figures]
    assert all(benchmarks.MATH_INSTRUCTION in p for p in rows["prompt"])
    counts = benchmarks.counts("aime24_nofigures", {benchmarks.DATA_KEY: {"aime24_nofigures": str(AIME)}})
    assert counts == {"rows": 30, "skipped_no_answer": 0, "removed_figures": 2}


def test_gpqa_shuffle_is_seeded_per_question_and_gold_follows(tmp_path: Path):
    rows = gpqa_rows(40)
    data = benchmarks.read_local(write_gpqa(tmp_path / "g.csv", rows))
    a = benchmarks.process("gpqa_diamond", data, {benchmarks.SEED_KEY: 0})
    again = benchmarks.process("gpqa_diamond", data.select(range(39, -1, -1)), {benchmarks.SEED_KEY: 0})
    by_id = {r["Record ID"]: r for r in again}
    other_seed = benchmarks.process("gpqa_diamond", data, {benchmarks.SEED_KEY: 1})
    positions = []
    for row, src, other in zip(a, rows, other_seed, strict=True):
        gold = row["choices"][benchmarks.LETTERS.index(row["gold"])]
        assert gold == src["Correct Answer"]  # the gold letter points at the correct text
        assert sorted(row["choices"]) == sorted(v for k, v in src.items() if "Answer" in k)
        assert by_id[row["Record ID"]]["choices"] == row["choices"]  # independent of dataset order
        assert f"{row['gold']}) {src['Correct Answer']}" in row["prompt"]
        positions.append(row["gold"])
        assert other["choices"][benchmarks.LETTERS.index(other["gold"])] == src["Correct Answer"]
    assert set(positions) == set("ABCD")  # actually shuffled, not always in first place
    assert [r["choices"] for r in other_seed] != [r["choices"] for r in a]


def test_rows_without_an_answer_are_skipped_and_counted(tmp_path: Path):
    rows = gpqa_rows(5)
    rows[1]["Correct Answer"] = ""
    rows[3]["Incorrect Answer 2"] = ""
    path = write_gpqa(tmp_path / "g.csv", rows)
    meta = {benchmarks.DATA_KEY: {"gpqa_diamond": str(path)}}
    assert benchmarks.counts("gpqa_diamond", meta) == {
        "rows": 5,
        "skipped_no_answer": 2,
        "removed_figures": 0,
    }
    assert benchmarks.dataset("gpqa_diamond", meta)["test"]["Record ID"] == ["rec0", "rec2", "rec4"]


def test_lm_eval_loads_the_shipped_tasks_from_local_files(tmp_path: Path):
    from lm_eval.tasks import TaskManager

    from lorascope.evaluate.stage import TASK_DIR

    math = tmp_path / "m.jsonl"
    math.write_text(
        json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "x"}) + "\n"
    )
    meta = {benchmarks.DATA_KEY: {"math500": str(math)}, benchmarks.SEED_KEY: 0}
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=meta)
    assert {"aime24_nofigures", "math500", "gpqa_diamond"} <= set(tm.all_tasks)
    task = tm.load(["math500"])["tasks"]["math500"]
    docs = list(task.test_docs())
    assert len(docs) == 1 and docs[0]["gold"] == "2"
    assert task.doc_to_text(docs[0]) == "1+1?\n\n" + benchmarks.MATH_INSTRUCTION
    out = THINK + "so two\n" + ANSWER + "Answer: \\boxed{2}"
    assert task.process_results(docs[0], [out]) == {"exact_match": 1.0, "fallback": 0.0}
    assert task.process_results(docs[0], [THINK + "it is 3"]) == {"exact_match": 0.0, "fallback": 1.0}


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(
        LorascopeError, match=r"unknown task 'gsm8k'; available: aime24_nofigures, math500, gpqa_diamond"
    ):
        benchmarks.benchmark("gsm8k")
    with pytest.raises(LorascopeError, match=r"evaluate\.tasks.*unknown task 'gsm8k'; available: aime24"):
        tiny_params(evaluate={"tasks": ["gsm8k"]})
    with pytest.raises(LorascopeError, match=r"benchmark file not found"):
        benchmarks.read_local("/nonexistent/aime.jsonl")


# -------------------------------------------------------------------------------- budget forcing
class Scripted:
    """A stand-in for an lm-eval model's ``generate_until``: each phase prompt gets the next reply
    of its question's script (token = character), cut at the stops and the token limit. It lets the
    phase logic be checked where a random tiny model cannot be made to stop thinking on cue."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = scripts
        self.calls: list[tuple[str, int, list[str]]] = []
        from lm_eval.api.model import CacheHook

        self.cache_hook = CacheHook(None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            prompt, kw = r.args
            self.calls.append((prompt, kw["max_gen_toks"], kw["until"]))
            user = prompt.split("USER:")[1].split("\n")[0]
            text = self.scripts[user].pop(0)[: kw["max_gen_toks"]]
            out.append(text)
        return out

    def set_cache_hook(self, hook: Any) -> None:
        self.cache_hook = hook

    def tok_encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class ScriptedForced(BudgetForcing, Scripted):
    def chat_prompt(self, user: str) -> str:
        return f"USER:{user}\n" + THINK


def forced(scripts: dict[str, list[str]], **budget: Any) -> ScriptedForced:
    lm = ScriptedForced(scripts)
    lm.budget = Budget(
        **{"max_gen_toks": 40, "thinking_tokens": 10, "answer_tokens": 6, "wait_extensions": 0,
           "wait_text": "Wait", "chunk_size": 8, **budget}
    )  # fmt: skip
    return lm


def test_budget_forcing_caps_thinking_then_forces_the_answer():
    lm = forced({"q": ["a" * 30, "Answer: 7 and more"]})
    [out] = lm.generate_questions(["q"])
    assert out == THINK + "a" * 10 + ANSWER + "Answer"
    think, answer = lm.calls
    assert think[1:] == (10, ["<|im_start|>", "<|im_end|>"])
    assert answer[0].endswith("a" * 10 + ANSWER) and answer[1:] == (6, ["<|im_end|>"])


def test_wait_extends_only_thinking_that_stopped_early():
    lm = forced(
        {"early": ["abc", "def", "x"], "full": ["z" * 10, "y"]}, wait_extensions=1, thinking_tokens=10
    )
    early, full = lm.generate_questions(["early", "full"])
    assert early == THINK + "abcWaitdef" + ANSWER + "x"  # "Wait" appended, thinking continued
    assert full == THINK + "z" * 10 + ANSWER + "y"  # spent its budget: no extension
    # the extension got what was left of the budget: 10 - 3 tokens
    assert [c[1] for c in lm.calls if c[0].startswith("USER:early")] == [10, 7, 6]


def test_without_forcing_a_question_out_of_tokens_gets_no_answer():
    lm = forced({"long": ["l" * 50], "short": ["ok\n", "Answer: 1"]}, thinking_tokens=None, max_gen_toks=12)
    long_, short = lm.generate_questions(["long", "short"])
    assert long_ == THINK + "l" * 12  # no answer phase: as plain generation would end
    assert short == THINK + "ok" + ANSWER + "Answer: 1"
    assert lm.calls[-1][1] == 12 - 3  # the answer gets the rest of max_gen_toks


def test_finished_questions_go_to_the_request_cache(tmp_path: Path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM

    lm = forced({"a": ["t", "1"], "b": ["u", "2"], "c": ["v", "3"]}, chunk_size=2)
    cached = CachingLM(lm, str(tmp_path / "cache.db"))
    reqs = [
        Instance("generate_until", {}, (u, {"until": ["<|im_end|>"], "max_gen_toks": 5}), idx=0)
        for u in "abc"
    ]
    first = cached.generate_until(reqs)
    assert first == [THINK + t + ANSWER + n for t, n in (("t", "1"), ("u", "2"), ("v", "3"))]
    n_calls = len(lm.calls)
    assert cached.generate_until(reqs) == first and len(lm.calls) == n_calls  # all from the cache
    assert lm.generated_requests == 3


def test_hf_forcing_matches_plain_greedy_generation(with_prepared: Path):
    """The real tiny model through lm-eval's HFLM: a thinking phase is the model's own greedy
    continuation of the chat prompt, and the output is thinking + answer marker + answer."""
    import torch

    from lorascope.base.load import load_model, load_tokenizer
    from lorascope.evaluate.backend import build
    from lorascope.evaluate.forcing import THINK_STOPS

    cfg = tiny_params(evaluate={"batch_size": 2, "wait_extensions": 0}).evaluate
    spec = resolve(with_prepared / "models/base", with_prepared / "models/base")
    lm = build(cfg, spec, with_prepared / "merged")
    users = ["What is 2 + 3?", "Name a prime number larger than ten, please."]
    prompts = [lm.chat_prompt(u) for u in users]
    assert all(p.endswith("<|im_start|>assistant\n" + THINK) for p in prompts)
    thinking = lm._phase(prompts, [cfg.thinking_tokens] * 2, THINK_STOPS)
    tok, model = load_tokenizer(spec.pretrained), load_model(spec.pretrained).eval()
    for prompt, text in zip(prompts, thinking, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=cfg.thinking_tokens, do_sample=False)
        new = greedy[0, ids.shape[1] :]
        assert len(new) == cfg.thinking_tokens  # the budget ran out: no stop token in the way
        assert text == tok.decode(new, skip_special_tokens=True)
    outs = lm.generate_questions(users)
    for text, out in zip(thinking, outs, strict=True):
        assert out.startswith(THINK + text.rstrip("\n") + ANSWER)
    # tokens are counted as the budget counts them: each phase's text re-encoded
    phases = [*thinking, *(o.split(ANSWER)[1] for o in outs)]
    assert lm.generated_tokens == sum(len(tok(t).input_ids) for t in phases) > 0


# ---------------------------------------------------------------------------------------- vLLM
def test_vllm_arguments_without_vllm(tmp_path: Path):
    cfg = EvaluateSection(backend="vllm", tensor_parallel_size=4, max_model_len=34816, max_lora_rank=16)
    spec = ModelSpec("Qwen/Qwen2.5-32B-Instruct", "main", "Qwen/Qwen2.5-32B-Instruct", tmp_path / "lora")
    args = vllm_args(cfg, spec)
    assert args["pretrained"] == "Qwen/Qwen2.5-32B-Instruct" and args["revision"] == "main"
    assert args["tensor_parallel_size"] == 4 and args["max_model_len"] == 34816
    assert args["lora_local_path"] == str(tmp_path / "lora") and args["max_lora_rank"] == 16
    merged = vllm_args(cfg, spec, merged=tmp_path / "merged")
    assert merged["pretrained"] == str(tmp_path / "merged")
    assert "lora_local_path" not in merged and "revision" not in merged
    plain = vllm_args(cfg, ModelSpec("m", None, "m", None))
    assert "lora_local_path" not in plain and "max_lora_rank" not in plain
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(LorascopeError, match=r"needs the vllm package .*pip install -e '\.\[gpu\]'"):
            lm_class("vllm")


def test_merged_copy_reproduces_the_adapter(with_prepared: Path):
    import torch
    from peft import PeftModel

    from lorascope.base.load import load_model
    from lorascope.evaluate.backend import merged_copy
    from test_extract import make_adapter

    adapter = make_adapter(with_prepared)
    spec = resolve(with_prepared / "models/base", adapter)
    assert spec.adapter == adapter and spec.pretrained == str(with_prepared / "models/base")
    out = merged_copy(spec, with_prepared / "merged")
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_model(with_prepared / "models/base"), str(adapter))(ids).logits
        got = load_model(out)(ids).logits
    assert torch.allclose(ref, got, atol=1e-4)
    assert (out / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------- recovery
def test_recovery_values_and_reasons():
    assert recovery(0.2, 0.5, 0.6) == (pytest.approx(0.75), None)
    value, reason = recovery(0.4, 0.5, 0.4)
    assert value is None and reason.startswith("full (0.4) <= base (0.4)")
    assert recovery(0.1, None, 0.3) == (None, "no score for variant")
    rows = table(
        {"base": {"m": 0.1, "a": 0.5}, "lora": {"m": 0.3, "a": 0.5}, "full": {"m": 0.5, "a": 0.4},
         "lora-attn-ablated": {"m": 0.2, "a": 0.1}},
        ["m", "a"],
    )  # fmt: skip
    assert rows["m"]["recovery"] == pytest.approx(0.5)
    assert rows["m"]["recovery.lora-attn-ablated"] == pytest.approx(0.25)
    assert rows["a"]["recovery"] is None and "gained nothing" in rows["a"]["recovery.reason"]


# ---------------------------------------------------------------------------------------- stage
@pytest.fixture
def eval_workspace(with_prepared: Path) -> Path:
    """base, a random-B adapter and a "full" finetune that is a copy of the base (full == base)."""
    from lorascope.tracking import create_run
    from test_extract import make_adapter

    adapter = make_adapter(with_prepared)
    run_id = create_run("finetune", "lora", {"finetune.variant": "lora"})  # the adapter's lineage record
    (adapter / "run.json").write_text(json.dumps({"run_id": run_id, "stage": "finetune"}))
    shutil.copytree(with_prepared / "models/base", with_prepared / "models/full")
    (with_prepared / "models/full/run.json").unlink()
    return with_prepared


def test_stage_end_to_end_metrics_samples_recovery_and_resume(eval_workspace: Path):
    import mlflow

    from lorascope import tracking
    from lorascope.evaluate.stage import metrics_path, recovery_path, run, run_recovery

    params = tiny_params(evaluate={"limit": 3})
    for variant in ("base", "lora", "full"):
        run(params, variant)
    lora = json.loads(metrics_path("lora").read_text())
    assert set(lora["tasks"]) == {"aime24_nofigures", "math500", "gpqa_diamond"}
    for res in lora["tasks"].values():
        assert res["n"] == 3 and 0 <= res["score"] <= 1 and res["rows"] == 8
        assert 0 <= res["fallback"] + res["no_answer_extracted"] <= 3
    assert lora["generated_requests"] == 9

    run_ = tracking.client().get_run(lora["run_id"])
    assert run_.data.tags["evaluate.variant"] == "lora"
    finetune_run = json.loads((eval_workspace / "models/lora/run.json").read_text())["run_id"]
    assert run_.data.tags["upstream.finetune"] == finetune_run
    table_path = mlflow.artifacts.download_artifacts(
        run_id=lora["run_id"], artifact_path="samples/math500.json"
    )
    samples = json.loads(Path(table_path).read_text())
    assert samples["columns"] == ["doc_id", "prompt", "output", "extracted", "method", "gold", "correct"]
    assert len(samples["data"]) == 3 and all(row[2].startswith(THINK) for row in samples["data"])
    assert sum(row[6] for row in samples["data"]) == round(lora["tasks"]["math500"]["score"] * 3)

    out = run_recovery(params)
    rec = json.loads(out.read_text())
    for row in rec["tasks"].values():  # full is a copy of base: nothing to recover
        assert row["base"] == row["full"] and row["recovery"] is None
        assert "gained nothing" in row["recovery.reason"]
    assert (
        out == recovery_path()
        and "| task | base | lora | full | recovery |" in out.with_suffix(".md").read_text()
    )

    # a repeated run answers every question from the request cache, with the same metrics
    again = json.loads(run(params, "lora").read_text())
    assert again["generated_requests"] == 0
    assert again["tasks"] == lora["tasks"]


def test_cli_errors_are_one_line(eval_workspace: Path, tmp_path: Path):
    env = {"LORASCOPE_ROOT": str(eval_workspace)}
    shutil.copy(Path(__file__).parents[1] / "params.yaml", eval_workspace)
    res = cli("evaluate", "--variant", "nope", cwd=eval_workspace, env=env)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: unknown variant 'nope'; evaluate.variants has: base, full, lora, lora-attn-ablated, lora-mlp-ablated"
    )
    res = cli("evaluate", "--variant", "base", "--task", "gsm8k", cwd=eval_workspace, env=env)
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == "error: unknown task 'gsm8k'; available: aime24_nofigures, math500, gpqa_diamond"
    )
    (eval_workspace / "data/prepared/eval/math.jsonl").unlink()
    res = cli("evaluate", "--variant", "base", "--task", "math500", cwd=eval_workspace, env=env)
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"error: {eval_workspace}/data/prepared/eval/math.jsonl: benchmark file not found"
    )
    assert not (eval_workspace / "metrics/eval").exists()


def test_adapter_that_does_not_fit_the_base(eval_workspace: Path, tmp_path: Path):
    from lorascope.evaluate.stage import run
    from test_extract import foreign_adapter

    shutil.rmtree(eval_workspace / "models/lora")
    shutil.copytree(foreign_adapter(tmp_path), eval_workspace / "models/lora")
    with pytest.raises(
        LorascopeError, match=r"models/lora: adapter does not match the base model \(.*size mismatch"
    ):
        run(tiny_params(), "lora", ["math500"])


def test_profiles_declare_every_field():
    raw = tiny_raw()
    assert set(raw["evaluate"]) == set(EvaluateSection.model_fields)
