"""`megacpt-fit` / tools/fit_scaling_law.py: fit laws, allocate compute, transfer metrics, plots.

    fit --law chinchilla|cpt|frontier (--input FILE.csv... | --runs DIR...) [--base FIT.json]
        --output FIT.json [--bootstrap K] [--init grid|optuna] [--plot PNG]
        [--base-input FILE.csv... | --base-runs DIR...] [--compute C...] [--holdout-largest K]
    allocate --law chinchilla|cpt --params PARAMS.json [--compute C...]
    check --scratch PATH... --cpt PATH... --scratch-fit FIT.json --cpt-fit FIT.json
        --output CHECK.json [--plot PNG]
    compare --base FIT.json (--input FILE.csv... | --runs DIR...) [--output TABLE.json]
    transfer --scratch PATH... --cpt PATH... --output TRANSFER.json [--plot PNG]
    plot --kind fit|isoloss|compute|transfer --output PNG [kind-specific inputs]

Every figure is written as PNG with a PDF and an SVG beside it (same name).  Progress bars
appear only when stderr is a terminal.

PATH in --scratch/--cpt is a CSV file (*.csv) or a run directory (see megacpt.scaling.runs).
FIT.json: {"E","A","B","alpha","beta"[,"gamma"],"huber","n_points","allocation":{"a","b",
"G","N_coef","D_coef"}, "intervals", "warnings", "identifiable", "data_range", "derived",
...} (see megacpt.scaling and .intervals); for the CPT law B and beta are the paper's B' and
beta'.  `fit` prints its summary as JSON on stdout and each warning as a "warning:" line on
stderr; a fit whose design does not identify the law prints "not identifiable" for its
parameters and allocation.  CHECK.json: see megacpt.scaling.checks.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from . import checks, curves, diagnostics, fit as fitmod, intervals, laws
from .runs import Points, load_points

log = logging.getLogger("megacpt.scaling")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: {what} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: {what} must be a JSON object")
    return data


def _write_json(path: str, data: dict):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    log.info("wrote %s", path)


def _paths_points(paths, valid_name) -> Points:
    csvs = [p for p in paths if p.lower().endswith(".csv")]
    runs = [p for p in paths if not p.lower().endswith(".csv")]
    return load_points(csvs, runs, valid_name)


def _data_args(p, required=True):
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--input", nargs="+", metavar="FILE.csv", help="CSV with N,D,loss[,C][,run]")
    g.add_argument("--runs", nargs="+", metavar="DIR", help="run directories (metrics.jsonl)")
    p.add_argument("--valid-name", default=None,
                   help="validation set whose loss is fitted (default: the header's target)")


def _fit_args(p):
    p.add_argument("--init", choices=("grid", "optuna"), default="grid")
    p.add_argument("--optuna-trials", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)


def _base(path):
    base = _read_json(path, "--base fit")
    if base.get("law", "chinchilla") != "chinchilla":
        raise SystemExit(f"{path}: --base must be a from-scratch chinchilla fit, "
                         f"got law {base.get('law')!r}")
    return base


def _summary(result: dict) -> dict:
    """What `fit` prints: parameters (or "not identifiable"), allocation, intervals, warnings."""
    keys = ("E", "A", "B", "alpha", "beta", "gamma", "g", "huber", "n_points", "allocation",
            "allocation_error", "derived", "intervals", "identifiable", "warnings")
    out = {k: result[k] for k in keys if k in result}
    if result.get("identifiable") is False:
        for k in ("E", "A", "B", "alpha", "beta", "gamma"):
            if k in out and k not in result.get("inherited", []):
                out[k] = "not identifiable"
    return out


def _dumps(obj) -> str:
    """JSON with one key per line but short lists (intervals) kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]"
                  if m.group(1) else "[]", text)


def format_fit(result: dict) -> str:
    """A table for people: each parameter and derived quantity with its 95% interval."""
    if result.get("identifiable") is False:
        return f"{result['law']} fit: {result.get('allocation_error', 'not identifiable')}"
    iv = result.get("intervals") or {}
    rows = [(k, result[k]) for k in ("E", "A", "B", "alpha", "beta", "gamma", "g")
            if k in result]
    rows += [(k, v) for k, v in (result.get("derived") or {}).items()]
    lines = [f"{result['law']} fit ({result.get('n_points')} points): estimate and "
             f"95% interval" + ("" if iv else " (none: --bootstrap K)")]
    for k, v in rows:
        ci = iv.get(k)
        ci_s = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        inh = " (inherited, fixed)" if k in result.get("inherited", []) and k not in iv else ""
        lines.append(f"  {k:<20}{'-' if v is None else format(v, '.4g'):>12}  {ci_s}{inh}")
    return "\n".join(lines)


def _print_warnings(result: dict):
    for w in result.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)


def cmd_fit(args):
    pts = load_points(args.input, args.runs, args.valid_name)
    kw = {"init": args.init, "optuna_trials": args.optuna_trials, "seed": args.seed,
          "progress": True}
    base_pts = None
    if args.base_input or args.base_runs:
        if args.law != "cpt":
            raise SystemExit("--base-input/--base-runs are for --law cpt")
        if args.base:
            raise SystemExit("give --base FIT.json or --base-input/--base-runs, not both")
        base_pts = load_points(args.base_input, args.base_runs, args.valid_name)
    if args.law == "frontier":
        law = laws.frontier(not args.no_offset)
        result = curves.fit_frontier(pts, args.levels, offset=not args.no_offset, **kw)
        result["data"] = pts.source
        if args.bootstrap:
            fp = result["frontier_points"]
            result["bootstrap"] = fitmod.bootstrap(law, result, fp["loss"], C=fp["C"],
                                                   K=args.bootstrap, seed=args.seed,
                                                   progress=True)
            result["intervals"] = result["bootstrap"]["ci95"]
        result["warnings"] = diagnostics.frontier_warnings(result)
    else:
        if args.law == "cpt" and not (args.base or base_pts is not None):
            raise SystemExit("fit --law cpt needs --base FIT.json (a from-scratch fit, held "
                             "fixed) or --base-input/--base-runs (scratch data, refitted)")
        base = _base(args.base) if args.law == "cpt" and args.base else None
        result = intervals.fit_points(args.law, pts, base=base, base_points=base_pts,
                                      bootstrap=args.bootstrap, budgets=args.compute,
                                      fix_gamma=args.fix_gamma, **kw)
        if args.holdout_largest:
            result["holdout"] = checks.holdout_largest(
                args.law, pts, args.holdout_largest, base=base, base_points=base_pts,
                bootstrap=args.bootstrap, fix_gamma=args.fix_gamma,
                **{k: v for k, v in kw.items() if k != "progress"})
    _write_json(args.output, result)
    print(_dumps(_summary(result)))
    print(format_fit(result), file=sys.stderr)
    if "holdout" in result:
        print(checks.format_holdout(result["holdout"]), file=sys.stderr)
    _print_warnings(result)
    if args.plot:
        from . import plots

        if args.law == "frontier":
            plots.plot_loss_compute({"data": (pts, result)}, args.plot)
        else:
            plots.plot_fit(pts, result, args.plot)
        log.info("wrote %s (+ .pdf, .svg)", args.plot)


def cmd_allocate(args):
    params = _read_json(args.params, "--params")
    need = ["A", "B", "alpha", "beta"] + (["gamma"] if args.law == "cpt" else [])
    missing = [k for k in need if k not in params]
    if missing:
        raise SystemExit(f"{args.params}: allocation for the {args.law} law needs {need}; "
                         f"missing {missing}")
    if params.get("identifiable") is False:
        print(f"megacpt-fit allocate: {args.params}: no allocation: "
              f"{params.get('allocation_error', 'the fit is not identifiable')}",
              file=sys.stderr)
        return 1
    try:
        out = laws.allocation(params, args.law)
    except ValueError:
        gamma = params.get("gamma", 0.0) if args.law == "cpt" else 0.0
        print(f"megacpt-fit allocate: {args.params}: no finite compute-optimal allocation "
              f"(needs A, B, alpha > 0 and beta - gamma > 0; alpha = {params['alpha']:.4g}, "
              f"beta - gamma = {params['beta'] - gamma:.4g})", file=sys.stderr)
        return 1
    if args.compute:
        out.update(intervals.allocate_budgets(params, args.compute, args.law))
    print(_dumps(out))
    _print_warnings(out)
    return 0


def cmd_compare(args):
    pts = load_points(args.input, args.runs, args.valid_name)
    base = _base(args.base)
    kw = {"init": args.init, "optuna_trials": args.optuna_trials, "seed": args.seed}
    table = {}
    for name, law in (("chinchilla", laws.chinchilla()),
                      ("chinchilla_inherited", laws.cpt(base, gamma=0.0)),
                      ("cpt", laws.cpt(base))):
        r = fitmod.fit_law(law, pts.loss, N=pts.N, D=pts.D, source=pts.source, **kw)
        table[name] = {k: r[k] for k in ("E", "A", "B", "alpha", "beta", "gamma", "huber",
                                         "huber_mean", "rmse_log", "n_points") if k in r}
    out = {"data": pts.source, "base": args.base, "laws": table}
    print(f"{'law':<22}{'huber (sum)':>14}{'huber (mean)':>14}{'rmse log':>11}")
    for name, r in table.items():
        print(f"{name:<22}{r['huber']:>14.6g}{r['huber_mean']:>14.6g}{r['rmse_log']:>11.5f}")
    if args.output:
        _write_json(args.output, out)


def cmd_transfer(args):
    scratch = _paths_points(args.scratch, args.valid_name)
    cpt = _paths_points(args.cpt, args.valid_name)
    out = curves.transfer_metrics(scratch, cpt, args.levels)
    _write_json(args.output, out)
    print(json.dumps(out["summary"], indent=1))
    if args.plot:
        from . import plots

        plots.plot_transfer(out, args.plot)


def cmd_check(args):
    scratch = _paths_points(args.scratch, args.valid_name)
    cpt = _paths_points(args.cpt, args.valid_name)
    out = checks.consistency_check(scratch, cpt, _read_json(args.scratch_fit, "--scratch-fit"),
                                   _read_json(args.cpt_fit, "--cpt-fit"), n_levels=args.levels)
    _write_json(args.output, out)
    t = out["transfer"]
    print(f"FLOPs saved at equal loss: runs {t['median_empirical']:.1%} (median), laws "
          f"{t['median_law']:.1%}" if t["median_law"] is not None else
          "FLOPs saved at equal loss: the laws reach none of the runs' loss levels")
    for name, f in out["frontier"].items():
        print(f"{name} frontier: runs {checks._fmt_front(f['empirical_fit'])}, law "
              f"{checks._fmt_front(f['law_fit'])}")
    print("consistent" if not out["mismatch"] else "MISMATCH:\n  " + "\n  ".join(out["messages"]))
    if args.plot:
        from . import plots

        plots.plot_consistency(out, args.plot)
        log.info("wrote %s (+ .pdf, .svg)", args.plot)
    if not out["intervals"]:
        print("warning: no bootstrap samples in the fits: compared with a fixed tolerance "
              "(fit with --bootstrap K for intervals)", file=sys.stderr)


def cmd_plot(args):
    from . import plots

    def need(*names):
        missing = [n for n in names if not getattr(args, n.replace("-", "_"))]
        if missing:
            raise SystemExit(f"plot --kind {args.kind} needs " +
                             " ".join(f"--{n}" for n in missing))

    if args.kind == "fit":
        need("fit")
        if not (args.input or args.runs):
            raise SystemExit("plot --kind fit needs --input FILE.csv or --runs DIR")
        fit = _read_json(args.fit, "--fit")
        if "g" in fit:
            raise SystemExit(f"{args.fit} is a frontier fit: plot it with --kind compute")
        plots.plot_fit(load_points(args.input, args.runs, args.valid_name), fit, args.output)
    elif args.kind == "isoloss":
        need("scratch-fit", "cpt-fit")
        fits = {"scratch": _read_json(args.scratch_fit, "--scratch-fit"),
                "cpt": _read_json(args.cpt_fit, "--cpt-fit")}
        pts = {}
        if args.scratch and args.cpt:
            pts = {"scratch": _paths_points(args.scratch, args.valid_name),
                   "cpt": _paths_points(args.cpt, args.valid_name)}
        plots.plot_isoloss(fits, args.output, tuple(args.c_range), tuple(args.n_range), pts)
    elif args.kind == "compute":
        need("scratch", "cpt")
        sets = {}
        for name, paths in (("scratch", args.scratch), ("cpt", args.cpt)):
            pts = _paths_points(paths, args.valid_name)
            sets[name] = (pts, curves.fit_frontier(pts, args.levels))
        plots.plot_loss_compute(sets, args.output)
    else:
        if args.transfer:
            data = _read_json(args.transfer, "--transfer")
        else:
            need("scratch", "cpt")
            data = curves.transfer_metrics(_paths_points(args.scratch, args.valid_name),
                                           _paths_points(args.cpt, args.valid_name))
        plots.plot_transfer(data, args.output)
    log.info("wrote %s", args.output)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megacpt-fit", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a law (Huber on log-loss, grid/optuna + L-BFGS)")
    p.add_argument("--law", choices=laws.LAWS, required=True)
    _data_args(p)
    p.add_argument("--base", help="from-scratch FIT.json (cpt law: E, A, alpha inherited and "
                   "held fixed, also in the bootstrap)")
    p.add_argument("--base-input", nargs="+", metavar="FILE.csv",
                   help="cpt law: scratch points; the base is fitted on them and refitted in "
                        "every bootstrap resample")
    p.add_argument("--base-runs", nargs="+", metavar="DIR", help="cpt law: scratch run dirs "
                   "(as --base-input)")
    p.add_argument("--fix-gamma", type=float, default=None, help="cpt: hold gamma fixed")
    p.add_argument("--output", required=True, metavar="FIT.json")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="K cluster-bootstrap resamples (runs drawn with replacement) for 95%% "
                        "intervals (e.g. 200)")
    p.add_argument("--compute", nargs="+", type=float, metavar="C",
                   help="budgets (FLOPs) for N_opt, D_opt, L_opt, FLOPs saved and their "
                        "intervals (default: the largest compute in the data)")
    p.add_argument("--holdout-largest", type=int, default=0, metavar="K",
                   help="also fit without the K largest sizes and report how well it predicts "
                        "their curves")
    p.add_argument("--levels", type=int, default=30, help="frontier: compute levels")
    p.add_argument("--no-offset", action="store_true", help="frontier: fit A'/C^g only")
    p.add_argument("--plot", metavar="PNG")
    _fit_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("allocate", help="compute-optimal allocation from law parameters")
    p.add_argument("--law", choices=("chinchilla", "cpt"), required=True)
    p.add_argument("--params", required=True, metavar="PARAMS.json")
    p.add_argument("--compute", nargs="+", type=float, metavar="C",
                   help="budgets (FLOPs): N_opt, D_opt (with intervals when PARAMS.json has "
                        "bootstrap samples) and extrapolation beyond its data_range")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("compare", help="fit errors of Chinchilla vs CPT law on the same data")
    _data_args(p)
    p.add_argument("--base", required=True, help="from-scratch FIT.json")
    p.add_argument("--output", metavar="TABLE.json")
    _fit_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("transfer", help="transferred tokens and FLOPs saved at equal loss")
    p.add_argument("--scratch", nargs="+", required=True, metavar="PATH")
    p.add_argument("--cpt", nargs="+", required=True, metavar="PATH")
    p.add_argument("--valid-name", default=None)
    p.add_argument("--levels", type=int, default=20, help="loss levels per pair")
    p.add_argument("--output", required=True, metavar="TRANSFER.json")
    p.add_argument("--plot", metavar="PNG")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("check", help="law-implied vs empirical transfer and frontiers")
    p.add_argument("--scratch", nargs="+", required=True, metavar="PATH")
    p.add_argument("--cpt", nargs="+", required=True, metavar="PATH")
    p.add_argument("--scratch-fit", required=True, metavar="FIT.json")
    p.add_argument("--cpt-fit", required=True, metavar="FIT.json")
    p.add_argument("--valid-name", default=None)
    p.add_argument("--levels", type=int, default=20, help="loss levels per pair")
    p.add_argument("--output", required=True, metavar="CHECK.json")
    p.add_argument("--plot", metavar="PNG", help="runs vs laws figure (+ PDF and SVG beside)")
    p.set_defaults(func=cmd_check)

    _add_plot_parser(sub)
    return ap


def _add_plot_parser(sub):
    p = sub.add_parser("plot", help="figures: fit, isoloss, compute, transfer")
    p.add_argument("--kind", choices=("fit", "isoloss", "compute", "transfer"), required=True)
    p.add_argument("--output", required=True, metavar="PNG")
    _data_args(p, required=False)
    p.add_argument("--fit", metavar="FIT.json", help="kind fit")
    p.add_argument("--scratch-fit", metavar="FIT.json", help="kind isoloss")
    p.add_argument("--cpt-fit", metavar="FIT.json", help="kind isoloss")
    p.add_argument("--scratch", nargs="+", metavar="PATH", help="kinds compute, transfer")
    p.add_argument("--cpt", nargs="+", metavar="PATH", help="kinds compute, transfer")
    p.add_argument("--transfer", metavar="TRANSFER.json", help="kind transfer")
    p.add_argument("--levels", type=int, default=30, help="kind compute: frontier levels")
    p.add_argument("--c-range", nargs=2, type=float, default=(1e17, 1e23))
    p.add_argument("--n-range", nargs=2, type=float, default=(1e7, 1e11))
    p.set_defaults(func=cmd_plot)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megacpt-fit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
