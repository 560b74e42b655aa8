"""The evaluate stage: benchmark data and s1's prompts, budget forcing, sampling, the adapter probe,
backends, metrics, recovery (Tables 1 and 2), resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorascope.chat import ANSWER, FINAL, THINK, answer_end
from lorascope.errors import LorascopeError
from lorascope.evaluate import benchmarks
from lorascope.evaluate.backend import ModelSpec, lm_class, resolve, vllm_args
from lorascope.evaluate.forcing import SAMPLE_KEY, Budget, BudgetForcing
from lorascope.evaluate.params import EvaluateSection
from lorascope.evaluate.recovery import recovery, table

from tests.conftest import SHARED_DATA, cli, record_output, run_of, tiny_params, tiny_raw

AIME = SHARED_DATA / "benchmarks" / "aime24.jsonl"
MATH500 = SHARED_DATA / "benchmarks" / "math500.jsonl"
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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------- data, prompts
@needs_data
def test_real_aime_file_is_evaluated_whole_with_s1s_bare_prompt():
    raw = [json.loads(line) for line in AIME.read_text().splitlines()]
    rows = benchmarks.process("aime24_nofigures", benchmarks.read_local(AIME), {})
    assert len(rows) == 30  # the paper's scores are multiples of 1/30: nothing is dropped
    assert rows["id"] == [r["id"] for r in raw]
    assert sum("[asy]" in p for p in rows["prompt"]) == 2  # the data README's ids 81 and 88 stay
    assert rows["prompt"] == [r["problem"] for r in raw]  # s1's QUERY_TEMPLATE "{Question}"
    assert rows["gold"] == [r["answer"] for r in raw]
    assert len(set(rows["qid"])) == 30
    counts = benchmarks.counts(
        "aime24_nofigures",
        benchmarks.load("aime24_nofigures", {benchmarks.DATA_KEY: {"aime24_nofigures": str(AIME)}}),
    )
    assert counts == {"rows": 30, "skipped_no_answer": 0}


@needs_data
def test_real_math500_prompts_and_an_instruction_only_when_asked():
    raw = [json.loads(line) for line in MATH500.read_text().splitlines()]
    data = benchmarks.read_local(MATH500)
    plain = benchmarks.process("math500", data, {})
    assert len(plain) == 500 and plain["prompt"] == [r["problem"] for r in raw]
    asked = "Please reason step by step, and put your final answer within \\boxed{}."
    meta = {benchmarks.INSTRUCTIONS_KEY: {"math500": asked}}
    told = benchmarks.process("math500", data, meta)
    assert told["prompt"] == [f"{r['problem']}\n\n{asked}" for r in raw]
    assert told["qid"] == plain["qid"]  # the question is the same question


def test_local_aime_file_keeps_its_figure_problems(tmp_path: Path):
    rows = [
        {"id": 1, "problem": "Find $x$ if $x+1=3$.", "answer": "2"},
        {"id": 2, "problem": "In the figure [asy]draw((0,0)--(1,1));[/asy] find the area.", "answer": "12"},
        {"id": 3, "problem": "  A problem with spaces around it.\n", "answer": "007"},
        {"id": 4, "problem": "No answer here.", "answer": ""},
    ]
    path = write_jsonl(tmp_path / "aime.jsonl", rows)
    got = benchmarks.process("aime24_nofigures", benchmarks.read_local(path), {})
    assert got["id"] == [1, 2, 3]  # the figure problem stays; only the row without an answer goes
    assert got["prompt"] == [r["problem"] for r in rows[:3]]  # as given, not even stripped
    assert benchmarks.counts(
        "aime24_nofigures",
        benchmarks.load("aime24_nofigures", {benchmarks.DATA_KEY: {"aime24_nofigures": str(path)}}),
    ) == {
        "rows": 4,
        "skipped_no_answer": 1,
    }


def test_aime_hub_default_is_s1s_30_problem_set():
    b = benchmarks.benchmark("aime24_nofigures")
    assert (b.hub_path, b.hub_split) == ("simplescaling/aime24_nofigures", "train")
    with pytest.raises(
        LorascopeError, match=r"^aime24_nofigures: cannot load hub dataset simplescaling/aime24"
    ):
        benchmarks.load("aime24_nofigures", {})  # offline in the tests: the hub id is in the error


def test_gpqa_prompt_is_s1s_question_and_lettered_choices(tmp_path: Path):
    rows = gpqa_rows(1)
    rows[0]["Correct Answer"] = " right-0\n"  # GPQA texts carry stray whitespace; s1 shows them as they are
    doc = benchmarks.process("gpqa_diamond", benchmarks.read_local(write_gpqa(tmp_path / "g.csv", rows)), {})[
        0
    ]
    c = doc["choices"]
    assert doc["prompt"] == f"Which value does quantity 0 take?\n\nA) {c[0]}\nB) {c[1]}\nC) {c[2]}\nD) {c[3]}"
    assert c[benchmarks.LETTERS.index(doc["gold"])] == " right-0\n"


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
    assert benchmarks.counts("gpqa_diamond", benchmarks.load("gpqa_diamond", meta)) == {
        "rows": 5,
        "skipped_no_answer": 2,
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
    assert task.doc_to_text(docs[0]) == "1+1?"  # s1: the bare problem
    out = THINK + "\nso two\n" + ANSWER + "\nAnswer: \\boxed{2}"
    assert task.process_results(docs[0], [out]) == {"exact_match": 1.0, "fallback": 0.0}
    # thinking that never reached its answer is not graded, even when it holds the right number
    assert task.process_results(docs[0], [THINK + "\nit is 2"]) == {"exact_match": 0.0, "fallback": 0.0}
    # s1's forced ending: the answer follows "Final Answer:"
    assert task.process_results(docs[0], [THINK + "\nhmm 3?\n" + ANSWER + FINAL + " 2"])["exact_match"] == 1.0
    assert task.process_results(docs[0], ["The sum is \\boxed{2}."])["exact_match"] == 1.0  # a chat reply


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(
        LorascopeError, match=r"unknown task 'gsm8k'; available: aime24_nofigures, math500, gpqa_diamond"
    ):
        benchmarks.benchmark("gsm8k")
    with pytest.raises(LorascopeError, match=r"evaluate\.tasks.*unknown task 'gsm8k'; available: aime24"):
        tiny_params(evaluate={"tasks": ["gsm8k"]})
    with pytest.raises(LorascopeError, match=r"evaluate\.instructions.*unknown task 'gsm8k'"):
        tiny_params(evaluate={"instructions": {"gsm8k": "Think."}})
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
        self.kwargs: list[dict[str, Any]] = []
        from lm_eval.api.model import CacheHook

        self.cache_hook = CacheHook(None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            prompt, kw = r.args
            self.calls.append((prompt, kw["max_gen_toks"], kw["until"]))
            self.kwargs.append(kw)
            user = prompt.split("USER:")[1].split("\n")[0]
            text = self.scripts[user].pop(0)[: kw["max_gen_toks"]]
            out.append(text)
        return out

    def set_cache_hook(self, hook: Any) -> None:
        self.cache_hook = hook

    def tok_encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class ScriptedForced(BudgetForcing, Scripted):
    def chat_template(self, user: str) -> str:
        return f"USER:{user}\n"


def forced(scripts: dict[str, list[str]], **budget: Any) -> ScriptedForced:
    lm = ScriptedForced(scripts)
    lm.budget = Budget(
        **{"max_gen_toks": 40, "thinking_tokens": 10, "answer_tokens": 6, "wait_extensions": 0,
           "wait_text": "Wait", "chunk_size": 8, **budget}
    )  # fmt: skip
    return lm


def test_budget_forcing_caps_thinking_then_forces_the_final_answer():
    lm = forced({"q": ["a" * 30, "7 and more"]})
    [out] = lm.generate_questions(["q"])
    # s1: the budget cut the thinking, so "<|im_start|>answer\nFinal Answer:" follows on a new line
    assert out == "<|im_start|>think" + "a" * 10 + "\n<|im_start|>answer\nFinal Answer:" + "7 and "
    think, answer = lm.calls
    assert think == ("USER:q\n<|im_start|>think", 10, ["<|im_start|>", "<|im_end|>"])
    assert answer[0] == "USER:q\n<|im_start|>think" + "a" * 10 + "\n<|im_start|>answer\nFinal Answer:"
    assert answer[1:] == (6, ["<|im_end|>"])
    assert all(kw["do_sample"] is False and kw["temperature"] == 0.0 for kw in lm.kwargs)  # greedy


def test_thinking_that_ends_on_its_own_gets_the_plain_answer_marker():
    lm = forced({"q": ["\nso 5\n", "\nAnswer: 5"]}, answer_tokens=20)
    [out] = lm.generate_questions(["q"])
    assert out == "<|im_start|>think\nso 5\n<|im_start|>answer\nAnswer: 5"  # no "Final Answer:"
    assert answer_end("x\n", forced=True) == "<|im_start|>answer\nFinal Answer:"  # no doubled newline
    assert answer_end("x", forced=False) == "<|im_start|>answer"


def test_wait_extends_only_thinking_that_stopped_early():
    lm = forced(
        {"early": ["abc", "def", "x"], "full": ["z" * 10, "y"]}, wait_extensions=1, thinking_tokens=10
    )
    early, full = lm.generate_questions(["early", "full"])
    # "Wait" appended and counted in the budget (s1 appends its tokens), thinking continued to the cap
    assert early == THINK + "abcWaitdef" + "\n" + ANSWER + FINAL + "x"
    assert full == THINK + "z" * 10 + "\n" + ANSWER + FINAL + "y"  # spent its budget: no extension
    # the extension got what was left of the budget: 10 - 3 - len("Wait")
    assert [c[1] for c in lm.calls if c[0].startswith("USER:early")] == [10, 3, 6]


def test_auto_budget_is_s1s_and_leaves_the_answer_100_tokens():
    lm = forced(
        {"q": ["b" * 43 + "\nmore thinking", "4"]},
        max_gen_toks=200,
        thinking_tokens="auto",
        answer_tokens=None,
    )
    [out] = lm.generate_questions(["q"])
    head = len("USER:q\n")
    # s1: max_tokens - prompt - len(thinking_start) - len(thinking_end + "\nFinal Answer:") - 100
    expected = 200 - head - len("<|im_start|>think") - len("<|im_start|>answer\nFinal Answer:") - 100
    assert lm.calls[0][1] == expected == 44
    assert out == THINK + "b" * 43 + "\n" + ANSWER + FINAL + "4"  # cut at 44 tokens, ending on "\n"
    assert lm.calls[1][1] == 100  # the rest of max_gen_toks: exactly s1's 100 answer tokens
    long = forced({"p" * 120: ["x"]}, max_gen_toks=200, thinking_tokens="auto")
    with pytest.raises(
        LorascopeError, match=r"thinking_tokens auto: a 126-token prompt leaves no thinking budget"
    ):
        long.generate_questions(["p" * 120])
    edge = forced({"q": ["x"]}, max_gen_toks=156, thinking_tokens="auto")  # 156 - 7 - 49 - 100: none left
    with pytest.raises(
        LorascopeError, match=r"a 7-token prompt leaves no thinking budget in max_gen_toks 156"
    ):
        edge.generate_questions(["q"])
    one = forced({"q": ["xy", "1"]}, max_gen_toks=157, thinking_tokens="auto")  # one thinking token left
    one.generate_questions(["q"])
    assert one.calls[0][1] == 1


def test_without_forcing_a_question_out_of_tokens_gets_no_answer():
    lm = forced({"long": ["l" * 50], "short": ["ok\n", "Answer: 1"]}, thinking_tokens=None, max_gen_toks=12)
    long_, short = lm.generate_questions(["long", "short"])
    assert long_ == THINK + "l" * 12  # no answer phase: as plain generation would end
    assert short == THINK + "ok\n" + ANSWER + "Answer: 1"
    assert lm.calls[-1][1] == 12 - 3  # the answer gets the rest of max_gen_toks


def test_chat_format_is_one_plain_generation():
    lm = forced({"q": ["The sum is \\boxed{4}.<|im_end|>junk"]}, format="chat", max_gen_toks=30)
    [out] = lm.generate_questions(["q"])
    assert out == "The sum is \\boxed{4}.<|im_end|>junk"[:30]
    assert lm.calls == [("USER:q\n", 30, ["<|im_end|>"])]  # no think marker, one phase, no forcing


def test_sampled_phases_are_seeded_per_question_and_phase():
    def seeds(sample: int, users: tuple[str, ...] = ("q", "r"), seed: int = 7) -> dict[tuple[str, int], int]:
        lm = forced({"q": ["a" * 30, "1"], "r": ["b" * 30, "2"]}, seed=seed, temperature=0.6)
        lm.seed_in_kwargs = True
        lm.sample = sample
        lm.generate_questions(list(users))
        assert all(kw["do_sample"] is True and kw["temperature"] == 0.6 for kw in lm.kwargs)
        return {(c[0].split("\n")[0], c[1]): kw["seed"] for c, kw in zip(lm.calls, lm.kwargs, strict=True)}

    first = seeds(0)
    assert first == seeds(0)  # reproducible
    assert len(set(first.values())) == 4  # 2 questions x (thinking, answer)
    assert seeds(0, ("r",)).items() <= first.items()  # the same seed whatever else shares the chunk
    assert set(first.values()).isdisjoint(seeds(1).values())
    assert set(first.values()).isdisjoint(seeds(0, seed=8).values())


def phase_seed_by_hand(run_seed: int, sample: int, prompt: str, phase: str) -> int:
    """The module docstring's seed of a sampled phase, computed independently: the first 4 bytes, big-endian,
    of the sha256 of [run seed, sample, the question's prompt, the phase name] as JSON."""
    import hashlib

    key = json.dumps([run_seed, sample, prompt, phase]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def test_question_rows_are_the_first_answered_rows_of_each_task(tmp_path: Path):
    """What steer and attribute generate from: per task, the first ``limit`` rows that have an answer, in
    file order, each with its task and row number; GPQA's choices shuffled by the run's choice seed."""
    import hashlib

    def write(name: str, rows: list[dict[str, str]]) -> str:
        (tmp_path / "eval").mkdir(exist_ok=True)
        (tmp_path / "eval" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f"eval/{name}"

    aime = [
        {"problem": f"P{i}", "answer": a} for i, a in enumerate(["1", " ", " 3 ", "4"])
    ]  # golds are stripped
    math = [{"problem": "M0", "answer": "\\frac12"}, {"problem": "M1", "answer": "2"}]
    gpqa = [
        {"Question": f"G{i}", "Correct Answer": "yes", "Record ID": f"rec{i}",
         **{f"Incorrect Answer {j}": f"no{j}" for j in (1, 2, 3)}}
        for i in range(6)
    ]  # fmt: skip
    data = {"aime24_nofigures": write("aime.jsonl", aime), "math500": write("math.jsonl", math),
            "gpqa_diamond": write("gpqa.jsonl", gpqa)}  # fmt: skip
    rows = benchmarks.question_rows(["aime24_nofigures", "math500"], 2, data, 0, tmp_path, "steer.tasks")
    assert [(r["task"], r["row"], r["question"], r["gold"], r["kind"]) for r in rows] == [
        ("aime24_nofigures", 0, "P0", "1", "integer"), ("aime24_nofigures", 1, "P2", "3", "integer"),
        ("math500", 0, "M0", "\\frac12", "latex"), ("math500", 1, "M1", "2", "latex"),
    ]  # fmt: skip
    assert rows[1]["qid"] == hashlib.sha256(b"P2").hexdigest()[:16] and rows[1]["prompt"] == "P2"
    everything = benchmarks.question_rows(["aime24_nofigures", "math500"], None, data, 0, tmp_path, "k")
    assert [(r["task"], r["row"]) for r in everything] == [
        ("aime24_nofigures", 0), ("aime24_nofigures", 1), ("aime24_nofigures", 2), ("math500", 0), ("math500", 1),
    ]  # fmt: skip
    assert len(benchmarks.question_rows(["math500"], 10, data, 0, tmp_path, "k")) == 2
    golds = {}
    for seed in (0, 7):
        picked = benchmarks.question_rows(["gpqa_diamond"], None, data, seed, tmp_path, "k")
        golds[seed] = [r["gold"] for r in picked]
        assert golds[seed] == [benchmarks.shuffled_choices(row, seed)[1] for row in gpqa]
    assert golds[0] != golds[7]  # the choice seed reaches the shuffle
    unanswered = write("unanswered.jsonl", [{"problem": "M", "answer": ""}])
    with pytest.raises(LorascopeError) as e:
        tasks = ["aime24_nofigures", "math500"]
        benchmarks.question_rows(tasks, 3, dict.fromkeys(tasks, unanswered), 0, tmp_path, "attribute.tasks")
    assert str(e.value) == "attribute.tasks: no rows with an answer in aime24_nofigures, math500"


def test_gpqa_choices_keep_their_text_and_are_ordered_by_record_id_else_question():
    """The order is a seeded shuffle keyed on the Record ID (the question text when there is none),
    computed here independently; choices keep their text as written (s1 shows it raw)."""
    import hashlib
    import random

    def order_by_hand(seed: int, key: str) -> list[int]:
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        order = list(range(4))
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
        return order

    def row(question: str, record: str | None) -> dict[str, str]:
        out = {
            "Question": question,
            "Correct Answer": " yes ",
            **{f"Incorrect Answer {j}": f" no{j}" for j in (1, 2, 3)},
        }
        return {**out, "Record ID": record} if record else out

    written = [" yes ", " no1", " no2", " no3"]
    for i in range(6):
        for question, record, key in ((f"G{i}", f"rec{i}", f"rec{i}"), (f"G{i}", None, f"G{i}")):
            choices, gold = benchmarks.shuffled_choices(row(question, record), 3)
            order = order_by_hand(3, key)
            assert choices == [written[j] for j in order] and gold == "ABCD"[order.index(0)], (i, record)
        same_id = benchmarks.shuffled_choices(row(f"other{i}", f"rec{i}"), 3)
        assert same_id == benchmarks.shuffled_choices(row(f"G{i}", f"rec{i}"), 3)  # the id, not the text


def test_process_defaults_to_choice_seed_0_and_puts_the_instruction_after_the_choices():
    import datasets

    rows = datasets.Dataset.from_list(
        [{"Question": f"G{i}", "Correct Answer": "yes", **{f"Incorrect Answer {j}": f"no{j}" for j in (1, 2, 3)}}
         for i in range(6)]
    )  # fmt: skip
    unseeded = benchmarks.process("gpqa_diamond", rows, {})
    assert unseeded["gold"] == benchmarks.process("gpqa_diamond", rows, {benchmarks.SEED_KEY: 0})["gold"]
    assert unseeded["gold"] != benchmarks.process("gpqa_diamond", rows, {benchmarks.SEED_KEY: 1})["gold"]
    told = benchmarks.process(
        "gpqa_diamond", rows, {benchmarks.INSTRUCTIONS_KEY: {"gpqa_diamond": "Pick one."}}
    )
    first = told[0]
    lines = "\n".join(f"{letter}) {c}" for letter, c in zip("ABCD", first["choices"], strict=True))
    assert first["prompt"] == f"G0\n\n{lines}\n\nPick one."
    assert benchmarks.prompt("Q", None, "Box it.") == "Q\n\nBox it." and benchmarks.prompt("Q") == "Q"
    # a blank column gives way to the next name the benchmark may use (AIME files say problem or Problem)
    aime = datasets.Dataset.from_list([{"problem": " ", "Problem": "P9", "answer": "9"}])
    assert benchmarks.process("aime24_nofigures", aime, {})[0]["question"] == "P9"


def test_each_answer_kind_is_graded_by_its_own_grader():
    """An AIME answer must be written as an integer; the same text as a MATH500 answer is compared as math."""
    assert benchmarks.score({"kind": "integer", "gold": "5"}, "\\boxed{10/2}") == {
        "exact_match": 0.0,
        "fallback": 0.0,
    }
    assert benchmarks.score({"kind": "latex", "gold": "5"}, "\\boxed{10/2}")["exact_match"] == 1.0


def test_local_benchmark_files_in_each_format_give_the_same_rows(tmp_path: Path):
    """.jsonl, .json, .csv and .parquet hold the same rows; another suffix is a one-line error; a GPQA row
    missing any incorrect answer is skipped and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"Question": f"G{i}", "Correct Answer": "yes", **{f"Incorrect Answer {j}": f"no{j}" for j in (1, 2, 3)}}
            for i in range(3)]  # fmt: skip
    rows[1]["Incorrect Answer 1"] = ""
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g.json").write_text(json.dumps(rows))
    with (tmp_path / "g.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        read = benchmarks.read_local(tmp_path / f"g.{suffix}")
        assert [{k: v or "" for k, v in r.items()} for r in read] == rows, suffix
        assert benchmarks.counts("gpqa_diamond", read) == {"rows": 3, "skipped_no_answer": 1}
    (tmp_path / "g.txt").write_text("G0")
    with pytest.raises(LorascopeError) as e:
        benchmarks.read_local(tmp_path / "g.txt")
    assert (
        str(e.value)
        == f"{tmp_path / 'g.txt'}: unsupported benchmark file type (expected .jsonl, .json, .csv or .parquet)"
    )
    # an empty or malformed file is a one-line error naming it (the builders raised StopIteration, ArrowInvalid)
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text('{"Question": "G0", \n')
    (tmp_path / "b.parquet").write_text("not parquet")
    for name, why in (("e.jsonl", "empty benchmark file"), ("b.jsonl", "unreadable as json ("),
                      ("b.parquet", "unreadable as parquet (")):  # fmt: skip
        with pytest.raises(LorascopeError) as e:
            benchmarks.read_local(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {why}") and "\n" not in str(e.value), str(e.value)


def test_hub_datasets_are_the_papers_and_a_failed_load_is_one_line(monkeypatch: pytest.MonkeyPatch):
    """Without a local file each benchmark loads its hub dataset (path, config, split); the hub is not
    reachable here, so `datasets.load_dataset` is replaced by one that records its call and fails as offline
    loading does, with a long multi-line message."""
    import datasets

    calls = []

    def offline(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach the Hub:\n   offline   mode " + "x" * 300)

    monkeypatch.setattr(datasets, "load_dataset", offline)
    hub = {"aime24_nofigures": ("simplescaling/aime24_nofigures", None, "train"),
           "math500": ("HuggingFaceH4/MATH-500", None, "test"), "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train")}  # fmt: skip
    for name, (path, config, split) in hub.items():
        with pytest.raises(LorascopeError) as e:
            benchmarks.load(name, {})
        assert calls[-1] == ((path, config), {"split": split})
        detail = ("Couldn't reach the Hub: offline mode " + "x" * 300)[:200]
        assert str(e.value) == (
            f"{name}: cannot load hub dataset {path} ({detail}); set evaluate.data.{name} to a local file"
        )


def test_a_sampled_phases_seed_is_derived_from_run_seed_sample_question_and_phase():
    """The phases are named think, wait1.., answer (and chat): a recorded sample can be re-derived, and vLLM
    (the seed in the kwargs) and HF (torch seeded before each question) get the same seeds."""
    import torch

    class TorchSeedRecording(Scripted):  # the backend under the mixin: what torch was seeded with per call
        torch_seeds: list[int] = []

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            self.torch_seeds = [*self.torch_seeds, torch.initial_seed()]
            return super().generate_until(requests, disable_tqdm)

    class SeedRecording(BudgetForcing, TorchSeedRecording):
        chat_template = ScriptedForced.chat_template

    head = "USER:q\n" + THINK
    want = [phase_seed_by_hand(7, 2, head, phase) for phase in ("think", "wait1", "answer")]
    for in_kwargs in (True, False):
        lm = SeedRecording({"q": ["abc", "de", "1"]})
        lm.budget = forced({}, seed=7, wait_extensions=1, temperature=0.5).budget
        lm.seed_in_kwargs, lm.sample = in_kwargs, 2
        lm.generate_questions(["q"])
        assert [c[1] for c in lm.calls] == [10, 3, 6]  # think, the "Wait" extension, answer
        got = [kw["seed"] for kw in lm.kwargs] if in_kwargs else lm.torch_seeds
        assert got == want, in_kwargs
    chat = forced({"q": ["4"]}, seed=7, format="chat")
    chat.seed_in_kwargs, chat.sample = True, 2
    chat.generate_questions(["q"])
    assert [kw["seed"] for kw in chat.kwargs] == [phase_seed_by_hand(7, 2, "USER:q\n", "chat")]


def test_generate_until_samples_only_the_requests_that_ask_then_decodes_greedily_again():
    from lm_eval.api.instance import Instance

    lm = forced({"a": ["t", "1", "u", "2"], "e": [""]}, temperature=0.5)
    lm.seed_in_kwargs = True
    kwargs = {"until": ["<|im_end|>"], "max_gen_toks": 5}
    reqs = [
        Instance("generate_until", {}, ("a", {**kwargs, **extra}), idx=0) for extra in ({}, {SAMPLE_KEY: 3})
    ]
    assert lm.generate_until(reqs) == [THINK + "t" + ANSWER + "1", THINK + "u" + ANSWER + "2"]
    greedy, sampled = lm.kwargs[:2], lm.kwargs[2:]
    assert all(kw["do_sample"] is False and "seed" not in kw for kw in greedy)
    head = "USER:a\n" + THINK
    assert [(kw["do_sample"], kw["temperature"], kw["seed"]) for kw in sampled] == [
        (True, 0.5, phase_seed_by_hand(0, 3, head, phase)) for phase in ("think", "answer")
    ]
    assert lm.sample is None  # a later call is greedy again
    chat = forced({"e": [""]}, format="chat")
    assert chat.generate_until([Instance("generate_until", {}, ("e", kwargs), idx=0)]) == [
        ""
    ]  # empty stays empty


def test_generated_tokens_add_up_over_calls():
    lm = forced({"q": ["abcd", "xy"]}, format="chat")
    lm.generate_questions(["q"])
    lm.generate_questions(["q"])
    assert lm.generated_tokens == 4 + 2
    think = forced({"q": ["a" * 30, "7 and more"]})
    think.generate_questions(["q"])
    assert think.generated_tokens == 10 + 6  # the capped thinking and the capped answer


def test_a_wait_extension_runs_only_while_thinking_budget_is_left():
    # budget 10 and "Wait" (4 tokens): 5 + 4 leave one token (one more call, of 1); 6 + 4 leave none (no call)
    lm = forced({"one": ["abcde", "f", "1"], "none": ["abcdef", "2"]}, wait_extensions=1, thinking_tokens=10)
    lm.generate_questions(["one", "none"])
    assert [c[1] for c in lm.calls if c[0].startswith("USER:one")] == [10, 1, 6]
    assert [c[1] for c in lm.calls if c[0].startswith("USER:none")] == [10, 6]


def test_a_forced_answer_with_no_tokens_left_is_not_generated():
    """s1's answer runs to the end of the context (max_gen_toks): with none left there is no answer phase,
    with one left it gets one token."""
    prompt, end = len("USER:q\n" + THINK), len(answer_end("a" * 10, forced=True))
    for left in (0, 1):
        lm = forced(
            {"q": ["a" * 30, "7 and more"]}, answer_tokens=None, max_gen_toks=prompt + 10 + end + left
        )
        [out] = lm.generate_questions(["q"])
        assert [c[1] for c in lm.calls] == [10, left][: 1 + left], left
        assert out == THINK + "a" * 10 + (answer_end("a" * 10, forced=True) + "7" if left else ""), left


def test_a_run_killed_mid_way_resumes_after_its_last_finished_chunk(tmp_path: Path):
    """Each finished chunk goes to lm-eval's request cache as it finishes: a run that dies in its third chunk
    keeps the first two, and the rerun generates only the third."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM

    reqs = [
        Instance("generate_until", {}, (u, {"until": ["<|im_end|>"], "max_gen_toks": 5}), idx=0)
        for u in "abc"
    ]
    scripts = {"a": ["t", "1"], "b": ["u", "2"]}  # no script for "c": its chunk raises
    with pytest.raises(KeyError):
        CachingLM(forced(scripts, chunk_size=1), str(tmp_path / "cache.db")).generate_until(reqs)
    again = forced({**scripts, "c": ["v", "3"]}, chunk_size=1)
    out = CachingLM(again, str(tmp_path / "cache.db")).generate_until(reqs)
    assert out == [THINK + t + ANSWER + n for t, n in (("t", "1"), ("u", "2"), ("v", "3"))]
    assert {c[0].split("\n")[0] for c in again.calls} == {"USER:c"}


def test_finished_questions_go_to_the_request_cache_with_samples_apart(tmp_path: Path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM

    lm = forced({"a": ["t", "1", "t", "9"], "b": ["u", "2"], "c": ["v", "3"]}, chunk_size=2)
    cached = CachingLM(lm, str(tmp_path / "cache.db"))
    reqs = [
        Instance("generate_until", {}, (u, {"until": ["<|im_end|>"], "max_gen_toks": 5}), idx=0)
        for u in "abc"
    ]
    first = cached.generate_until(reqs)
    assert first == [THINK + t + ANSWER + n for t, n in (("t", "1"), ("u", "2"), ("v", "3"))]
    n_calls = len(lm.calls)
    assert cached.generate_until(reqs) == first and len(lm.calls) == n_calls  # all from the cache
    sampled = Instance(
        "generate_until", {}, ("a", {"until": ["<|im_end|>"], "max_gen_toks": 5, SAMPLE_KEY: 3}), 0
    )
    assert cached.generate_until([sampled]) == [THINK + "t" + ANSWER + "9"]  # a sample is its own request
    assert lm.generated_requests == 4


def test_hf_forcing_matches_plain_greedy_generation(with_prepared: Path):
    """The real tiny model through lm-eval's HFLM: a thinking phase is the model's own greedy
    continuation of the chat prompt, and the output is thinking + s1's forced ending + answer."""
    import torch

    from lorascope.evaluate.backend import build
    from lorascope.evaluate.forcing import THINK_STOPS
    from lorascope.models import load_model, load_tokenizer

    cfg = tiny_params(evaluate={"batch_size": 2, "wait_extensions": 0}).evaluate
    spec = resolve(with_prepared / "models/base", with_prepared / "models/base")
    lm = build(cfg, spec, with_prepared / "merged")
    users = ["What is 2 + 3?", "Name a prime number larger than ten, please."]
    prompts = [lm.chat_prompt(u) for u in users]
    assert all(p.endswith("<|im_start|>assistant\n<|im_start|>think") for p in prompts)
    thinking = lm._phase(prompts, [cfg.thinking_tokens] * 2, THINK_STOPS, "think", prompts)
    tok, model = load_tokenizer(spec.pretrained), load_model(spec.pretrained).eval()
    for prompt, text in zip(prompts, thinking, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=cfg.thinking_tokens, do_sample=False)
        new = greedy[0, ids.shape[1] :]
        assert len(new) == cfg.thinking_tokens  # the budget ran out: no stop token in the way
        assert text == tok.decode(new, skip_special_tokens=True)
    outs = lm.generate_questions(users)
    heads = [THINK + text + answer_end(text, forced=True) for text in thinking]
    assert all(o.startswith(h) for o, h in zip(outs, heads, strict=True))
    # tokens are counted as the budget counts them: each phase's text re-encoded
    phases = [*thinking, *(o[len(h) :] for o, h in zip(outs, heads, strict=True))]
    assert lm.generated_tokens == sum(len(tok(t).input_ids) for t in phases) > 0


def test_hf_thinking_ends_at_its_stop_whatever_its_batch_mate_does(
    with_prepared: Path, monkeypatch: pytest.MonkeyPatch
):
    """lm-eval's HFLM cuts the stop sequences from the decoded text; decoded without special tokens, a
    thinking phase that stopped at ``<|im_start|>`` while its batch-mate generated on kept what followed."""
    import torch

    from lorascope.evaluate.backend import build
    from lorascope.evaluate.forcing import THINK_STOPS

    cfg = tiny_params(evaluate={"batch_size": 2, "wait_extensions": 0}).evaluate
    spec = resolve(with_prepared / "models/base", with_prepared / "models/base")
    lm = build(cfg, spec, with_prepared / "merged")
    tok = lm.tokenizer
    stopped = tok("So 5.\n<|im_start|>answer\nAnswer: 5", add_special_tokens=False).input_ids
    going = tok("a line of thinking that goes on and on, " * 3, add_special_tokens=False).input_ids
    assert len(going) > len(stopped)
    pad = [tok.pad_token_id] * (len(going) - len(stopped))

    def scripted(context: torch.Tensor, **_: object) -> torch.Tensor:  # one batch, the two rows as generated
        return torch.cat([context, torch.tensor([stopped + pad, going])], 1)

    monkeypatch.setattr(lm, "_model_generate", scripted)
    prompts = [lm.chat_prompt("q1"), lm.chat_prompt("q2")]
    texts = lm._phase(prompts, [64, 64], THINK_STOPS, "think", prompts)
    assert texts == ["So 5.\n", tok.decode(going)]


def test_hf_sampling_is_reproducible_and_differs_between_samples(with_prepared: Path):
    from lorascope.evaluate.backend import build

    cfg = tiny_params(evaluate={"batch_size": 2, "samples": 2, "temperature": 1.0}).evaluate
    spec = resolve(with_prepared / "models/base", with_prepared / "models/base")
    lm = build(cfg, spec, with_prepared / "merged")
    users = ["What is 2 + 3?", "Is 91 prime?"]

    def decode(sample: int | None) -> list[str]:
        lm.sample = sample
        return lm.generate_questions(users)

    greedy = decode(None)
    s0, s1, s0_again = decode(0), decode(1), decode(0)
    assert s0 == s0_again and s0 != s1 and s0 != greedy
    assert decode(None) == greedy  # sampling leaves greedy decoding as it was
    lm.sample = 0
    assert lm.generate_questions(users[1:]) == s0[1:]  # a question's sample does not depend on its batch


# ------------------------------------------------------------------------------- adapter probe
def zero_lora_b(adapter: Path) -> Path:
    """The adapter with every lora_B set to zero: it computes exactly the base model."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    weights = {k: (v * 0 if "lora_B" in k else v) for k, v in load_file(path).items()}
    save_file(weights, path)
    return adapter


def test_adapter_that_changes_nothing_is_refused_before_generating(eval_workspace: Path):
    from lorascope.evaluate.backend import PROBE_ATOL, build, check_adapter_applied
    from lorascope.evaluate.stage import metrics_path, run

    cfg = tiny_params().evaluate
    spec = resolve(eval_workspace / "models/base", eval_workspace / "models/lora")
    lm = build(cfg, spec, eval_workspace / "merged")  # a real adapter passes
    assert check_adapter_applied(lm, cfg, spec) > PROBE_ATOL
    zero_lora_b(eval_workspace / "models/lora")
    with pytest.raises(LorascopeError) as err:
        run(tiny_params(), "lora", ["math500"])
    msg = str(err.value)
    assert "\n" not in msg and msg == (
        f"{eval_workspace}/models/lora: the adapter does not change the model: on the probe prompt its "
        f"log-probs equal the base model's (max difference 0 <= 1e-05); the engine ignored it or its lora_B is zero"
    )
    assert not metrics_path("lora").exists()


def test_merged_copy_is_checked_against_the_base(eval_workspace: Path, tmp_path: Path):
    from lorascope.evaluate.backend import PROBE_ATOL, PROBE_FILE, merged_copy

    spec = resolve(eval_workspace / "models/base", eval_workspace / "models/lora")
    out = merged_copy(spec, tmp_path / "merged", "float32")
    assert json.loads((out / PROBE_FILE).read_text())["max_logprob_diff_vs_base"] > PROBE_ATOL
    zero_lora_b(eval_workspace / "models/lora")
    with pytest.raises(
        LorascopeError, match=r"models/lora \(merged in float32\): the adapter does not change"
    ):
        merged_copy(spec, tmp_path / "merged-zero", "float32")
    assert not (tmp_path / "merged-zero").exists()  # nothing half-written


class _StubVLLM:
    """What the probe uses of lm-eval's VLLM (vLLM cannot run on this machine): ``loglikelihood``
    through the engine, with or without ``lora_request``."""

    def __init__(self, lora_shift: float):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "qwen2.5-tokenizer")
        self.lora_request, self.lora_shift, self.seen = "finetuned", lora_shift, []

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.seen.append((requests[0].args, self.lora_request))
        return [(-12.5 + (self.lora_shift if self.lora_request else 0.0), False)]


@pytest.mark.skipif(
    not (SHARED_DATA / "qwen2.5-tokenizer").is_dir(), reason="../shared/data is not checked out"
)
def test_vllm_probe_compares_with_and_without_the_lora_request():
    from lorascope.evaluate.backend import PROBE_REPLY, check_adapter_applied

    cfg = EvaluateSection(backend="vllm")
    spec = ModelSpec("m", None, "m", Path("models/lora"))
    ignored = _StubVLLM(0.0)  # the engine serves the base whatever the request says
    with pytest.raises(LorascopeError, match=r"^models/lora: the adapter does not change the model"):
        check_adapter_applied(ignored, cfg, spec)
    assert [lora for _, lora in ignored.seen] == ["finetuned", None] and ignored.lora_request == "finetuned"
    assert ignored.seen[0][0][1] == PROBE_REPLY
    assert check_adapter_applied(_StubVLLM(0.25), cfg, spec) == 0.25
    merged = EvaluateSection(backend="vllm", lora_serving="merged")  # checked when the copy was made
    assert check_adapter_applied(ignored, merged, spec) is None


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

    from lorascope.evaluate.backend import merged_copy
    from lorascope.models import load_model

    from tests.extract.test_extract import make_adapter

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
# The paper's Appendix C (Table 2) reports each ablated adapter's score as a share of the LoRA's own
# gain: AIME attn-ablated 50.02%, MATH500 attn 86.84% / mlp 13.16%, GPQA attn 27.83% / mlp 16.72%.
# AIME's scores are the paper's (base 0.2333, LoRA 0.5000, attn-ablated 0.3667); the MATH500 and
# GPQA scores were not at hand, so they are reconstructed: counts out of 500 and 198 questions,
# printed to 4 decimals as the paper prints scores, whose ratios give the printed percentages (MATH500:
# a gain of 38 questions, 33 kept by attn-ablated, 5 by mlp-ablated; GPQA: 18, 5 and 3).
PAPER_SCORES = {  # Tables 1 and 2 as printed (4 decimals); full's MATH500 / GPQA from the printed recoveries
    "base": {"aime24_nofigures": 0.2333, "math500": 0.8120, "gpqa_diamond": 0.5303},
    "lora": {"aime24_nofigures": 0.5000, "math500": 0.8880, "gpqa_diamond": 0.6212},
    "full": {"aime24_nofigures": 0.6000, "math500": 0.9000, "gpqa_diamond": 0.6313},
    "lora-attn-ablated": {"aime24_nofigures": 0.3667, "math500": 0.8780, "gpqa_diamond": 0.5556},
    "lora-mlp-ablated": {"aime24_nofigures": 0.1333, "math500": 0.8220, "gpqa_diamond": 0.5455},
}
PAPER_TABLE1 = {"aime24_nofigures": 72.73, "math500": 86.36, "gpqa_diamond": 89.90}  # percent, as printed
PAPER_TABLE2 = {  # percent, as printed
    ("aime24_nofigures", "lora-attn-ablated"): 50.02,
    ("math500", "lora-attn-ablated"): 86.84,
    ("gpqa_diamond", "lora-attn-ablated"): 27.83,
    ("math500", "lora-mlp-ablated"): 13.16,
    ("gpqa_diamond", "lora-mlp-ablated"): 16.72,
}
TASKS = ["aime24_nofigures", "math500", "gpqa_diamond"]


def test_table1_reproduces_the_papers_recoveries_and_its_gpqa_slip():
    """Table 1: (lora - base) / (full - base) from the printed scores gives the printed 72.73% and 86.36%;
    for GPQA-Diamond the printed scores give 90.00% (a gain of 18 of 20 questions of 198) where the paper
    prints 89.90% (docs/fidelity.md records the slip)."""
    rows = table(PAPER_SCORES, TASKS, list(PAPER_SCORES))
    for task in ("aime24_nofigures", "math500"):
        assert 100 * rows[task]["recovery"] == pytest.approx(PAPER_TABLE1[task], abs=0.005), task
    gpqa = 100 * rows["gpqa_diamond"]["recovery"]
    assert gpqa == pytest.approx(90.00, abs=0.005) and gpqa != pytest.approx(
        PAPER_TABLE1["gpqa_diamond"], abs=0.05
    )
    assert (123 - 105) / (125 - 105) == 0.9  # the same as counts of 198 questions (0.5303 / 0.6212 / 0.6313)
    assert [round(n / 198, 4) for n in (105, 123, 125)] == [0.5303, 0.6212, 0.6313]


def test_table2_reproduces_the_papers_percentages():
    rows = table(PAPER_SCORES, TASKS, list(PAPER_SCORES))  # default references: ablated -> lora
    for (task, variant), percent in PAPER_TABLE2.items():
        assert 100 * rows[task][f"recovery.{variant}"] == pytest.approx(percent, abs=0.005), (task, variant)
    # the paper prints the MLP-ablated AIME score (0.1333, below the base) but leaves its percentage blank:
    # the formula gives -37.50%, a loss of more than the LoRA's whole gain (docs/fidelity.md)
    assert 100 * rows["aime24_nofigures"]["recovery.lora-mlp-ablated"] == pytest.approx(-37.50, abs=0.005)
    # a variant without a score is null with the reason, never a silent 0
    missing = {**PAPER_SCORES, "lora-mlp-ablated": {"math500": 0.8220, "gpqa_diamond": 0.5455}}
    rows = table(missing, TASKS, list(missing))
    assert rows["aime24_nofigures"]["recovery.lora-mlp-ablated"] is None
    assert rows["aime24_nofigures"]["recovery.lora-mlp-ablated.reason"] == "no score for lora-mlp-ablated"
    # dividing by full - base instead (the old behaviour) gives the 36.4% reported
    old = table(PAPER_SCORES, TASKS, list(PAPER_SCORES), {"lora-attn-ablated": "full"})
    assert 100 * old["aime24_nofigures"]["recovery.lora-attn-ablated"] == pytest.approx(36.38, abs=0.005)


def test_table1_recovery_values_and_reasons():
    assert recovery(0.2, 0.5, 0.6) == (pytest.approx(0.75), None)  # (lora - base) / (full - base)
    value, reason = recovery(0.4, 0.5, 0.4)
    assert value is None and reason == "full (0.4) <= base (0.4): the full finetune gained nothing to recover"
    assert recovery(0.1, None, 0.3) == (None, "no score for variant")
    value, reason = recovery(0.3, 0.2, 0.3, ("lora-attn-ablated", "lora"))
    assert value is None and reason == "lora (0.3) <= base (0.3): the LoRA gained nothing to recover"
    rows = table(
        {"base": {"m": 0.1, "a": 0.5}, "lora": {"m": 0.3, "a": 0.5}, "full": {"m": 0.5, "a": 0.4},
         "lora-attn-ablated": {"m": 0.2, "a": 0.1}, "lora-r8": {"m": 0.4, "a": 0.6}},
        ["m", "a"], references={"lora-r8": None},
    )  # fmt: skip
    assert rows["m"]["recovery"] == pytest.approx((0.3 - 0.1) / (0.5 - 0.1))
    assert rows["m"]["recovery.lora-attn-ablated"] == pytest.approx((0.2 - 0.1) / (0.3 - 0.1))  # of the LoRA
    assert rows["m"]["recovery.lora-r8"] == pytest.approx((0.4 - 0.1) / (0.5 - 0.1))  # not ablated: of full
    assert rows["a"]["recovery"] is None and "gained nothing" in rows["a"]["recovery.reason"]
    assert rows["a"]["recovery.lora-attn-ablated"] is None  # lora (0.5) == base: no division by zero
    explicit = table(
        {"base": {"m": 0.1}, "lora-x": {"m": 0.2}, "full": {"m": 0.5}}, ["m"], references={"lora-x": "full"}
    )
    assert explicit["m"]["recovery.lora-x"] == pytest.approx(0.25)


def test_recovery_reasons_name_every_missing_score_and_the_reference():
    assert recovery(None, 0.2, None, ("lora", "full")) == (None, "no score for base, full")
    assert recovery(0.1, None, None, ("lora-x", "lora")) == (None, "no score for lora-x, lora")
    # a reference other than full / lora is named as itself, its scores to 4 significant digits
    assert recovery(0.123456, 0.3, 0.1, ("a", "lora-r8")) == (
        None,
        "lora-r8 (0.1) <= base (0.1235): lora-r8 gained nothing to recover",
    )
    assert recovery(0.1, 0.1, 0.3000001, ("a", "lora-r8")) == (0.0, None)  # a gain, however small


def test_recovery_markdown_cells_notes_and_column_choice():
    from lorascope.evaluate.recovery import markdown

    rows = {
        "m": {"lora-x": 0.2, "full": 0.5, "base": 0.1, "lora": 3, "recovery": 0.5, "recovery.ci_low": 0.25,
              "recovery.ci_high": 0.75, "recovery.lora-x": None, "recovery.lora-x.reason": "why not",
              "recovery.other": 0.9},
        "a": {"lora-x": None, "full": 0.4, "base": 0.2, "lora": 0.3, "recovery": 0.5, "recovery.lora-x": 0.125},
    }  # fmt: skip
    formulas = {"recovery": "(lora - base) / (full - base)", "recovery.other": "not a column"}
    got = markdown(rows, ["lora-x", "full", "base", "lora"], formulas)
    assert got == (
        "| task | base | lora | full | lora-x | recovery | recovery.lora-x |\n"
        "|---|---|---|---|---|---|---|\n"
        "| m | 0.100 | 3 | 0.500 | 0.200 | 0.500 [0.250, 0.750] | — |\n"
        "| a | 0.200 | 0.300 | 0.400 | — | 0.500 | 0.125 |\n"
        "\n"
        "- recovery = (lora - base) / (full - base)\n"
        "- m, recovery.lora-x: why not\n"
        "- [low, high]: paired bootstrap 95% CI over questions\n"
    )
    # no notes: no blank line; no rows: the header alone
    assert markdown({"m": {"base": 0.5, "lora-x": 0.25}}, ["lora-x", "base"]) == (
        "| task | base | lora-x |\n|---|---|---|\n| m | 0.500 | 0.250 |\n"
    )
    assert markdown({}, ["base", "lora"]) == "| task | base | lora |\n|---|---|---|\n"
    # a recovery without a CI: no CI note
    assert markdown({"m": {"base": 0.1, "lora": 0.3, "recovery": 0.5}}, ["base", "lora"]) == (
        "| task | base | lora | recovery |\n|---|---|---|---|\n| m | 0.100 | 0.300 | 0.500 |\n"
    )


def test_recovery_formulas_name_each_columns_reference():
    from lorascope.evaluate.recovery import formulas

    got = formulas(
        ["base", "full", "lora", "lora-attn-ablated", "lora-r8", "lora-y"],
        {"lora-r8": "lora", "lora-y": None},
    )
    assert got == {
        "recovery": "(lora - base) / (full - base)",
        "recovery.lora-attn-ablated": "(lora-attn-ablated - base) / (lora - base)",
        "recovery.lora-r8": "(lora-r8 - base) / (lora - base)",
        "recovery.lora-y": "(lora-y - base) / (full - base)",
    }
    assert formulas(["lora"]) == {"recovery": "(lora - base) / (full - base)"}


def test_recovery_table_paired_cis_by_hand():
    """The CI resamples the same questions (sorted ids) for base, variant and reference, seeded by
    (seed, "recovery", task, variant, reference); resamples where the reference gained nothing are
    left out and their share reported."""
    import numpy as np

    from lorascope.bootstrap import rng

    ids = [f"q{i}" for i in range(8)]
    base, lora, full = ([int(i < k) for i in range(8)] for k in (1, 2, 3))
    pq = {
        v: {"m": dict(zip(reversed(ids), reversed(c), strict=True))}
        for v, c in (("base", base), ("lora", lora), ("full", full))
    }
    scores = {"base": {"m": 1 / 8}, "lora": {"m": 2 / 8}, "full": {"m": 3 / 8}}
    rows = table(scores, ["m"], ["base", "lora", "full"], per_question=pq, iters=200, seed=3)
    idx = rng(3, "recovery", "m", "lora", "full").integers(0, 8, size=(200, 8))
    b, v, r = (np.asarray(c, dtype=float)[idx].mean(axis=1) for c in (base, lora, full))
    ok = r > b
    lo, hi = np.percentile((v[ok] - b[ok]) / (r - b)[ok], (2.5, 97.5))
    row = rows["m"]
    assert row["recovery"] == pytest.approx(0.5)
    assert row["recovery.ci_low"] == pytest.approx(lo) and row["recovery.ci_high"] == pytest.approx(hi)
    assert 0 < row["recovery.ci_dropped"] == pytest.approx(1 - ok.mean())
    assert "recovery.ci_reason" not in row and "recovery.reason" not in row
    # the reference better on every question: no resample is dropped, and no ci_dropped key
    better = {**pq, "full": {"m": dict.fromkeys(ids, 1)}}
    row = table(
        {**scores, "full": {"m": 1.0}}, ["m"], ["base", "lora", "full"], per_question=better, iters=50
    )["m"]
    assert "recovery.ci_dropped" not in row and row["recovery.ci_low"] <= row["recovery.ci_high"]
    # the default seed is 0, and by default no resampling (iters 0)
    assert table(scores, ["m"], ["base", "lora", "full"], per_question=pq, iters=200) == table(
        scores, ["m"], ["base", "lora", "full"], per_question=pq, iters=200, seed=0
    )
    assert not any(".ci" in k for k in table(scores, ["m"], per_question=pq)["m"])
    # the configured variants, not those with scores: one without a score gets its column, null with why
    row = table(scores, ["m"], ["base", "lora", "full", "lora-y"])["m"]
    assert row["lora-y"] is None and row["recovery.lora-y.reason"] == "no score for lora-y"
    assert table(scores, ["m"], ["base", "full"])["m"] == {"base": 1 / 8, "full": 3 / 8}
    # no CI without iters or without per-question results
    for kw in ({"per_question": pq, "iters": 0}, {"per_question": None, "iters": 50}):
        row = table(scores, ["m"], ["base", "lora", "full"], **kw)["m"]
        assert not any(".ci" in k for k in row), kw
    # why there is no CI
    flat = {**pq, "full": {"m": dict.fromkeys(ids, 0)}, "base": {"m": dict.fromkeys(ids, 0)}}
    row = table(scores, ["m"], ["base", "lora", "full"], per_question=flat, iters=50)["m"]
    assert row == {"base": 1 / 8, "lora": 2 / 8, "full": 3 / 8, "recovery": pytest.approx(0.5),
                   "recovery.ci_reason": "full gained nothing over base in every bootstrap resample"}  # fmt: skip
    no_task = {**pq, "full": {"other": {"q0": 1}}}
    row = table(scores, ["m"], ["base", "lora", "full"], per_question=no_task, iters=50)["m"]
    assert row["recovery.ci_reason"] == "no per-question results for full"
    del no_task["base"]
    row = table(scores, ["m"], ["base", "lora", "full"], per_question=no_task, iters=50)["m"]
    assert row["recovery.ci_reason"] == "no per-question results for base, full"
    # a point value with a reason gets no CI
    row = table({**scores, "full": {"m": 0.1}}, ["m"], ["base", "lora", "full"], per_question=pq, iters=50)[
        "m"
    ]
    assert row["recovery"] is None and not any(".ci" in k for k in row)


def test_bad_evaluate_params_are_one_line_errors():
    variants = {"base": {"model": "models/base"}, "lora": {"model": "models/lora"}}
    for ref in ("nope", "base", "lora"):
        with pytest.raises(
            LorascopeError, match=rf"evaluate.*variants\.lora\.reference: '{ref}' is not a variant"
        ):
            tiny_params(
                evaluate={"variants": {**variants, "lora": {"model": "models/lora", "reference": ref}}}
            )
    for bad in ("soon", 0):
        with pytest.raises(LorascopeError) as err:
            tiny_params(evaluate={"thinking_tokens": bad})
        assert (
            str(err.value)
            == f"params: evaluate.thinking_tokens: must be a positive integer, auto or null, got {bad!r}"
        )
    assert tiny_params(evaluate={"thinking_tokens": "auto"}).evaluate.thinking_tokens == "auto"


def write_variant(root: Path, variant: str, correct: dict[str, list[list[int]]]) -> None:
    """metrics/eval/<variant>.json and .questions.json as the stage writes them, from 0/1 matrices."""
    eval_dir = root / "metrics" / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    tasks = {t: {"score": sum(map(sum, m)) / sum(map(len, m))} for t, m in correct.items()}
    (eval_dir / f"{variant}.json").write_text(json.dumps({"variant": variant, "tasks": tasks}))
    questions = {t: {"ids": [f"q{i}" for i in range(len(m))], "correct": m} for t, m in correct.items()}
    (eval_dir / f"{variant}.questions.json").write_text(json.dumps({"variant": variant, "tasks": questions}))


def test_recovery_stage_names_references_and_gives_paired_cis(workspace: Path):
    from lorascope.evaluate.stage import recovery_path, run_recovery

    n = 60  # base right on the first 20 questions, lora on 40, the ablated adapter on 30
    right = lambda k: [[int(i < k)] for i in range(n)]  # noqa: E731
    for variant, k in (("base", 20), ("lora", 40), ("full", 50), ("lora-attn-ablated", 30)):
        write_variant(workspace, variant, {"math500": right(k)})
    params = tiny_params(evaluate={"tasks": ["math500"], "bootstrap_iters": 200})
    out = run_recovery(params)
    rec = json.loads(out.read_text())
    row = rec["tasks"]["math500"]
    assert row["recovery"] == pytest.approx((40 - 20) / (50 - 20))
    assert row["recovery.lora-attn-ablated"] == pytest.approx((30 - 20) / (40 - 20))
    assert rec["references"] == {
        "recovery": "full",
        "recovery.lora-attn-ablated": "lora",
        "recovery.lora-mlp-ablated": "lora",
    }
    # nested correctness (every question lora gets, full gets too): a paired bootstrap still varies
    assert row["recovery.ci_low"] < row["recovery"] < row["recovery.ci_high"]
    assert row["recovery.lora-mlp-ablated"] is None and rec["missing_variants"] == ["lora-mlp-ablated"]
    assert row["recovery.lora-mlp-ablated.reason"] == "no score for lora-mlp-ablated"
    md = out.with_suffix(".md").read_text()
    assert "| task | base | lora | full | lora-attn-ablated | lora-mlp-ablated | recovery |" in md
    assert "- recovery.lora-attn-ablated = (lora-attn-ablated - base) / (lora - base)" in md
    assert f"{row['recovery']:.3f} [{row['recovery.ci_low']:.3f}, {row['recovery.ci_high']:.3f}]" in md
    assert run_recovery(params) == recovery_path() and json.loads(out.read_text()) == rec  # deterministic
    # the ablated adapter keeps the questions lora gets, in the same order: paired, its CI is exact
    for variant, k in (("lora-attn-ablated", 40),):
        write_variant(workspace, variant, {"math500": right(k)})
    row = json.loads(run_recovery(params).read_text())["tasks"]["math500"]
    assert row["recovery.lora-attn-ablated"] == row["recovery.lora-attn-ablated.ci_low"] == 1.0
    assert row["recovery.lora-attn-ablated.ci_high"] == 1.0


# ---------------------------------------------------------------------------------------- stage
@pytest.fixture
def eval_workspace(with_prepared: Path) -> Path:
    """base, a random-B adapter and a "full" finetune that is a copy of the base (full == base)."""
    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    record_output("finetune", with_prepared, "models/lora", {"finetune.variant": "lora"})
    shutil.copytree(with_prepared / "models/base", with_prepared / "models/full")
    return with_prepared


def test_stage_end_to_end_metrics_samples_recovery_and_resume(eval_workspace: Path):
    import mlflow

    from lorascope import tracking
    from lorascope.evaluate.stage import metrics_path, questions_path, recovery_path, run, run_recovery

    params = tiny_params(evaluate={"limit": 3})
    sampled = tiny_params(evaluate={"limit": 3, "samples": 2})
    for variant in ("base", "full"):
        run(params, variant)
    run(sampled, "lora")
    lora = json.loads(metrics_path("lora").read_text())
    assert set(lora["tasks"]) == {"aime24_nofigures", "math500", "gpqa_diamond"}
    assert lora["decoding"] == {"samples": 2, "temperature": 1.0, "format": "think"}
    questions = json.loads(questions_path("lora").read_text())
    for task, res in lora["tasks"].items():
        assert res["n"] == 3 and res["decodes"] == 2 and res["rows"] == params.prepare.synthetic.n_eval
        correct = questions["tasks"][task]["correct"]
        assert len(correct) == 3 and all(len(c) == 2 for c in correct)
        assert res["score"] == pytest.approx(sum(map(sum, correct)) / 6)  # avg@2
        assert res["pass@2"] == pytest.approx(sum(any(c) for c in correct) / 3)  # n = k: any correct
        assert res["score_ci_low"] <= res["score"] <= res["score_ci_high"]
        assert 0 <= res["fallback"] + res["no_answer_extracted"] <= 6
    base = json.loads(metrics_path("base").read_text())
    assert base["decoding"] == {"samples": 0, "temperature": 0.0, "format": "chat"}
    assert all(r["decodes"] == 1 and "pass@2" not in r for r in base["tasks"].values())

    run_id = run_of(eval_workspace, "metrics/eval/lora.json")
    run_ = tracking.client().get_run(run_id)
    assert run_.data.tags["evaluate.variant"] == "lora"
    assert run_.data.tags["upstream.finetune"] == run_of(eval_workspace, "models/lora")
    assert run_.data.metrics["generated_requests"] == 9 * 2  # 3 tasks x 3 questions x 2 samples
    inputs = {d.dataset.name: d for d in run_.inputs.dataset_inputs}  # the runs table's Dataset column
    assert set(inputs) == set(lora["tasks"])
    for task, d in inputs.items():
        # MLflow keeps one dataset per (name, digest) in an experiment: an earlier workspace's path may stand
        assert json.loads(d.dataset.source)["uri"].endswith("/ws/" + params.evaluate.data[task])
        assert json.loads(d.dataset.profile)["num_rows"] == lora["tasks"][task]["rows"]
        assert [t.value for t in d.tags if t.key == "mlflow.data.context"] == ["evaluation"]
    table_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/math500.json")
    samples = json.loads(Path(table_path).read_text())
    assert samples["columns"] == [
        "doc_id",
        "sample",
        "qid",
        "prompt",
        "output",
        "extracted",
        "method",
        "gold",
        "correct",
    ]
    assert len(samples["data"]) == 6 and all(row[4].startswith(THINK) for row in samples["data"])
    assert sum(row[8] for row in samples["data"]) == round(lora["tasks"]["math500"]["score"] * 6)
    base_table = mlflow.artifacts.download_artifacts(
        run_id=run_of(eval_workspace, "metrics/eval/base.json"), artifact_path="samples/math500.json"
    )
    assert not any(row[4].startswith(THINK) for row in json.loads(Path(base_table).read_text())["data"])

    out = run_recovery(params)
    rec = json.loads(out.read_text())
    for row in rec["tasks"].values():  # full is a copy of base: nothing to recover
        assert row["base"] == row["full"] and row["recovery"] is None
        assert "gained nothing" in row["recovery.reason"]
    assert out == recovery_path() and "| task | base | lora | full |" in out.with_suffix(".md").read_text()

    # a repeated run answers every question (every sample) from the request cache, with the same outputs
    before = questions_path("lora").read_bytes()
    again = json.loads(run(sampled, "lora").read_text())
    assert again == lora and questions_path("lora").read_bytes() == before
    again_run = tracking.client().get_run(run_of(eval_workspace, "metrics/eval/lora.json"))
    assert again_run.data.metrics["generated_requests"] == 0


def test_cli_errors_are_one_line(eval_workspace: Path, tmp_path: Path):
    env = {"LORASCOPE_ROOT": str(eval_workspace)}
    shutil.copy(Path(__file__).parents[2] / "params.yaml", eval_workspace)
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

    from tests.extract.test_extract import foreign_adapter

    shutil.rmtree(eval_workspace / "models/lora")
    shutil.copytree(foreign_adapter(tmp_path), eval_workspace / "models/lora")
    with pytest.raises(
        LorascopeError, match=r"models/lora: adapter does not match the base model \(.*size mismatch"
    ):
        run(tiny_params(), "lora", ["math500"])


def test_profiles_declare_every_field():
    raw = tiny_raw()
    assert set(raw["evaluate"]) == set(EvaluateSection.model_fields)
    assert raw["evaluate"]["variants"]["base"]["format"] == "chat"
