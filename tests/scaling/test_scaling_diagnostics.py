"""Warnings: designs that do not identify the law, implausible values, extrapolation."""
import json

import numpy as np
import pytest

from megacpt.scaling.cli import main
from megacpt.scaling.diagnostics import extrapolation, plausibility
from megacpt.scaling.runs import Points

from scaling_synth import CPT, SCRATCH, synth_points


def _write_csv(path, pts: Points):
    with open(path, "w") as fh:
        fh.write("run,N,D,loss\n")
        fh.writelines(f"{g},{float(n)!r},{float(d)!r},{float(l)!r}\n"
                      for g, n, d, l in zip(pts.group, pts.N, pts.D, pts.loss))
    return str(path)


def test_final_points_only_is_not_identifiable(tmp_path, capsys):
    """One budget per size at 20 tokens/parameter: N and D terms are collinear."""
    rng = np.random.default_rng(0)
    pts = synth_points(rng, SCRATCH, np.geomspace(1e7, 3e9, 12), n_ckpt=1, tpp=(20, 20))
    csv, out = _write_csv(tmp_path / "final.csv", pts), tmp_path / "fit.json"
    assert main(["fit", "--law", "chinchilla", "--input", csv, "--output", str(out)]) == 0
    fit = json.loads(out.read_text())
    assert fit["identifiable"] is False and fit["allocation"] is None
    assert fit["allocation_error"].startswith("not identifiable")
    assert any("not identifiable" in w and "one budget per size" in w for w in fit["warnings"])
    cap = capsys.readouterr()
    printed = json.loads(cap.out)
    assert printed["alpha"] == printed["A"] == "not identifiable"
    assert "warning: not identifiable" in cap.err
    assert main(["allocate", "--law", "chinchilla", "--params", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not identifiable" in err[0]


def test_few_sizes_and_data_range(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pts = synth_points(rng, SCRATCH, np.geomspace(1e7, 1e9, 4))
    csv, out = _write_csv(tmp_path / "four.csv", pts), tmp_path / "fit.json"
    assert main(["fit", "--law", "chinchilla", "--input", csv, "--output", str(out)]) == 0
    fit = json.loads(out.read_text())
    assert fit["identifiable"] is True
    assert any("only 4 model sizes" in w for w in fit["warnings"])
    assert any("no intervals" in w for w in fit["warnings"])
    assert fit["data_range"]["N"] == [pytest.approx(1e7), pytest.approx(1e9)]
    assert fit["data_range"]["C"][1] == pytest.approx(pts.C.max())
    # allocate at 100x the largest compute: flagged with its factor
    capsys.readouterr()
    C = 100 * float(pts.C.max())
    assert main(["allocate", "--law", "chinchilla", "--params", str(out),
                 "--compute", repr(C)]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["N_opt"][0] == pytest.approx(res["N_coef"] * C ** res["a"], rel=1e-9)
    assert "100x beyond the largest compute" in cap.err
    assert any("100x beyond" in w for w in res["warnings"])


def test_allocate_without_finite_optimum_prints_one_line(tmp_path, capsys):
    p = tmp_path / "cpt.json"
    p.write_text(json.dumps({**CPT, "gamma": 0.3}))
    assert main(["allocate", "--law", "cpt", "--params", str(p)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finite compute-optimal allocation" in err[0]
    assert "beta - gamma = -0.1" in err[0]


def test_plausibility_and_extrapolation_messages():
    assert plausibility(SCRATCH, "chinchilla") == []
    assert plausibility(CPT, "cpt") == []
    bad = plausibility({**SCRATCH, "alpha": -0.1, "beta": 3.57, "A": 8.6e25}, "chinchilla")
    assert any("negative exponent: alpha" in m for m in bad)
    assert any("implausible exponent: beta = 3.57" in m for m in bad)
    assert any("implausible coefficient A" in m for m in bad)
    assert any("no finite" in m for m in plausibility({**CPT, "gamma": 0.25}, "cpt"))
    rng_ = {"N": [1e7, 1e9], "D": [1e8, 1e10], "C": [1e16, 1e19]}
    assert extrapolation(rng_, [1e18], [1e8], [1e9]) == []
    msg = extrapolation(rng_, [2.5e20], [2e10], [1e9])
    assert len(msg) == 1 and "25x beyond" in msg[0] and "20x above the data's N range" in msg[0]
