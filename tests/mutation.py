"""Mutation testing of the modules behind the paper's numbers, with mutmut, one module at a time.

    python tests/mutation.py                      # every module below (slow: not part of CI)
    python tests/mutation.py evaluate/answers.py  # one module, against its own tests only
    python tests/mutation.py --list               # the modules and the tests that guard them

Each module is mutated in a private copy of the repository (a temporary directory holding ``src/``,
``tests/``, the params and the pipelines, with ``../shared`` linked beside it when there is one), so the
working tree is never touched and several people can work while it runs. mutmut runs only the module's own
tests (``TESTS``) and, for each mutant, only those of them that reach the mutated function. A mutant is
*killed* when a test fails (or times out) and *survived* when every test passes. The script prints, per
module, killed / survived / no tests / other and the score (killed / (killed + survived)), and the
survivors' names with ``--survivors``; ``mutmut show NAME`` in the printed work directory (kept with
``--keep``) shows a survivor's diff. Equivalent mutants (no test could tell them apart) are listed in
``docs/testing.md`` ("Mutation testing").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TESTS: dict[str, list[str]] = {
    "evaluate/answers.py": ["tests/evaluate/test_answers.py", "tests/evaluate/test_grading.py"],
    "evaluate/grading.py": ["tests/evaluate/test_grading.py", "tests/evaluate/test_answers.py"],
    "evaluate/recovery.py": ["tests/test_properties.py", "tests/evaluate/test_evaluate.py::test_table2_reproduces_the_papers_percentages",
                             "tests/evaluate/test_evaluate.py::test_table1_recovery_values_and_reasons",
                             "tests/evaluate/test_evaluate.py::test_recovery_formulas_name_each_columns_reference",
                             "tests/evaluate/test_evaluate.py::test_recovery_reasons_name_every_missing_score_and_the_reference",
                             "tests/evaluate/test_evaluate.py::test_recovery_markdown_cells_notes_and_column_choice",
                             "tests/evaluate/test_evaluate.py::test_recovery_table_paired_cis_by_hand"],
    "extract/recorder.py": ["tests/extract/test_recorder.py"],
    "sae/model.py": ["tests/test_properties.py", "tests/sae/test_units.py",
                     "tests/sae/test_sae.py::test_sparse_backward_equals_the_dense_gradient"],
    "sae/train.py": ["tests/sae/test_units.py", "tests/test_properties.py", "tests/sae/test_trainer.py"],
    "ablate/runner.py": ["tests/ablate/test_ablate.py::test_ablator_against_zeroed_lora_b_on_a_small_model",
                         "tests/ablate/test_ablate.py::test_ablator_batches_and_a_response_starting_at_a_chunk_boundary"],
    "ablate/stage.py": [f"tests/ablate/test_ablate.py::{t}" for t in (
        "test_summary_against_a_hand_computed_case", "test_figure3_orientation_cell_by_cell",
        "test_stage_outputs_lineage_and_resume", "test_the_runs_metrics_go_to_mlflow_in_batches_it_accepts",
        "test_sequences_are_sampled_with_response_tokens", "test_bad_input_is_one_line")],
    "contexts/selection.py": ["tests/test_properties.py", "tests/contexts/test_selection.py"],
    "categorize/figures.py": ["tests/categorize/test_figures_data.py"],
    "evaluate/forcing.py": [f"tests/evaluate/test_evaluate.py::{t}" for t in (
        "test_budget_forcing_caps_thinking_then_forces_the_final_answer",
        "test_thinking_that_ends_on_its_own_gets_the_plain_answer_marker",
        "test_wait_extends_only_thinking_that_stopped_early", "test_auto_budget_is_s1s_and_leaves_the_answer_100_tokens",
        "test_without_forcing_a_question_out_of_tokens_gets_no_answer", "test_chat_format_is_one_plain_generation",
        "test_sampled_phases_are_seeded_per_question_and_phase",
        "test_finished_questions_go_to_the_request_cache_with_samples_apart",
        "test_hf_forcing_matches_plain_greedy_generation",
        "test_hf_thinking_ends_at_its_stop_whatever_its_batch_mate_does",
        "test_hf_sampling_is_reproducible_and_differs_between_samples",
        "test_a_sampled_phases_seed_is_derived_from_run_seed_sample_question_and_phase",
        "test_generate_until_samples_only_the_requests_that_ask_then_decodes_greedily_again",
        "test_generated_tokens_add_up_over_calls", "test_a_wait_extension_runs_only_while_thinking_budget_is_left",
        "test_a_forced_answer_with_no_tokens_left_is_not_generated",
        "test_a_run_killed_mid_way_resumes_after_its_last_finished_chunk")],
    "steer/directions.py": ["tests/steer/test_steer.py"],
    "steer/stage.py": ["tests/steer/test_steer.py"],
    "ablate/export.py": ["tests/ablate/test_ablate.py"],
    "sae/downstream.py": ["tests/sae/test_units.py", "tests/sae/test_sae.py"],
    "contexts/stage.py": ["tests/contexts/test_contexts.py"],
    "evaluate/benchmarks.py": ["tests/evaluate/test_evaluate.py", "tests/evaluate/test_answers.py"],
    "sae/stage.py": ["tests/sae/test_sae.py"],
    "autointerp/stage.py": ["tests/autointerp/test_autointerp.py"],
    "evaluate/backend.py": ["tests/evaluate/test_evaluate.py"],
}  # fmt: skip
"""Module (under src/lorascope/) -> the tests that guard it (files or node ids)."""

COPY = ["src", "tests", "params.yaml", "pipelines", "dvc.yaml", "pyproject.toml"]


def mutmut_config(module: str, tests: list[str]) -> str:
    quoted = ", ".join(f'"{t}"' for t in tests)
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f'only_mutate = ["src/lorascope/{module}"]\n'
        f"pytest_add_cli_args_test_selection = [{quoted}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "-q", "--hypothesis-profile=mutation"]\n'
        'process_isolation = "forkserver"\n'
        'also_copy = ["params.yaml", "pipelines", "dvc.yaml"]\n'
        "use_git_change_detection = false\n"
    )


def run_module(module: str, work: Path, children: int, survivors: bool) -> Counter:
    """Mutate one module in ``work`` (a fresh copy of the repository) and return its status counts."""
    root = work / "main"
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.is_file():
            root.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    existing = [t for t in TESTS[module] if (root / t.split("::")[0]).is_file()]
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + mutmut_config(module, existing))
    shared = REPO.parent / "shared"
    if shared.is_dir():  # tests find ../shared beside the repository they run from (mutants/)
        (root / "shared").symlink_to(shared)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "GX_ANALYTICS_ENABLED": "false"}  # fmt: skip
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", str(children)], cwd=root, env=env, check=False)
    out = subprocess.run([*mutmut, "results", "--all", "true"], cwd=root, env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    statuses = re.findall(r"^\s+(\S+): (.+)$", out, re.MULTILINE)
    counts = Counter(status for _, status in statuses)
    if survivors:
        for name, status in statuses:
            if status == "survived":
                print(f"  survived: {name}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="modules under src/lorascope/ (default: all in TESTS)")
    ap.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    ap.add_argument("--survivors", action="store_true", help="print every surviving mutant's name")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (for `mutmut show`)")
    ap.add_argument("--list", action="store_true", help="print the modules and their tests, run nothing")
    args = ap.parse_args()
    modules = args.modules or list(TESTS)
    unknown = [m for m in modules if m not in TESTS]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; known: {', '.join(TESTS)}")
    if args.list:
        for m in modules:
            print(f"{m}: {' '.join(TESTS[m])}")
        return
    rows = []
    for module in modules:
        work = Path(tempfile.mkdtemp(prefix="lorascope-mutation-"))
        print(f"== {module} (in {work / 'main'})", flush=True)
        counts = run_module(module, work, args.children, args.survivors)
        killed = counts["killed"] + counts["timeout"]
        tested = killed + counts["survived"]
        score = killed / tested if tested else float("nan")
        rows.append((module, killed, counts["survived"], counts["no tests"], sum(counts.values()), score))
        print(f"   {dict(counts)}", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| module | killed | survived | no tests | mutants | score |\n|---|---|---|---|---|---|")
    for module, killed, survived, untested, total, score in rows:
        print(f"| {module} | {killed} | {survived} | {untested} | {total} | {score:.0%} |")


if __name__ == "__main__":
    main()
