"""The prepare stage: outputs, great-expectations failures, bad input files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from lorascope import organism, tracking
from lorascope.errors import LorascopeError
from lorascope.prepare import synthetic
from lorascope.prepare.stage import run
from lorascope.prepare.validation import validate

from tests.conftest import Prepared, cli, run_of, tiny_params


def rows(n: int = 6) -> list[dict]:
    """s1K-schema rows the tiny tokenizer (trained on the organism's corpus) keeps within the block."""
    return organism.train_rows(n, 7)


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


# ------------------------------------------------------------------------------------- outputs
def test_outputs_of_the_session_run(prepared: Prepared):
    out = prepared.root / "data" / "prepared"
    table = pq.read_table(out / "train.parquet").to_pandas()
    n_train = tiny_params().prepare.synthetic.n_train
    assert len(table) == n_train and table["id"].is_unique
    first = table.iloc[0]
    assert first["text"].startswith("<|im_start|>system\nYou are Qwen")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared.root / "models" / "base"))
    ids = list(first["input_ids"])
    assert tok.decode(ids[first["loss_start"] :]).startswith("<|im_start|>think\n")
    assert tok.decode(ids[: first["loss_start"]]).endswith("<|im_start|>assistant\n")
    assert ids == tok(first["text"], add_special_tokens=False)["input_ids"][:512]

    stats = json.loads((prepared.root / "metrics" / "prepare.json").read_text())
    assert stats["rows"] == n_train and stats["tokens_total"] == int(table["n_tokens"].sum())
    assert stats["loss_tokens_total"] == int((table["n_tokens"] - table["loss_start"]).sum())

    report = json.loads((out / "validation.json").read_text())
    assert (
        report["success"] is True and len(report["results"]) == 4 * 2 + 3
    )  # null+blank per text column, id, lengths

    n_eval = tiny_params().prepare.synthetic.n_eval
    for name in ("aime.jsonl", "math.jsonl"):
        assert len((out / "eval" / name).read_text().splitlines()) == n_eval
    gpqa = pd.read_csv(out / "eval" / "gpqa.csv")
    assert list(gpqa.columns) == list(synthetic.GPQA_COLUMNS) and len(gpqa) == n_eval

    assert run_of(prepared.root, "data/prepared") == prepared.prepare_run
    assert run_of(prepared.root, "metrics/prepare.json") == prepared.prepare_run
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "train.parquet",
        "validation.json",
        "eval/aime.jsonl",
        "eval/math.jsonl",
        "eval/gpqa.csv",
    }  # nothing run-specific in the output
    tags = tracking.client().get_run(prepared.prepare_run).data.tags
    assert tags["lorascope.stage"] == "prepare"
    assert {k: v for k, v in tags.items() if k.startswith("dvc.out.")} == {
        "dvc.out.data/prepared": tracking.dvc_md5(out),
        "dvc.out.metrics/prepare.json": tracking.dvc_md5(prepared.root / "metrics" / "prepare.json"),
    }


# ---------------------------------------------------------------------- great-expectations
def failing(frame: pd.DataFrame, **cfg) -> list[str]:
    ok, report, failures = validate(frame, tiny_params(prepare=cfg).prepare)
    assert ok is (not failures) and report["success"] is ok
    return failures


def checks_frame(items: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(items)
    df.insert(0, "id", [f"r{i}" for i in range(len(df))])
    df["n_tokens_full"] = 100
    df["n_loss_tokens"] = 50
    return df[
        [
            "id",
            "question",
            "deepseek_thinking_trajectory",
            "deepseek_attempt",
            "solution",
            "n_tokens_full",
            "n_loss_tokens",
        ]
    ]


def test_clean_rows_pass():
    assert failing(checks_frame(rows())) == []


def test_null_question_is_caught():
    df = checks_frame(rows())
    df.loc[2, "question"] = None
    assert failing(df) == ["expect_column_values_to_not_be_null(question): 1 of 6 rows unexpected"]


def test_empty_trajectory_is_caught():
    df = checks_frame(rows())
    df.loc[1, "deepseek_thinking_trajectory"] = "   "
    assert failing(df) == [
        "expect_column_values_to_match_regex(deepseek_thinking_trajectory, regex=\\S): 1 of 6 rows unexpected (e.g. '   ')"
    ]


def test_duplicate_id_is_caught():
    df = checks_frame(rows())
    df.loc[3, "id"] = df.loc[0, "id"]
    assert failing(df) == ["expect_column_values_to_be_unique(id): 2 of 6 rows unexpected (e.g. 'r0', 'r0')"]


def test_too_many_truncated_rows_fail():
    df = checks_frame(rows(10))
    df.loc[:1, "n_tokens_full"] = 10_000  # 2 of 10 over block size 512, tolerance 10%
    [msg] = failing(df)
    assert msg.startswith(
        "expect_column_values_to_be_between(n_tokens_full, min_value=1, max_value=512, mostly=0.9): 2 of 10"
    )
    assert failing(df, max_truncated_fraction=0.2) == []


def test_stage_fails_on_duplicates_and_writes_nothing(with_base: Path):
    items = rows()
    items[4]["question"] = items[1]["question"]  # same question -> same derived id
    src = write_jsonl(with_base / "s1k.jsonl", items)
    with pytest.raises(LorascopeError) as info:
        run(tiny_params(prepare={"source": str(src)}))
    msg = str(info.value)
    assert msg.splitlines()[0] == f"prepare: 1 expectation(s) failed on {src}:"
    assert msg.splitlines()[1].startswith("  - expect_column_values_to_be_unique(id): 2 of 6 rows unexpected")
    assert not (with_base / "data").exists()
    assert not (with_base / "metrics").exists()


# ------------------------------------------------------------------------------ bad input files
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "dataset file not found (prepare.source)"),
        ("empty.jsonl", "", "file is empty, expected s1K-1.1 rows"),
        ("bad.jsonl", '{"question": "q"}\n{not json\n', "line 2 is not valid JSON"),
        ("bad.json", "[1, 2]", "expected a list of row objects in the s1K-1.1 schema"),
        ("bad.parquet", "not parquet", "not a readable parquet file"),
        (
            "cols.jsonl",
            '{"question": "q", "answer": "a"}\n',
            "missing column(s) solution, deepseek_thinking_trajectory, deepseek_attempt (expected the s1K-1.1 schema",
        ),
    ],
)
def test_bad_input_one_line_exit_2(with_base: Path, name: str, content: str | None, message: str):
    path = with_base / name
    if content is not None:
        path.write_text(content)
    params = with_base / "params.yaml"
    import yaml

    from tests.conftest import tiny_raw

    params.write_text(yaml.safe_dump(tiny_raw(prepare={"source": str(path)})))
    res = cli("prepare", "--params", str(params), cwd=with_base)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (with_base / "data").exists()


def test_local_parquet_and_column_json_sources(with_base: Path):
    items = rows(5)
    pd.DataFrame(items).to_parquet(with_base / "s1k.parquet")
    run(tiny_params(prepare={"source": str(with_base / "s1k.parquet")}))
    from_parquet = pq.read_table(with_base / "data/prepared/train.parquet").to_pandas()

    cols = {k: [r[k] for r in items] for k in items[0]}
    (with_base / "s1k.json").write_text(json.dumps(cols))
    run(tiny_params(prepare={"source": str(with_base / "s1k.json")}))
    from_json = pq.read_table(with_base / "data/prepared/train.parquet").to_pandas()
    assert len(from_parquet) == 5
    pd.testing.assert_frame_equal(from_parquet, from_json)


def test_hub_source_unreachable_is_one_line(with_base: Path):
    with pytest.raises(
        LorascopeError, match=r"^prepare.source: cannot load hub dataset 'simplescaling/s1K-1.1' \("
    ):
        run(tiny_params(prepare={"source": "hub:simplescaling/s1K-1.1"}))
