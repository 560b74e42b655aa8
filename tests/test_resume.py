"""Resumable work (``lorascope.resume``): one fingerprint (the stage run's), one claim of a work
directory or file."""

from __future__ import annotations

import json
from pathlib import Path

from lorascope import resume, tracking
from lorascope.config import Params, section_hash

from tests.conftest import tiny_params


def fingerprint(params: Params, section: str, paths: list[Path], **extra: str) -> dict[str, object]:
    """The fingerprint of a stage run opened on ``params`` and ``paths``: its params hash and input md5s,
    as ``stage_run`` computes them (tests/test_tracking.py opens real runs)."""
    md5s = {p: tracking.dvc_md5(p) for p in paths}
    run = tracking.StageRun(section, "a-run-id", section_hash(params, section), inputs_md5=md5s)
    return run.fingerprint(**extra)


def inputs(root: Path) -> list[Path]:
    data = root / "data" / "in.txt"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("tokens\n")
    model = root / "models" / "m"
    model.mkdir(parents=True, exist_ok=True)
    (model / "w.bin").write_bytes(b"\0\1\2")
    return [data, model]


def test_same_params_and_inputs_give_the_same_fingerprint(workspace: Path):
    paths = inputs(workspace)
    fp = fingerprint(tiny_params(), "extract", paths, source="lora")
    assert fp == fingerprint(tiny_params(), "extract", paths, source="lora")
    md5s = {p: tracking.dvc_md5(p) for p in paths}
    assert fp["inputs"] == {"data/in.txt": md5s[paths[0]], "models/m": md5s[paths[1]]}
    assert str(workspace) not in json.dumps(fp) and "a-run-id" not in json.dumps(fp)  # no paths, no run id

    assert fp != fingerprint(tiny_params(extract={"shard_tokens": 999}), "extract", paths, source="lora")
    assert fp != fingerprint(tiny_params(), "extract", paths, source="mlp")
    assert fp != fingerprint(tiny_params(), "contexts", paths, source="lora")
    # another section's params leave it alone
    assert fp == fingerprint(tiny_params(sae={"k": 7}), "extract", paths, source="lora")


def test_work_is_kept_for_the_same_fingerprint_and_discarded_otherwise(workspace: Path):
    paths = inputs(workspace)
    fp = fingerprint(tiny_params(), "ablate", paths)
    work = workspace / "checkpoints" / "ablate"

    assert not resume.claim(work, fp)  # nothing to resume: claimed
    marker = workspace / "checkpoints" / "ablate.fingerprint.json"
    assert resume.marker(work) == marker and json.loads(marker.read_text()) == fp
    work.mkdir()
    (work / "00000.json").write_text("{}")

    assert resume.claim(work, fingerprint(tiny_params(), "ablate", paths))  # same: kept
    assert (work / "00000.json").is_file()

    changed = tiny_params(ablate={"sequences": 2})  # a changed params key: discarded
    assert not resume.claim(work, fingerprint(changed, "ablate", paths))
    assert not work.exists() and not resume.claim(work, fp)  # the marker now names the other params

    work.mkdir()
    (work / "00000.json").write_text("{}")
    paths[0].write_text("other tokens\n")  # a changed input: discarded
    assert not resume.claim(work, fingerprint(tiny_params(), "ablate", paths))
    assert not work.exists()


def test_a_checkpoint_file_is_claimed_and_released(workspace: Path):
    paths = inputs(workspace)
    fp = fingerprint(tiny_params(), "sae", paths)
    ckpt = workspace / "checkpoints" / "sae" / "state.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"from a run without a marker")
    assert not resume.claim(ckpt, fp) and not ckpt.exists()  # unclaimed work is never resumed
    ckpt.write_bytes(b"state")
    assert resume.claim(ckpt, fp) and ckpt.read_bytes() == b"state"

    resume.marker(ckpt).write_text("not json")  # a torn marker belongs to no run
    assert not resume.claim(ckpt, fp) and not ckpt.exists()

    ckpt.write_bytes(b"state")
    resume.release(ckpt)
    assert not ckpt.exists() and not resume.marker(ckpt).exists()
    resume.release(ckpt)  # nothing left: a no-op
