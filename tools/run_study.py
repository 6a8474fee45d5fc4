"""Run a scaling study of cross-lingual CPT from a YAML config, then fit and report.

    python tools/run_study.py --config examples/study_tiny.yaml [--out DIR]
                              [--launch local|print] [--fit-only]

`launch: local` trains every unfinished run here, one after another; `launch: print` writes
`OUT/commands.sh` (data preparation, source models, target runs; unfinished runs only) for a
cluster scheduler and, once every run has finished, fits. Finished runs are always skipped,
so running the command again resumes a study. The config format and the planned runs are
described in `megacpt.study`.

At the end (all runs finished) it writes `OUT/fits/*.json` (the scaling library's FIT.json
and TRANSFER.json formats), `OUT/plots/*.png`, `OUT/results.json` (`megacpt.study.analyze`)
and `OUT/report.md`. Fits the data cannot determine (too few sizes or points, wide bootstrap
intervals, no finite allocation) are reported as such rather than stopping the study.
Exit codes: 0 done (or commands written), 1 a run failed, 2 bad config.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt import study  # noqa: E402

log = logging.getLogger("megacpt.study")
PARAMS = ("E", "A", "B", "alpha", "beta", "gamma")


# ----- plots -----

def make_plots(results: dict, out_dir: str) -> dict[str, list[str]]:
    """PNG files per target language: fits, loss-compute, transfer, IsoLoss, forgetting."""
    import numpy as np

    from megacpt.scaling import Points, plots

    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    made = {}
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
        if res["forgetting"]:
            files.append(plot_forgetting(res["forgetting"], results["source_lang"], lang,
                                         os.path.join(plot_dir, f"{lang}_forgetting.png")))
    return made


def plot_forgetting(rows: list[dict], src: str, lang: str, path: str) -> str:
    """Source-language loss of CPT runs vs target tokens, per size and replay ratio."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    styles = ["-", "--", ":", "-."]
    for r in rows:
        color = f"C{sizes.index(r['size']) % 10}"
        ratios = sorted({x["replay"] for x in rows})
        ax.plot(r["curve"]["D"], r["curve"]["loss"], color=color, marker="o", ms=3,
                ls=styles[ratios.index(r["replay"]) % len(styles)],
                label=f"{r['size']}, {100 * r['replay']:.0f}% replay")
        ax.axhline(r["source_model_loss"], color=color, lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(f"{lang} tokens trained")
    ax.set_ylabel(f"{src} validation loss")
    ax.set_title(f"forgetting of {src} during {lang} CPT (thin lines: source models)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


# ----- report -----

def _num(v, fmt=".4g") -> str:
    return "-" if v is None else format(v, fmt)


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
        vals = " | ".join(_num(fit.get(k)) + (" (inherited)" if k in inherited else "")
                          for k in PARAMS)
        lines.append(f"| {s} | {fit['law']} | {vals} | {fit['huber']:.3g} | "
                     f"{fit['n_points']} | {notes} |")
    return lines


def language_section(lang: str, res: dict, src: str, plot_files: list[str],
                     out_dir: str) -> list[str]:
    lines = [f"## Target language: {lang}", "", "### Scaling-law fits", "",
             "Chinchilla L = E + A/N^alpha + B/D^beta on scratch runs; the CPT law "
             "L = E + A/N^alpha + B'/(D^beta' N^gamma) on CPT runs with E, A, alpha inherited "
             "(B, beta columns hold B', beta'). D = target-language tokens.", "",
             *fit_rows(res), ""]
    poor = [s for s, f in res["fits"].items() if "error" in f or f["quality_notes"]]
    if poor:
        lines += [f"**Poorly determined:** {', '.join(poor)}: the runs do not pin these fits "
                  "down (see the notes); treat their parameters as descriptive only.", ""]
    lines += ["### Compute-optimal allocation (C = 6ND)", "",
              "| strategy | N_opt | D_opt |", "|---|---|---|"]
    for s, fit in res["fits"].items():
        al = fit.get("allocation")
        lines.append(f"| {s} | {al['N_coef']:.4g} C^{al['a']:.3f} | {al['D_coef']:.4g} "
                     f"C^{al['b']:.3f} |" if al else f"| {s} | - | - |")
    lines += ["", "### Loss-compute frontier L_opt(C) = E' + A'/C^g", "",
              "| strategy | frontier | Huber |", "|---|---|---|"]
    for s, fr in res["frontiers"].items():
        lines.append(f"| {s} | not fitted: {fr['error']} | - |" if "error" in fr else
                     f"| {s} | {fr['E']:.4g} + {fr['A']:.4g} C^-{fr['g']:.4f} | "
                     f"{fr['huber']:.3g} |")
    lines += ["", "### Transfer: CPT vs scratch at equal target loss", "",
              "| strategy | FLOPs saved (min / median / max) | tokens transferred at the "
              "lowest common loss |", "|---|---|---|"]
    for s, t in res["transfer"].items():
        if "error" in t:
            lines.append(f"| {s} | not computed: {t['error']} | - |")
            continue
        sm = t["summary"]
        last = [f"{p['N'] / 1e6:.2f}M: {_num(p['transferred_tokens'][-1], ',.0f')}"
                for p in t["pairs"]]
        lines.append(f"| {s} | {100 * sm['flops_saved_min']:.1f}% / "
                     f"{100 * sm['flops_saved_median']:.1f}% / "
                     f"{100 * sm['flops_saved_max']:.1f}% | {'; '.join(last)} |")
    lines += ["", f"### Forgetting: {src} validation loss", "",
              f"| run | replay | source model | after CPT | change |", "|---|---|---|---|---|"]
    for r in res["forgetting"]:
        lines.append(f"| {r['run']} | {100 * r['replay']:.0f}% | {r['source_model_loss']:.4f} "
                     f"| {r['final_source_loss']:.4f} | "
                     f"{r['final_source_loss'] - r['source_model_loss']:+.4f} |")
    lines += ["", "### Plots", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in plot_files]
    return lines + [""]


def write_report(cfg, results: dict, plot_files: dict) -> str:
    src = results["source_lang"]
    lines = [f"# Scaling study: {cfg.name}", "",
             f"Config `{cfg.path}`: sizes {', '.join(cfg.sizes)}; kinds {', '.join(cfg.kinds)}; "
             f"replay ratios {', '.join(f'{r:g}' for r in cfg.replay_ratios)}; source "
             f"{src} -> targets {', '.join(cfg.target_langs)}; {cfg.tokens_per_param:g} tokens "
             f"per parameter; seq {cfg.seq_length}, global batch {cfg.global_batch_size}, lr "
             f"{cfg.lr:g} (cosine, {100 * cfg.lr_warmup_fraction:g}% warm-up).", "",
             "## Runs", "",
             f"| run | size | parameters | iterations | tokens | final target loss | "
             f"final {src} loss |", "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        loss = r["final_valid_loss"]
        lines.append(f"| {r['name']} | {r['size']} | {r['num_parameters']:,} | "
                     f"{r['train_iters']} | {r['train_tokens']:,} | "
                     f"{_num(loss.get(r['lang']), '.4f')} | {_num(loss.get(src), '.4f')} |")
    lines.append("")
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


# ----- main -----

def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="study YAML (see megacpt.study)")
    ap.add_argument("--out", help="output directory (overrides the config's out_dir)")
    ap.add_argument("--launch", choices=study.LAUNCH, help="overrides the config's launch")
    ap.add_argument("--fit-only", action="store_true",
                    help="run nothing; fit and report (every run must be finished)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    try:
        cfg = study.load_config(args.config, args.out, args.launch)
        runs = study.plan_runs(cfg, study.vocab_size(cfg))
        study.check_plan(cfg, runs)
    except (study.StudyConfigError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    log.info("study %s: %d runs planned (%d finished) in %s", cfg.name, len(runs),
             sum(study.run_finished(r) for r in runs), cfg.out_dir)
    if not args.fit_only:
        if cfg.launch == "print":
            path = study.write_commands(cfg, runs)
            print(open(path, encoding="utf-8").read())
            left = [r.name for r in runs if not study.run_finished(r)]
            if left:
                log.info("wrote %s; %d runs to go. Launch them, then run this again to fit.",
                         path, len(left))
                return 0
        else:
            try:
                study.prepare_data(cfg)
                study.run_local(cfg, runs)
            except RuntimeError as e:
                log.error("error: %s", e)
                return 1
    try:
        results = study.analyze(cfg, runs)
    except RuntimeError as e:
        log.error("error: %s", e)
        return 1
    write_fits(results, cfg.out_dir)
    plot_files = make_plots(results, cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    report = write_report(cfg, results, plot_files)
    log.info("wrote %s, results.json, fits/ and plots/", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
