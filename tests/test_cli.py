"""The command line: help everywhere, no heavy imports for --help, and the installed script's errors."""

from __future__ import annotations

import subprocess
import sys

import typer

from lorascope.cli import app


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lorascope.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'prepare' in r.output, r.output\n"
        "heavy = ['torch', 'transformers', 'mlflow', 'great_expectations', 'dvc', 'datasets', 'peft', 'pandas']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _commands(cmd, path: str = "lorascope"):  # typer vendors click: duck-type, no isinstance
    yield path, cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_command_and_option_has_help():
    root = typer.main.get_command(app)
    seen = set()
    for path, cmd in _commands(root):
        seen.add(path)
        assert (cmd.help or "").strip(), f"{path} has no help text"
        for param in cmd.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"{path} {param.opts[0]} has no help text"
            if param.param_type_name == "argument":
                assert (getattr(param, "help", "") or "").strip(), f"{path} {param.name} has no help text"
    assert {
        "lorascope base",
        "lorascope prepare",
        "lorascope params show",
        "lorascope lineage",
        "lorascope ui",
    } <= seen


def test_stage_commands_take_params_and_profile():
    root = typer.main.get_command(app)
    for stage in ("base", "prepare"):
        opts = {o for p in root.commands[stage].params for o in getattr(p, "opts", [])}
        assert {"--params", "--profile"} <= opts


def test_the_installed_script_reports_bad_input_in_one_line(tmp_path):
    """The console script itself (the other tests call its entry point in-process: conftest.cli): a bad
    params file is one line on stderr and exit status 2; `--debug` shows the traceback instead."""
    from pathlib import Path

    bad = tmp_path / "params.yaml"
    bad.write_text("finetune: [not, a, mapping]\n")
    script = str(Path(sys.executable).parent / "lorascope")
    res = subprocess.run([script, "params", "show", "--params", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and str(bad) in res.stderr
    debug = subprocess.run(
        [script, "--debug", "params", "show", "--params", str(bad)], capture_output=True, text=True
    )
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
