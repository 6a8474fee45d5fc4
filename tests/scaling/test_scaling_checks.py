"""Checking laws against runs: held-out largest sizes, law-implied vs empirical transfer."""
import json

import numpy as np
import pytest

from megacpt.scaling import chinchilla, fit_law, predict
from megacpt.scaling.checks import consistency_check, holdout_largest
from megacpt.scaling.cli import main
from megacpt.scaling.intervals import fit_points
from megacpt.scaling.runs import Points

from scaling_synth import CPT, GRID_C, GRID_S, SCRATCH, synth_points

SIZES = np.geomspace(1e7, 3e9, 10)


def _pts(params, seed, label, run_sd=0.003):
    return synth_points(np.random.default_rng(seed), params, SIZES, run_sd=run_sd,
                        point_sd=0.001, label=label)


def test_holdout_predicts_largest_sizes():
    pts = _pts(SCRATCH, 0, "scratch")
    h = holdout_largest("chinchilla", pts, 2, bootstrap=60, n_starts=1, init=GRID_S)
    assert h["heldout_sizes"] == pytest.approx(list(SIZES[-2:]))
    assert len(h["train_sizes"]) == 8 and len(h["per_size"]) == 2
    assert h["rmse_log"] < 0.02 and h["inside_band"] is not None
    # a law that bends away at large N: predicting the held-out sizes fails visibly
    bent = Points(pts.N, pts.D, pts.loss * np.where(pts.N > 1e9, 1.05, 1.0), pts.C, pts.group)
    hb = holdout_largest("chinchilla", bent, 2, init=GRID_S)
    assert hb["per_size"][-1]["bias_log"] > 0.03 and hb["rmse_log"] > 2 * h["rmse_log"]
    with pytest.raises(ValueError, match="fewer than 3 sizes"):
        holdout_largest("chinchilla", pts, 8)


def test_consistency_check_agrees_on_data_from_the_laws():
    s, c = _pts(SCRATCH, 1, "scratch"), _pts(CPT, 2, "cpt")
    fs = fit_points("chinchilla", s, bootstrap=60, n_starts=1, init=GRID_S)
    fc = fit_points("cpt", c, base_points=s, bootstrap=60, n_starts=1, init=GRID_C,
                    base_init=GRID_S)
    out = consistency_check(s, c, fs, fc)
    assert out["intervals"] and not out["mismatch"], out["messages"]
    assert out["transfer"]["fraction_outside"] < 0.5
    for f in out["frontier"].values():
        assert f["fraction_outside"] < 0.5 and len(f["C"]) >= 5


def test_consistency_check_flags_a_law_that_contradicts_the_runs(tmp_path, capsys):
    """Runs where CPT saves compute everywhere against the paper's Table 2a CPT law, which
    predicts CPT losing to scratch beyond a few tokens per parameter."""
    s = _pts(SCRATCH, 3, "scratch")
    head_start = 5.0  # CPT curve = scratch curve 5 tokens/param further on
    c = Points(s.N, s.D, predict(SCRATCH, N=s.N, D=s.D + head_start * s.N) *
               s.loss / predict(SCRATCH, N=s.N, D=s.D), s.C,
               np.array([g.replace("scratch", "cpt") for g in s.group], dtype=object))
    fs = fit_law(chinchilla(), s.loss, N=s.N, D=s.D, init=GRID_S)
    fc = {**CPT, "law": "cpt"}
    out = consistency_check(s, c, fs, fc)
    assert out["mismatch"] and not out["intervals"]
    assert out["transfer"]["median_empirical"] > 0.2 > out["transfer"]["median_law"]
    assert any(m.startswith("transfer mismatch") for m in out["messages"])
    # the CLI: fit files in, CHECK.json out, a readable verdict
    paths = {}
    for name, obj in (("s", fs), ("c", fc)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    for name, pts in (("s", s), ("c", c)):
        with open(tmp_path / f"{name}.csv", "w") as fh:
            fh.write("run,N,D,loss\n")
            fh.writelines(f"{g},{float(n)!r},{float(d)!r},{float(l)!r}\n"
                          for g, n, d, l in zip(pts.group, pts.N, pts.D, pts.loss))
    assert main(["check", "--scratch", str(tmp_path / "s.csv"), "--cpt", str(tmp_path / "c.csv"),
                 "--scratch-fit", str(paths["s"]), "--cpt-fit", str(paths["c"]),
                 "--output", str(tmp_path / "check.json")]) == 0
    printed = capsys.readouterr().out
    assert "MISMATCH" in printed and "transfer mismatch" in printed
    assert json.loads((tmp_path / "check.json").read_text())["mismatch"] is True


def test_fit_cli_holdout(tmp_path, capsys):
    s = _pts(SCRATCH, 4, "scratch")
    csv = tmp_path / "s.csv"
    with open(csv, "w") as fh:
        fh.write("run,N,D,loss\n")
        fh.writelines(f"{g},{float(n)!r},{float(d)!r},{float(l)!r}\n"
                      for g, n, d, l in zip(s.group, s.N, s.D, s.loss))
    out = tmp_path / "fit.json"
    assert main(["fit", "--law", "chinchilla", "--input", str(csv), "--output", str(out),
                 "--holdout-largest", "2"]) == 0
    fit = json.loads(out.read_text())
    assert fit["holdout"]["k"] == 2 and fit["holdout"]["rmse_log"] < 0.02
    assert "predicting the 2 largest" in capsys.readouterr().err
