"""The CORE-style aggregate and the comparison of two evaluations.

CORE (DCLM; nanochat's base eval): each task's accuracy centred by its random-guess baseline,
(acc - baseline) / (1 - baseline), so 0 is chance and 1 is perfect on every task, then averaged.

Comparing two runs on the same questions, the difference of their accuracies gets a 95 % interval
from a paired bootstrap over questions (fixed seed): resampling questions keeps each question's
pair of outcomes together, which is tighter and fairer than treating the runs as independent.
When the questions differ, a two-proportion normal (binomial) interval is used instead.
"""

from __future__ import annotations

import math

import numpy as np


def centred(acc: float, baseline: float) -> float:
    return (acc - baseline) / (1.0 - baseline)


def core_score(tasks: dict[str, dict]) -> float:
    """Mean of each task's centred accuracy; `tasks` maps name -> {"acc": ..., "baseline": ...}."""
    return float(np.mean([centred(t["acc"], t["baseline"]) for t in tasks.values()]))


def paired_bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high): the 95 % interval of the difference, resampling questions in pairs."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = y - x
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def binomial_interval(acc_a: float, n_a: int, acc_b: float, n_b: int) -> tuple[float, float, float]:
    """(acc_b - acc_a, low, high) under the normal approximation for two independent proportions."""
    d = acc_b - acc_a
    se = math.sqrt(acc_a * (1 - acc_a) / n_a + acc_b * (1 - acc_b) / n_b)
    return d, d - 1.96 * se, d + 1.96 * se
