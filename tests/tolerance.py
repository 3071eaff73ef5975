"""Relative comparison of float results, the one way the tests compare computations.

    |got - want| <= atol_frac * max|want| + rtol * |want|   elementwise

rtol does the work; atol is only a floor, scaled to the data, for elements that
happen to be near zero (a sum of terms of the typical size whose true value is
~0 still carries the rounding of those terms). Another CPU's BLAS sums in another
order, so an absolute bound on fp32 results is a property of the machine, not of
the code; a bound relative to the magnitude is not. Errors the tests exist to
catch (a misplaced shard, a wrong sign, a missing all-reduce, a dropped term)
are of order 1e-2 relative or more, far above the fp32 tolerances used here.

Where the natural scale of a difference is not the compared values (weights
after Adam steps differ by fractions of an update, lr, whatever their size), an
extra absolute floor `atol` derived from that scale may be given.

`worst` returns plain (float, str) so multi-rank workers can send it back; the
float is the worst element's error as a fraction of its allowance (<= 1 passes).
With TOLERANCE_LOG=FILE set, every comparison appends its line to FILE (workers
too), which is how to see the margins a machine leaves.
"""
from __future__ import annotations

import os

import torch


def worst(got, want, rtol: float, atol_frac: float = 1e-6, what: str = "value",
          atol: float = 0.0) -> tuple[float, str]:
    """(ratio, message): max over elements of |got - want| / (atol_frac * max|want| + atol + rtol * |want|),
    and a description of that element; the comparison passes when ratio <= 1."""
    got = torch.as_tensor(got).detach().to("cpu", torch.float64)
    want = torch.as_tensor(want).detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        return float("inf"), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return 0.0, f"{what}: empty"
    finite = want[torch.isfinite(want)].abs()
    scale = float(finite.max()) if finite.numel() else 0.0
    atol = atol_frac * scale + atol
    err = torch.where(got == want, torch.zeros_like(got), (got - want).abs())
    allowed = atol + rtol * want.abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / allowed)  # equal (0 == 0, inf == inf) passes
    ratio = torch.nan_to_num(ratio, nan=float("inf"), posinf=float("inf"))  # NaN, or inf vs a number: fails
    i = int(ratio.reshape(-1).argmax())
    index = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else ()
    g, w = float(got.reshape(-1)[i]), float(want.reshape(-1)[i])
    rel = float(err.max()) / scale if scale else float(err.max())
    result = float(ratio.reshape(-1)[i]), (
        f"{what}: worst element {index}: got {g:.9g}, want {w:.9g}: |diff| {abs(g - w):.3g} is "
        f"{float(ratio.reshape(-1)[i]):.3g}x its allowance atol {atol:.3g} + rtol {rtol:g} * |want|; "
        f"max |diff| / max |want| = {rel:.3g}")
    if os.environ.get("TOLERANCE_LOG"):
        with open(os.environ["TOLERANCE_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]} | {result[1]}\n")
    return result


def assert_close(got, want, rtol: float, atol_frac: float = 1e-6, what: str = "value", atol: float = 0.0) -> None:
    """Fail with the worst element when |got - want| > atol_frac * max|want| + atol + rtol * |want| anywhere."""
    ratio, message = worst(got, want, rtol, atol_frac, what, atol)
    assert ratio <= 1.0, message
