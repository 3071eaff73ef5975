"""data.path: Megatron's dataset blend, a list of prefixes with optional weights, read as text.

Pure string handling, so that loading and validation can check a blend without opening a file;
megalite.data.blend builds the blended dataset from the result.
"""
from __future__ import annotations

import math
import os


def is_number(text: str) -> bool:
    """Whether `text` reads as a float (a blend weight rather than a prefix)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def split_blend_string(items: list[str]) -> list[str]:
    """Megatron's space-separated blend '0.3 A 0.7 B' (an item that starts with a weight) -> its parts.

    Items without whitespace, or whose first word is not a number (a prefix
    with a space in it, like 'my corpus/A'), are kept whole.
    """
    out: list[str] = []
    for item in items:
        words = item.split()
        out.extend(words if len(words) > 1 and is_number(words[0]) else [item])
    return out


def parse_data_path(path) -> tuple[list[str], list[float]]:
    """(prefixes, normalized weights) from ['0.3', 'A', '0.7', 'B'] or ['A'] (or ['A', 'B'], equal weights)."""
    items = [str(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not items:
        raise ValueError("data path is empty; give one prefix ['PREFIX'] or weighted prefixes "
                         "['0.3', 'PREFIX_A', '0.7', 'PREFIX_B']")
    if not is_number(items[0]):
        prefixes, weights = items, [1.0] * len(items)
    else:
        prefixes, raw = items[1::2], items[0::2]
        if len(items) % 2 or any(not is_number(w) for w in raw) or any(is_number(p) for p in prefixes):
            raise ValueError(f"data path {items!r} must alternate weights and prefixes, "
                             "e.g. ['0.3', 'PREFIX_A', '0.7', 'PREFIX_B']")
        weights = [float(w) for w in raw]
        if any(not w > 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"data path weights {raw} must all be positive finite numbers")
    total = sum(weights)
    return prefixes, [w / total for w in weights]
