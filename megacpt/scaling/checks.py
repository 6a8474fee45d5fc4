"""Checking a fitted law against runs: held-out sizes and law-vs-empirical transfer.

`holdout_largest(law, points, k, ...)` fits the law without the k largest model sizes (the
scratch base of a CPT law too, when given as points) and reports how well it predicts their
curves:
    {"k", "train_sizes": [N...], "heldout_sizes": [N...], "fit": {params, "warnings"},
     "per_size": [{"N", "n_points", "rmse_log", "bias_log", "max_abs_rel_err",
                   "final_rel_err", "inside_band"}], "rmse_log", "max_abs_rel_err",
     "inside_band": fraction of held-out points inside the 95 % band of the predicted
                    curves (null without --bootstrap)}
All errors are of observed against predicted loss (rel_err = observed / predicted - 1).

`consistency_check(scratch_points, cpt_points, scratch_fit, cpt_fit)` compares what the two
laws imply with what the runs show:
- "transfer": FLOPs saved at equal loss per CPT run (`curves.transfer_metrics`) against the
  laws' 1 - D_cpt(L) / D_scratch(L) at the same N and loss (D(L) solved from each law), with
  the laws' 95 % band from their bootstrap samples;
- "frontier": per strategy, the lowest loss the runs reach at each compute level (Eq. 3's
  points, `curves.frontier_points`) against the same envelope of the law's predicted curves
  on the runs' own (N, D) design (a design that stops at 20 tokens per parameter never
  reaches a law's compute-optimal L_opt(C), so that is not the comparison), and power laws
  E' + A'/C^g fitted to both;
    {"transfer": {"pairs": [{"N", "loss", "empirical", "law", "law_lo", "law_hi",
                             "outside"}], "median_empirical", "median_law",
                  "fraction_outside"},
     "frontier": {strategy: {"C", "empirical", "law", "law_lo", "law_hi", "outside",
                             "fraction_outside", "empirical_fit": {E, A, g},
                             "law_fit": {E, A, g}}},
     "mismatch": bool, "messages": [str, ...], "intervals": bool}
A quantity mismatches when more than half of its points lie outside the laws' band (without
bootstrap samples: differ by more than `tolerance`, relative).
"""
from __future__ import annotations

import numpy as np

from .curves import frontier_points, transfer_metrics
from .intervals import expanded_tail, fit_points, law_params
from .runs import Points


def _predict(p: dict, N, D):
    """Loss of (array-valued) law parameters: [K, n] for params [K] and points [n]."""
    ex = lambda k: np.asarray(p[k], dtype=np.float64)[..., None]  # noqa: E731
    gamma = ex("gamma") if "gamma" in p else 0.0
    return ex("E") + ex("A") / N ** ex("alpha") + ex("B") / (D ** ex("beta") * N ** gamma)


def _band(values, n_clusters):
    """Expanded-percentile 95 % band over axis 0 of [K, m] (NaN-aware)."""
    q = 100 * expanded_tail(n_clusters)
    with np.errstate(all="ignore"):
        return np.nanpercentile(values, q, axis=0), np.nanpercentile(values, 100 - q, axis=0)


def holdout_largest(law_name: str, points: Points, k: int, *, base: dict | None = None,
                    base_points: Points | None = None, bootstrap: int = 0, seed: int = 0,
                    **fit_kw) -> dict:
    """Fit without the k largest sizes, predict their curves (module doc)."""
    sizes = np.unique(points.N)
    if k < 1 or sizes.size - k < 3:
        raise ValueError(f"{points.source}: --holdout-largest {k} of {sizes.size} sizes leaves "
                         "fewer than 3 sizes to fit on")
    cut = sizes[-k]
    train = points.select(points.N < cut)
    b_train = base_points.select(base_points.N < cut) if base_points is not None else None
    fit = fit_points(law_name, train, base=base, base_points=b_train, bootstrap=bootstrap,
                     seed=seed, **fit_kw)
    p = law_params(fit)
    samples = (fit.get("bootstrap") or {}).get("samples")
    per, all_r, inside_all = [], [], []
    for n in sizes[-k:]:
        sel = points.select(points.N == n)
        pred = _predict(p, sel.N, sel.D)
        r = np.log(sel.loss / pred)
        rel = sel.loss / pred - 1
        last = int(np.argmax(sel.D))
        row = {"N": float(n), "n_points": len(sel), "rmse_log": float(np.sqrt(np.mean(r * r))),
               "bias_log": float(np.mean(r)), "max_abs_rel_err": float(np.max(np.abs(rel))),
               "final_rel_err": float(rel[last]), "inside_band": None}
        if samples:
            s = {key: np.asarray(v, dtype=np.float64) for key, v in samples.items()
                 if key in ("E", "A", "B", "alpha", "beta", "gamma")}
            s.update({key: np.full(len(s["B"]), p[key]) for key in p if key not in s})
            lo, hi = _band(_predict(s, sel.N, sel.D), fit["bootstrap"]["n_clusters"])
            inside = (sel.loss >= lo) & (sel.loss <= hi)
            row["inside_band"] = float(inside.mean())
            inside_all.append(inside)
        per.append(row)
        all_r.append(r)
    r = np.concatenate(all_r)
    return {"k": int(k), "train_sizes": [float(x) for x in sizes[:-k]],
            "heldout_sizes": [float(x) for x in sizes[-k:]],
            "fit": {**p, "warnings": fit.get("warnings", []),
                    "identifiable": fit.get("identifiable", True)},
            "per_size": per, "rmse_log": float(np.sqrt(np.mean(r * r))),
            "max_abs_rel_err": float(max(row["max_abs_rel_err"] for row in per)),
            "inside_band": float(np.concatenate(inside_all).mean()) if inside_all else None}


def format_holdout(h: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"holdout: fitted on {len(h['train_sizes'])} sizes, predicting the {h['k']} "
             f"largest: rmse(log) {h['rmse_log']:.4f}, max |rel err| {h['max_abs_rel_err']:.2%}"]
    for row in h["per_size"]:
        band = "" if row["inside_band"] is None else f", {row['inside_band']:.0%} in 95% band"
        lines.append(f"  N={row['N']:.3g}: rmse(log) {row['rmse_log']:.4f}, bias "
                     f"{row['bias_log']:+.4f}, final point {row['final_rel_err']:+.2%}{band}")
    return "\n".join(lines)


def _tokens_at_loss(p: dict, N, L):
    """D at which the law reaches loss L at size N ([K, m] or [m]); NaN if it never does."""
    ex = lambda k: np.asarray(p[k], dtype=np.float64)[..., None]  # noqa: E731
    gamma = ex("gamma") if "gamma" in p else 0.0
    gap = L - ex("E") - ex("A") / N ** ex("alpha")
    with np.errstate(all="ignore"):
        D = (ex("B") / (N ** gamma * gap)) ** (1.0 / ex("beta"))
    return np.where(gap > 0, D, np.nan)


def law_samples(scratch_fit: dict, cpt_fit: dict):
    """(scratch, cpt) parameter dicts of [K] arrays from the fits' bootstrap samples, paired
    (jointly when the CPT fit refitted its base), or None when either lacks samples."""
    cs = (cpt_fit.get("bootstrap") or {}).get("samples")
    if not cs:
        return None
    arr = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    if "base_B" in cs:
        c = {k: arr(cs[k]) for k in ("E", "A", "alpha", "B", "beta", "gamma")}
        s = {"E": c["E"], "A": c["A"], "alpha": c["alpha"], "B": arr(cs["base_B"]),
             "beta": arr(cs["base_beta"])}
        return s, c
    ss = (scratch_fit.get("bootstrap") or {}).get("samples")
    if not ss:
        return None
    K = min(len(cs["B"]), len(ss["B"]))
    s = {k: arr(ss[k])[:K] for k in ("E", "A", "alpha", "B", "beta")}
    c = {k: arr(cs[k])[:K] if k in cs else np.full(K, cpt_fit[k])
         for k in ("E", "A", "alpha", "B", "beta", "gamma")}
    return s, c


def _verdict(emp, law, lo, hi, tolerance):
    ok = np.isfinite(emp) & np.isfinite(law)
    if lo is not None:
        outside = ok & ((emp < lo) | (emp > hi))
    else:
        outside = ok & (np.abs(emp - law) > tolerance * np.maximum(np.abs(law), 1e-12))
    frac = float(outside[ok].mean()) if ok.any() else float("nan")
    return outside, frac


def consistency_check(scratch: Points, cpt: Points, scratch_fit: dict, cpt_fit: dict, *,
                      n_levels: int = 20, tolerance: float = 0.05) -> dict:
    """Law-implied against empirical transfer and frontiers (module doc)."""
    ps, pc = law_params(scratch_fit), law_params(cpt_fit)
    ps.pop("gamma", None)
    samp = law_samples(scratch_fit, cpt_fit)
    n_cl = (cpt_fit.get("bootstrap") or {}).get("n_clusters")
    messages, pairs = [], []
    emp_all, law_all, out_all = [], [], []
    for pair in transfer_metrics(scratch, cpt, n_levels)["pairs"]:
        N, L = pair["N"], np.asarray(pair["loss"])
        emp = np.asarray(pair["flops_saved"], dtype=np.float64)
        law = 1 - _tokens_at_loss(pc, N, L) / _tokens_at_loss(ps, N, L)
        lo = hi = None
        if samp:
            lo, hi = _band(1 - _tokens_at_loss(samp[1], N, L) / _tokens_at_loss(samp[0], N, L),
                           n_cl)
        outside, _ = _verdict(emp, law, lo, hi, tolerance)
        pairs.append({"N": N, "loss": L.tolist(), "empirical": emp.tolist(),
                      "law": law.tolist(), "law_lo": None if lo is None else lo.tolist(),
                      "law_hi": None if hi is None else hi.tolist(),
                      "outside": outside.tolist()})
        emp_all.append(emp)
        law_all.append(law)
        out_all.append(outside)
    emp, law, outside = (np.concatenate(x) for x in (emp_all, law_all, out_all))
    ok = np.isfinite(emp) & np.isfinite(law)
    frac = float(outside[ok].mean()) if ok.any() else float("nan")
    transfer = {"pairs": pairs, "median_empirical": float(np.nanmedian(emp)),
                "median_law": float(np.nanmedian(law[ok])) if ok.any() else None,
                "fraction_outside": frac}
    if frac > 0.5:
        messages.append(f"transfer mismatch: the runs save a median {np.nanmedian(emp):.1%} of "
                        f"the FLOPs at equal loss, the laws imply {np.nanmedian(law[ok]):.1%}; "
                        f"{frac:.0%} of the loss levels lie outside the laws' "
                        f"{'95% band' if samp else f'{tolerance:.0%} tolerance'}")
    frontier = {}
    for name, pts, p, idx in (("scratch", scratch, ps, 0), ("cpt", cpt, pc, 1)):
        frontier[name] = _frontier_check(pts, p, samp[idx] if samp else None, n_cl, tolerance)
        f = frontier[name]
        if f["fraction_outside"] > 0.5:
            messages.append(
                f"{name} frontier mismatch: the runs' lowest loss per compute follows "
                f"{_fmt_front(f['empirical_fit'])}, the law implies {_fmt_front(f['law_fit'])}; "
                f"{f['fraction_outside']:.0%} of the compute levels lie outside the law's "
                f"{'95% band' if samp else f'{tolerance:.0%} tolerance'}")
    return {"transfer": transfer, "frontier": frontier, "mismatch": bool(messages),
            "messages": messages, "intervals": samp is not None}


def _fmt_front(f):
    if f is None:
        return "(no fit)"
    return f"{f['E']:.3g} + {f['A']:.4g} C^-{f['g']:.4f}"


def _law_frontier(pts: Points, p: dict):
    """Frontier points of the law's predicted curves on the runs' own (N, D) design."""
    loss = np.asarray(_predict(p, pts.N, pts.D), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(loss) & (loss > 0)):
        return None
    return frontier_points(Points(pts.N, pts.D, loss, pts.C, pts.group, pts.source),
                           n_levels=30)[1]


def _frontier_check(pts: Points, p: dict, samples, n_cl, tolerance) -> dict:
    """Eq. 3 points of the runs against those of the law's curves on the same design."""
    C, emp = frontier_points(pts, n_levels=30)
    law = _law_frontier(pts, p)
    law = np.full(C.size, np.nan) if law is None or law.size != C.size else law
    lo = hi = None
    if samples is not None:
        rows = []
        for i in range(len(samples["B"])):
            f = _law_frontier(pts, {k: v[i] for k, v in samples.items()})
            rows.append(f if f is not None and f.size == C.size else np.full(C.size, np.nan))
        lo, hi = _band(np.array(rows), n_cl)
    outside, frac = _verdict(emp, law, lo, hi, tolerance)
    out = {"C": C.tolist(), "empirical": emp.tolist(), "law": law.tolist(),
           "law_lo": None if lo is None else lo.tolist(),
           "law_hi": None if hi is None else hi.tolist(), "outside": outside.tolist(),
           "fraction_outside": frac, "empirical_fit": None, "law_fit": None}
    if C.size >= 5:
        from .fit import fit_law
        from .laws import frontier

        for key, vals in (("empirical_fit", emp), ("law_fit", law)):
            if np.all(np.isfinite(vals)) and np.all(vals > 0):
                f = fit_law(frontier(), vals, C=C, source=f"{pts.source} ({key})")
                out[key] = {k: f[k] for k in ("E", "A", "g")}
    return out
