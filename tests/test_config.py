"""Typed params: every bad value gets its one-line message; profiles resolve to the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lorascope.config import dump_params, load_params, section_hash, validate_params
from lorascope.errors import LorascopeError
from lorascope.sections import LORA_TARGETS

from tests.conftest import REPO, cli, tiny_raw


def error_of(**sections) -> str:
    with pytest.raises(LorascopeError) as info:
        validate_params(tiny_raw(**sections), "params.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"finetune": {"lr": -1}}, "params.yaml: finetune.lr: must be > 0, got -1"),
        ({"finetune": {"full_lr": 0}}, "params.yaml: finetune.full_lr: must be > 0, got 0"),
        ({"finetune": {"lora": {"r": 0}}}, "params.yaml: finetune.lora.r: must be > 0, got 0"),
        (
            {"finetune": {"lora": {"dropout": 1.0}}},
            "params.yaml: finetune.lora.dropout: must be < 1, got 1.0",
        ),
        ({"finetune": {"warmup_ratio": 1.5}}, "params.yaml: finetune.warmup_ratio: must be < 1, got 1.5"),
        ({"finetune": {"weight_decay": -0.1}}, "params.yaml: finetune.weight_decay: must be >= 0, got -0.1"),
        ({"finetune": {"epochs": "many"}}, "params.yaml: finetune.epochs: expected a number, got 'many'"),
        ({"sae": {"k": 2.5}}, "params.yaml: sae.k: expected an integer, got 2.5"),
        (
            {"finetune": {"precision": "fp8"}},
            "params.yaml: finetune.precision: must be one of 'auto', 'float32', 'bfloat16' or 'float16', got 'fp8'",
        ),
        (
            {"ablate": {"device": "gpu"}},
            "params.yaml: ablate.device: expected auto, cpu, cuda or cuda:<index>, got 'gpu'",
        ),
        (
            {"finetune": {"lr_scheduler": "exp"}},
            "params.yaml: finetune.lr_scheduler: must be one of 'cosine', 'linear', 'constant' or "
            "'constant_with_warmup', got 'exp'",
        ),
        (
            {"finetune": {"lora": {"target_modules": ["q_proj", "q_proj"]}}},
            "params.yaml: finetune.lora.target_modules: must not repeat a projection, got ['q_proj', 'q_proj']",
        ),
        (
            {"finetune": {"lora": {"target_modules": []}}},
            "params.yaml: finetune.lora.target_modules: must list at least one projection",
        ),
        (
            {"finetune": {"micro_batch_size": 3}},
            "params.yaml: finetune: micro_batch_size (3) must divide global_batch_size (8)",
        ),
        (
            {"base": {"tiny": {"num_attention_heads": 3}}},
            "params.yaml: base.tiny: num_attention_heads (3) must divide hidden_size (64)",
        ),
        (
            {"prepare": {"block_size": 4096}},
            "params.yaml: params: base.tiny.max_position_embeddings (1024) must be >= prepare.block_size (4096)",
        ),
        (
            {"prepare": {"source": "data.csv"}},
            "params.yaml: prepare.source: expected 'synthetic', 'hub:<dataset id>' or a "
            ".jsonl/.json/.parquet path, got 'data.csv'",
        ),
        (
            {"categorize": {"min_categories": 9}},
            "params.yaml: categorize: min_categories (9) must be <= max_categories (8)",
        ),
        (
            {"prepare": {"max_truncated_fraction": -0.5}},
            "params.yaml: prepare.max_truncated_fraction: must be >= 0, got -0.5",
        ),
    ],
)
def test_bad_value_messages(sections, message):
    assert error_of(**sections) == message


def test_unknown_key_names_the_known_ones():
    msg = error_of(finetune={"lrr": 1e-3})
    assert msg.startswith("params.yaml: finetune.lrr: unknown key (expected one of: lr, full_lr, lora, ")


def test_unknown_section_names_the_sections():
    assert error_of(extrakt={"batch": 1}) == (
        "params.yaml: extrakt: unknown key (expected one of: base, prepare, finetune, extract, contexts, sae, evaluate, "
        "autointerp, categorize, ablate, steer, attribute, report, kernels)"
    )
    assert error_of(extract={"batch": 1}) == (
        "params.yaml: extract.batch: unknown key (expected one of: dtype, shard_tokens, batch_tokens, precision, "
        "method, merge_check_tokens, merge_max_relative_error, merge_max_kl_fraction, mlp_neurons, launcher, outlier_ratio)"
    )


def test_several_errors_share_one_line():
    msg = error_of(finetune={"lr": -1, "epochs": 0})
    assert "\n" not in msg
    assert "finetune.lr: must be > 0, got -1" in msg and "finetune.epochs: must be > 0, got 0" in msg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "file is empty, expected a mapping of params sections"),
        ("- a\n- b\n", "expected a mapping of params sections, got list"),
        ("base: [unclosed\n", "invalid YAML at line 2, column 1"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(LorascopeError, match="^" + str(path) + ": ") as info:
        load_params(path)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path):
    with pytest.raises(LorascopeError) as info:
        load_params(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: params file not found"


def test_params_yaml_is_the_tiny_profile(monkeypatch):
    monkeypatch.setenv("LORASCOPE_ROOT", str(REPO))
    assert load_params(REPO / "params.yaml") == load_params(profile="tiny")


def test_params_yaml_is_what_params_use_tiny_writes(tmp_path: Path):
    """Byte for byte: values, key order and the comments (the sections' field docstrings, now in each
    stage's params module) cannot drift from the tiny profile and the section models."""
    out = tmp_path / "params.yaml"
    res = cli("params", "use", "tiny", "--output", str(out), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == (REPO / "params.yaml").read_text()


def test_paper_profile_is_the_papers_recipe(monkeypatch):
    monkeypatch.setenv("LORASCOPE_ROOT", str(REPO))
    p = load_params(profile="qwen2.5-32b-paper")
    assert p.base.model == "Qwen/Qwen2.5-32B-Instruct"
    assert p.prepare.source == "hub:simplescaling/s1K-1.1"
    assert p.prepare.block_size == 20000
    lora = p.finetune.lora
    assert (lora.r, lora.alpha, lora.use_rslora, lora.dropout, lora.layers) == (1, 16, True, 0.0, None)
    assert tuple(lora.target_modules) == LORA_TARGETS
    f = p.finetune
    assert (f.lr, f.full_lr, f.adam_betas, f.weight_decay) == (1e-3, 1e-5, (0.9, 0.95), 1e-4)
    assert (f.lr_scheduler, f.warmup_ratio, f.epochs) == ("cosine", 0.05, 5)
    assert (f.global_batch_size, f.micro_batch_size, f.gradient_checkpointing) == (16, 1, True)
    assert f.precision == "auto"
    # the paper does not state the SAE learning rate: docs/fidelity.md
    assert (p.sae.k, p.sae.expansion, p.sae.lr, p.sae.batch_size) == (16, 8, 1e-3, 512)
    assert 448 * p.sae.expansion == 3584
    e, ctx = p.extract, p.contexts
    assert (e.dtype, e.method, e.mlp_neurons, e.precision) == ("float16", "merged", 60, "auto")
    assert e.launcher == "accelerate launch --multi_gpu --num_processes 8 -m lorascope.cli"
    assert (ctx.top_k, ctx.quantile_bins, ctx.quantile_samples, ctx.active_threshold) == (64, 10, 5, 0.0)
    assert (p.autointerp.backend, p.autointerp.model, p.autointerp.n_contexts) == ("openai", "gpt-5-mini", 64)
    c = p.categorize
    assert (c.assign.model, c.generate.model, c.min_categories, c.max_categories) == (
        "gpt-5-mini",
        "claude-opus-4-1",
        5,
        8,
    )


def test_small_profile_extends_the_paper(monkeypatch):
    monkeypatch.setenv("LORASCOPE_ROOT", str(REPO))
    small, paper = load_params(profile="qwen2.5-0.5b"), load_params(profile="qwen2.5-32b-paper")
    assert small.base.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert small.prepare.block_size < paper.prepare.block_size
    assert small.finetune.launcher == "lorascope" and paper.finetune.launcher.startswith("accelerate launch")
    assert small.finetune.model_copy(update={"launcher": paper.finetune.launcher}) == paper.finetune
    assert small.sae == paper.sae and small.contexts == paper.contexts
    assert small.extract.launcher == "lorascope"
    assert small.extract.model_copy(update={"launcher": paper.extract.launcher}) == paper.extract


def test_profile_errors(tmp_path: Path, monkeypatch):
    root = tmp_path
    (root / "pipelines" / "profiles").mkdir(parents=True)
    (root / "pipelines/profiles/a.yaml").write_text("extends: b\n")
    (root / "pipelines/profiles/b.yaml").write_text("extends: a\n")
    monkeypatch.setenv("LORASCOPE_ROOT", str(root))
    with pytest.raises(LorascopeError, match=r"^profile 'a': 'extends' cycle a -> b -> a$"):
        load_params(profile="a")
    with pytest.raises(LorascopeError, match=r"^profile 'zzz' not found in .* \(known: a, b\)$"):
        load_params(profile="zzz")


def test_dump_round_trips_with_comments(monkeypatch):
    monkeypatch.setenv("LORASCOPE_ROOT", str(REPO))
    for name in ("tiny", "qwen2.5-0.5b", "qwen2.5-32b-paper"):
        p = load_params(profile=name)
        text = dump_params(p, comments=True)
        assert "# Peak learning rate of the LoRA finetune." in text
        assert validate_params(yaml.safe_load(text)) == p


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(min_value=1e-8, max_value=1.0, allow_nan=False),
    r=st.integers(min_value=1, max_value=64),
    targets=st.lists(st.sampled_from(LORA_TARGETS), min_size=1, max_size=7, unique=True),
    layers=st.none() | st.lists(st.integers(min_value=0, max_value=63), max_size=5),
)
def test_any_valid_finetune_round_trips(lr, r, targets, layers):
    p = validate_params(
        tiny_raw(finetune={"lr": lr, "lora": {"r": r, "target_modules": targets, "layers": layers}})
    )
    assert validate_params(yaml.safe_load(dump_params(p))) == p


def test_section_hash_tracks_the_section_only():
    a = validate_params(tiny_raw())
    b = validate_params(tiny_raw(finetune={"lr": 2e-3}))
    assert section_hash(a, "finetune") != section_hash(b, "finetune")
    assert section_hash(a, "prepare") == section_hash(b, "prepare")
    assert len(section_hash(a, "finetune")) == 64


def test_cli_bad_params_one_line_exit_2(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(tiny_raw(finetune={"lr": -1})))
    res = cli("params", "show", "--params", str(bad))
    assert res.returncode == 2
    assert res.stderr == f"error: {bad}: finetune.lr: must be > 0, got -1\n"
    assert res.stdout == ""


def test_cli_debug_shows_the_traceback(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("finetune: {lr: -1}\n")
    res = cli("--debug", "params", "show", "--params", str(bad))
    assert res.returncode != 0 and "Traceback" in res.stderr and "LorascopeError" in res.stderr


def test_cli_params_show_profile_and_section():
    res = cli("params", "show", "--profile", "qwen2.5-32b-paper", "--section", "finetune", cwd=REPO)
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["finetune"]["lr"] == 1e-3 and shown["finetune"]["lora"]["r"] == 1


def test_cli_params_use_writes_a_valid_file(tmp_path: Path):
    out = tmp_path / "p.yaml"
    res = cli("params", "use", "qwen2.5-0.5b", "--output", str(out), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert out.read_text().startswith("# Resolved from pipelines/profiles/qwen2.5-0.5b.yaml")
    assert load_params(out).base.model == "Qwen/Qwen2.5-0.5B-Instruct"
