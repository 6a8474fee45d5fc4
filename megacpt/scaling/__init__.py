"""Scaling laws for cross-lingual continual pre-training: fit, allocate, compare, plot.

Modules: `laws` (law forms, LSE parameterisation, compute-optimal allocation), `fit`
(vectorised multi-start Huber fit, L-BFGS polish, point bootstrap), `intervals` (cluster
bootstrap over runs, the CPT base refitted per resample, derived quantities, `fit_points`:
fit + intervals + warnings in one call), `diagnostics` (identifiability, plausibility,
extrapolation warnings), `checks` (`holdout_largest`, `consistency_check`: law-implied vs
empirical transfer and frontier), `runs` (the trainer's metrics.jsonl and N,D,loss CSV
input), `curves` (loss-compute frontier, transfer metrics at equal loss), `plots` (figures;
needs matplotlib), `cli` (the `megacpt-fit` command).

For a study report: `fit_points("chinchilla", scratch_pts, bootstrap=200, budgets=[...])`,
`fit_points("cpt", cpt_pts, base_points=scratch_pts, bootstrap=200, budgets=[...])`,
`holdout_largest(law, pts, k, ...)` and `consistency_check(scratch_pts, cpt_pts, fs, fc)`
return JSON-ready dicts (fields: the `intervals` and `checks` module docs).

Formats owned here:
- Input CSV: header N,D,loss[,C][,run]; values finite and > 0 (see `runs`).
- FIT.json, written by `megacpt-fit fit`:
    {"law": "chinchilla"|"cpt"|"frontier",
     "E", "A", "B", "alpha", "beta" [, "gamma"]      # laws (cpt: B, beta = paper's B', beta')
     | "E", "A", "g"                                  # frontier L = E + A / C^g
     "huber": sum of Huber_1e-3 over points (the objective), "huber_mean", "rmse_log",
     "n_points", "delta", "theta" (log-space parameters), "minima_theta" (best distinct
     local minima), "n_starts", "init", "inherited" (cpt: ["A", "E", "alpha"]),
     "allocation": {"a", "b", "G", "N_coef", "D_coef"} | null (+ "allocation_error"),
     "intervals": {name: [lo, hi] | null}   # --bootstrap: every parameter and derived value
     "bootstrap": {"K", "seed", "method", "n_clusters", "base_refit", "samples", "se",
                   "median"}                                   # chinchilla/cpt: `intervals`
                | {"K", "seed", "samples", "ci95", "se", "median"}       # frontier: points
     "budgets", "derived": {"a", ..., "N_opt@<C>", "D_opt@<C>", "L_opt@<C>",
                            "flops_saved@<C>"},                 # see `intervals`
     "data_range": {"N", "D", "C": [lo, hi], "n_sizes", "n_runs"},
     "warnings": [str, ...], "identifiable": bool,               # see `diagnostics`
     "base": the scratch fit a CPT law inherits from, "holdout": see `checks`,
     "frontier_points": {"C": [...], "loss": [...]}                         # frontier only
     "data": where the points came from}
- CHECK.json, written by `megacpt-fit check`: see `checks`.
- TRANSFER.json: see `curves`.

This package does not import torch; matplotlib is imported only when plotting.
"""
from .checks import consistency_check, holdout_largest
from .curves import fit_frontier, frontier_points, transfer_metrics
from .diagnostics import extrapolation, fit_warnings
from .fit import bootstrap, fit_law
from .intervals import allocate_budgets, cluster_bootstrap, derived, fit_points
from .laws import allocation, chinchilla, cpt, frontier, make_law, optimal_allocation, predict
from .runs import Points, load_points, load_runs, points_from_runs, read_points_csv

__all__ = [
    "Points", "allocate_budgets", "allocation", "bootstrap", "chinchilla", "cluster_bootstrap",
    "consistency_check", "cpt", "derived", "extrapolation", "fit_frontier", "fit_law",
    "fit_points", "fit_warnings", "frontier", "frontier_points", "holdout_largest",
    "load_points", "load_runs", "make_law", "optimal_allocation", "points_from_runs",
    "predict", "read_points_csv", "transfer_metrics",
]
