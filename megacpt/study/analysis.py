"""Analysis of a finished study: fits, intervals, checks, transfer, forgetting, Figure 4 data.

Points fitted: by default only end-of-schedule points (the last validation of every run whose
LR schedule has fully decayed: cosine runs and WSD cooldown branches), so that a loss measured
mid-schedule, which sits above the loss of a run trained to that D, does not bias the law
(Hagele et al. 2024). `fit: {checkpoints: all}` also fits intermediate checkpoints (past
min_tokens_fraction of each run) and the report flags it.

Fits use `megacpt.scaling.fit_points` (cluster bootstrap over runs, the CPT law's scratch base
refitted per resample; `intervals` and `warnings` in the fit JSON) and carry this module's
`quality_notes`; `holdout_largest` and `consistency_check` of `megacpt.scaling` check them.
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np

from megacpt.study.config import StudyConfig
from megacpt.study.downstream import summarize
from megacpt.study.plan import Run, run_finished

log = logging.getLogger("megacpt.study")


def _points(runs: list[Run], valid_name: str, cfg: StudyConfig):
    """Scaling points of the runs on validation set `valid_name`; one curve per size."""
    from megacpt.scaling import load_runs, points_from_runs

    final_only = cfg.fit["checkpoints"] == "final"
    mine = [r for r in runs if r.end_of_schedule or not final_only]
    loaded = load_runs([r.run_dir for r in mine], valid_name)
    for run, r in zip(mine, loaded):
        if not len(r["D"]):
            continue
        if final_only:
            keep = np.arange(len(r["D"])) == len(r["D"]) - 1
        else:
            keep = r["D"] >= cfg.fit["min_tokens_fraction"] * r["D"].max()
        for k in ("iteration", "loss", "D", "tokens", "flops", "C"):
            r[k] = np.asarray(r[k])[keep]
        r["name"] = f"{run.lang}_{run.size}_{run.strategy}"  # a curve per size
    loaded = [r for r in loaded if len(r["loss"])]
    return points_from_runs(loaded, f"{valid_name} runs") if loaded else None


def fit_quality(fit: dict, points, n_params: int) -> list[str]:
    """Plain-language reasons a fit is poorly determined (empty when none is found)."""
    notes = []
    n_sizes = np.unique(points.N).size
    if fit["law"] == "chinchilla" and n_sizes < 3:
        notes.append(f"only {n_sizes} model sizes: E, A and alpha are not separately "
                     f"identifiable (use at least 3, better 5+)")
    per_size = min(np.unique(points.D[points.N == n]).size for n in np.unique(points.N))
    if per_size < 2:
        notes.append("one budget per size: N and D move together, so the N and D terms are "
                     "not identifiable (use several budgets per size: design wsd or budgets)")
    if len(points) < 3 * n_params:
        notes.append(f"{len(points)} points for {n_params} free parameters")
    ci = fit.get("intervals") or (fit.get("bootstrap") or {}).get("ci95", {})
    for k in ("alpha", "beta", "gamma"):
        if ci.get(k) is not None and k not in fit.get("inherited", []):
            lo, hi = ci[k]
            if not (math.isfinite(lo) and math.isfinite(hi)) or \
                    hi - lo > max(0.5 * abs(fit[k]), 0.05):
                notes.append(f"{k} = {fit[k]:.3g} has a wide 95% interval [{lo:.3g}, {hi:.3g}]")
    if fit.get("allocation") is None and fit.get("identifiable", True):
        gamma = fit.get("gamma", 0.0)
        notes.append(f"no finite compute-optimal allocation (needs alpha > 0 and beta - gamma "
                     f"> 0; alpha = {fit['alpha']:.3g}, beta - gamma = "
                     f"{fit['beta'] - gamma:.3g})")
    return notes


def _fit(law_name: str, points, cfg: StudyConfig, base_points=None) -> dict:
    """`megacpt.scaling.fit_points` (the CPT law refits its scratch base in every resample)
    plus this module's quality notes; {"law", "error"} when it cannot be fitted."""
    from megacpt.scaling import fit_points

    try:
        with warnings.catch_warnings():  # resamples of degenerate data give NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            fit = fit_points(law_name, points, base_points=base_points,
                             bootstrap=int(cfg.fit["bootstrap"]), seed=cfg.seed)
    except (ValueError, RuntimeError) as e:
        return {"law": law_name, "error": str(e)}
    fit.setdefault("warnings", [])
    n_params = {"chinchilla": 5, "cpt": 3}[law_name]
    fit["quality_notes"] = fit_quality(fit, points, n_params)
    fit["points_fitted"] = cfg.fit["checkpoints"]
    return fit


def holdout(cfg: StudyConfig, points: dict) -> dict:
    """fit.holdout_largest K: each law fitted without the K largest sizes, scored on them
    (`megacpt.scaling.holdout_largest`); {strategy: result or {"error"}}."""
    from megacpt.scaling import holdout_largest

    k, out = int(cfg.fit["holdout_largest"]), {}
    if not k or "scratch" not in points:
        return out
    for s, p in points.items():
        law, base = ("chinchilla", None) if s == "scratch" else ("cpt", points["scratch"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[s] = holdout_largest(law, p, k, base_points=base,
                                         bootstrap=int(cfg.fit["bootstrap"]), seed=cfg.seed)
        except (ValueError, RuntimeError) as e:
            out[s] = {"error": str(e)}
    return out


def consistency(points: dict, fits: dict) -> dict:
    """Law-implied vs empirical transfer and frontiers per CPT strategy
    (`megacpt.scaling.consistency_check`)."""
    from megacpt.scaling import consistency_check

    out, base = {}, fits.get("scratch", {})
    for s, p in points.items():
        fit = fits.get(s, {})
        if s == "scratch" or "scratch" not in points or "error" in fit or "error" in base:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[s] = consistency_check(points["scratch"], p, base, fit)
        except (ValueError, RuntimeError) as e:
            out[s] = {"error": str(e)}
    return out


def analyze_language(cfg: StudyConfig, runs: list[Run], lang: str) -> dict:
    """Fits, frontiers, transfer, checks and forgetting for one target language."""
    from megacpt.scaling import fit_frontier, transfer_metrics

    mine = [r for r in runs if r.lang == lang and r.kind != "source"]
    groups = {s: [r for r in mine if r.strategy == s] for s in dict.fromkeys(
        r.strategy for r in mine)}
    points = {s: _points(rs, lang, cfg) for s, rs in groups.items()}
    out = {"fits": {s: {"law": "chinchilla" if s == "scratch" else "cpt",
                        "error": f"no {lang} validation points"}
                    for s, p in points.items() if p is None},
           "frontiers": {}, "transfer": {}, "forgetting": [],
           "points_fitted": cfg.fit["checkpoints"]}
    points = {s: p for s, p in points.items() if p is not None}
    if "scratch" in points:
        out["fits"]["scratch"] = _fit("chinchilla", points["scratch"], cfg)
    base = out["fits"].get("scratch", {})
    for s in (s for s in groups if s != "scratch" and s in points):
        if "error" in base or not base:
            why = base.get("error", "no scratch runs (kinds lacks scratch)")
            out["fits"][s] = {"law": "cpt", "error": f"needs the from-scratch fit as base: {why}"}
        else:
            out["fits"][s] = _fit("cpt", points[s], cfg, base_points=points["scratch"])
    for s, p in points.items():
        try:
            out["frontiers"][s] = fit_frontier(p, n_levels=min(30, max(4, len(p))))
        except (ValueError, RuntimeError) as e:
            out["frontiers"][s] = {"law": "frontier", "error": str(e)}
        if s != "scratch" and "scratch" in points:
            try:
                out["transfer"][s] = with_source_compute(
                    transfer_metrics(points["scratch"], p), runs)
            except ValueError as e:
                out["transfer"][s] = {"error": str(e)}
    out["holdout"] = holdout(cfg, points)
    out["consistency"] = consistency(points, out["fits"])
    out["forgetting"] = forgetting(cfg, runs, lang)
    out["figure4"] = figure4(cfg, runs, lang)
    out["points"] = {s: {"N": p.N.tolist(), "D": p.D.tolist(), "loss": p.loss.tolist(),
                         "C": p.C.tolist(), "run": p.group.tolist()} for s, p in points.items()}
    return out


def with_source_compute(transfer: dict, runs: list[Run]) -> dict:
    """Add FLOPs saved counting the source model's own training compute as CPT's cost."""
    src = {r.num_parameters: r for r in runs if r.kind == "source"}
    saved_all = []
    for p in transfer["pairs"]:
        s = src.get(int(round(p["N"])))
        c_src = source_compute(s) if s else float("nan")
        c_s, c_c = np.asarray(p["C_scratch"]), np.asarray(p["C_cpt"])
        p["C_source"] = c_src
        p["flops_saved_with_source"] = ((c_s - c_c - c_src) / c_s).tolist()
        saved_all.append(p["flops_saved_with_source"])
    if saved_all:
        v = np.concatenate(saved_all)
        transfer["summary"].update({
            "flops_saved_with_source_min": float(np.nanmin(v)),
            "flops_saved_with_source_median": float(np.nanmedian(v)),
            "flops_saved_with_source_max": float(np.nanmax(v))})
    return transfer


def source_compute(run: Run) -> float:
    """6 N D of a source model's whole training (D: its tokens)."""
    cfg, _ = run.resolved()
    tokens = run.train_iters * cfg.training.global_batch_size * cfg.model.seq_length
    return 6.0 * run.num_parameters * tokens


def _valid_curve(run: Run, name: str, lang: str):
    """[(tokens of `lang` consumed, loss on `name`)] over a run's validations."""
    from megacpt.training.metrics import read_metrics

    rows = read_metrics(run.run_dir)
    per = {0: 0}
    for r in rows:
        if r.get("type") == "train":
            per[r["iteration"]] = r.get("consumed_tokens_per_dataset", {}).get(lang, 0)
    return [(per.get(r["iteration"], 0), r["loss"]) for r in rows
            if r.get("type") == "valid" and r.get("name") == name]


def figure4(cfg: StudyConfig, runs: list[Run], lang: str) -> list[dict]:
    """The paper's Figure 4: per replay ratio and size, each language's loss against that
    language's compute (6 N x its tokens) during CPT (cosine runs and branches)."""
    src, rows = cfg.source_lang, []
    for r in (r for r in runs if r.lang == lang and r.kind == "cpt" and r.role != "stable"):
        row = {"run": r.name, "size": r.size, "N": r.num_parameters, "replay": r.replay}
        for key, name in (("target", lang), ("source", src)):
            pts = [(6.0 * r.num_parameters * d, loss) for d, loss in _valid_curve(r, name, name)
                   if d > 0]
            row[key] = {"C": [c for c, _ in pts], "loss": [x for _, x in pts]}
        rows.append(row)
    return rows


def forgetting(cfg: StudyConfig, runs: list[Run], lang: str) -> list[dict]:
    """Final source-language loss of each CPT run next to its source model's."""
    from megacpt.scaling import load_runs

    src = cfg.source_lang
    sources = {r.size: r for r in runs if r.kind == "source"}
    rows = []
    for r in (r for r in runs if r.lang == lang and r.kind == "cpt" and r.end_of_schedule):
        mine = load_runs(r.run_dir, src)[0]
        before = load_runs(sources[r.size].run_dir, src)[0]
        rows.append({"run": r.name, "size": r.size, "replay": r.replay, "budget": r.budget,
                     "source_model_loss": float(before["loss"][-1]),
                     "final_source_loss": float(mine["loss"][-1]),
                     "curve": {"D": mine["D"].tolist(), "loss": mine["loss"].tolist()}})
    return rows


def run_summary(runs: list[Run]) -> list[dict]:
    """One row per run: its final validation losses (None while unfinished)."""
    from megacpt.training.metrics import read_metrics

    rows = []
    for r in runs:
        final = {}
        if run_finished(r):
            for row in read_metrics(r.run_dir, "valid"):
                if row["iteration"] == r.train_iters:
                    final[row["name"]] = row["loss"]
        c, _ = r.resolved()
        rows.append({"name": r.name, "lang": r.lang, "size": r.size, "kind": r.kind,
                     "role": r.role, "budget": r.budget, "replay": r.replay,
                     "num_parameters": r.num_parameters, "train_iters": r.train_iters,
                     "global_batch_size": c.training.global_batch_size,
                     "train_tokens": r.train_iters * c.training.global_batch_size
                     * c.model.seq_length,
                     "finished": bool(final), "final_valid_loss": final})
    return rows


def cross_language(results: dict) -> list[dict]:
    """One row per target language: exponents, FLOPs saved, forgetting (several targets)."""
    rows = []
    for lang, res in results["languages"].items():
        row = {"lang": lang}
        for s, fit in res["fits"].items():
            if "error" not in fit:
                row[s] = {k: fit.get(k) for k in ("alpha", "beta", "gamma") if k in fit}
        for s, t in res["transfer"].items():
            if "error" not in t:
                row.setdefault("flops_saved", {})[s] = {
                    "median": t["summary"]["flops_saved_median"],
                    "median_with_source": t["summary"].get("flops_saved_with_source_median")}
        if res["forgetting"]:
            row["forgetting"] = float(np.mean([f["final_source_loss"] - f["source_model_loss"]
                                               for f in res["forgetting"]]))
        rows.append(row)
    return rows


def analyze(cfg: StudyConfig, runs: list[Run]) -> dict:
    """The results of the study (results.json); every run must be finished."""
    unfinished = [r.name for r in runs if not run_finished(r)]
    if unfinished:
        raise RuntimeError(f"cannot analyse: runs not finished: {unfinished}")
    res = {"name": cfg.name, "config": cfg.path, "source_lang": cfg.source_lang,
           "design": cfg.design, "budgets": cfg.all_budgets,
           "points_fitted": cfg.fit["checkpoints"], "runs": run_summary(runs),
           "languages": {lang: analyze_language(cfg, runs, lang) for lang in cfg.target_langs}}
    res["cross_language"] = cross_language(res)
    res["downstream"] = summarize(cfg, runs)
    return res
