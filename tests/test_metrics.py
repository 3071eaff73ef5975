"""FLOPs/MFU arithmetic, peak tables, throughput and the metrics logger's sinks."""
import json
import math
import sys

import pytest
import torch

from megalite.config import LoggingConfig
from megalite.metrics import (
    MetricsLogger,
    Throughput,
    flops_per_token,
    mfu,
    peak_flops,
    peak_flops_for_name,
    peak_memory_gb,
)


def test_flops_per_token_formula():
    assert flops_per_token(1_000_000, 2, 4, 16, 128) == 6_000_000 + 12 * 2 * 4 * 16 * 128


def test_mfu_on_a_known_example():
    # Llama-2-7B shape at 4k context on one H100 at 3,000 tokens/s
    per_token = flops_per_token(6_738_415_616, 32, 32, 128, 4096)
    assert per_token == pytest.approx(46.87e9, rel=1e-3)
    value = mfu(3000.0, per_token, peak_flops_for_name("NVIDIA H100 80GB HBM3", "bf16"))
    assert value == pytest.approx(3000 * per_token / 989e12) and 0.14 < value < 0.15
    assert mfu(8 * 3000.0, per_token, 989e12, num_devices=8) == pytest.approx(value)
    assert mfu(3000.0, per_token, None) is None


@pytest.mark.parametrize("name, precision, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989e12), ("NVIDIA H100 80GB HBM3", "fp16", True, 989e12),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494e12), ("NVIDIA H100 80GB HBM3", "fp32", False, 67e12),
    ("NVIDIA H200", "bf16", True, 989e12), ("NVIDIA H100 PCIe", "bf16", True, 756e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", True, 312e12), ("Tesla T4", "bf16", True, None)])
def test_peak_flops_table(name, precision, tf32, expected):
    assert peak_flops_for_name(name, precision, tf32) == expected


def test_peak_flops_on_cpu_is_unknown_and_bad_precision_is_named():
    assert peak_flops(torch.device("cpu"), "bf16") is None
    with pytest.raises(ValueError, match="'fp8'"):
        peak_flops("cpu", "fp8")


def test_peak_memory_on_cpu_is_the_process_rss():
    gb = peak_memory_gb("cpu")
    assert 0.01 < gb < 100  # a Python process with torch loaded holds tens of MB at least


def test_throughput_from_a_timer():
    ticks = iter([0.0, 2.0, 10.0, 11.0])
    t = Throughput(clock=lambda: next(ticks))
    t.start()
    assert t.stop(1000) == 500.0
    t.start()
    assert t.stop(2000) == 2000.0 and t.mean_tokens_per_s == 1000.0
    with pytest.raises(RuntimeError, match="without start"):
        t.stop(1)


TRAIN = {"loss": 2.5, "lr": 3e-4, "grad_norm": torch.tensor(0.75), "tokens_per_s": 12345.0, "mfu": None,
         "step_time_s": 0.5, "peak_mem_gb": 1.25, "skipped": False}


def test_jsonl_lines_parse_and_hold_the_keys(tmp_path, capsys):
    cfg = LoggingConfig(tensorboard=False, progress_bar=True)  # stderr is no TTY under pytest: plain lines
    with MetricsLogger(tmp_path / "run", cfg, total_steps=10) as logger:
        logger.log(1, TRAIN)
        logger.log(2, {**TRAIN, "loss": float("nan")})
        logger.log(2, {"valid_loss": 2.4, "valid_ppl": math.exp(2.4)})
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2]
    assert set(lines[0]) == {"step", *TRAIN} and lines[0]["grad_norm"] == 0.75 and lines[0]["mfu"] is None
    assert lines[1]["loss"] is None  # NaN is not JSON; it is written as null
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("step 1/10 | loss 2.5") and "eta 0:00:04" in out[0]
    with MetricsLogger(tmp_path / "run", cfg, total_steps=10) as logger:  # a resumed run appends
        logger.log(3, TRAIN)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_the_console_line_shows_what_matters_and_the_file_keeps_everything(tmp_path, capsys):
    row = {**TRAIN, "loss_scale": 1.0, "consumed_samples": 64, "comm_tp_all_reduce_bytes": 0,
           "comm_dp_all_reduce_bytes": 123456}
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), total_steps=4) as logger:
        logger.log(1, row)
        logger.log(2, {**row, "loss_scale": 1024.0, "skipped": True})
    first, second = capsys.readouterr().out.splitlines()
    for hidden in ("comm_", "loss_scale", "skipped", "consumed_samples", "mfu"):
        assert hidden not in first, (hidden, first)  # a one-process fp32 CPU step: none of them says anything
    assert "loss 2.5" in first and "grad_norm 0.75" in first and "tokens_per_s" in first
    assert "loss_scale 1024" in second and "skipped True" in second  # shown when they carry news
    saved = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert saved["comm_dp_all_reduce_bytes"] == 123456 and saved["loss_scale"] == 1.0 and saved["skipped"] is False


def test_progress_bar_on_a_tty(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), total_steps=4) as logger:
        logger.log(2, TRAIN)
    captured = capsys.readouterr()
    assert captured.out == "" and "2/4" in captured.err and "loss 2.5" in captured.err


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "rank1", LoggingConfig(), total_steps=4, enabled=False)
    logger.log(1, TRAIN)
    logger.close()
    assert not (tmp_path / "rank1").exists() and capsys.readouterr().out == ""


def test_tensorboard_events_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True, progress_bar=False), total_steps=4) as logger:
        logger.log(1, TRAIN)
        logger.log(2, TRAIN)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.5)]
    assert "mfu" not in acc.Tags()["scalars"]  # None is not a number to plot
