"""Scaling laws for cross-lingual continual pre-training: fit, allocate, compare, plot.

Modules: `laws` (law forms, LSE parameterisation, compute-optimal allocation), `fit`
(vectorised multi-start Huber fit, L-BFGS polish, bootstrap), `runs` (the trainer's
metrics.jsonl and N,D,loss CSV input), `curves` (loss-compute frontier, transfer metrics at
equal loss), `plots` (figures; needs matplotlib), `cli` (the `megacpt-fit` command).

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
     "bootstrap": {"K", "seed", "ci95": {param: [lo, hi]}, "se", "median"}   # --bootstrap
     "frontier_points": {"C": [...], "loss": [...]}                         # frontier only
     "data": where the points came from}
- TRANSFER.json: see `curves`.

This package does not import torch; matplotlib is imported only when plotting.
"""
from .curves import fit_frontier, frontier_points, transfer_metrics
from .fit import bootstrap, fit_law
from .laws import allocation, chinchilla, cpt, frontier, make_law, optimal_allocation, predict
from .runs import Points, load_points, load_runs, points_from_runs, read_points_csv

__all__ = [
    "Points", "allocation", "bootstrap", "chinchilla", "cpt", "fit_frontier", "fit_law",
    "frontier", "frontier_points", "load_points", "load_runs", "make_law",
    "optimal_allocation", "points_from_runs", "predict", "read_points_csv",
    "transfer_metrics",
]
