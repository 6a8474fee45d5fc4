"""When a scaling-law answer cannot be trusted: identifiability, plausibility, extrapolation.

`fit_warnings(fit, points, base_points)` returns {"warnings": [str, ...], "identifiable": bool}
for a FIT.json dict (from `intervals.fit_points`) and applies the verdict to it: a fit whose
design does not identify the law keeps its parameters (they still describe the data in
sample) but its "allocation" becomes null with "allocation_error": "not identifiable: ...",
its "derived" values and "intervals" become null, and the CLI prints "not identifiable"
instead of numbers.  Checks:
- design: fewer than 3 model sizes; log D (nearly) a linear function of log N (one budget per
  size, or final points only of runs at a fixed tokens-per-parameter ratio): the N and D
  terms cannot be told apart ("not identifiable"); fewer than 5 sizes (a warning);
- conditioning of the fit's Jacobian at the optimum (a warning when > 1e8);
- exponents: alpha, beta, beta - gamma <= 0 (negative), outside [0.05, 1.5] or |gamma| > 0.5
  (implausible); A or B > 1e12 (a degenerate fit); allocation exponent a outside [0.1, 0.9];
- intervals: none (no bootstrap), wide ones, resamples without a finite allocation, a CPT
  base held fixed;
- extrapolation: budgets beyond the data's compute range, N_opt / D_opt beyond its N / D
  range, each with its factor (`extrapolation`; `allocate --compute` prints these too).
"""
from __future__ import annotations

import math

import numpy as np

from .runs import Points

MIN_SIZES = 3  # below: E, A and alpha cannot be separated
FEW_SIZES = 5  # below: a warning
COLLINEAR_SD = 0.1  # residual sd of log D given log N below which the design is collinear


def design_problems(points: Points, what: str = "data") -> tuple[list[str], list[str]]:
    """(fatal, warnings) of a design: reasons it cannot identify the Chinchilla form."""
    fatal, warn = [], []
    n_sizes = int(np.unique(points.N).size)
    if n_sizes < MIN_SIZES:
        fatal.append(f"{what}: only {n_sizes} model size(s); E, A and alpha need at least "
                     f"{MIN_SIZES} (better {FEW_SIZES}+)")
    elif n_sizes < FEW_SIZES:
        warn.append(f"{what}: only {n_sizes} model sizes; the size exponent rests on few "
                    f"points (use at least {FEW_SIZES}, better 8+)")
    logn, logd = np.log(points.N), np.log(points.D)
    if n_sizes >= 2 and np.std(logn) > 0:
        slope = np.cov(logn, logd, bias=True)[0, 1] / np.var(logn)
        resid = float(np.std(logd - slope * logn))
        if resid < COLLINEAR_SD:
            budgets = _budgets_per_size(points)
            fatal.append(f"{what}: log D is a linear function of log N (residual sd {resid:.3f}; "
                         f"{budgets} distinct budgets per size at most): with one budget per "
                         "size or final points only, A/N^alpha and B/D^beta cannot be told "
                         "apart; add several budgets per size (intermediate or cooldown "
                         "checkpoints, or runs of several lengths)")
    return fatal, warn


def _budgets_per_size(points: Points) -> int:
    return max(np.unique(np.round(np.log(points.D[points.N == n]), 2)).size
               for n in np.unique(points.N))


def conditioning(fit: dict, points: Points) -> float:
    """Condition number of the column-normalised Jacobian d log L_hat / d theta at the fit."""
    from .laws import chinchilla, cpt

    law = chinchilla() if fit["law"] == "chinchilla" else cpt(fit, None if len(fit["theta"]) == 3
                                                              else fit["gamma"])
    des = law.design(N=points.N, D=points.D)
    T = des.const + np.einsum("kip,p->ki", des.J, np.asarray(fit["theta"]))  # [K, n]
    w = np.exp(T - T.max(0))
    w /= w.sum(0)
    G = np.einsum("ki,kip->ip", w, des.J)  # [n, P]
    norms = np.linalg.norm(G, axis=0)
    if np.any(norms == 0):
        return math.inf
    s = np.linalg.svd(G / norms, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def plausibility(p: dict, law: str) -> list[str]:
    """Warnings about negative or implausible parameter values."""
    out = []
    free = ("alpha", "beta") if law == "chinchilla" else ("beta",)
    for k in free:
        v = p[k]
        if v <= 0:
            out.append(f"negative exponent: {k} = {v:.3g} <= 0 (loss would not fall with "
                       f"{'N' if k == 'alpha' else 'D'})")
        elif not 0.05 <= v <= 1.5:
            out.append(f"implausible exponent: {k} = {v:.3g} (published fits: 0.05-1.5)")
    if law == "cpt":
        g = p["gamma"]
        if p["beta"] - g <= 0:
            out.append(f"beta' - gamma = {p['beta'] - g:.3g} <= 0: no finite compute-optimal "
                       "allocation (the law prefers ever smaller models)")
        if abs(g) > 0.5:
            out.append(f"implausible gamma = {g:.3g} (|gamma| > 0.5)")
    for k in ("A", "B"):
        if k in p and (law == "chinchilla" or k == "B") and p[k] > 1e12:
            out.append(f"implausible coefficient {k} = {p[k]:.3g} (> 1e12: a degenerate fit "
                       "that trades the coefficient against its exponent)")
    return out


def extrapolation(data_range: dict, budgets, n_opt=None, d_opt=None) -> list[str]:
    """Messages for budgets (and their N_opt, D_opt) outside the data's ranges, with factors."""
    out = []
    lo_c, hi_c = data_range["C"]
    for j, C in enumerate(np.atleast_1d(np.asarray(budgets, dtype=np.float64))):
        parts = []
        if C > hi_c * 1.0001 or C < lo_c / 1.0001:
            f = C / hi_c if C > hi_c else lo_c / C
            parts.append(f"{f:.3g}x {'beyond the largest' if C > hi_c else 'below the smallest'}"
                         f" compute in the data ({hi_c if C > hi_c else lo_c:.3g})")
        for name, arr, key in (("N_opt", n_opt, "N"), ("D_opt", d_opt, "D")):
            if arr is None:
                continue
            v = float(np.atleast_1d(arr)[j])
            lo, hi = data_range[key]
            if np.isfinite(v) and (v > hi * 1.0001 or v < lo / 1.0001):
                f = v / hi if v > hi else lo / v
                parts.append(f"{name} = {v:.3g} is {f:.3g}x {'above' if v > hi else 'below'} "
                             f"the data's {key} range [{lo:.3g}, {hi:.3g}]")
        if parts:
            out.append(f"extrapolation at C = {C:.3g}: " + "; ".join(parts))
    return out


def interval_problems(fit: dict) -> list[str]:
    """Warnings about missing, wide or incomplete intervals."""
    iv = fit.get("intervals")
    if iv is None:
        return ["no intervals: point estimates only (run with --bootstrap K, e.g. 200)"]
    out = []
    if fit["law"] == "cpt" and not fit.get("bootstrap", {}).get("base_refit", False):
        out.append("the CPT intervals hold the base's E, A, alpha fixed and leave out its "
                   "uncertainty (give the scratch data: --base-input / --base-runs)")
    values = {**(fit.get("allocation") or {}), **fit}
    for k in ("alpha", "beta", "gamma", "a"):
        ci = iv.get(k, "absent")
        if ci is None:
            out.append(f"{k}: more than 2.5% of the resamples give no value; no interval")
        elif ci != "absent" and k in values and \
                (ci[1] - ci[0]) > max(0.5 * abs(values[k]), 0.1):
            out.append(f"{k} = {values[k]:.3g} is poorly determined: 95% interval "
                       f"[{ci[0]:.3g}, {ci[1]:.3g}]")
    samples = fit.get("bootstrap", {}).get("samples", {})
    if "a" in samples:
        a = np.asarray(samples["a"], dtype=np.float64)
        bad = 1 - np.isfinite(a).mean()
        if bad > 0:
            out.append(f"{100 * bad:.1f}% of the bootstrap resamples have no finite "
                       "compute-optimal allocation")
    return out


def fit_warnings(fit: dict, points: Points, base_points: Points | None = None) -> dict:
    """{"warnings", "identifiable"} for a fit (module doc); nulls what is not identified."""
    fatal, warn = design_problems(points, "data")
    if base_points is not None:
        f2, w2 = design_problems(base_points, "scratch base")
        fatal, warn = fatal + f2, warn + w2
    base = fit.get("base") or {}
    for k in base.get("warnings", []):
        warn.append(f"scratch base: {k}")
    if not fatal:
        cond = conditioning(fit, points)
        if cond > 1e8:
            warn.append(f"the fit's Jacobian is ill-conditioned (condition number {cond:.2g}): "
                        "some parameter combinations are not determined by the data")
    p = {k: fit[k] for k in ("E", "A", "B", "alpha", "beta", "gamma") if k in fit}
    warn += plausibility(p, fit["law"])
    al = fit.get("allocation")
    if al and not 0.1 <= al["a"] <= 0.9:
        warn.append(f"implausible allocation exponent a = {al['a']:.3g} (N_opt ~ C^a)")
    if not fatal:
        warn += interval_problems(fit)
        der = fit.get("derived", {})
        budgets = fit.get("budgets", [])
        if budgets and "data_range" in fit:
            from .intervals import budget_key

            n_opt = [der.get(budget_key("N_opt", c), np.nan) for c in budgets]
            d_opt = [der.get(budget_key("D_opt", c), np.nan) for c in budgets]
            warn += extrapolation(fit["data_range"], budgets, n_opt, d_opt)
    if fatal:
        why = "; ".join(fatal)
        fit["allocation"] = None
        fit["allocation_error"] = f"not identifiable: {why}"
        if "derived" in fit:
            fit["derived"] = {k: None for k in fit["derived"]}
        if "intervals" in fit:
            fit["intervals"] = {k: None for k in fit["intervals"]}
    return {"warnings": [f"not identifiable: {m}" for m in fatal] + warn,
            "identifiable": not fatal}


def frontier_warnings(fit: dict) -> list[str]:
    """Warnings for a loss-compute frontier fit L = E' + A'/C^g."""
    out = []
    n = len(fit.get("frontier_points", {}).get("C", []))
    if n < 8:
        out.append(f"only {n} frontier points: the exponent rests on few compute levels")
    if not 0 < fit["g"] < 1:
        out.append(f"implausible frontier exponent g = {fit['g']:.3g} (expected 0 < g < 1)")
    if "intervals" not in fit:
        out.append("no intervals: point estimates only (run with --bootstrap K)")
    return out
