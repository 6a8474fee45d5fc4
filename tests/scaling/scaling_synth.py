"""Synthetic run directories for the scaling tests, in the trainer's metrics.jsonl format.

Losses follow known laws (the paper's Table 2a) with multiplicative log-normal noise, so a fit
can be checked against the parameters that generated the data.
"""
import itertools
import json
import os

import numpy as np
from megacpt.scaling.laws import predict

SCRATCH = {"E": 1.55, "A": 420.0, "B": 719.5, "alpha": 0.40, "beta": 0.30}
CPT = {"E": 1.55, "A": 420.0, "B": 433.3, "alpha": 0.40, "beta": 0.20, "gamma": 0.08}
SIZES = (1e7, 4e7, 1.6e8, 6.4e8, 2.56e9)
TOKENS_PER_ITER = 1.0e6
# coarse start grids (243 and 36 starts, none at the truth) for tests that fit many studies
GRID_S = np.array(list(itertools.product([0, 10, 20], [0, 10, 20], [-1, 0, 1], [0, 0.5, 1],
                                         [0, 0.5, 1])), dtype=float)
GRID_C = np.array(list(itertools.product([0, 5, 10, 20], [0, 0.5, 1], [-0.25, 0, 0.25])),
                  dtype=float)


def write_run(run_dir, N, kind, params, noise=0.002, seed=0, target="zh", replay=0.3,
              n_evals=12, max_iter=None, per_dataset=True, train_at_evals=True):
    """Write run_dir/metrics.jsonl: header, ~100 train rows (and one at every evaluation when
    train_at_evals), valid rows.

    Valid rows: iteration 0 (before training) and n_evals log-spaced iterations, each for the
    target ("zh", loss from `params` at the target tokens) and the source language ("en").
    Returns the path of metrics.jsonl.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(run_dir, exist_ok=True)
    blend = {target: 1.0} if kind == "scratch" else {target: 1 - replay, "en": replay}
    share = blend[target]
    max_iter = max_iter or int(20 * N / TOKENS_PER_ITER / share)
    evals = np.unique(np.geomspace(max_iter / 64, max_iter, n_evals).round(-1).astype(int))
    rows = [{"type": "header", "model_size": f"{N / 1e6:.0f}M", "num_parameters": int(N),
             "run_kind": kind, "blend": blend, "seq_length": 2048, "flops_per_token": 6 * N,
             "init_from": None if kind == "scratch" else "/ckpt/en-source", "target": target}]
    valid_its = [0] + [int(i) for i in evals]
    interval = max(10, max_iter // 100)
    train_its = set(range(interval, max_iter + 1, interval))
    if train_at_evals:
        train_its |= set(valid_its[1:])
    for it in sorted(train_its | set(valid_its)):
        tokens = it * TOKENS_PER_ITER
        per = {name: w * tokens for name, w in blend.items()}
        if it in train_its:
            row = {"type": "train", "iteration": it, "lm_loss": 3.0, "lr": 2e-4,
                   "grad_norm": 1.0, "consumed_tokens": tokens, "flops": 6 * N * tokens,
                   "consumed_samples_per_dataset": {k: v / 2048 for k, v in per.items()},
                   "tokens_per_sec": 1e5}
            if per_dataset:
                row["consumed_tokens_per_dataset"] = per
            rows.append(row)
        if it in valid_its:
            d = per[target]
            loss = (predict(params, N=N, D=d) * np.exp(rng.normal(0, noise))
                    if d > 0 else 10.0)
            for name, val in ((target, loss), ("en", 2.4 + 0.5 * (kind == "cpt"))):
                rows.append({"type": "valid", "split": "valid", "name": name, "iteration": it,
                             "loss": float(val), "consumed_tokens": tokens,
                             "flops": 6 * N * tokens})
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def synth_points(rng, params, sizes, run_sd=0.005, point_sd=0.002, n_ckpt=12, tpp=(0.5, 20),
                 label="run"):
    """A synthetic study in memory: one run per size, n_ckpt checkpoints log-spaced over
    tokens-per-parameter tpp, loss = law * exp(run offset + checkpoint noise)."""
    from megacpt.scaling.runs import Points

    N = np.repeat(np.asarray(sizes, dtype=np.float64), n_ckpt)
    D = N * np.tile(np.geomspace(*tpp, n_ckpt), len(sizes))
    offset = np.repeat(rng.normal(0, run_sd, len(sizes)), n_ckpt)
    loss = predict(params, N=N, D=D) * np.exp(offset + rng.normal(0, point_sd, N.size))
    group = np.repeat(np.array([f"{label}-{i}" for i in range(len(sizes))], dtype=object),
                      n_ckpt)
    return Points(N, D, loss, 6 * N * D, group, label)
