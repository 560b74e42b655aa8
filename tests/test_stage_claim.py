"""A stage run owns its fingerprint and claim: one hash of the params section and the inputs, computed
when the run opens (``tracking.stage_run``) and reused by ``StageRun.claim`` (``lorascope.resume``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorascope import resume, tracking
from lorascope.config import Params, section_hash

from tests.conftest import tiny_params
from tests.test_resume import inputs as make_inputs


def _claim(params: Params, inputs: list[Path], work: Path, **extra: str) -> bool:
    with tracking.stage_run("ablate", params, inputs) as run:
        return run.claim(work, **extra)


def test_the_fingerprint_is_the_runs_own_params_hash_and_input_md5s(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    inputs = make_inputs(workspace)
    hashed: list[Path] = []
    dvc_md5 = tracking.dvc_md5
    monkeypatch.setattr(tracking, "dvc_md5", lambda p: hashed.append(Path(p)) or dvc_md5(p))
    with tracking.stage_run("ablate", tiny_params(), inputs) as run:
        opened = len(hashed)
        fp = run.fingerprint(source="lora")
        run.claim(workspace / "checkpoints" / "ablate", source="lora")
    assert len(hashed) == opened == len(inputs)  # hashed once, when the run opened
    tags = tracking.client().get_run(run.run_id).data.tags
    assert fp == {
        "params_hash": tags["params.hash"],
        "inputs": {"data/in.txt": tags["dvc.md5.data/in.txt"], "models/m": tags["dvc.md5.models/m"]},
        "source": "lora",
    }
    assert fp["params_hash"] == section_hash(tiny_params(), "ablate")
    assert resume.matches(workspace / "checkpoints" / "ablate", fp)
    assert run.run_id not in str(fp) and str(workspace) not in str(fp)


def test_same_params_and_inputs_resume_and_others_start_over(workspace: Path):
    inputs = make_inputs(workspace)
    work = workspace / "checkpoints" / "ablate"
    assert not _claim(tiny_params(), inputs, work)  # nothing to resume
    work.mkdir()
    (work / "00000.json").write_text("{}")
    assert _claim(tiny_params(), inputs, work) and (work / "00000.json").is_file()  # a new run: resumed
    assert _claim(tiny_params(sae={"k": 7}), inputs, work)  # another section's params: still resumed

    assert not _claim(tiny_params(ablate={"sequences": 2}), inputs, work)  # other params: started over
    assert not work.exists()
    work.mkdir()
    (work / "00000.json").write_text("{}")
    inputs[0].write_text("other tokens\n")  # another input: started over
    assert not _claim(tiny_params(ablate={"sequences": 2}), inputs, work) and not work.exists()

    work.mkdir()
    assert not _claim(tiny_params(ablate={"sequences": 2}), inputs, work, source="mlp")  # other extras
