"""A checkpoint written by today's format, committed as a fixture, must keep loading and training on.

fixtures/format_v1 holds step 4 of an 8-step one-process run of the tiny preset shrunk to seconds
(tests.training_helpers.tiny_overrides, AdamW, fp32) on the counting corpus, with the losses of its
steps 5-8 (expected_losses.json). The test resumes the committed checkpoint and must reproduce them:
a later change of the checkpoint format must either read this one (convert it) or fail here.

The corpus is rebuilt by the test (write_counting_corpus is deterministic) at the relative path the
fixture's run used, `corpus/count_text_document`, from a scratch working directory, so the data
order recorded in the checkpoint matches. Tolerance rtol 1e-5, the golden curves' (test_golden_curves):
another CPU's BLAS moves later fp32 losses by ~1e-6 relative; any change of the arithmetic or of what
was restored (a moment dropped, the step count, the RNG, the data position) moves them by 1e-3 or more.

Re-record (only for a deliberate format change, and say so in the commit):
    MEGALITE_RECORD_FIXTURE=1 python -m pytest tests/checkpoint/test_format_fixture.py
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from megalite.config import load_config
from megalite.topology import ProcessGroups
from megalite.train import Trainer
from tests.training_helpers import step_metrics, tiny_overrides, write_counting_corpus

FIXTURE = Path(__file__).with_name("fixtures") / "format_v1"
CORPUS = "corpus/count_text_document"
RTOL = 1e-5


def _trainer(run_dir: Path, **extra) -> Trainer:
    return Trainer(load_config("tiny", tiny_overrides(CORPUS, run_dir, steps=8, **extra)), ProcessGroups.single())


def _record(tmp_path: Path) -> None:
    _trainer(tmp_path / "run", **{"checkpoint.interval": 4}).fit()
    shutil.rmtree(FIXTURE, ignore_errors=True)
    (FIXTURE / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_00000004", FIXTURE / "checkpoints" / "step_00000004")
    losses = step_metrics(tmp_path / "run")
    (FIXTURE / "expected_losses.json").write_text(json.dumps({s: losses[s] for s in range(5, 9)}, indent=1) + "\n")


def test_the_committed_checkpoint_resumes_onto_its_recorded_losses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_counting_corpus(CORPUS)
    if os.environ.get("MEGALITE_RECORD_FIXTURE"):
        _record(tmp_path)
    checkpoint = FIXTURE / "checkpoints" / "step_00000004"
    assert checkpoint.is_dir(), f"{checkpoint} is missing; record it (see this module's docstring)"
    _trainer(tmp_path / "resumed", **{"train.resume": str(checkpoint), "checkpoint.interval": 0}).fit()
    got = step_metrics(tmp_path / "resumed")
    want = {int(s): v for s, v in json.loads((FIXTURE / "expected_losses.json").read_text()).items()}
    assert sorted(got) == sorted(want) == [5, 6, 7, 8]
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=RTOL), step
