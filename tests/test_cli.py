"""The command line: config printing, config errors before any process starts, and a
training run of the tiny preset in an empty folder (which builds the demo data)."""
import json
import os
import subprocess
import sys

import pytest


def megalite(*args, cwd=None, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "megalite", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_config_prints_resolved_yaml():
    out = megalite("config", "tiny", "train.steps=70", "optim.lr=2e-4")
    assert out.returncode == 0, out.stderr
    assert "steps: 70" in out.stdout and "lr: 0.0002" in out.stdout


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=64", "did you mean 'hidden_size'"),
    ("model.num_kv_heads=3", "num_kv_heads"),
    ("train.global_batch_size=10", "global_batch_size"),
])
def test_bad_config_fails_before_training_with_the_key(override, message, tmp_path):
    out = megalite("train", "tiny", override, f"train.run_dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One demo corpus and tokenizer for this module: the first command that needs it builds it."""
    return tmp_path_factory.mktemp("megalite-cache")


@pytest.mark.slow
def test_tiny_trains_in_an_empty_folder_on_the_demo_corpus(tmp_path, demo_cache):
    env = {"MEGALITE_CACHE": str(demo_cache)}
    args = ["train", "tiny", "train.steps=3", "train.eval_interval=0", "checkpoint.interval=0",
            "logging.interval=1", "optim.warmup_steps=1", f"train.run_dir={tmp_path}/run"]
    out = megalite(*args, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (demo_cache / "demo" / "demo_text_document.idx").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_demo_trains_and_ends_with_a_generated_sample(tmp_path, demo_cache):
    args = ["demo", "train.steps=4", "train.eval_interval=2", "optim.warmup_steps=1", "logging.interval=1",
            f"train.run_dir={tmp_path}/run"]
    out = megalite(*args, cwd=tmp_path, env={"MEGALITE_CACHE": str(demo_cache)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trained 4 steps" in out.stdout
    sample = out.stdout.split("for more):\n", 1)[1].strip()
    assert sample.startswith("def") and len(sample) > len("def "), out.stdout[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
