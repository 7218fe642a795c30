"""How the report reads and prints numbers: a finite number or None, two decimals, a signed difference."""

from __future__ import annotations

import math
from typing import Any


def num(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def as_float(value: Any) -> float:
    """``value`` as a float for a plotted series: NaN (a gap) when it is not a finite number."""
    v = num(value)
    return math.nan if v is None else v


def pct(value: Any) -> str:
    v = num(value)
    return "-" if v is None else f"{v:.2f}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"
