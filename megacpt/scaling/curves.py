"""Loss curves: lower envelopes, the loss-compute frontier and transfer metrics at equal loss.

A curve is the list of validation points of one run (or one `run`/N group of a CSV), as a
`Points` with one group label.  Loss along a curve is made monotone by its running minimum
(the lower envelope: "the best loss reached with at most this many tokens"), then read off
by linear interpolation of log D (or log C) against log loss.

Frontier (`frontier_points`): at n_levels log-spaced compute levels, the lowest loss any
curve reached with at most that compute (Chinchilla's approach 1: the lower envelope of the
loss-vs-compute curves, where a curve that ended at a smaller budget counts with its final
loss); `fit_frontier` fits L_opt(C) = E' + A'/C^g to those points.

Transfer (`transfer_metrics`), the paper's Figure 2: each CPT curve is paired with the
from-scratch curve of the same N; at loss levels both reach, the effectively transferred
data is D_scratch(L) - D_cpt(L) and the FLOPs saved are (C_scratch(L) - C_cpt(L)) /
C_scratch(L).  Returned JSON:

    {"pairs": [{"N", "scratch", "cpt", "loss": [...], "D_scratch": [...], "D_cpt": [...],
                "C_scratch": [...], "C_cpt": [...], "transferred_tokens": [...],
                "flops_saved": [...]}, ...],
     "summary": {"flops_saved_min", "flops_saved_median", "flops_saved_max"}}
"""
from __future__ import annotations

import numpy as np

from .fit import fit_law
from .laws import frontier
from .runs import Points


def envelope_index(loss) -> np.ndarray:
    """Indices where the running minimum of `loss` strictly decreases (the first included)."""
    run_min = np.minimum.accumulate(np.asarray(loss, dtype=np.float64))
    keep = np.ones(run_min.size, dtype=bool)
    keep[1:] = run_min[1:] < run_min[:-1]
    return np.flatnonzero(keep)


def envelope(x, loss):
    """The running-minimum envelope where it strictly decreases: (x [m], L [m]).

    x must be sorted ascending.
    """
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if x.size and np.any(np.diff(x) < 0):
        raise ValueError("envelope: x must be sorted ascending")
    idx = envelope_index(loss)
    return x[idx], loss[idx]


def value_at_loss(x_env, loss_env, levels):
    """x at which the (strictly decreasing) envelope reaches each loss level; NaN outside."""
    levels = np.asarray(levels, dtype=np.float64)
    if x_env.size == 0:
        return np.full(levels.shape, np.nan)
    u = -np.log(loss_env)  # increasing
    out = np.exp(np.interp(-np.log(levels), u, np.log(x_env)))
    out[(levels > loss_env[0]) | (levels < loss_env[-1])] = np.nan
    return out


def loss_at(x_env, loss_env, at):
    """Envelope loss at positions `at` (log-log interpolation); NaN outside its x range."""
    at = np.asarray(at, dtype=np.float64)
    if x_env.size == 0:
        return np.full(at.shape, np.nan)
    out = np.exp(np.interp(np.log(at), np.log(x_env), np.log(loss_env)))
    out[(at < x_env[0]) | (at > x_env[-1])] = np.nan
    return out


def frontier_points(points: Points, n_levels: int = 30):
    """Lowest loss reached with at most C FLOPs, at n_levels log-spaced C: (C [m], loss [m]).

    At each level every curve that started at or below it counts with its envelope loss
    there (or its final loss, if it ended earlier).
    """
    levels = np.geomspace(points.C.min(), points.C.max(), n_levels)
    best = np.full(n_levels, np.inf)
    for _, cur in points.curves():
        order = np.argsort(cur.C, kind="stable")
        c_env, l_env = envelope(cur.C[order], cur.loss[order])
        vals = loss_at(c_env, l_env, np.clip(levels, c_env[0], c_env[-1]))
        vals[levels < c_env[0] * (1 - 1e-12)] = np.inf
        best = np.minimum(best, vals)
    best = np.minimum.accumulate(best)
    ok = np.isfinite(best)
    return levels[ok], best[ok]


def fit_frontier(points: Points, n_levels: int = 30, offset: bool = True, **fit_kw) -> dict:
    """Fit L_opt(C) = E' + A'/C^g (E' = 0 with offset=False) on `frontier_points`."""
    C, loss = frontier_points(points, n_levels)
    fit = fit_law(frontier(offset), loss, C=C, source=f"{points.source} (frontier)", **fit_kw)
    fit["frontier_points"] = {"C": C.tolist(), "loss": loss.tolist()}
    return fit


def _by_size(points: Points, what: str) -> dict:
    out = {}
    for label, cur in points.curves():
        n = float(cur.N[0])
        if np.unique(cur.N).size != 1:
            raise ValueError(f"{points.source}: {what} curve {label!r} mixes model sizes")
        for other in out:
            if np.isclose(other, n, rtol=1e-6):
                raise ValueError(f"{points.source}: two {what} curves with N={n:.4g} "
                                 f"({out[other][0]!r} and {label!r}); give one per model size")
        out[n] = (label, cur)
    return out


def transfer_metrics(scratch: Points, cpt: Points, n_levels: int = 20) -> dict:
    """Transferred tokens and FLOPs saved at equal loss, per CPT curve (see module doc)."""
    if len(scratch) == 0 or len(cpt) == 0:
        raise ValueError(f"transfer needs points on both sides: {len(scratch)} scratch "
                         f"({scratch.source}), {len(cpt)} cpt ({cpt.source})")
    base = _by_size(scratch, "scratch")
    pairs = []
    for label, cur in cpt.curves():
        n = float(cur.N[0])
        match = [k for k in base if np.isclose(k, n, rtol=1e-6)]
        if not match:
            raise ValueError(f"{cpt.source}: CPT curve {label!r} (N={n:.4g}) has no "
                             f"from-scratch curve of the same size in {scratch.source}")
        s_label, s_cur = base[match[0]]
        si, ci = envelope_index(s_cur.loss), envelope_index(cur.loss)
        s_l, c_l = s_cur.loss[si], cur.loss[ci]
        hi, lo = min(s_l[0], c_l[0]), max(s_l[-1], c_l[-1])
        if not hi > lo:
            raise ValueError(f"curves {s_label!r} and {label!r} reach no common loss level "
                             f"(scratch {s_l[-1]:.4g}..{s_l[0]:.4g}, "
                             f"cpt {c_l[-1]:.4g}..{c_l[0]:.4g})")
        levels = np.geomspace(hi, lo, n_levels)
        d_s, d_c = value_at_loss(s_cur.D[si], s_l, levels), value_at_loss(cur.D[ci], c_l, levels)
        c_s, c_c = value_at_loss(s_cur.C[si], s_l, levels), value_at_loss(cur.C[ci], c_l, levels)
        pairs.append({"N": n, "scratch": str(s_label), "cpt": str(label),
                      "loss": levels.tolist(), "D_scratch": d_s.tolist(), "D_cpt": d_c.tolist(),
                      "C_scratch": c_s.tolist(), "C_cpt": c_c.tolist(),
                      "transferred_tokens": (d_s - d_c).tolist(),
                      "flops_saved": ((c_s - c_c) / c_s).tolist()})
    saved = np.concatenate([p["flops_saved"] for p in pairs])
    return {"pairs": pairs,
            "summary": {"flops_saved_min": float(np.nanmin(saved)),
                        "flops_saved_median": float(np.nanmedian(saved)),
                        "flops_saved_max": float(np.nanmax(saved))}}
