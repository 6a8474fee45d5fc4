"""Outputs of an analysed study: fits/*.json, plots/*.png, results.json and report.md."""
from __future__ import annotations

import json
import os

from megacpt.study.config import StudyConfig

PARAMS = ("E", "A", "B", "alpha", "beta", "gamma")


# ----- plots -----

def make_plots(results: dict, out_dir: str) -> dict[str, list[str]]:
    """PNG files per target language: fits, loss-compute, transfer, IsoLoss, forgetting,
    Figure 4 (each language's loss against its own compute, per replay ratio)."""
    import numpy as np

    from megacpt.scaling import Points, plots

    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    made = {}
    for lang in results["languages"] if results.get("downstream") else ():
        plot_downstream_bars(results["downstream"], lang, results["source_lang"],
                             downstream_plot_path(out_dir, lang))
    for lang, res in results["languages"].items():
        files = made.setdefault(lang, [])
        pts = {s: Points(*(np.asarray(p[k], dtype=np.float64) for k in ("N", "D", "loss", "C")),
                         np.asarray(p["run"], dtype=object), s)
               for s, p in res["points"].items() if p["loss"]}
        for s, fit in res["fits"].items():
            if "error" not in fit and s in pts:
                files.append(plots.plot_fit(pts[s], fit, os.path.join(plot_dir,
                                                                      f"{lang}_fit_{s}.png")))
        sets = {s: (pts[s], None if "error" in res["frontiers"][s] else res["frontiers"][s])
                for s in ("scratch", "cpt") if s in pts}  # the paper's comparison
        if sets:
            files.append(plots.plot_loss_compute(sets, os.path.join(plot_dir,
                                                                    f"{lang}_loss_compute.png")))
        ok = {s: t for s, t in res["transfer"].items() if "error" not in t and t["pairs"]}
        for s, t in ok.items():
            files.append(plots.plot_transfer(t, os.path.join(plot_dir,
                                                             f"{lang}_transfer_{s}.png")))
        fits = {k: res["fits"].get(s, {}) for k, s in (("scratch", "scratch"), ("cpt", "cpt"))}
        if all("error" not in f and f and f.get("allocation") for f in fits.values()):
            allC = np.concatenate([p.C for p in pts.values()])
            allN = np.concatenate([p.N for p in pts.values()])
            files.append(plots.plot_isoloss(
                fits, os.path.join(plot_dir, f"{lang}_isoloss.png"),
                (allC.min() / 10, allC.max() * 100), (allN.min() / 3, allN.max() * 10),
                {k: pts[k] for k in fits if k in pts}))
        for s, check in (res.get("consistency") or {}).items():
            if "error" not in check:
                files.append(plots.plot_consistency(
                    check, os.path.join(plot_dir, f"{lang}_consistency_{s}.png")))
        if res["forgetting"]:
            files.append(plot_forgetting(res["forgetting"], results["source_lang"], lang,
                                         os.path.join(plot_dir, f"{lang}_forgetting.png")))
        if res.get("figure4"):
            files.append(plot_figure4(res["figure4"], results["source_lang"], lang,
                                      os.path.join(plot_dir, f"{lang}_figure4.png")))
    return made


def _styles(rows):
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    ratios = sorted({r["replay"] for r in rows})
    lines = ["-", "--", ":", "-."]
    return (lambda r: f"C{sizes.index(r['size']) % 10}",
            lambda r: lines[ratios.index(r["replay"]) % len(lines)])


def plot_forgetting(rows: list[dict], src: str, lang: str, path: str) -> str:
    """Source-language loss of CPT runs vs target tokens, per size and replay ratio."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    color, ls = _styles(rows)
    for r in rows:
        budget = f", {r['budget']:g} tok/param" if r.get("budget") else ""
        ax.plot(r["curve"]["D"], r["curve"]["loss"], color=color(r), marker="o", ms=3,
                ls=ls(r), label=f"{r['size']}, {100 * r['replay']:.0f}% replay{budget}")
        ax.axhline(r["source_model_loss"], color=color(r), lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(f"{lang} tokens trained")
    ax.set_ylabel(f"{src} validation loss")
    ax.set_title(f"forgetting of {src} during {lang} CPT (thin lines: source models)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=120)
    return path


def plot_figure4(rows: list[dict], src: str, lang: str, path: str) -> str:
    """Two panels: {lang} loss vs {lang} compute and {src} loss vs {src} compute (replay)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    color, ls = _styles(rows)
    for ax, key, name in ((axes[0], "target", lang), (axes[1], "source", src)):
        seen = set()
        for r in rows:
            if r[key]["C"]:
                label = f"{r['size']}, {100 * r['replay']:.0f}% replay"
                ax.plot(r[key]["C"], r[key]["loss"], color=color(r), ls=ls(r), marker="o", ms=3,
                        label=None if label in seen else label)
                seen.add(label)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} compute during CPT (6 N x {name} tokens, FLOPs)")
        ax.set_ylabel(f"{name} validation loss")
        ax.grid(True, which="both", alpha=0.25)
        ax.set_title(f"({'a' if key == 'target' else 'b'}) {name} loss vs {name} compute")
    axes[0].legend(fontsize=6)
    if not any(r["source"]["C"] for r in rows):
        axes[1].text(0.5, 0.5, "no replay runs: no source-language compute", ha="center",
                     transform=axes[1].transAxes)
    fig.savefig(path, dpi=120)
    return path


# ----- report -----

def _num(v, fmt=".4g") -> str:
    return "-" if v is None else format(v, fmt)


def _interval(fit: dict, k: str) -> str:
    iv = (fit.get("intervals") or {}).get(k)
    return f" [{iv[0]:.3g}, {iv[1]:.3g}]" if iv and None not in iv else ""


def fit_rows(res: dict) -> list[str]:
    lines = ["| strategy | law | " + " | ".join(PARAMS) + " | Huber | points | notes |",
             "|" + "---|" * (len(PARAMS) + 5)]
    for s, fit in res["fits"].items():
        if "error" in fit:
            lines.append(f"| {s} | {fit['law']} |" + " - |" * len(PARAMS)
                         + f" - | - | not fitted: {fit['error']} |")
            continue
        notes = "; ".join(fit["quality_notes"]) or "ok"
        inherited = set(fit.get("inherited", []))
        vals = " | ".join(_num(fit.get(k)) + _interval(fit, k)
                          + (" (inherited)" if k in inherited else "") for k in PARAMS)
        lines.append(f"| {s} | {fit['law']} | {vals} | {fit['huber']:.3g} | "
                     f"{fit['n_points']} | {notes} |")
    return lines


def _checks(res: dict) -> list[str]:
    lines = ["### Warnings", ""]
    warned = [(s, w) for s, f in res["fits"].items() for w in f.get("warnings", [])]
    lines += [f"- {s}: {w}" for s, w in warned] or ["- none from the fits"]
    lines += ["", "### Checks of the predictions", ""]
    hs = res.get("holdout") or {}
    if not hs:
        lines.append("- holdout: off (fit.holdout_largest: K fits each law without the K "
                     "largest sizes and scores its predictions of them)")
    for s, h in hs.items():
        if "error" in h:
            lines.append(f"- holdout {s}: not computed: {h['error']}")
            continue
        band = h.get("inside_band")
        lines.append(f"- holdout {s}: fitted on {len(h['train_sizes'])} sizes, the law predicts "
                     f"the {h['k']} largest with rms log error {h['rmse_log']:.4f} (max "
                     f"|error| {100 * h['max_abs_rel_err']:.2f}%)"
                     + (f"; {100 * band:.0f}% of their points inside the 95% band"
                        if band is not None else ""))
    for s, c in (res.get("consistency") or {}).items():
        if "error" in c:
            lines.append(f"- consistency {s}: not computed: {c['error']}")
            continue
        t = c["transfer"]
        law = t.get("median_law")
        lines.append(f"- consistency {s}: FLOPs saved at equal loss, runs "
                     f"{100 * t['median_empirical']:.1f}% vs the laws "
                     + ("-" if law is None else f"{100 * law:.1f}%")
                     + (": **MISMATCH**" if c["mismatch"] else ": consistent"
                        + (" within the 95% bands" if c.get("intervals") else "")))
        lines += [f"  - {m}" for m in c["messages"]]
    return lines + [""]


def language_section(lang: str, res: dict, src: str, plot_files: list[str],
                     out_dir: str) -> list[str]:
    flagged = res.get("points_fitted") == "all"
    lines = [f"## Target language: {lang}", "", "### Scaling-law fits", "",
             "Chinchilla L = E + A/N^alpha + B/D^beta on scratch runs; the CPT law "
             "L = E + A/N^alpha + B'/(D^beta' N^gamma) on CPT runs with E, A, alpha inherited "
             "(B, beta columns hold B', beta'). D = target-language tokens. Brackets: 95% "
             "intervals.", ""]
    if flagged:
        lines += ["**Intermediate checkpoints fitted** (fit.checkpoints: all): losses measured "
                  "mid-schedule sit above those of runs trained to that D and bias alpha and "
                  "the allocation; prefer end-of-schedule points (design wsd or several "
                  "budgets).", ""]
    else:
        lines += ["Points: end-of-schedule losses only (one per run).", ""]
    lines += [*fit_rows(res), ""]
    poor = [s for s, f in res["fits"].items() if "error" in f or f["quality_notes"]]
    if poor:
        lines += [f"**Poorly determined:** {', '.join(poor)}: the runs do not pin these fits "
                  "down (see the notes); treat their parameters as descriptive only.", ""]
    lines += ["### Compute-optimal allocation (C = 6ND)", "",
              "| strategy | N_opt | D_opt | a (95%) |", "|---|---|---|---|"]
    for s, fit in res["fits"].items():
        al = fit.get("allocation")
        why = fit.get("allocation_error", "-")
        lines.append(f"| {s} | {al['N_coef']:.3g} C^{al['a']:.3f} | {al['D_coef']:.3g} "
                     f"C^{al['b']:.3f} | {al['a']:.3f}{_interval(fit, 'a')} |" if al else
                     f"| {s} | - | - | {why} |")
    lines += ["", "### Loss-compute frontier L_opt(C) = E' + A'/C^g", "",
              "| strategy | frontier | Huber |", "|---|---|---|"]
    for s, fr in res["frontiers"].items():
        lines.append(f"| {s} | not fitted: {fr['error']} | - |" if "error" in fr else
                     f"| {s} | {fr['E']:.4g} + {fr['A']:.4g} C^-{fr['g']:.4f} | "
                     f"{fr['huber']:.3g} |")
    lines += ["", "### Transfer: CPT vs scratch at equal target loss", "",
              "| strategy | FLOPs saved (min / median / max) | counting the source model's "
              "compute (median) | tokens transferred at the lowest common loss |",
              "|---|---|---|---|"]
    for s, t in res["transfer"].items():
        if "error" in t:
            lines.append(f"| {s} | not computed: {t['error']} | - | - |")
            continue
        sm = t["summary"]
        last = [f"{p['N'] / 1e6:.2f}M: {_num(p['transferred_tokens'][-1], ',.0f')}"
                for p in t["pairs"]]
        with_src = sm.get("flops_saved_with_source_median")
        lines.append(f"| {s} | {100 * sm['flops_saved_min']:.1f}% / "
                     f"{100 * sm['flops_saved_median']:.1f}% / "
                     f"{100 * sm['flops_saved_max']:.1f}% | "
                     f"{'-' if with_src is None else f'{100 * with_src:.1f}%'} | "
                     f"{'; '.join(last)} |")
    lines += ["", *_checks(res), f"### Forgetting: {src} validation loss", "",
              "| run | replay | source model | after CPT | change |", "|---|---|---|---|---|"]
    for r in res["forgetting"]:
        lines.append(f"| {r['run']} | {100 * r['replay']:.0f}% | {r['source_model_loss']:.4f} "
                     f"| {r['final_source_loss']:.4f} | "
                     f"{r['final_source_loss'] - r['source_model_loss']:+.4f} |")
    lines += ["", "### Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in plot_files]
    return lines + [""]


def _score(metrics: dict) -> float | None:
    """A task's headline number: acc_norm (lm-eval's, length-normalised), else acc."""
    return metrics.get("acc_norm", metrics.get("acc"))


def downstream_plot_path(out_dir: str, lang: str) -> str:
    return os.path.join(out_dir, "plots", f"{lang}_downstream.png")


def eval_section(results: dict, out_dir: str | None = None) -> list[str]:
    """"Downstream evaluation": a run x task table of acc_norm (acc) and the bar plots."""
    ds = results.get("downstream") or {}
    if not ds.get("runs"):
        return []
    tasks = list(ds["tasks"])
    lines = ["## Downstream evaluation", "",
             "Zero-shot multiple choice on each end-of-schedule checkpoint, scored like "
             "lm-evaluation-harness: acc_norm (acc in brackets; chance in the header). demo_* "
             "tasks (the true continuation of held-out text among 4) are a smoke signal, not "
             "the paper's benchmarks.", "",
             "| run | strategy | replay | " + " | ".join(
                 f"{t} ({ds['chance'][t]:.2f})" if t in ds.get("chance", {}) else t
                 for t in tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for r in ds["runs"]:
        cells = []
        for t in tasks:
            m = r["tasks"].get(t) or {}
            cells.append(f"{_num(_score(m), '.3f')} ({_num(m.get('acc'), '.3f')})" if m else "-")
        lines.append(f"| {r['run']} | {r['strategy']} | {100 * r['replay']:.0f}% | "
                     + " | ".join(cells) + " |")
    lines.append("")
    if out_dir:
        for lang in results.get("languages", {}):
            p = downstream_plot_path(out_dir, lang)
            if os.path.isfile(p):
                lines.append(f"![{lang} downstream]({os.path.relpath(p, out_dir)})")
        lines.append("")
    return lines


def plot_downstream_bars(ds: dict, lang: str, src: str, path: str) -> str | None:
    """Figure 3/6 of the paper in miniature: a panel per task, bars per run kind and replay
    ratio (source model, scratch, CPT, CPT + replay) at each size (and budget), for the
    target language `lang`; dotted: chance."""
    from matplotlib.figure import Figure

    rows = [r for r in ds["runs"] if r["lang"] == lang or (r["kind"] == "source"
                                                           and r["lang"] == src)]
    if not rows:
        return None
    tasks = list(ds["tasks"])
    strategies = sorted(dict.fromkeys(r["strategy"] for r in rows), key=lambda s: (
        ["source", "scratch", "cpt"].index(s) if s in ("source", "scratch", "cpt") else 3, s))
    budgets = {r["budget"] for r in rows if r["kind"] != "source"}
    group = (lambda r: r["size"] + (f"\n{r['budget']:g} tok/p" if len(budgets) > 1 and
                                     r["kind"] != "source" else ""))
    groups = list(dict.fromkeys(group(r) for r in rows if r["kind"] != "source")) or \
        list(dict.fromkeys(group(r) for r in rows))
    ncol = min(3, len(tasks))
    nrow = -(-len(tasks) // ncol)
    panel = 1.2 + 0.22 * len(groups) * len(strategies)  # inches per task panel
    fig = Figure(figsize=(min(18.0, panel * ncol), 3.2 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    width = 0.8 / len(strategies)
    for ax, task in zip(axes, tasks):
        for k, s in enumerate(strategies):
            xs, ys = [], []
            for i, g in enumerate(groups):
                for r in rows:
                    same = group(r) == g or (r["kind"] == "source"
                                             and g.split("\n")[0] == r["size"])
                    if r["strategy"] == s and same and task in r["tasks"]:
                        xs.append(i + (k - (len(strategies) - 1) / 2) * width)
                        ys.append(_score(r["tasks"][task]))
                        break
            label = s if s != "source" else f"source ({src})"
            ax.bar(xs, ys, width, label=label, color=f"C{k}")
        if task in ds.get("chance", {}):
            ax.axhline(ds["chance"][task], color="k", ls=":", lw=1)
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("acc_norm")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"downstream accuracy of the {lang} runs by kind and replay ratio "
                 f"(dotted: chance)", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def cross_language_section(results: dict) -> list[str]:
    rows = results.get("cross_language") or []
    if len(rows) < 2:
        return []
    lines = ["## Across target languages", "",
             "| language | scratch alpha / beta | CPT beta' / gamma | FLOPs saved (median; "
             "with source) | forgetting (mean change of source loss) |", "|---|---|---|---|---|"]
    for r in rows:
        sc, cp = r.get("scratch", {}), r.get("cpt", {})
        fs = (r.get("flops_saved") or {}).get("cpt", {})
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(f"| {r['lang']} | {_num(sc.get('alpha'), '.3f')} / "
                     f"{_num(sc.get('beta'), '.3f')} | {_num(cp.get('beta'), '.3f')} / "
                     f"{_num(cp.get('gamma'), '.3f')} | {pct(fs.get('median'))}; "
                     f"{pct(fs.get('median_with_source'))} | "
                     f"{_num(r.get('forgetting'), '+.4f')} |")
    return lines + [""]


def write_report(cfg: StudyConfig, results: dict, plot_files: dict) -> str:
    src = results["source_lang"]
    design = ("cosine, one run per size and budget" if cfg.design == "cosine" else
              f"WSD: one stable-LR run per size, {cfg.wsd_decay_style} cooldown branches over "
              f"the last {100 * cfg.cooldown_fraction:g}% of each budget")
    batch = (f"global batch {cfg.global_batch_size}" if cfg.batch_tokens is None else
             "batch by size " + ", ".join(f"{t:,} tokens up to {n:.3g} params"
                                          for n, t in cfg.batch_tokens))
    lines = [f"# Scaling study: {cfg.name}", "",
             f"Config `{os.path.basename(cfg.path)}`: sizes {', '.join(cfg.sizes)}; kinds "
             f"{', '.join(cfg.kinds)}; "
             f"replay ratios {', '.join(f'{r:g}' for r in cfg.replay_ratios)}; source "
             f"{src} -> targets {', '.join(cfg.target_langs)}; budgets "
             f"{', '.join(f'{b:g}' for b in cfg.all_budgets)} tokens per parameter; design "
             f"{design}; seq {cfg.seq_length}, {batch}, lr {cfg.lr:g} "
             f"({100 * cfg.lr_warmup_fraction:g}% warm-up).", "",
             "## Runs", "",
             f"| run | size | parameters | role | iterations | tokens | final target loss | "
             f"final {src} loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        loss = r["final_valid_loss"]
        lines.append(f"| {r['name']} | {r['size']} | {r['num_parameters']:,} | {r['role']} | "
                     f"{r['train_iters']} | {r['train_tokens']:,} | "
                     f"{_num(loss.get(r['lang']), '.4f')} | {_num(loss.get(src), '.4f')} |")
    lines.append("")
    lines += eval_section(results, cfg.out_dir)
    lines += cross_language_section(results)
    for lang, res in results["languages"].items():
        lines += language_section(lang, res, src, plot_files.get(lang, []), cfg.out_dir)
    path = os.path.join(cfg.out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def write_fits(results: dict, out_dir: str) -> None:
    fit_dir = os.path.join(out_dir, "fits")
    os.makedirs(fit_dir, exist_ok=True)
    for lang, res in results["languages"].items():
        for kind in ("fits", "frontiers", "transfer"):
            for s, obj in res[kind].items():
                name = {"fits": "fit", "frontiers": "frontier", "transfer": "transfer"}[kind]
                with open(os.path.join(fit_dir, f"{lang}_{name}_{s}.json"), "w",
                          encoding="utf-8") as f:
                    json.dump(obj, f, indent=1)


def strip_samples(obj):
    """A copy without bootstrap resamples ("samples": K values per quantity): the JSON files
    keep the intervals, standard errors and medians."""
    if isinstance(obj, dict):
        return {k: strip_samples(v) for k, v in obj.items() if k != "samples"}
    if isinstance(obj, list):
        return [strip_samples(v) for v in obj]
    return obj


def write_all(cfg: StudyConfig, results: dict) -> str:
    """plots/, fits/, results.json and report.md; the report's path."""
    plot_files = make_plots(results, cfg.out_dir)  # bands from the bootstrap samples
    results = strip_samples(results)
    write_fits(results, cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return write_report(cfg, results, plot_files)
