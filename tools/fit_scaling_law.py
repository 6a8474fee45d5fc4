#!/usr/bin/env python
"""Fit scaling laws from runs or CSV points: a thin wrapper around `megacpt.scaling.cli`.

    python tools/fit_scaling_law.py fit --law chinchilla --runs runs/scratch-* --output fit.json
    python tools/fit_scaling_law.py allocate --law cpt --params cpt_fit.json

Same as the `megacpt-fit` console script; run with --help for every subcommand.
"""
import sys

from megacpt.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
