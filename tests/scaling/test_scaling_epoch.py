"""Epoch AI's replication of Chinchilla's approach 3 (Besiroglu et al. 2024) on their public data.

The data (245 points read off Hoffmann et al.'s Figure 4) is not ours to commit: it lives in
shared/data/scaling beside the repository (or $MEGACPT_SCALING_DATA); the test skips without
it.  Procedure and published numbers: that folder's README.
"""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megacpt.scaling.cli import main

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MEGACPT_SCALING_DATA", REPO.parent / "shared" / "data" / "scaling"))
CSV = DATA / "chinchilla_svg_extracted_data.csv"

# Epoch's grid result and 95% bootstrap intervals
EPOCH = {"A": 477.84, "B": 2143.86, "E": 1.8172, "alpha": 0.3473, "beta": 0.3672}
EPOCH_OBJECTIVE = 0.00101827
EPOCH_CI = {"A": (285, 744), "B": (1042, 5810), "E": (1.769, 1.871), "alpha": (0.317, 0.373),
            "beta": (0.331, 0.415)}

pytestmark = pytest.mark.skipif(not CSV.is_file(), reason=f"Epoch's data not found at {DATA}")


@pytest.fixture(scope="module")
def epoch_csv(tmp_path_factory):
    """Their points as our N,D,loss CSV, minus the 5 highest losses (Epoch's procedure)."""
    with open(CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss, kind="stable")[:-5])
    out = tmp_path_factory.mktemp("epoch") / "chinchilla_points.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["N", "D", "loss", "C"])
        for i in keep:
            w.writerow([repr(float(x)) for x in (N[i], C[i] / (6 * N[i]), loss[i], C[i])])
    return out


def test_fit_lands_on_epochs_grid_result(epoch_csv, tmp_path, capsys):
    out = tmp_path / "fit.json"
    rc = main(["fit", "--law", "chinchilla", "--input", str(epoch_csv), "--output", str(out),
               "--bootstrap", "30", "--seed", "1"])
    assert rc == 0
    fit = json.loads(out.read_text())
    assert fit["n_points"] == 240 and fit["n_starts"] == 4500
    assert fit["huber"] == pytest.approx(EPOCH_OBJECTIVE, rel=2e-5)
    assert fit["E"] == pytest.approx(EPOCH["E"], abs=2e-4)
    assert fit["alpha"] == pytest.approx(EPOCH["alpha"], abs=2e-4)
    assert fit["beta"] == pytest.approx(EPOCH["beta"], abs=2e-4)
    assert fit["A"] == pytest.approx(EPOCH["A"], rel=2e-3)
    assert fit["B"] == pytest.approx(EPOCH["B"], rel=2e-3)
    for k, (lo, hi) in EPOCH_CI.items():
        assert lo < fit[k] < hi
    # a = beta / (alpha + beta) = 0.513 (SE 0.020) in Epoch's bootstrap
    assert fit["allocation"]["a"] == pytest.approx(0.513, abs=2e-3)
    bs = fit["bootstrap"]
    assert 0.01 < bs["se"]["a"] < 0.04
    assert fit["identifiable"] and fit["warnings"] == []
    for k in ("E", "alpha", "beta"):
        lo, hi = fit["intervals"][k]
        assert lo < fit[k] < hi
        assert lo < EPOCH_CI[k][1] and hi > EPOCH_CI[k][0]  # intervals overlap Epoch's
    printed = json.loads(capsys.readouterr().out)
    assert printed["alpha"] == fit["alpha"]
