"""What a run reports: FLOPs and MFU math, peak memory, throughput, and the metrics logger.

MFU (model FLOPs utilization) = achieved model FLOP/s / the hardware's dense
peak. Model FLOPs per token follow the PaLM appendix: 6N for the weight
matmuls forward and backward, plus 12 * L * H * d * s for attention scores
and values (forward and backward), with N the parameter count the caller
passes (the whole model, summed over tensor and pipeline ranks).
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from megalite.config import LoggingConfig, choices

# Dense (no sparsity) peak FLOP/s by device-name fragment, first match wins. Keys: precision.
# fp32 uses the TF32 tensor-core peak when torch allows TF32 matmuls, else the plain fp32 peak.
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)
PRECISIONS = choices("train.precision")


def flops_per_token(n_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6*N (matmuls, fwd+bwd) + 12*L*H*d*s (attention)."""
    return 6 * n_params + 12 * num_layers * num_heads * head_dim * seq_len


def peak_flops_for_name(name: str, precision: str, tf32: bool = True) -> float | None:
    """Dense peak FLOP/s of a GPU called `name` at `precision`; None when the GPU is not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    key = "tf32" if precision == "fp32" and tf32 else precision
    for fragment, peaks in _PEAKS:
        if fragment in name:
            return peaks[key]
    return None


def peak_flops(device, precision: str) -> float | None:
    """Peak FLOP/s of `device` (torch.device or str) for `precision`; None on CPU or an unknown GPU.

    None makes the logged MFU null rather than a made-up number.
    """
    device = torch.device(device)
    if device.type != "cuda":
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision,
                               tf32=torch.backends.cuda.matmul.allow_tf32)


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilization in [0, 1]; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * num_devices)


def peak_memory_gb(device) -> float | None:
    """Peak memory in GB (1e9 bytes): CUDA max_memory_allocated, or this process's max RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


class Throughput:
    """Tokens per second over timed intervals: `start()`, work, `stop(tokens)`."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.total_tokens, self.total_s = 0, 0.0
        self.last_tokens_per_s: float | None = None
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self, tokens: int) -> float:
        """End the interval started by `start`; returns its tokens/s."""
        if self._t0 is None:
            raise RuntimeError("Throughput.stop() called without start()")
        seconds = max(self.clock() - self._t0, 1e-12)
        self._t0 = None
        self.total_tokens += tokens
        self.total_s += seconds
        self.last_tokens_per_s = tokens / seconds
        return self.last_tokens_per_s

    @property
    def mean_tokens_per_s(self) -> float | None:
        """Tokens/s over every interval so far."""
        return self.total_tokens / self.total_s if self.total_s else None


def _plain(value):
    """JSON-safe scalar: tensors/numpy to Python, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(key: str, value) -> str:
    if value is None:
        return f"{key} -"
    if isinstance(value, (bool, int)):
        return f"{key} {value}"
    if isinstance(value, float):
        if key == "mfu":
            return f"mfu {100 * value:.1f}%"
        if abs(value) >= 1e4:
            return f"{key} {value:,.0f}"
        return f"{key} {value:.3e}" if value != 0 and abs(value) < 1e-2 else f"{key} {value:.4g}"
    return f"{key} {value}"


def on_console(key: str, value) -> bool:
    """Whether a metric earns a place on the console line (metrics.jsonl keeps every one): no
    communication counters, no per-layer MoE figures (the averages are there), no unknown values (MFU
    on a CPU), no loss scale of 1 and no skip flag unless a step was skipped, and not the sample count
    (the step says it)."""
    if key.startswith(("comm_", "moe_load_entropy_l")) or key == "consumed_samples" or value is None:
        return False
    if key == "loss_scale":
        return value != 1
    return key != "skipped" or bool(value)


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "eta ?"
    s = int(seconds)
    return f"eta {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsLogger:
    """One JSON line per `log` call in run_dir/metrics.jsonl, a console line, TensorBoard and W&B.

    Construct with enabled=False on every rank but 0: all methods then do
    nothing. Non-finite floats are written as null (strict JSON has no NaN).
    """

    def __init__(self, run_dir, cfg: LoggingConfig, total_steps: int, enabled: bool = True):
        self.enabled, self.cfg, self.total_steps = enabled, cfg, total_steps
        self._file = self._bar = self._tb = self._wandb = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first log, for the ETA
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # a resumed run appends
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, file=sys.stderr, dynamic_ncols=True, unit="step")
        if cfg.tensorboard:
            self._tb = self._open_tensorboard()
        if cfg.wandb:
            self._wandb = self._open_wandb()

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"logging.tensorboard is set but TensorBoard is unavailable ({e}); "
                          "`pip install tensorboard` or set logging.tensorboard=false")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), flush_secs=30)

    def _open_wandb(self):
        try:
            import wandb
        except ImportError:
            warnings.warn("logging.wandb is set but wandb is not installed; `pip install wandb` "
                          "or set logging.wandb=false")
            return None
        return wandb.init(project=self.cfg.wandb_project, dir=str(self.run_dir),
                          name=self.run_dir.name, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        """Record `metrics` for `step` everywhere that is enabled."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()  # a crashed run keeps every line logged so far
        numeric = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        self._console(step, record)

    def _eta_s(self, step: int, record: dict) -> float | None:
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        first_step, first_t = self._first
        remaining = max(self.total_steps - step, 0)
        if step > first_step:
            return (now - first_t) / (step - first_step) * remaining
        per_step = record.get("step_time_s")
        return per_step * remaining if isinstance(per_step, (int, float)) else None

    def _console(self, step: int, record: dict) -> None:
        fields = " | ".join(_fmt(k, v) for k, v in record.items() if k != "step" and on_console(k, v))
        eta = _eta(self._eta_s(step, record))
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.set_postfix_str(fields, refresh=True)
            return
        print(f"step {step}/{self.total_steps} | {fields} | {eta}", flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()
        self._file = self._bar = self._tb = self._wandb = None
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
