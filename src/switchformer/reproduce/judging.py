"""Judging a reproduced result against the direction registered before it ran.

Quality is negative log perplexity in nats (higher is better, paper §3). ``delta`` is the paired difference
"arm the paper says is better" minus "the other arm", so a positive delta is the paper's direction. ``sigma`` is the
pooled seed standard deviation of the experiment (an experiment without repeated seeds borrows the Fig. 12 value),
floored at ``SIGMA_FLOOR`` nats so that a lucky run of near-identical seeds cannot make a tiny gap look decisive.

- HELD: ``delta > max(2 * sigma * sqrt(2 / n), 0.005)``, every paired seed has the paper's sign, and with
  ``n >= 3`` seeds a one-sided paired t-test gives ``p < 0.05``.
- NOT RESOLVED: the gap is within that margin (or the seeds disagree): no evidence either way, never a pass.
- REVERSED: the opposite sign beyond the margin.
- Sweeps: Spearman's rho between the swept value and the mean quality is >= 0.8 and the endpoint gap is >= 3 sigma.

A diverged run (a non-finite loss, or a final loss above its untrained value) keeps its untrained quality: it
counts as the worst run and stays in the mean and spread.

Statistics use scipy when it is installed and the small exact implementations below otherwise (regularised
incomplete beta by Lentz's continued fraction; tests compare the two and closed forms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

SIGMA_FLOOR = 0.005
"""Smallest seed standard deviation (nats) the margin is computed from."""
MARGIN_FLOOR = 0.005
"""Smallest margin (nats) a difference must clear."""
ALPHA = 0.05
"""One-sided significance level of the paired t-test (n >= 3) and the variance F-test."""
RHO_MIN = 0.8
"""Spearman's rho a sweep needs."""
SWEEP_GAP_SIGMAS = 3.0
"""Endpoint gap of a sweep, in sigmas."""

HELD, NOT_RESOLVED, REVERSED = "HELD", "NOT RESOLVED", "REVERSED"


# ----------------------------------------------------------------------------------------------- statistics


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return math.fsum(xs) / len(xs)


def sample_std(xs: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction; 0.0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pooled_std(groups: Sequence[Sequence[float]]) -> float | None:
    """``sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))`` over the groups with two or more values; None if none has."""
    dof = sum(len(g) - 1 for g in groups if len(g) >= 2)
    if dof == 0:
        return None
    ss = math.fsum(math.fsum((x - mean(g)) ** 2 for x in g) for g in groups if len(g) >= 2)
    return math.sqrt(ss / dof)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Survival function ``P(T > t)`` of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def f_sf(f: float, d1: float, d2: float) -> float:
    """Survival function ``P(F > f)`` of the F distribution with (d1, d2) degrees of freedom."""
    if d1 <= 0 or d2 <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got ({d1}, {d2})")
    if f <= 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return betainc(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        return None
    return stats


def paired_t_test_greater(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """One-sided paired t-test of ``mean(a - b) > 0``: ``(t, p)``; scipy's ``ttest_rel`` when installed.

    Identical differences (zero spread) give ``t = +-inf`` and ``p`` 0 or 1 (0.5 when they are all zero).
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired t-test needs two equal-length samples of >= 2 values, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean(d), sample_std(d)
    if s == 0.0:
        return (math.copysign(math.inf, m) if m else 0.0), (0.0 if m > 0 else 1.0 if m < 0 else 0.5)
    stats = _scipy_stats()
    if stats is not None:
        res = stats.ttest_rel(a, b, alternative="greater")
        return float(res.statistic), float(res.pvalue)
    t = m / (s / math.sqrt(len(d)))
    return t, t_sf(t, len(d) - 1)


def variance_f_test_greater(smaller: Sequence[float], larger: Sequence[float]) -> tuple[float, float]:
    """One-sided F-test that ``larger`` has the larger variance: ``(F, p)`` with ``F = s_larger^2 / s_smaller^2``."""
    if len(smaller) < 2 or len(larger) < 2:
        raise ValueError("a variance F-test needs >= 2 values per group")
    v_small, v_large = sample_std(smaller) ** 2, sample_std(larger) ** 2
    if v_small == 0.0:
        return (math.inf, 0.0) if v_large > 0 else (math.nan, 1.0)
    f = v_large / v_small
    stats = _scipy_stats()
    if stats is not None:
        return f, float(stats.f.sf(f, len(larger) - 1, len(smaller) - 1))
    return f, f_sf(f, len(larger) - 1, len(smaller) - 1)


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman_rho needs two equal-length sequences of >= 2 values, got {len(x)}, {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in rx)
    syy = math.fsum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


# ----------------------------------------------------------------------------------------------- verdicts


def effective_sigma(sigma: float | None) -> float:
    """The seed std a margin is computed from: ``sigma`` floored at ``SIGMA_FLOOR`` (None: the floor)."""
    return max(sigma if sigma is not None and math.isfinite(sigma) else 0.0, SIGMA_FLOOR)


def margin(sigma: float | None, n: int) -> float:
    """``max(2 * sigma * sqrt(2 / n), 0.005)`` with sigma floored: what a paired mean difference must clear."""
    if n < 1:
        raise ValueError(f"margin needs n >= 1 paired seeds, got {n}")
    return max(2.0 * effective_sigma(sigma) * math.sqrt(2.0 / n), MARGIN_FLOOR)


@dataclass
class Judgement:
    """One claim's verdict and the numbers behind it (all qualities in nats of negative log perplexity)."""

    verdict: str
    delta: float | None = None
    """Paired mean difference in the paper's direction (or the endpoint gap of a sweep)."""
    margin: float | None = None
    n: int = 0
    sigma: float | None = None
    """The floored sigma the margin used."""
    signs_agree: bool | None = None
    t: float | None = None
    p: float | None = None
    rho: float | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _clears(diffs: list[float], a: Sequence[float], b: Sequence[float], m: float) -> tuple[bool, float | None,
                                                                                            float | None]:
    """Whether the paired differences ``a - b`` pass the HELD test at margin ``m``: (passes, t, p)."""
    delta = mean(diffs)
    t = p = None
    if len(diffs) >= 2:
        t, p = paired_t_test_greater(a, b)
    ok = delta > m and all(d > 0 for d in diffs)
    if len(diffs) >= 3:
        ok = ok and p is not None and p < ALPHA
    return ok, t, p


def judge_better(better: Sequence[float], worse: Sequence[float], sigma: float | None) -> Judgement:
    """Verdict on "``better`` beats ``worse``" from per-seed qualities paired by seed (equal lengths)."""
    if len(better) != len(worse) or not better:
        raise ValueError(f"paired qualities needed, got {len(better)} and {len(worse)} values")
    diffs = [x - y for x, y in zip(better, worse, strict=True)]
    n, m = len(diffs), margin(sigma, len(diffs))
    held, t, p = _clears(diffs, better, worse, m)
    back, _, p_back = _clears([-d for d in diffs], worse, better, m)
    delta = mean(diffs)
    verdict = HELD if held else REVERSED if delta < -m else NOT_RESOLVED
    return Judgement(verdict, delta, m, n, effective_sigma(sigma), all(d > 0 for d in diffs), t, p,
                     details={"reverse_test_passes": back, "p_reverse": p_back})


def judge_equivalent(a: Sequence[float], b: Sequence[float], sigma: float | None) -> Judgement:
    """Verdict on "``a`` matches ``b``": HELD when the paired gap is within the margin, REVERSED when it passes the
    HELD test in either direction (a real difference), NOT RESOLVED otherwise."""
    j = judge_better(a, b, sigma)
    differs = j.verdict == HELD or j.details["reverse_test_passes"]
    verdict = HELD if abs(j.delta) <= j.margin else REVERSED if differs else NOT_RESOLVED
    return Judgement(verdict, j.delta, j.margin, j.n, j.sigma, j.signs_agree, j.t, j.p, details=j.details)


def judge_no_benefit(treated: Sequence[float], control: Sequence[float], sigma: float | None) -> Judgement:
    """Verdict on "``treated`` brings no benefit over ``control``": HELD when its gain is below the margin (or
    negative), REVERSED when the gain passes the HELD test, NOT RESOLVED otherwise. ``delta`` is the gain."""
    j = judge_better(treated, control, sigma)
    verdict = HELD if j.delta < j.margin else REVERSED if j.verdict == HELD else NOT_RESOLVED
    return Judgement(verdict, j.delta, j.margin, j.n, j.sigma, j.signs_agree, j.t, j.p, details=j.details)


def judge_sweep(xs: Sequence[float], qualities: Sequence[float], sigma: float | None) -> Judgement:
    """Verdict on "quality rises with x": HELD when Spearman's rho(x, mean quality) >= 0.8 and the endpoint gap
    (quality at the largest x minus at the smallest) is >= 3 sigma; REVERSED for the mirror image."""
    if len(xs) != len(qualities) or len(xs) < 2:
        raise ValueError("a sweep needs >= 2 (x, quality) points")
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    rho = spearman_rho(xs, qualities)
    gap = qualities[order[-1]] - qualities[order[0]]
    s = effective_sigma(sigma)
    need = SWEEP_GAP_SIGMAS * s
    if rho >= RHO_MIN and gap >= need:
        verdict = HELD
    elif rho <= -RHO_MIN and gap <= -need:
        verdict = REVERSED
    else:
        verdict = NOT_RESOLVED
    return Judgement(verdict, gap, need, len(xs), s, rho=rho)


def judge_spread(narrow: Sequence[float], wide: Sequence[float], sigma: float | None) -> Judgement:
    """Verdict on "``wide`` varies more over seeds than ``narrow``" (one-sided F-test of the variances, p < 0.05),
    with the count of ``wide`` seeds worse than ``mean(narrow) - 3 sigma`` reported beside it."""
    if len(narrow) < 2 or len(wide) < 2:
        return Judgement(NOT_RESOLVED, n=min(len(narrow), len(wide)),
                         details={"reason": "a spread needs >= 2 seeds per arm"})
    f, p = variance_f_test_greater(narrow, wide)
    _, p_back = variance_f_test_greater(wide, narrow)
    s = effective_sigma(sigma)
    cut = mean(narrow) - SWEEP_GAP_SIGMAS * s
    worse = sum(1 for q in wide if q < cut)
    verdict = HELD if p < ALPHA else REVERSED if p_back < ALPHA else NOT_RESOLVED
    return Judgement(verdict, sample_std(wide) - sample_std(narrow), None, min(len(narrow), len(wide)), s, p=p,
                     details={"F": f, "p_reverse": p_back, "std_narrow": sample_std(narrow),
                              "std_wide": sample_std(wide), "wide_seeds_below_cut": worse, "cut": cut})
