"""Fitting scaling laws: summed Huber loss on log-loss, many starts at once, L-BFGS polish.

Objective (Hoffmann et al. 2022; Besiroglu et al. 2024):

    f(theta) = sum_i w_i * Huber_delta( LSE_k(term[k, i](theta)) - log L_i ),  delta = 1e-3

summed (not averaged) over points; w_i = 1 except in bootstrap resamples (w_i = multiplicity).

Search: every start of the initialisation (the Chinchilla 4,500-point grid, or an Optuna TPE
search over the same box) is optimised *together* by a vectorised Levenberg-Marquardt method
with analytic gradients and the IRLS (Gauss-Newton) curvature of the Huber terms: a float32
pass over all starts (starts that meet in the same 0.01-wide cell merge), then a float64 pass
on the 64 best distinct results.  The best few distinct minima are then polished with scipy's
L-BFGS-B on the objective divided by its value, with ftol/gtol tight enough for objectives
near 1e-3 (scipy's default ftol is relative to max(|f|, 1), so at f ~ 1e-3 it stops early).
The lowest polished objective wins.  On Epoch's 240 Chinchilla points the 4,500 starts take
~5 s of one core.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import re
import time

import numpy as np
from scipy.optimize import minimize

from .laws import Design, LawSpec, allocation

log = logging.getLogger(__name__)

HUBER_DELTA = 1e-3
_EXP_FLOOR = {np.float32: -80.0, np.float64: -700.0}

#: initialisation grids per law: name of free parameter -> values (product = the starts)
GRIDS = {
    "chinchilla": {"a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0),
                   "e": np.arange(-1, 1.5, 0.5), "alpha": np.arange(0, 2.5, 0.5),
                   "beta": np.arange(0, 2.5, 0.5)},
    "cpt": {"b": np.arange(0, 27.5, 2.5), "beta": np.arange(0, 2.25, 0.25),
            "gamma": np.array([-0.5, -0.25, 0.0, 0.25, 0.5])},
    "frontier": {"a": np.arange(0, 22, 2.0), "g": np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.5]),
                 "e": np.arange(-1, 1.5, 0.5)},
}


@contextlib.contextmanager
def single_blas_thread():
    """Run the block with OpenBLAS on one thread (in this thread only), then restore it.

    The fits make only tiny BLAS/LAPACK calls (5x5 systems, L-BFGS-B on 5 parameters) where
    waking OpenBLAS worker threads costs ~1 ms per call: 10-20x the work on 2 busy cores.
    Uses OpenBLAS's thread-local setter on every OpenBLAS loaded in the process (numpy's and
    scipy's); a no-op where there is none or /proc/self/maps is unavailable.
    """
    setters = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", fh.read())))
        for path in paths:
            fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                setters.append(fn)
    except OSError:
        setters = []
    previous = [fn(1) for fn in setters]
    try:
        yield
    finally:
        for fn, n in zip(setters, previous):
            fn(n)


def init_grid(law: LawSpec) -> np.ndarray:
    """All starts of the law's grid, [S, P] in the order of `law.free`."""
    grid = GRIDS[law.name]
    if any(p not in grid for p in law.free):
        raise ValueError(f"no initialisation grid for parameters {law.free} of {law.name}")
    return np.array(list(itertools.product(*(grid[p] for p in law.free))), dtype=np.float64)


def evaluate(theta, design: Design, logl, weights, delta=HUBER_DELTA, order=2):
    """Objective (order 0), + gradient (1), + Gauss-Newton/IRLS curvature (2) for a batch.

    theta [S, P] (float32 or float64: the arithmetic follows its dtype); logl [n];
    weights [n] or [S, n]; design.const [K, n] or [S, K, n].  Returns f [S], grad [S, P],
    H [S, P, P] with H = sum_i w_i c_i g_i g_i^T, g_i = d LSE_i / d theta and
    c_i = Huber'(r_i) / r_i (1 inside delta, delta/|r_i| outside): the curvature of the
    quadratic that majorises each Huber term at r_i (iteratively reweighted least squares).
    It is positive semi-definite.
    """
    dt = theta.dtype
    const, J = design.const.astype(dt, copy=False), design.J.astype(dt, copy=False)
    logl, weights = logl.astype(dt, copy=False), weights.astype(dt, copy=False)
    S, P = theta.shape
    K, n = const.shape[-2:]
    T = np.empty((S, K, n), dtype=dt)  # [S, K, n] the LSE terms
    cols = [np.flatnonzero(np.any(J[k] != 0, axis=0)) for k in range(K)]  # used params
    for k in range(K):  # broadcasts, not BLAS: tiny matmuls only add threading overhead
        T[:, k] = const[:, k] if const.ndim == 3 else const[k]
        for p in cols[k]:
            T[:, k] += theta[:, p, None] * J[k][None, :, p]
    m = T.max(axis=1, keepdims=True)
    T -= m
    np.maximum(T, _EXP_FLOOR[dt.type], out=T)  # keep exp out of the (slow) subnormal range
    w = np.exp(T, out=T)
    Z = w.sum(axis=1, keepdims=True)
    r = (m + np.log(Z))[:, 0] - logl  # [S, n] residual in log-loss
    ar = np.abs(r)
    cr = np.minimum(ar, delta)
    f = (weights * (cr * (ar - 0.5 * cr))).sum(-1)  # Huber: r^2/2 inside, delta(|r|-delta/2) out
    if order == 0:
        return f
    w /= Z  # softmax weights of the terms
    hp = np.copysign(cr, r) * weights  # [S, n] weighted Huber'
    G = np.zeros((S, P, n), dtype=dt)  # [S, P, n] d LSE / d theta
    for k in range(K):
        for p in cols[k]:
            G[:, p] += w[:, k] * J[k][:, p]
    grad = np.matmul(G, hp[:, :, None])[..., 0]  # [S, P]
    if order == 1:
        return f, grad
    c = delta / np.maximum(ar, delta) * weights  # [S, n] IRLS weights Huber'(r) / r
    H = np.matmul(G * c[:, None, :], G.transpose(0, 2, 1))  # [S, P, P]
    return f, grad, H


def newton_batch(theta0, design, logl, weights, delta=HUBER_DELTA, max_iter=150,
                 rtol=1e-10, dedup=1e-2, dtype=np.float64, progress=False):
    """Levenberg-Marquardt on every start at once; returns (theta [S, P], f [S]).

    Step: -(H + mu I)^-1 g with the IRLS curvature H and mu = lam * trace(H) / P; lam
    shrinks on an accepted step and grows on a rejected one.  A start stops when an accepted
    step improves f by less than rtol * f, when lam exceeds 1e10, or (every 5 iterations)
    when another start with a lower f sits within `dedup` of it in every parameter (the two
    follow the same path from there).  The survivors are meant to be polished afterwards.
    dtype=np.float32 runs a ~3x cheaper coarse pass (use rtol >= 1e-5 with it).
    """
    theta = np.array(theta0, dtype=dtype)
    weights = np.asarray(weights, dtype=dtype)
    logl = np.asarray(logl, dtype=dtype)
    per_start_w = weights.ndim == 2
    S, P = theta.shape
    f, g, H = evaluate(theta, design, logl, weights, delta)
    lam = np.full(S, 1e-3)
    active = np.isfinite(f)
    eye = np.eye(P)
    bar = _progress_bar(max_iter, "newton", progress)
    for it in range(max_iter):
        if dedup and it % 5 == 4 and not per_start_w:
            active &= ~_duplicates(theta, f, dedup)
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        w_idx = weights[idx] if per_start_w else weights
        Hi = H[idx].astype(np.float64)
        mu = lam[idx] * np.maximum(np.trace(Hi, axis1=1, axis2=2) / P, 1e-300)
        step = np.linalg.solve(Hi + mu[:, None, None] * eye, g[idx][..., None])[..., 0]
        trial = (theta[idx] - step).astype(dtype)
        ft = evaluate(trial, design.take(idx), logl, w_idx, delta, order=0)
        ok = np.isfinite(ft) & (ft < f[idx])
        acc, rej = idx[ok], idx[~ok]
        small = (f[acc] - ft[ok]) <= rtol * np.abs(f[acc])
        theta[acc], f[acc] = trial[ok], ft[ok]
        lam[acc] = np.maximum(lam[acc] * 0.3, 1e-12)
        lam[rej] *= 10.0
        active[acc[small]] = False
        active[rej[lam[rej] > 1e10]] = False
        upd = acc[~small]
        if upd.size:
            _, g[upd], H[upd] = evaluate(theta[upd], design.take(upd), logl,
                                         weights[upd] if per_start_w else weights, delta)
        bar.update(1)
        bar.set_postfix(active=int(active.sum()))
    bar.close()
    return theta.astype(np.float64), f.astype(np.float64)


def _duplicates(theta, f, tol):
    """Mask of starts that have a lower-f start in the same tol-sized cell (to drop)."""
    order = np.lexsort((f,) + tuple(np.round(theta / tol).T[::-1]))
    keys = np.round(theta[order] / tol)
    same = np.zeros(len(f), dtype=bool)
    same[1:] = (keys[1:] == keys[:-1]).all(axis=1)
    out = np.zeros(len(f), dtype=bool)
    out[order] = same
    return out


def multistart(design, logl, starts, delta=HUBER_DELTA, n_refine=64, progress=False):
    """Coarse float32 LM pass on all starts (chunked to bound memory), then a float64 pass on
    the n_refine best distinct coarse solutions.  Returns (theta [M, P], f [M]) of the latter.
    """
    ones = np.ones(logl.size)
    chunk = max(64, int(4e6 // design.const.size))  # starts per chunk: S * K * n <= 4M
    thetas, fs = [], []
    for lo in range(0, len(starts), chunk):
        th, f = newton_batch(starts[lo:lo + chunk], design, logl, ones, delta, max_iter=60,
                             rtol=1e-5, dtype=np.float32, progress=progress)
        keep = np.isfinite(f) & ~_duplicates(th, f, 1e-2)
        thetas.append(th[keep])
        fs.append(f[keep])
    theta, f = np.concatenate(thetas), np.concatenate(fs)
    if theta.shape[0] == 0:
        return theta, f
    sel = distinct_best(theta, f, n_refine, decimals=2)
    return newton_batch(theta[sel], design, logl, ones, delta, max_iter=150, rtol=1e-10,
                        dedup=1e-4, progress=progress)


def polish(theta, design, logl, weights, delta=HUBER_DELTA):
    """scipy L-BFGS-B from one start, on f / f(start) with tight tolerances; (theta, f)."""
    theta = np.asarray(theta, dtype=np.float64)
    f0 = float(evaluate(theta[None], design, logl, weights, delta, order=0)[0])
    scale = f0 if f0 > 0 else 1.0

    def fun(x):
        f, g = evaluate(x[None], design, logl, weights, delta, order=1)
        return f[0] / scale, g[0] / scale

    res = minimize(fun, theta, jac=True, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000, "maxcor": 30})
    f1 = float(res.fun) * scale
    return (res.x, f1) if np.isfinite(f1) and f1 <= f0 else (theta, f0)


def distinct_best(theta, f, k, decimals=4):
    """Indices of the k lowest-f starts with distinct (rounded) parameters."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))
    seen, keep = set(), []
    for i in order:
        if not np.isfinite(f[i]):
            break
        key = tuple(np.round(theta[i], decimals))
        if key not in seen:
            seen.add(key)
            keep.append(i)
            if len(keep) == k:
                break
    return np.array(keep, dtype=int)


def optuna_starts(law: LawSpec, design, logl, n_trials=300, n_keep=64, seed=0):
    """Optuna TPE search for initial points inside the law's grid box; the n_keep best."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is in the test extras
        raise ImportError("--init optuna needs optuna: pip install 'megacpt[optuna]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = GRIDS[law.name]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    ones = np.ones(design.n_points)
    for start in range(0, n_trials, 25):
        trials = [study.ask() for _ in range(min(25, n_trials - start))]
        theta = np.array([[t.suggest_float(p, float(grid[p].min()), float(grid[p].max()))
                           for p in law.free] for t in trials])
        f = evaluate(theta, design, logl, ones, order=0)
        for t, v in zip(trials, f):
            study.tell(t, float(v) if np.isfinite(v) else float("inf"))
    done = sorted((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    return np.array([[t.params[p] for p in law.free] for t in done[:n_keep]])


def check_points(law: LawSpec, source="data", **arrays):
    """Validate the arrays a law is fitted on; raises ValueError naming source and field."""
    sizes = {k: np.asarray(v).shape for k, v in arrays.items()}
    n = None
    for name, v in arrays.items():
        v = np.asarray(v, dtype=np.float64)
        if v.ndim != 1:
            raise ValueError(f"{source}: {name} must be a 1-D array, got shape {v.shape}")
        if n is not None and v.size != n:
            raise ValueError(f"{source}: arrays differ in length: {sizes}")
        n = v.size
        bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
        if bad.size:
            raise ValueError(f"{source}: {name} must be finite and > 0; point {bad[0]} has "
                             f"{name}={v[bad[0]]!r} ({bad.size} bad points)")
    if n is None or n <= law.n_params:
        raise ValueError(f"{source}: the {law.name} law has {law.n_params} free parameters and "
                         f"needs more points than that; got {n or 0}")
    for name, v in arrays.items():
        if name != "loss" and np.unique(v).size < 2:
            raise ValueError(f"{source}: the {law.name} law needs at least 2 distinct values "
                             f"of {name}; all points have {name}={v[0]!r}")


def fit_law(law: LawSpec, loss, N=None, D=None, C=None, *, init="grid", delta=HUBER_DELTA,
            n_polish=8, optuna_trials=300, seed=0, source="data", progress=False) -> dict:
    """Fit `law` to points; returns the FIT.json dict (natural parameters, huber, ...).

    loss, N, D (laws) or loss, C (frontier) are 1-D arrays of positive finite values.
    init: "grid" (the law's grid), "optuna" (TPE search over the grid's box) or an array of
    starts [S, P] in log-space parameters (order `law.free`).
    """
    data = {"C": C} if law.name == "frontier" else {"N": N, "D": D}
    check_points(law, source, loss=loss, **data)
    design = law.design(**data)
    logl = np.log(np.asarray(loss, dtype=np.float64))
    ones = np.ones(logl.size)
    t0 = time.perf_counter()
    if isinstance(init, str) and init == "grid":
        starts = init_grid(law)
    elif isinstance(init, str) and init == "optuna":
        starts = optuna_starts(law, design, logl, optuna_trials, seed=seed)
    elif isinstance(init, str):
        raise ValueError(f"init must be 'grid', 'optuna' or an array of starts, got {init!r}")
    else:
        starts = np.atleast_2d(np.asarray(init, dtype=np.float64))
        if starts.ndim != 2 or starts.shape[1] != law.n_params:
            raise ValueError(f"init starts must have shape [S, {law.n_params}] "
                             f"({', '.join(law.free)}), got {starts.shape}")
    with single_blas_thread():
        theta, f = multistart(design, logl, starts, delta, progress=progress)
        best = [polish(theta[i], design, logl, ones, delta)
                for i in distinct_best(theta, f, n_polish)]
    if not best:
        raise RuntimeError(f"{source}: every start of the {law.name} fit diverged")
    best.sort(key=lambda tf: tf[1])
    keep = distinct_best(np.array([t for t, _ in best]), np.array([v for _, v in best]), n_polish)
    best = [best[i] for i in keep]
    theta_best, f_best = best[0]
    log.info("%s fit: %d starts, %d points, huber %.8g in %.2fs", law.name, len(starts),
             logl.size, f_best, time.perf_counter() - t0)
    return fit_result(law, theta_best, f_best, design, logl, delta, n_starts=len(starts),
                      init=init if isinstance(init, str) else "given",
                      minima=[t for t, _ in best])


def residuals(theta, design: Design, logl) -> np.ndarray:
    """Log-space residuals LSE(terms) - log L of one theta, [n]."""
    T = design.const + np.einsum("kip,p->ki", design.J, np.asarray(theta))  # [K, n]
    m = T.max(0)
    return m + np.log(np.exp(T - m).sum(0)) - logl


def fit_result(law, theta, f, design, logl, delta, **extra) -> dict:
    """FIT.json dict for one fitted theta (natural parameters, fit errors, allocation)."""
    out = law.to_natural(theta)
    r = residuals(theta, design, logl)
    out.update({"law": law.name, "huber": float(f), "huber_mean": float(f) / logl.size,
                "rmse_log": float(np.sqrt(np.mean(r * r))), "n_points": int(logl.size),
                "delta": delta, "theta": [float(x) for x in theta]})
    if law.base is not None:
        out["inherited"] = sorted(law.base)
    if law.name != "frontier":
        try:
            out["allocation"] = allocation(out, law.name)
        except ValueError as exc:
            out["allocation"] = None
            out["allocation_error"] = str(exc)
    minima = extra.pop("minima", None)
    out.update(extra)
    if minima is not None:
        out["minima_theta"] = [[float(x) for x in t] for t in minima]
    return out


def bootstrap(law: LawSpec, fit: dict, loss, N=None, D=None, C=None, *, K=100, seed=0,
              n_starts=4, delta=HUBER_DELTA, chunk=2048, progress=False, groups=None) -> dict:
    """Percentile bootstrap: refit on K resamples (with replacement) of the points.

    Each resample is a weight vector (multiplicities); it is refitted from the best
    `n_starts` distinct minima of the full fit, all resamples batched together.
    Returns {"K", "seed", "samples": {param: [K values]}, "ci95": {param: [lo, hi]},
    "se": {param: std}, "median": {...}}.  Resampling points treats checkpoints of one run
    as independent: for runs, `intervals.cluster_bootstrap` (`groups` here draws whole
    groups instead, with the same refit).
    """
    if K < 2:
        raise ValueError(f"bootstrap needs K >= 2 resamples, got {K}")
    data = {"C": C} if law.name == "frontier" else {"N": N, "D": D}
    design = law.design(**data)
    logl = np.log(np.asarray(loss, dtype=np.float64))
    n = logl.size
    starts = np.array(fit.get("minima_theta") or [fit["theta"]])[:n_starts]  # [M, P]
    M = len(starts)
    rng = np.random.default_rng(seed)
    if groups is not None:  # whole groups (runs) with replacement
        _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        G = int(codes.max()) + 1
        counts = rng.multinomial(G, np.full(G, 1.0 / G), size=K).astype(np.float64)[:, codes]
    else:
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=K).astype(np.float64)  # [K, n]
    theta_all = np.repeat(starts[None], K, 0).reshape(K * M, -1)
    w_all = np.repeat(counts, M, 0)  # [K*M, n]
    theta_fit, f_fit = np.empty_like(theta_all), np.empty(K * M)
    bar = _progress_bar(K * M, "bootstrap starts", progress)
    with single_blas_thread():
        for lo in range(0, K * M, chunk):
            sl = slice(lo, lo + chunk)
            theta_fit[sl], f_fit[sl] = newton_batch(theta_all[sl], design, logl, w_all[sl],
                                                    delta)
            bar.update(len(f_fit[sl]))
    bar.close()
    pick = np.nanargmin(f_fit.reshape(K, M), axis=1) + np.arange(K) * M
    rows = []
    for th in theta_fit[pick]:
        p = law.to_natural(th)
        if law.name != "frontier":
            try:
                al = allocation(p, law.name)
                p.update({"alloc_a": al["a"], "alloc_b": al["b"]})
            except ValueError:
                p.update({"alloc_a": np.nan, "alloc_b": np.nan})
        rows.append(p)
    keys = [k for k in rows[0] if not (law.base and k in law.base)]
    table = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    return {"K": K, "seed": seed,
            "samples": {k: [float(x) if np.isfinite(x) else None for x in v]
                        for k, v in table.items()},
            "ci95": {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
                     for k, v in table.items()},
            "se": {k: float(np.nanstd(v, ddof=1)) for k, v in table.items()},
            "median": {k: float(np.nanmedian(v)) for k, v in table.items()}}


def _progress_bar(total, desc, enabled):
    """A tqdm bar on stderr, shown only when enabled and stderr is a terminal (no bars in logs)."""
    import sys

    from tqdm import tqdm

    show = bool(enabled) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not show, leave=False, mininterval=0.5)
