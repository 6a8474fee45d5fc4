"""Run a scaling study of cross-lingual CPT from a YAML config, then fit and report.

    python tools/run_study.py --config examples/study_tiny.yaml [--out DIR]
                              [--launch local|print|slurm] [--dry-run] [--fit-only]
                              [--prepare-data] [--prepare-run NAME] [--evaluate-run NAME]

`launch: local` trains every unfinished run here, one after another; `launch: print` writes
`OUT/commands.sh` for a cluster scheduler; `launch: slurm` writes and submits one sbatch job
array per stage with dependencies (`--dry-run`: write the scripts only). Finished runs are
always skipped, so running the command again resumes a study. Once every run has finished it
scores every final checkpoint on the config's `downstream:` tasks (`run_dir/eval.json`, kept
when current) and writes `OUT/fits/*.json`, `OUT/plots/*.png`, `OUT/results.json` and
`OUT/report.md`. The
config format, the planned runs and the analysis are described in `megacpt.study`.
Exit codes: 0 done (or commands written / jobs submitted), 1 a run failed, 2 bad config.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt import study  # noqa: E402
from megacpt.study.report import make_plots, write_all, write_report  # noqa: E402,F401

log = logging.getLogger("megacpt.study")
TOOL = os.path.abspath(__file__)


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="study YAML (see megacpt.study)")
    ap.add_argument("--out", help="output directory (overrides the config's out_dir)")
    ap.add_argument("--launch", choices=study.LAUNCH, help="overrides the config's launch")
    ap.add_argument("--dry-run", action="store_true",
                    help="slurm: write the sbatch scripts, submit nothing")
    ap.add_argument("--fit-only", action="store_true",
                    help="run nothing; fit and report (every run must be finished)")
    ap.add_argument("--prepare-data", action="store_true",
                    help="only prepare the data (tokenizer, binaries, held-out samples)")
    ap.add_argument("--prepare-run", metavar="NAME",
                    help="only prepare run NAME (a cooldown branch: link its start checkpoint)")
    ap.add_argument("--evaluate-run", metavar="NAME",
                    help="only score run NAME's final checkpoint on the config's downstream "
                         "tasks (run_dir/eval.json; print/slurm commands run it after training)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    try:
        cfg = study.load_config(args.config, args.out, args.launch)
        runs = study.plan_runs(cfg, study.vocab_size(cfg))
        study.check_plan(cfg, runs)
        named = {r.name: r for r in runs}
        for name in (args.prepare_run, args.evaluate_run):
            if name and name not in named:
                raise study.StudyConfigError(f"{cfg.path}: no run named {name!r}")
    except (study.StudyConfigError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    try:
        if args.prepare_data or args.prepare_run or args.evaluate_run:
            if args.prepare_data:
                study.prepare_data(cfg)
            if args.prepare_run:
                study.prepare_run(named[args.prepare_run])
            if args.evaluate_run:
                study.evaluate_run(cfg, named[args.evaluate_run], force=True)
            return 0
        log.info("study %s: %d runs planned (%d finished) in %s", cfg.name, len(runs),
                 sum(study.run_finished(r) for r in runs), cfg.out_dir)
        left = [r.name for r in runs if not study.run_finished(r)]
        if not args.fit_only and left:
            if cfg.launch == "print":
                path = study.write_commands(cfg, runs, TOOL)
                print(open(path, encoding="utf-8").read())
                log.info("wrote %s; %d runs to go. Launch them, then run this again to fit.",
                         path, len(left))
                return 0
            if cfg.launch == "slurm":
                from megacpt.study import slurm

                jobs = slurm.submit(cfg, runs, TOOL, dry_run=args.dry_run)
                log.info("%s %d sbatch scripts in %s; %d runs to go", "wrote" if args.dry_run
                         else "submitted", len(jobs), os.path.join(cfg.out_dir, "slurm"),
                         len(left))
                return 0
            study.prepare_data(cfg)
            study.run_local(cfg, runs)
        study.evaluate_pending(cfg, runs)  # runs finished elsewhere or before it was configured
        results = study.analyze(cfg, runs)
    except RuntimeError as e:
        log.error("error: %s", e)
        return 1
    report = write_all(cfg, results)
    log.info("wrote %s, results.json, fits/ and plots/", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
