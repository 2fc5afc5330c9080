"""Where the key falls among null draws (keys that should not carry the capability).

Every test is one-sided and counts ties against the key, so it is valid when the key and
the draws are exchangeable: the permutation p (1 + #{null >= key}) / (1 + n), its normal-model
version (Student-t prediction interval), a per-layer test with a max-statistic p valid
whatever the dependence between layers, Holm over measures, and the behavioural null: four
measures of the key's condition against conditions steered by null keys on the same items.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .conditions import ConditionResult

__all__ = [
    "METRICS", "BehaviouralNull", "LayerTest", "MetricTest", "Spread", "behavioural_null",
    "binomial_tail", "holm", "layer_test", "metric_values", "permutation_p_value",
    "prediction_p_value", "spread"
]  # fmt: skip


def _finite_list(name: str, values: Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must hold finite numbers only")
    return out


def permutation_p_value(observed: float, null: Sequence[float] | torch.Tensor) -> float:
    """One-sided p-value of ``observed`` against null draws: (1 + #{null >= observed}) /
    (1 + n). Never below 1 / (1 + n); with n = 0 it is 1."""
    obs = float(observed)
    if not math.isfinite(obs):
        raise ValueError(f"observed must be a finite number, got {observed!r}")
    draws = _finite_list("null", null)
    return (1 + sum(1 for v in draws if v >= obs)) / (1 + len(draws))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def prediction_p_value(observed: float, null: Sequence[float] | torch.Tensor) -> float:
    """One-sided p-value of ``observed`` as one more draw of a normal null: with the draws'
    mean m and standard deviation s (n - 1 denominator), P(T_{n-1} > (observed - m) /
    (s·sqrt(1 + 1/n))). nan with fewer than 2 draws, or when they are all equal and the
    observed value is above them."""
    obs = float(observed)
    if not math.isfinite(obs):
        raise ValueError(f"observed must be a finite number, got {observed!r}")
    draws = _finite_list("null", null)
    n = len(draws)
    if n < 2:
        return math.nan
    m = sum(draws) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in draws) / (n - 1))
    if sd == 0.0:
        return 1.0 if obs <= m else math.nan
    return student_t_sf((obs - m) / (sd * math.sqrt(1.0 + 1.0 / n)), n - 1)


@dataclass(frozen=True)
class Spread:
    """Summary of null draws: n, min, 5/25/50/75/95% quantiles (linear interpolation), max
    and mean."""

    n: int
    min: float
    q05: float
    q25: float
    median: float
    q75: float
    q95: float
    max: float
    mean: float


def spread(values: Sequence[float] | torch.Tensor) -> Spread:
    """The :class:`Spread` of ``values`` (at least one)."""
    v = _finite_list("values", values)
    if not v:
        raise ValueError("spread needs at least one value")
    t = torch.tensor(v, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    q05, q25, median, q75, q95 = (float(x) for x in q)
    return Spread(len(v), min(v), q05, q25, median, q75, q95, max(v), float(t.mean()))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    tail = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    return min(1.0, tail)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error over the given tests)."""
    names = sorted(p_values, key=lambda k: p_values[k])
    m, out, running = len(names), {}, 0.0
    for i, name in enumerate(names):
        running = max(running, min(1.0, (m - i) * float(p_values[name])))
        out[name] = running
    return {k: out[k] for k in p_values}


@dataclass
class LayerTest:
    """A per-layer statistic of the key against ``num_null`` draws at every layer: per-layer
    permutation ``p_values``; ``above``, the layers with p <= 1 - ``level``, against the
    ``expected`` count and its ``binomial_p`` (exact for independent layers: a guide);
    ``max_p``, the key's largest standardised value ranked among each draw's largest (valid
    whatever the dependence between layers), and per-layer max-T ``adjusted`` p; ``exceed``,
    the share of draws at least as large as the key; the band (``null_low``, ``null_high``)."""

    name: str
    layers: list[int]
    observed: list[float]
    p_values: list[float]
    above: list[int]
    expected: float
    binomial_p: float
    max_p: float
    adjusted: list[float]
    level: float
    num_null: int
    null_low: list[float]
    null_high: list[float]
    null_mean: list[float]
    exceed: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_above": len(self.above)}

    def summary(self) -> str:
        """One line: layers above the band against chance, and both p-values."""
        return (
            f"{self.name}: the key beats the {100 * self.level:g}% band at {len(self.above)}"
            f"/{len(self.layers)} layers (expected by chance {self.expected:.1f}; binomial "
            f"p={self.binomial_p:.2g}); max-statistic p={self.max_p:.2g} over "
            f"{self.num_null} draws"
        )


def layer_test(
    observed: Sequence[float] | torch.Tensor,
    null: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    level: float = 0.975,
    name: str = "null",
) -> LayerTest:
    """Test a per-layer statistic ``observed`` [L] against null draws ``null`` [n, L].

    The band edges (null_low, null_high) are the (1 - level) and ``level`` quantiles of the
    draws at each layer, for plots.
    """
    obs = torch.tensor(_finite_list("observed", observed), dtype=torch.float64)
    if not isinstance(null, torch.Tensor):
        raise TypeError(f"null must be a torch.Tensor [n, L], got {type(null).__name__}")
    if null.dim() != 2 or null.shape[1] != obs.numel() or null.shape[0] < 1:
        raise ValueError(f"null must be [n >= 1, {obs.numel()}], got {list(null.shape)}")
    if not bool(torch.isfinite(null).all()):
        raise ValueError("null must hold finite numbers only")
    if not 0.5 <= level < 1.0:
        raise ValueError(f"level must be in [0.5, 1), got {level!r}")
    names = list(range(obs.numel())) if layers is None else [int(x) for x in layers]
    if len(names) != obs.numel():
        raise ValueError(f"layers must name {obs.numel()} layers, got {len(names)}")
    draws = null.double()
    n = draws.shape[0]
    p = ((1 + (draws >= obs).sum(0)).double() / (1 + n)).tolist()
    alpha = 1.0 - level
    above = [layer for layer, pv in zip(names, p, strict=True) if pv <= alpha + 1e-12]
    pool = torch.cat([obs[None], draws])
    z = (pool - pool.mean(0)) / pool.std(0, correction=0).clamp_min(1e-300)
    z_obs, z_null_max = z[0], z[1:].max(dim=1).values
    max_p = (1 + int((z_null_max >= z_obs.max()).sum())) / (1 + n)
    adjusted = [(1 + int((z_null_max >= zl).sum())) / (1 + n) for zl in z_obs.tolist()]
    q = torch.quantile(draws, torch.tensor([alpha, level], dtype=torch.float64), dim=0)
    binomial = binomial_tail(len(above), len(names), alpha)
    exceed = ((draws >= obs).sum(0).double() / n).tolist()
    return LayerTest(
        name, names, obs.tolist(), p, above, len(names) * alpha, binomial, max_p, adjusted, level,
        n, q[0].tolist(), q[1].tolist(), draws.mean(0).tolist(), exceed,
    )  # fmt: skip


METRICS = {"accuracy": "accuracy", "step_rate": "shows steps"}
METRICS |= {"answer_words": "mean answer length (words)", "final_rate": "final-answer phrase"}


def metric_values(cond: ConditionResult) -> dict[str, float]:
    """The four measures of one condition."""
    c = cond
    values = (c.accuracy.value, c.step_rate, c.mean_answer_words, c.final_rate)
    return dict(zip(METRICS, values, strict=True))


@dataclass
class MetricTest:
    """One measure of the key against one null family."""

    metric: str
    key: float
    null: list[float]
    p_value: float
    holm_p: float
    normal_p: float
    spread: Spread

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BehaviouralNull:
    """Per null family ("random", "null_contrast"): one :class:`MetricTest` per measure."""

    families: dict[str, list[MetricTest]]
    num_items: int

    def test(self, family: str, metric: str) -> MetricTest:
        return next(t for t in self.families[family] if t.metric == metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def behavioural_null(
    key: ConditionResult,
    nulls: Mapping[str, Sequence[ConditionResult]],
    *,
    metrics: Sequence[str] = tuple(METRICS),
) -> BehaviouralNull:
    """Test the key's condition against each family of null-key conditions (same items)."""
    if not metrics or any(m not in METRICS for m in metrics):
        raise ValueError(f"metrics must be a non-empty subset of {tuple(METRICS)}, got {metrics}")
    ids, observed = [it.id for it in key.items], metric_values(key)
    families: dict[str, list[MetricTest]] = {}
    for family, conds in nulls.items():
        if any([it.id for it in c.items] != ids for c in conds):
            raise ValueError(f"a null condition of {family!r} ran on other items than the key's")
        values = {m: [metric_values(c)[m] for c in conds] for m in metrics}
        raw = {m: permutation_p_value(observed[m], values[m]) for m in metrics}
        adjusted = holm(raw)
        families[family] = [
            MetricTest(m, observed[m], values[m], raw[m], adjusted[m],
                       prediction_p_value(observed[m], values[m]), spread(values[m]))
            for m in metrics if conds
        ]  # fmt: skip
    return BehaviouralNull({k: v for k, v in families.items() if v}, len(ids))
