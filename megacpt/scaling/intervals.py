"""Uncertainty of scaling-law fits: cluster bootstrap over runs, derived quantities, intervals.

Checkpoints of one run share its seed, data order and schedule, so their errors are correlated:
resampling points one by one treats 15 checkpoints of a run as 15 independent measurements and
gives intervals far too narrow.  Here a resample draws whole *runs* (the `group` of `Points`: a
run directory, a CSV's `run` column, or one curve per N) with replacement, and every point of a
drawn run gets the run's multiplicity as its weight.  Each resample is refitted from the best
distinct minima of the full fit, all resamples at once (`fit.newton_batch`, per-start weights).

CPT law: given the from-scratch points (`base_points`), every resample also draws scratch runs
and refits the from-scratch law, and the CPT law of that resample inherits *its* E, A, alpha
(the design's constants differ per resample).  With a fixed base (a FIT.json) E, A, alpha stay
fixed, and the intervals leave out the base's uncertainty (`diagnostics` warns about it).

Derived quantities (`derived`, vectorised over resamples; params may hold arrays):
- allocation: "a", "b", "G", "N_coef", "D_coef" (as `laws.allocation`; NaN without an optimum);
- per compute budget C, keys suffixed "@" + f"{C:.3g}" (e.g. "N_opt@1e+21"): "N_opt", "D_opt",
  "L_opt" (the loss on the law's efficient frontier, E + A N_opt^-alpha (1 + alpha/(beta-gamma)))
  and, for the CPT law with a from-scratch base, "flops_saved": 1 - C / C_s, C_s being the
  compute the scratch law needs to reach the CPT law's L_opt(C), both compute-optimally
  allocated (the paper's Eq. 3 sense; negative when the laws say CPT is worse).

`fit_points` does fit + bootstrap + diagnostics and returns the FIT.json dict; fields it adds
to those of `fit.fit_law`:
    "budgets": [C, ...]; "derived": {name: value}
    "data_range": {"N": [lo, hi], "D": [lo, hi], "C": [lo, hi], "n_sizes", "n_runs"}
    "intervals": {name: [lo, hi] | null}   95 % intervals (`percentile_intervals`: the
        expanded percentile interval over n_clusters runs) of every parameter the
        resamples vary (E, A, alpha too when the CPT base is refitted; the scratch base's own
        B, beta as "base_B", "base_beta") and every derived quantity; null when more than
        2.5 % of the resamples give no value (e.g. no finite allocation) or the design does
        not identify the law
    "bootstrap": {"K", "seed", "method": "cluster", "n_clusters", "base_refit",
                  "samples": {name: [K values]}, "se": {...}, "median": {...}}
    "base": the from-scratch fit a CPT law inherits from (E, A, B, alpha, beta, ...)
    "warnings": [str, ...]; "identifiable": bool          (see `diagnostics`)
"""
from __future__ import annotations

import numpy as np

from .fit import fit_law, newton_batch, single_blas_thread, _progress_bar
from .laws import Design, LawSpec, chinchilla, cpt
from .runs import Points

ALLOC_KEYS = ("a", "b", "G", "N_coef", "D_coef")


def budget_key(name: str, C: float) -> str:
    """Key of a per-budget derived quantity, e.g. budget_key("N_opt", 1e21) == "N_opt@1e+21"."""
    return f"{name}@{C:.3g}"


def allocation_arrays(p: dict) -> dict:
    """`laws.allocation` vectorised over arrays of parameters; NaN where there is no optimum."""
    A, B, alpha, beta = (np.asarray(p[k], dtype=np.float64) for k in ("A", "B", "alpha", "beta"))
    gamma = np.asarray(p.get("gamma", 0.0), dtype=np.float64)
    denom = alpha + beta - gamma
    ok = (A > 0) & (B > 0) & (alpha > 0) & (beta - gamma > 0) & (denom > 0)
    with np.errstate(all="ignore"):
        G = (alpha * A / ((beta - gamma) * B)) ** (1.0 / denom)
        a, b = beta / denom, (alpha - gamma) / denom
        out = {"a": a, "b": b, "G": G, "N_coef": G * 6.0 ** -a, "D_coef": 6.0 ** -b / G}
    return {k: np.where(ok, v, np.nan) for k, v in out.items()}


def optimal_loss(p: dict, alloc: dict, C):
    """L_opt(C) on the law's efficient frontier: [..., m] for budgets C [m]."""
    C = np.asarray(C, dtype=np.float64)
    ex = lambda k: np.asarray(p[k], dtype=np.float64)[..., None]  # noqa: E731
    gamma = np.asarray(p.get("gamma", 0.0), dtype=np.float64)[..., None]
    n_opt = alloc["N_coef"][..., None] * C ** alloc["a"][..., None]
    with np.errstate(all="ignore"):
        return ex("E") + ex("A") * n_opt ** -ex("alpha") * (1 + ex("alpha") / (ex("beta") - gamma))


def compute_to_reach(p: dict, alloc: dict, loss):
    """Compute the (compute-optimal) law needs to reach `loss` ([..., m]); inf below its E."""
    ex = lambda k: np.asarray(p[k], dtype=np.float64)[..., None]  # noqa: E731
    gamma = np.asarray(p.get("gamma", 0.0), dtype=np.float64)[..., None]
    k = ex("A") * (1 + ex("alpha") / (ex("beta") - gamma)) * alloc["N_coef"][..., None] ** \
        -ex("alpha")
    gap = np.asarray(loss, dtype=np.float64) - ex("E")
    with np.errstate(all="ignore"):
        C = (k / gap) ** (1.0 / (alloc["a"][..., None] * ex("alpha")))
    return np.where(gap > 0, C, np.inf)


def derived(p: dict, budgets=(), scratch: dict | None = None) -> dict:
    """Derived quantities (module doc) of parameters `p` (floats or [K] arrays each).

    scratch: from-scratch law parameters (E, A, B, alpha, beta) for "flops_saved" of a CPT law.
    """
    alloc = allocation_arrays(p)
    out = dict(alloc)
    budgets = np.asarray(list(budgets), dtype=np.float64)
    if budgets.size == 0:
        return out
    n_opt = alloc["N_coef"][..., None] * budgets ** alloc["a"][..., None]  # [..., m]
    d_opt = alloc["D_coef"][..., None] * budgets ** alloc["b"][..., None]
    l_opt = optimal_loss(p, alloc, budgets)
    saved = None
    if scratch is not None:
        c_s = compute_to_reach(scratch, allocation_arrays(scratch), l_opt)
        saved = np.where(np.isfinite(l_opt), 1.0 - budgets / c_s, np.nan)
    for j, C in enumerate(budgets):
        out[budget_key("N_opt", C)] = n_opt[..., j]
        out[budget_key("D_opt", C)] = d_opt[..., j]
        out[budget_key("L_opt", C)] = l_opt[..., j]
        if saved is not None:
            out[budget_key("flops_saved", C)] = saved[..., j]
    return out


def cluster_weights(groups, K: int, rng) -> np.ndarray:
    """[K, n] weights: each point's run drawn how many times, runs drawn with replacement."""
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    G = int(codes.max()) + 1
    counts = rng.multinomial(G, np.full(G, 1.0 / G), size=K).astype(np.float64)  # [K, G]
    return counts[:, codes]


def refit(starts, design: Design, logl, W, chunk=2048, progress=False):
    """Best of `starts` [M, P] refitted under each weight row of W [R, n]: (theta [R, P], f [R]).

    design.const may be per resample ([R, K, n]).
    """
    starts = np.atleast_2d(starts)
    R, M = W.shape[0], len(starts)
    theta0 = np.tile(starts, (R, 1))  # [R*M, P], resample-major
    w_all = np.repeat(W, M, 0)  # [R*M, n]
    const = design.const if design.const.ndim == 2 else np.repeat(design.const, M, 0)
    theta, f = np.empty_like(theta0), np.empty(R * M)
    bar = _progress_bar(R * M, "bootstrap", progress)
    with single_blas_thread():
        for lo in range(0, R * M, chunk):
            sl = slice(lo, lo + chunk)
            des = Design(const if const.ndim == 2 else const[sl], design.J)
            theta[sl], f[sl] = newton_batch(theta0[sl], des, logl, w_all[sl])
            bar.update(len(f[sl]))
    bar.close()
    f = np.where(np.isfinite(f), f, np.inf).reshape(R, M)
    pick = np.argmin(f, axis=1) + np.arange(R) * M
    return theta[pick], f.min(axis=1)


def natural_arrays(law: LawSpec, theta, base: dict | None = None) -> dict:
    """law.to_natural over rows of theta [R, P]; base: inherited E, A, alpha (floats or [R])."""
    t = {name: theta[:, i] for i, name in enumerate(law.free)}
    if law.name == "chinchilla":
        return {"E": np.exp(t["e"]), "A": np.exp(t["a"]), "B": np.exp(t["b"]),
                "alpha": t["alpha"], "beta": t["beta"]}
    base = base if base is not None else law.base
    R = theta.shape[0]
    out = {k: np.broadcast_to(np.asarray(base[k], dtype=np.float64), (R,)).copy()
           for k in ("E", "A", "alpha")}
    out.update({"B": np.exp(t["b"]), "beta": t["beta"],
                "gamma": t["gamma"] if "gamma" in t else np.full(R, law.base["gamma"])})
    return out


def _starts(fit: dict, n_starts: int):
    return np.array(fit.get("minima_theta") or [fit["theta"]])[:n_starts]


def cluster_bootstrap(law: LawSpec, fit: dict, points: Points, *, K: int = 200, seed: int = 0,
                      base_points: Points | None = None, base_fit: dict | None = None,
                      n_starts: int = 4, progress: bool = False) -> dict:
    """Resample runs K times and refit; returns {name: [K] array} of natural parameters.

    CPT law with base_points and base_fit (the scratch fit on them): the scratch runs are
    resampled too and the scratch law refitted per resample; its B and beta are returned as
    "base_B" and "base_beta".
    """
    if K < 2:
        raise ValueError(f"bootstrap needs K >= 2 resamples, got {K}")
    rng = np.random.default_rng(seed)
    logl = np.log(points.loss)
    if law.name != "cpt" or base_points is None:
        W = cluster_weights(points.group, K, rng)
        theta, _ = refit(_starts(fit, n_starts), law.design(N=points.N, D=points.D), logl, W,
                         progress=progress)
        return natural_arrays(law, theta)
    if base_fit is None:
        raise ValueError("cluster_bootstrap: base_points needs base_fit (the scratch fit)")
    s_law = chinchilla()
    Ws = cluster_weights(base_points.group, K, rng)
    th_s, _ = refit(_starts(base_fit, n_starts), s_law.design(N=base_points.N, D=base_points.D),
                    np.log(base_points.loss), Ws, progress=progress)
    s = natural_arrays(s_law, th_s)
    template = law.design(N=points.N, D=points.D)
    logn = np.log(points.N)
    const = np.repeat(template.const[None], K, 0)  # [K, 3, n]
    const[:, 0] = np.log(s["A"])[:, None] - s["alpha"][:, None] * logn[None]
    const[:, 2] = np.log(s["E"])[:, None]
    Wc = cluster_weights(points.group, K, rng)
    th_c, _ = refit(_starts(fit, n_starts), Design(const, template.J), logl, Wc,
                    progress=progress)
    out = natural_arrays(law, th_c, base=s)
    out.update({"base_B": s["B"], "base_beta": s["beta"]})
    return out


def expanded_tail(n_clusters: int | None, level: float = 0.95) -> float:
    """Tail probability of Hesterberg's expanded percentile interval (2015) for n clusters.

    The plain percentile interval is too narrow with few resampling units (it misses the
    n/(n-1) variance factor and the t quantile); this one uses the percentiles at
    Phi(-sqrt(n/(n-1)) t_{n-1}(1 - tail)): for 12 runs 1.1% / 98.9% instead of 2.5% / 97.5%.
    """
    from scipy.stats import norm, t

    tail = (1 - level) / 2
    if not n_clusters or n_clusters < 3:
        return tail
    n = n_clusters
    return float(norm.cdf(-np.sqrt(n / (n - 1)) * t.ppf(1 - tail, n - 1)))


def percentile_intervals(samples: dict, level: float = 0.95, max_missing: float = 0.025,
                         n_clusters: int | None = None) -> dict:
    """{name: [lo, hi]} (expanded, with n_clusters) percentile intervals; None where more than
    max_missing of the values are NaN."""
    q = 100 * expanded_tail(n_clusters, level)
    out = {}
    for k, v in samples.items():
        v = np.asarray(v, dtype=np.float64)
        finite = np.isfinite(v)
        if finite.mean() < 1 - max_missing:
            out[k] = None
        else:
            out[k] = [float(np.percentile(v[finite], q)), float(np.percentile(v[finite], 100 - q))]
    return out


def data_range(points: Points) -> dict:
    """The span of the data a law was fitted on (for extrapolation warnings)."""
    return {"N": [float(points.N.min()), float(points.N.max())],
            "D": [float(points.D.min()), float(points.D.max())],
            "C": [float(points.C.min()), float(points.C.max())],
            "n_sizes": int(np.unique(points.N).size),
            "n_runs": int(np.unique(points.group.astype(str)).size)}


def _finite_list(v) -> list:
    """Values as a JSON-safe list (NaN/inf -> None)."""
    return [float(x) if np.isfinite(x) else None for x in np.asarray(v, dtype=np.float64)]


def law_params(fit: dict) -> dict:
    """The natural parameters of a FIT.json dict (E, A, B, alpha, beta[, gamma])."""
    return {k: float(fit[k]) for k in ("E", "A", "B", "alpha", "beta", "gamma") if k in fit}


def fit_points(law_name: str, points: Points, *, base: dict | None = None,
               base_points: Points | None = None, bootstrap: int = 0, budgets=None,
               seed: int = 0, fix_gamma: float | None = None, n_starts: int = 4,
               base_init=None, progress: bool = False, **fit_kw) -> dict:
    """Fit the chinchilla or CPT law to points, with cluster-bootstrap intervals and warnings.

    CPT: `base_points` (scratch runs: the base is fitted here and refitted per resample) or
    `base` (a from-scratch FIT.json, held fixed).  budgets: compute budgets for N_opt, D_opt,
    L_opt, flops_saved (default: the largest compute in the data).  fit_kw go to `fit_law`
    (init, optuna_trials, delta, n_polish); base_init: init of the scratch base fit (default:
    init when it is a name, else "grid").  n_starts: minima each resample is refitted from.
    Returns the FIT.json dict (module doc).
    """
    from .diagnostics import fit_warnings

    base_fit = None
    if law_name == "chinchilla":
        law = chinchilla()
    elif law_name == "cpt":
        if base_points is not None and base is not None:
            raise ValueError("give the CPT law's base as a fit or as scratch points, not both")
        if base_points is not None:
            init = fit_kw.get("init", "grid")
            kw = {**fit_kw, "init": base_init if base_init is not None
                  else (init if isinstance(init, str) else "grid")}
            base_fit = fit_law(chinchilla(), base_points.loss, N=base_points.N,
                               D=base_points.D, source=base_points.source, seed=seed, **kw)
            base_fit["data"] = base_points.source
            base_fit["data_range"] = data_range(base_points)
            base = base_fit
        if base is None:
            raise ValueError("the cpt law needs a from-scratch base: a chinchilla FIT.json "
                             "(--base) or scratch points (--base-input / --base-runs)")
        law = cpt(base, fix_gamma)
    else:
        raise ValueError(f"fit_points fits 'chinchilla' or 'cpt', not {law_name!r} "
                         "(the frontier: curves.fit_frontier)")
    fit = fit_law(law, points.loss, N=points.N, D=points.D, source=points.source, seed=seed,
                  progress=progress, **fit_kw)
    fit["data"] = points.source
    fit["data_range"] = data_range(points)
    budgets = [float(points.C.max())] if budgets is None else [float(c) for c in budgets]
    fit["budgets"] = budgets
    scratch = None
    if law.name == "cpt":
        fit["base"] = {k: base[k] for k in ("law", "E", "A", "B", "alpha", "beta", "huber",
                                            "n_points", "data", "data_range") if k in base}
        if "B" in base and "beta" in base:
            scratch = law_params(base)
    fit["derived"] = {k: float(v) for k, v in derived(law_params(fit), budgets, scratch).items()}
    if bootstrap:
        samples = cluster_bootstrap(law, fit, points, K=int(bootstrap), seed=seed,
                                    base_points=base_points, base_fit=base_fit,
                                    n_starts=n_starts, progress=progress)
        s_scr = None
        if scratch is not None:
            s_scr = ({"E": samples["E"], "A": samples["A"], "alpha": samples["alpha"],
                      "B": samples["base_B"], "beta": samples["base_beta"]}
                     if "base_B" in samples else scratch)
        samples.update(derived(samples, budgets, s_scr))
        if law.name == "cpt" and base_points is None:  # inherited and fixed: no interval
            for k in ("E", "A", "alpha"):
                samples.pop(k)
        if law.name == "cpt" and fix_gamma is not None:
            samples.pop("gamma")
        n_cl = fit["data_range"]["n_runs"]
        if base_fit is not None:
            n_cl = min(n_cl, base_fit["data_range"]["n_runs"])
        fit["intervals"] = percentile_intervals(samples, n_clusters=n_cl)
        fit["bootstrap"] = {
            "K": int(bootstrap), "seed": seed, "method": "cluster, expanded percentile",
            "n_clusters": n_cl, "base_refit": base_points is not None,
            "samples": {k: _finite_list(v) for k, v in samples.items()},
            "se": {k: float(np.nanstd(v, ddof=1)) for k, v in samples.items()},
            "median": {k: float(np.nanmedian(v)) for k, v in samples.items()}}
    fit.update(fit_warnings(fit, points, base_points))
    return fit


def allocate_budgets(fit: dict, budgets, law: str | None = None) -> dict:
    """N_opt, D_opt, L_opt at budgets for a FIT.json (or plain parameter) dict, with 95 %
    intervals when it carries bootstrap samples and extrapolation warnings when it records
    its data_range: {"budgets", "N_opt", "D_opt", "L_opt", "intervals", "warnings"}."""
    from .diagnostics import extrapolation

    budgets = [float(c) for c in budgets]
    p = law_params(fit)
    if law == "chinchilla":
        p.pop("gamma", None)
    d = derived(p, budgets)
    out = {"budgets": budgets}
    for name in ("N_opt", "D_opt", "L_opt"):
        out[name] = [float(d[budget_key(name, c)]) for c in budgets]
    samples = (fit.get("bootstrap") or {}).get("samples")
    if samples and all(k in samples for k in ("B", "beta")):
        s = {k: np.asarray(samples[k] if k in samples else np.full(len(samples["B"]), p[k]),
                           dtype=np.float64) for k in p}
        ds = derived(s, budgets)
        iv = percentile_intervals(ds, n_clusters=fit["bootstrap"].get("n_clusters"))
        out["intervals"] = {k: v for k, v in iv.items() if "@" in k or k in ALLOC_KEYS}
    out["warnings"] = (extrapolation(fit["data_range"], budgets, out["N_opt"], out["D_opt"])
                       if "data_range" in fit else
                       ["no data_range in the parameters: cannot tell whether these budgets "
                        "extrapolate"])
    return out
