"""Scaling-law figures (matplotlib's Agg canvas; matplotlib is imported only here, lazily).

- `plot_fit`: observed vs fitted loss against tokens, one colour per model size, with the 95 %
  band of the fitted curves when the fit carries bootstrap samples.
- `plot_isoloss`: IsoLoss contours over (compute, parameters) for the from-scratch and CPT
  laws on the same loss levels in every panel, both efficient frontiers N_opt(C) with their
  bands, and the region outside the data's compute / size range shaded as extrapolation
  (the paper's Figure 5).
- `plot_loss_compute`: loss against compute per run with the fitted loss-compute frontiers
  of both strategies and their bands (Figure 1).
- `plot_transfer`: FLOPs saved and effectively transferred tokens at equal loss (Figure 2).
- `plot_consistency`: a `checks.consistency_check` result: runs against the laws' band.

Every function writes the PNG at `path` and, by default, a PDF and an SVG beside it (same
name, other suffix; `formats=()` for the PNG only) and returns the PNG's path.  Model sizes
are labelled by `size_label` (0.4M, 49M, 1.4B); with more than `MAX_LEGEND_SIZES` sizes a
colorbar replaces the legend.
"""
from __future__ import annotations

import os

import numpy as np

from .laws import predict
from .runs import Points

STRATEGY_COLORS = {"scratch": "tab:blue", "cpt": "tab:orange"}
MAX_LEGEND_SIZES = 8
FORMATS = ("pdf", "svg")


def size_label(n: float) -> str:
    """A parameter count that reads right at any scale: 40K, 0.4M, 49M, 125M, 1.4B, 12B."""
    n = float(n)
    if n >= 1e9:
        return f"{n / 1e9:.2g}B"
    if n >= 1e5:
        v = n / 1e6
        return f"{v:.2g}M" if v < 10 else f"{v:.0f}M"
    return f"{n / 1e3:.2g}K"


_fmt_params = size_label  # the old private name


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

    sizes = np.asarray(sorted(set(float(s) for s in sizes)))
    lo, hi = np.log(sizes.min()), np.log(sizes.max())
    t = (np.log(sizes) - lo) / (hi - lo) if hi > lo else np.zeros(sizes.size)
    cmap = colormaps["viridis"]
    return {float(s): cmap(0.9 * float(v)) for s, v in zip(sizes, t)}


def _size_key(ax, fig, colors: dict, handles_title="N"):
    """A legend for few sizes, a log colorbar labelled with size_label for many."""
    if len(colors) <= MAX_LEGEND_SIZES:
        ax.legend(fontsize=7, ncols=2, title=handles_title, title_fontsize=8)
        return
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, LogNorm
    from matplotlib.ticker import FuncFormatter

    sizes = sorted(colors)
    cmap = LinearSegmentedColormap.from_list("sizes", colormaps["viridis"](np.linspace(0, .9, 256)))
    sm = ScalarMappable(norm=LogNorm(sizes[0], sizes[-1]), cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, pad=0.01)
    cb.set_label("parameters N")
    ticks = sizes if len(sizes) <= 12 else list(np.array(sizes)[
        np.unique(np.linspace(0, len(sizes) - 1, 10).round().astype(int))])
    cb.set_ticks(ticks)
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: size_label(v)))
    cb.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    cb.ax.tick_params(labelsize=7)


def _plain_loss_axis(ax):
    """Loss on a log axis labelled with plain numbers (2, 3, 4 rather than 2 x 10^0)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _loss_loglog(ax, xlabel: str, title: str, title_size: float | None = None):
    """Validation loss against `xlabel` on log-log axes (plain loss numbers), with a grid."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    _plain_loss_axis(ax)
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))


def _save(fig, path, formats=FORMATS):
    """Write path (PNG) and the same figure in `formats` beside it; returns path."""
    fig.savefig(path, dpi=150)
    stem = os.path.splitext(path)[0]
    for ext in formats:
        fig.savefig(f"{stem}.{ext}")
    return path


def _samples(fit: dict):
    """Bootstrap samples of a fit as {name: [K] array}, or None."""
    s = (fit.get("bootstrap") or {}).get("samples")
    if not s:
        return None
    return {k: np.asarray([np.nan if x is None else x for x in v], dtype=np.float64)
            for k, v in s.items()}


def _param_samples(fit: dict, keys):
    """[K]-array parameters: the samples where the bootstrap varied them, else the estimate."""
    s = _samples(fit)
    if s is None:
        return None
    K = len(next(iter(s.values())))
    return {k: s[k] if k in s else np.full(K, float(fit[k])) for k in keys if k in fit or k in s}


def _band(values, lo=2.5, hi=97.5):
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanpercentile(values, lo, axis=0), np.nanpercentile(values, hi, axis=0)


def _curve_band(fit: dict, N, D):
    """95 % band of the law's predicted loss at (N, D) [m] from its samples; None without."""
    ps = _param_samples(fit, ("E", "A", "B", "alpha", "beta", "gamma"))
    if ps is None:
        return None
    ex = {k: v[:, None] for k, v in ps.items()}
    gamma = ex.get("gamma", 0.0)
    L = ex["E"] + ex["A"] / N ** ex["alpha"] + ex["B"] / (D ** ex["beta"] * N ** gamma)
    return _band(L)


def plot_fit(points: Points, fit: dict, path: str, formats=FORMATS) -> str:
    """Observed loss vs tokens per model size, with the fitted law's curves (and bands)."""
    fig, (ax,) = _figure()
    colors = _size_colors(points.N)
    for n, color in colors.items():
        sel = np.isclose(points.N, n, rtol=1e-9)
        D = points.D[sel]
        ax.scatter(D, points.loss[sel], s=10, color=color, alpha=0.7)
        grid = np.geomspace(D.min(), D.max(), 100)
        Ng = np.full(grid.size, n)
        ax.plot(grid, predict(fit, N=Ng, D=grid), color=color, lw=1.4, label=size_label(n))
        band = _curve_band(fit, Ng, grid)
        if band is not None:
            ax.fill_between(grid, *band, color=color, alpha=0.18, lw=0)
    _loss_loglog(ax, "tokens D", _fit_title(fit), 9)
    _size_key(ax, fig, colors)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path, formats)


def _fit_title(fit: dict) -> str:
    iv = fit.get("intervals") or {}

    def fmt(k, spec):
        ci = iv.get(k)
        s = f"{k}={fit[k]:{spec}}"
        return s + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")

    if fit.get("identifiable") is False:
        return f"{fit.get('law', 'fit')}: not identifiable from this design"
    params = [fmt("alpha", ".3f"), fmt("beta", ".3f")] + \
        ([fmt("gamma", ".3f")] if "gamma" in fit else [])
    extra = f"  a={fit['allocation']['a']:.3f}" if fit.get("allocation") else ""
    return (f"{fit.get('law', 'fit')}: E={fit['E']:.3f} A={fit['A']:.4g} B={fit['B']:.4g}\n"
            + " ".join(params) + extra + ("  (95% bands)" if iv else ""))


def _common_levels(fields, n=9):
    """Round loss levels shared by every IsoLoss panel: log-spaced over the quantiles of all
    fields together, each rounded to 2 significant digits."""
    allv = np.concatenate([f[np.isfinite(f) & (f > 0)].ravel() for f in fields])
    lo, hi = np.quantile(allv, [0.03, 0.9])
    raw = np.geomspace(lo, hi, n)
    digits = 1 - np.floor(np.log10(raw)).astype(int)
    return np.unique([round(float(v), int(d)) for v, d in zip(raw, digits)])


def _contour_cmap():
    """viridis without its pale yellow end, reversed: every contour label stays legible."""
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("isoloss", colormaps["viridis"](
        np.linspace(0.78, 0.0, 256)))


def _mark_extrapolation(ax, rng: dict | None, C_range, N_range):
    """Shade where compute or size lies outside the data the law was fitted on."""
    if not rng:
        return
    style = {"color": "0.5", "alpha": 0.12, "lw": 0, "hatch": "//", "zorder": 0}
    (c_lo, c_hi), (n_lo, n_hi) = rng["C"], rng["N"]
    if c_hi < C_range[1]:
        ax.axvspan(c_hi, C_range[1], **style)
        ax.text(c_hi * 1.3, N_range[0] * 1.5, "extrapolation", fontsize=7, color="0.3",
                rotation=90, va="bottom")
    if c_lo > C_range[0]:
        ax.axvspan(C_range[0], c_lo, **style)
    if n_hi < N_range[1]:
        ax.axhspan(n_hi, N_range[1], **style)
    if n_lo > N_range[0]:
        ax.axhspan(N_range[0], n_lo, **style)


def plot_isoloss(fits: dict, path: str, C_range=(1e17, 1e23), N_range=(1e7, 1e11),
                 points: dict | None = None, formats=FORMATS) -> str:
    """IsoLoss contours per law; `fits` maps "scratch"/"cpt" to a FIT.json dict.

    All panels share the contour levels.  Every panel shows the efficient frontiers N_opt(C)
    of all fits (its own solid, 95 % band from bootstrap samples); points (optional,
    {strategy: Points}) are scattered on their strategy's panel; the region outside the
    fit's data_range is hatched as extrapolation.
    """
    from .intervals import allocation_arrays

    fig, axes = _figure(len(fits), size=(5.6, 4.8))
    C = np.geomspace(*C_range, 160)
    N = np.geomspace(*N_range, 160)
    CC, NN = np.meshgrid(C, N)  # [nN, nC]
    fields = {name: predict(fit, N=NN, D=CC / (6.0 * NN)) for name, fit in fits.items()}
    levels = _common_levels(list(fields.values()))
    for ax, (name, fit) in zip(axes, fits.items()):
        cs = ax.contour(CC, NN, fields[name], levels=levels, cmap=_contour_cmap(),
                        linewidths=1.0)
        ax.clabel(cs, fontsize=8, fmt="%g", inline=True, inline_spacing=3)
        _mark_extrapolation(ax, fit.get("data_range"), C_range, N_range)
        for other, ofit in fits.items():
            al = ofit.get("allocation")
            if not al:
                continue
            n_opt = al["N_coef"] * C ** al["a"]
            inside = (n_opt >= N_range[0]) & (n_opt <= N_range[1])
            color = STRATEGY_COLORS.get(other, "k")
            ax.plot(C[inside], n_opt[inside], color=color, ls="-" if other == name else "--",
                    lw=2, label=f"efficient frontier ({other})")
            ps = _param_samples(ofit, ("A", "B", "alpha", "beta", "gamma"))
            if ps is not None:
                sa = allocation_arrays(ps)
                lo, hi = _band(sa["N_coef"][:, None] * C ** sa["a"][:, None])
                ax.fill_between(C, np.clip(lo, *N_range), np.clip(hi, *N_range), color=color,
                                alpha=0.15, lw=0)
        if points and name in points:
            ax.scatter(points[name].C, points[name].N, s=6, color="k", alpha=0.4,
                       label="runs")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*C_range)
        ax.set_ylim(*N_range)
        ax.set_xlabel("compute C = 6ND (FLOPs)")
        ax.set_ylabel("parameters N")
        ax.set_title(f"IsoLoss contours: {name} law")
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path, formats)


def _frontier_band(front: dict, grid):
    ps = _param_samples(front, ("E", "A", "g"))
    if ps is None:
        return None
    return _band(ps["E"][:, None] + ps["A"][:, None] / grid ** ps["g"][:, None])


def plot_loss_compute(sets: dict, path: str, formats=FORMATS) -> str:
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
            band = _frontier_band(front, grid)
            if band is not None:
                ax.fill_between(grid, *band, color=color, alpha=0.2, lw=0)
    _loss_loglog(ax, "compute C = 6ND (FLOPs)", "loss vs compute with loss-compute frontiers")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path, formats)


def plot_transfer(transfer: dict, path: str, formats=FORMATS) -> str:
    """FLOPs saved (%) vs scratch compute, and transferred tokens vs scratch tokens."""
    fig, (ax1, ax2) = _figure(2, size=(5.6, 4.4))
    colors = _size_colors([p["N"] for p in transfer["pairs"]])
    many = len(colors) > MAX_LEGEND_SIZES
    for p in transfer["pairs"]:
        color = colors[float(p["N"])]
        label = size_label(p["N"]) if many else f"{size_label(p['N'])} ({p['cpt']})"
        ax1.plot(p["C_scratch"], 100 * np.asarray(p["flops_saved"]), color=color, marker="o",
                 ms=3, label=label)
        ax2.plot(p["D_scratch"], p["transferred_tokens"], color=color, marker="o", ms=3,
                 label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.25)
    moved = np.abs(np.concatenate([np.asarray(p["transferred_tokens"], dtype=float)
                                   for p in transfer["pairs"]]))
    moved = moved[np.isfinite(moved) & (moved > 0)]
    if moved.size and moved.max() > 100 * np.percentile(moved, 10):  # sizes span decades
        from matplotlib.ticker import FuncFormatter

        lt = float(np.percentile(moved, 10))
        ax2.set_yscale("symlog", linthresh=lt)

        def _tok(v, _):
            if v == 0 or abs(v) < 10 * lt:  # the linear core: no crowded labels
                return "0" if v == 0 else ""
            return f"${'-' if v < 0 else ''}10^{{{int(round(np.log10(abs(v))))}}}$"

        ax2.yaxis.set_major_formatter(FuncFormatter(_tok))
    ax1.set_xlabel("from-scratch compute to reach the loss (FLOPs)")
    ax1.set_ylabel("FLOPs saved by CPT at equal loss (%)")
    ax1.set_title("compute saved by continual pre-training")
    ax2.set_xlabel("from-scratch tokens to reach the loss")
    ax2.set_ylabel("effectively transferred tokens D_scratch - D_cpt")
    ax2.set_title("effectively transferred data")
    if many:
        _size_key(ax2, fig, colors)
    else:
        ax1.legend(fontsize=7)
    return _save(fig, path, formats)


def plot_consistency(check: dict, path: str, formats=FORMATS) -> str:
    """Runs against laws: FLOPs saved at equal loss (left) and Eq. 3 frontier points (right),
    the laws' values as lines with their 95 % band, the runs' as markers."""
    fig, (ax1, ax2) = _figure(2, size=(5.6, 4.4))
    pairs = check["transfer"]["pairs"]
    colors = _size_colors([p["N"] for p in pairs])
    for p in pairs:
        color = colors[float(p["N"])]
        L = np.asarray(p["loss"])
        ax1.plot(L, 100 * np.asarray(p["law"], dtype=float), color=color, lw=1.2)
        if p["law_lo"] is not None:
            ax1.fill_between(L, 100 * np.asarray(p["law_lo"]), 100 * np.asarray(p["law_hi"]),
                             color=color, alpha=0.15, lw=0)
        ax1.scatter(L, 100 * np.asarray(p["empirical"], dtype=float), color=color, s=9,
                    label=size_label(p["N"]))
    ax1.invert_xaxis()
    ax1.set_xlabel("validation loss (both strategies reach it)")
    ax1.set_ylabel("FLOPs saved at equal loss (%)")
    ax1.set_title("transfer: runs (dots) vs laws (lines, band)", fontsize=9)
    _size_key(ax1, fig, colors)
    for name, f in check["frontier"].items():
        color = STRATEGY_COLORS.get(name, "k")
        C = np.asarray(f["C"])
        ax2.plot(C, np.asarray(f["law"], dtype=float), color=color, lw=1.5, label=f"{name} law")
        if f["law_lo"] is not None:
            ax2.fill_between(C, f["law_lo"], f["law_hi"], color=color, alpha=0.2, lw=0)
        ax2.scatter(C, f["empirical"], color=color, s=10, edgecolor="k", lw=0.3,
                    label=f"{name} runs")
        if f.get("given"):
            g = f["given"]["params"]
            ax2.plot(C, f["given"]["values"], color=color, ls="--", lw=1.2,
                     label=f"{name} given: {g['E']:.3g} + {g['A']:.4g} C^-{g['g']:.4f}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    _plain_loss_axis(ax2)
    ax2.set_xlabel("compute C (FLOPs)")
    ax2.set_ylabel("lowest loss reached")
    ax2.set_title("frontier: " + ("MISMATCH" if check["mismatch"] else "consistent"),
                  fontsize=9)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path, formats)
