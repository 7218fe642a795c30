"""Hand computations for the method tests: plain Python floats, no library code."""

from __future__ import annotations

import math

import torch

DELTA = 1e-6  # the reference code's log offset, log(p + 1e-6)
F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# Hand-computation helpers (plain Python floats, no library code)
# --------------------------------------------------------------------------------------------------


def h(lam: float, b: float) -> float:
    """The logistic h(lambda, b) = 1 / (1 + exp(-lambda * b)) of Eq. (5), (6), (12)."""
    return 1.0 / (1.0 + math.exp(-lam * b))


def ent(row: list[float]) -> float:
    """Reference entropy -sum p log(p + 1e-6) of one row."""
    return -sum(x * math.log(x + DELTA) for x in row)


def xent(q_row: list[float], p_row: list[float]) -> float:
    """Reference cross entropy -sum q log(p + 1e-6) of one row."""
    return -sum(a * math.log(b + DELTA) for a, b in zip(q_row, p_row))


def kl(t_row: list[float], p_row: list[float]) -> float:
    """Reference KL divergence sum t (log(t + 1e-6) - log(p + 1e-6)) of one row."""
    return sum(a * (math.log(a + DELTA) - math.log(b + DELTA)) for a, b in zip(t_row, p_row))


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def random_probs(gen: torch.Generator, batch: int, classes: int, scale: float = 3.0, dtype=F64) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(batch, classes, generator=gen, dtype=dtype), dim=1)


P3 = [[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]


# The label and prediction rows of the refined-label and loss tests.
Q = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
P = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.15, 0.6]]
