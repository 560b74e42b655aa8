"""dvc.yaml is generated from lorascope.pipeline: code deps are import closures, params keys exist."""

from __future__ import annotations

import shutil

import pytest
import yaml

from lorascope import pipeline
from lorascope.config import list_profiles, load_params, section_dict

from tests.conftest import REPO, cli


def test_committed_dvc_yaml_is_the_generated_one():
    assert (REPO / "dvc.yaml").read_text() == pipeline.render()


def test_closure_follows_every_kind_of_import():
    sae = pipeline.code_deps(pipeline.by_name("sae"))
    # a module imported inside a function (the store) and shared services
    for rel in ("src/lorascope/extract/store.py", "src/lorascope/config.py", "src/lorascope/tracking.py",
                "src/lorascope/sae/train.py"):  # fmt: skip
        assert rel in sae, rel
    # a package __init__ holding only its docstring runs nothing: not a dep (one with code: the test below)
    for init in ("src/lorascope/extract/__init__.py", "src/lorascope/__init__.py"):
        assert pipeline.is_docstring_only(REPO / init) and init not in sae
    assert "src/lorascope/cli.py" not in sae and "src/lorascope/report/stage.py" not in sae
    # package data: the lm-eval task files, the dashboard template and the prompts
    assert "src/lorascope/evaluate/tasks" in pipeline.code_deps(pipeline.by_name("evaluate"))
    assert "src/lorascope/report/dashboard" in pipeline.code_deps(pipeline.by_name("report"))
    assert "src/lorascope/labelling/prompts" in pipeline.code_deps(pipeline.by_name("autointerp"))
    # an independent check: every `from lorascope...` line of the stage module is in the closure
    stage_py = (REPO / "src/lorascope/sae/stage.py").read_text().splitlines()
    for line in stage_py:
        words = line.strip().split()
        if len(words) > 1 and words[0] == "from" and words[1].startswith("lorascope."):
            path = pipeline.module_file(words[1])
            assert path is not None and path.relative_to(REPO).as_posix() in sae, line


def test_a_stage_depends_on_its_own_section_model_not_every_stages():
    """config.py assembles every section model; a stage's deps hold its own (a change to it can change
    how its values validate) and not the others', nor their packages' data (evaluate's task YAMLs, the
    dashboard's template), so editing one stage's params model or data leaves the other stages cached."""
    base = pipeline.code_deps(pipeline.by_name("base"))
    evaluate = pipeline.code_deps(pipeline.by_name("evaluate"))
    assert "src/lorascope/base/params.py" in base and "src/lorascope/config.py" in base
    assert not {"src/lorascope/evaluate/params.py", "src/lorascope/evaluate/tasks",
                "src/lorascope/report/dashboard", "src/lorascope/evaluate/__init__.py"} & set(base)  # fmt: skip
    assert {"src/lorascope/evaluate/params.py", "src/lorascope/evaluate/tasks"} <= set(evaluate)
    assembled = {p.relative_to(REPO).as_posix() for p in pipeline.other_sections()}
    params_models = {p.relative_to(REPO).as_posix() for p in (REPO / "src/lorascope").glob("*/params.py")}
    assert params_models <= assembled and "src/lorascope/config.py" not in assembled
    for stage in pipeline.STAGES:  # every stage that has a section model of its own depends on it
        own = f"src/lorascope/{stage.code[0].split('.')[1]}/params.py"
        assert own not in params_models or own in pipeline.code_deps(stage), stage.name


def test_relative_imports_resolve(tmp_path, monkeypatch):
    pkg = tmp_path / "lorascope"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The package."""\n\nVERSION = 1\n')
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text('"""A package that runs nothing."""\n')
    (pkg / "sub" / "a.py").write_text("from . import b\nfrom ..helper import X\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from lorascope import helper\n")
    monkeypatch.setattr(pipeline, "PACKAGE_DIR", pkg)
    pipeline._imports.cache_clear()
    try:
        files = {p.relative_to(tmp_path).as_posix() for p in pipeline.closure(("lorascope.sub.a",))}
    finally:
        pipeline._imports.cache_clear()
    # sub/__init__.py holds only its docstring: not a dep; lorascope/__init__.py runs a statement
    assert files == {
        "lorascope/__init__.py",
        "lorascope/helper.py",
        "lorascope/sub/a.py",
        "lorascope/sub/b.py",
    }


def _has(data: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


@pytest.mark.parametrize("profile", list_profiles(REPO))
def test_every_declared_params_key_exists_in_every_profile(profile, monkeypatch):
    monkeypatch.setenv("LORASCOPE_ROOT", str(REPO))
    params = load_params(profile=profile)
    data = {s: section_dict(params, s) for s in type(params).model_fields}
    for stage in pipeline.STAGES:
        keys = [*stage.params, *stage.speed, *(k for v in stage.item_params.values() for k in v)]
        for key in keys:
            if "${key}" in key:  # evaluate.variants.${key}: one per variant
                key = key.replace("${key}", next(iter(data["evaluate"]["variants"])))
            assert _has(data, key), f"{stage.name}: {key} not in profile {profile}"
        assert not set(stage.params) & set(stage.speed), stage.name


def test_every_declared_params_key_is_in_params_yaml_itself():
    """DVC reads params.yaml as written (no defaults filled in): every key a stage declares is there."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in pipeline.STAGES:
        for key in [*stage.params, *(k for v in stage.item_params.values() for k in v)]:
            for variant in raw["evaluate"]["variants"] if "${key}" in key else [None]:
                concrete = key.replace("${key}", variant) if variant else key
                assert _has(raw, concrete), f"{stage.name}: {concrete} missing from params.yaml"


def test_item_params_pad_with_a_repeated_key():
    rendered = yaml.safe_load(pipeline.render())["stages"]["finetune"]
    assert rendered["foreach"]["full"] == {"param0": "finetune.full_lr", "param1": "finetune.full_lr"}
    assert rendered["foreach"]["lora"] == {"param0": "finetune.lr", "param1": "finetune.lora"}
    assert (
        "finetune.full_lr" not in rendered["do"]["params"] and "finetune.lr" not in rendered["do"]["params"]
    )


def test_pipeline_check_and_write(tmp_path):
    shutil.copytree(REPO / "src", tmp_path / "src")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    res = cli("pipeline", "check", env={"LORASCOPE_ROOT": str(tmp_path)})
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "out of date" in res.stderr and "lorascope pipeline write" in res.stderr
    assert cli("pipeline", "write", env={"LORASCOPE_ROOT": str(tmp_path)}).returncode == 0
    assert (tmp_path / "dvc.yaml").read_text() == pipeline.render()
    assert cli("pipeline", "check", env={"LORASCOPE_ROOT": str(tmp_path)}).returncode == 0


def test_dvc_reads_yaml_with_the_c_parser_and_the_same_values():
    """A no-op `dvc repro` parses params.yaml once per stage with ruamel's safe loader: the libyaml parser
    (ruamel.yaml.clib, a dependency) makes that ~5x faster; its values are the pure-Python loader's (the
    YAML 1.2 resolver stays ruamel's: `on` is a string, `010` is 10)."""
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__.startswith("ruamel.yaml.clib")
    for path in (REPO / "params.yaml", REPO / "dvc.yaml", REPO / "pipelines/profiles/qwen2.5-32b-paper.yaml"):
        text = path.read_text()
        assert YAML(typ="safe").load(text) == YAML(typ="safe", pure=True).load(text), path
    assert YAML(typ="safe").load("pin: on\nn: 010\n") == {"pin": "on", "n": 10}


def test_no_benchmark_script_shadows_an_installed_package():
    """`python benchmarks/<name>.py` puts benchmarks/ first on the import path, so a script named like an
    installed top-level package (``kernels``: transformers imports it; ``evaluate``: lm-eval's metrics) is
    imported in its place and breaks every benchmark that loads the real one."""
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    shadowing = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem in installed)
    assert not shadowing, f"benchmarks/ scripts named like installed packages: {shadowing}"
