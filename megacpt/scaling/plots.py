"""Scaling-law figures (PNG, matplotlib's Agg canvas; matplotlib is imported only here, lazily).

- `plot_fit`: observed vs fitted loss against tokens, one colour per model size.
- `plot_isoloss`: IsoLoss contours over (compute, parameters) for the from-scratch and CPT
  laws with both efficient frontiers N_opt(C) (the paper's Figure 5).
- `plot_loss_compute`: loss against compute per run with the fitted loss-compute frontiers
  of both strategies (Figure 1).
- `plot_transfer`: FLOPs saved and effectively transferred tokens at equal loss (Figure 2).
"""
from __future__ import annotations

import numpy as np

from .laws import optimal_allocation, predict
from .runs import Points

STRATEGY_COLORS = {"scratch": "tab:blue", "cpt": "tab:orange"}


def _figure(ncols=1, size=(6.4, 4.8)):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'megacpt[plots]' "
                          "(or pip install matplotlib)") from exc
    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _size_colors(sizes):
    from matplotlib import colormaps

    sizes = np.asarray(sorted(set(sizes)))
    lo, hi = np.log(sizes.min()), np.log(sizes.max())
    t = (np.log(sizes) - lo) / (hi - lo) if hi > lo else np.zeros(sizes.size)
    cmap = colormaps["viridis"]
    return {float(s): cmap(0.9 * float(v)) for s, v in zip(sizes, t)}


def _fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _plain_loss_axis(ax):
    """Loss on a log axis labelled with plain numbers (2, 3, 4 rather than 2 x 10^0)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _save(fig, path):
    fig.savefig(path, dpi=120)
    return path


def plot_fit(points: Points, fit: dict, path: str) -> str:
    """Observed loss vs tokens per model size, with the fitted law's curves."""
    fig, (ax,) = _figure()
    colors = _size_colors(points.N)
    for n, color in colors.items():
        sel = np.isclose(points.N, n, rtol=1e-9)
        D = points.D[sel]
        ax.scatter(D, points.loss[sel], s=12, color=color, alpha=0.7)
        grid = np.geomspace(D.min(), D.max(), 100)
        ax.plot(grid, predict(fit, N=np.full(grid.size, n), D=grid), color=color, lw=1.5,
                label=_fmt_params(n))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens D")
    ax.set_ylabel("validation loss")
    _plain_loss_axis(ax)
    extra = f", gamma={fit['gamma']:.3f}" if "gamma" in fit else ""
    ax.set_title(f"{fit.get('law', 'fit')}: E={fit['E']:.3f} A={fit['A']:.4g} "
                 f"B={fit['B']:.4g}\nalpha={fit['alpha']:.3f} beta={fit['beta']:.3f}{extra} "
                 f"huber={fit.get('huber', float('nan')):.4g}", fontsize=10)
    if len(colors) <= 14:
        ax.legend(fontsize=7, ncols=2, title="N", title_fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)


def plot_isoloss(fits: dict, path: str, C_range=(1e17, 1e23), N_range=(1e7, 1e11),
                 points: dict | None = None) -> str:
    """IsoLoss contours per law; `fits` maps "scratch"/"cpt" to a FIT.json dict.

    Every panel shows the efficient frontiers N_opt(C) of all fits (its own solid); points
    (optional, {strategy: Points}) are scattered on their strategy's panel.
    """
    fig, axes = _figure(len(fits), size=(5.6, 4.8))
    C = np.geomspace(*C_range, 160)
    N = np.geomspace(*N_range, 160)
    CC, NN = np.meshgrid(C, N)  # [nN, nC]
    for ax, (name, fit) in zip(axes, fits.items()):
        L = predict(fit, N=NN, D=CC / (6.0 * NN))
        levels = np.quantile(L, np.linspace(0.02, 0.9, 12))
        cs = ax.contour(CC, NN, L, levels=np.unique(np.round(levels, 2)), cmap="viridis_r",
                        linewidths=0.9)
        ax.clabel(cs, fontsize=7, fmt="%.2f")
        for other, ofit in fits.items():
            if ofit.get("allocation") is None and "allocation_error" in ofit:
                continue
            n_opt, _ = optimal_allocation(ofit, C)
            inside = (n_opt >= N_range[0]) & (n_opt <= N_range[1])
            ax.plot(C[inside], n_opt[inside], color=STRATEGY_COLORS.get(other, "k"),
                    ls="-" if other == name else "--", lw=2,
                    label=f"efficient frontier ({other})")
        if points and name in points:
            ax.scatter(points[name].C, points[name].N, s=6, color="k", alpha=0.4,
                       label="runs")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C = 6ND (FLOPs)")
        ax.set_ylabel("parameters N")
        ax.set_title(f"IsoLoss contours: {name} law")
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_loss_compute(sets: dict, path: str) -> str:
    """Loss vs compute; `sets` maps a strategy name to (Points, frontier fit dict or None)."""
    fig, (ax,) = _figure(size=(7.2, 4.8))
    for name, (points, front) in sets.items():
        color = STRATEGY_COLORS.get(name, None)
        for i, (_, cur) in enumerate(points.curves()):
            order = np.argsort(cur.C)
            ax.plot(cur.C[order], cur.loss[order], color=color, lw=0.8, alpha=0.45,
                    label=f"{name} runs" if i == 0 else None)
        if front is not None:
            fp = front["frontier_points"]
            ax.scatter(fp["C"], fp["loss"], s=14, color=color, edgecolor="k", lw=0.4, zorder=3)
            grid = np.geomspace(points.C.min(), points.C.max(), 100)
            ax.plot(grid, predict(front, C=grid), color=color, lw=2.2,
                    label=f"{name} frontier: {front['E']:.3g} + {front['A']:.4g} "
                          f"C^-{front['g']:.4f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("validation loss")
    _plain_loss_axis(ax)
    ax.set_title("loss vs compute with loss-compute frontiers")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_transfer(transfer: dict, path: str) -> str:
    """FLOPs saved (%) vs scratch compute, and transferred tokens vs scratch tokens."""
    fig, (ax1, ax2) = _figure(2, size=(5.6, 4.4))
    colors = _size_colors([p["N"] for p in transfer["pairs"]])
    for p in transfer["pairs"]:
        color = colors[float(p["N"])]
        label = f"{_fmt_params(p['N'])} ({p['cpt']})"
        ax1.plot(p["C_scratch"], 100 * np.asarray(p["flops_saved"]), color=color, marker="o",
                 ms=3, label=label)
        ax2.plot(p["D_scratch"], p["transferred_tokens"], color=color, marker="o", ms=3,
                 label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.25)
    ax1.set_xlabel("from-scratch compute to reach the loss (FLOPs)")
    ax1.set_ylabel("FLOPs saved by CPT at equal loss (%)")
    ax1.set_title("compute saved by continual pre-training")
    ax2.set_xlabel("from-scratch tokens to reach the loss")
    ax2.set_ylabel("effectively transferred tokens D_scratch - D_cpt")
    ax2.set_title("effectively transferred data")
    ax1.legend(fontsize=7)
    return _save(fig, path)
