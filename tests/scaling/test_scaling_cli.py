"""CLI end to end on synthetic runs; transfer metrics against curves with a known answer."""
import json

import numpy as np
import pytest

from megacpt.scaling import read_points_csv, transfer_metrics
from megacpt.scaling.cli import main

SHIFT = {1e8: 5e8, 4e8: 2e9}  # CPT curve = scratch curve shifted by this many tokens


def _write_curves(path, shifted):
    """Scratch L = 2 + 300 / D^0.3 per size; CPT: the same at D + SHIFT[N] tokens."""
    D = np.geomspace(1e7, 1e10, 80)
    with open(path, "w") as fh:
        fh.write("run,N,D,loss\n")
        for N, d0 in SHIFT.items():
            loss = 2 + 300 / (D + (d0 if shifted else 0)) ** 0.3
            fh.writelines(f"{'cpt' if shifted else 'scratch'}-{N:.0e},{N!r},{d:.17g},{l:.17g}\n"
                          for d, l in zip(D, loss))
    return str(path)


def test_transfer_recovers_known_shift(tmp_path):
    scratch = _write_curves(tmp_path / "scratch.csv", False)
    cpt = _write_curves(tmp_path / "cpt.csv", True)
    out = tmp_path / "transfer.json"
    assert main(["transfer", "--scratch", scratch, "--cpt", cpt, "--output", str(out),
                 "--levels", "15"]) == 0
    res = json.loads(out.read_text())
    assert len(res["pairs"]) == 2
    for pair in res["pairs"]:
        d0 = SHIFT[pair["N"]]
        d_s, d_c = np.array(pair["D_scratch"]), np.array(pair["D_cpt"])
        assert np.allclose(np.array(pair["transferred_tokens"]), d0, rtol=0.01)
        assert np.allclose(pair["flops_saved"], d0 / d_s, rtol=0.01, atol=1e-3)
        assert np.allclose(pair["C_cpt"], 6 * pair["N"] * d_c, rtol=1e-6)
        # the levels are losses both curves reach, and the CPT run needs fewer tokens
        assert np.all(d_c < d_s) and np.all(np.diff(pair["loss"]) < 0)
    s = res["summary"]
    assert 0 < s["flops_saved_min"] < s["flops_saved_median"] < s["flops_saved_max"] < 1


def test_transfer_needs_matching_sizes(tmp_path):
    scratch = read_points_csv(_write_curves(tmp_path / "scratch.csv", False))
    cpt = read_points_csv(_write_curves(tmp_path / "cpt.csv", True))
    only_small = scratch.select(scratch.N == 1e8)
    with pytest.raises(ValueError, match=r"N=4e\+08\) has no from-scratch curve"):
        transfer_metrics(only_small, cpt)


def test_fit_cpt_compare_and_plots(study_dir, tmp_path, capsys):
    scratch_fit, cpt_fit = tmp_path / "scratch.json", tmp_path / "cpt.json"
    scratch, cpt = str(study_dir / "scratch"), str(study_dir / "cpt")
    fig_fit = tmp_path / "fit.png"
    assert main(["fit", "--law", "chinchilla", "--runs", scratch, "--output", str(scratch_fit),
                 "--plot", str(fig_fit)]) == 0
    s = json.loads(scratch_fit.read_text())
    assert s["law"] == "chinchilla" and s["n_points"] == 56
    assert set(s["allocation"]) == {"a", "b", "G", "N_coef", "D_coef"}
    assert main(["fit", "--law", "cpt", "--runs", cpt, "--base", str(scratch_fit),
                 "--output", str(cpt_fit), "--bootstrap", "8"]) == 0
    c = json.loads(cpt_fit.read_text())
    assert c["A"] == s["A"] and c["gamma"] == pytest.approx(0.08, abs=0.01)
    assert set(c["intervals"]) >= {"B", "beta", "gamma", "a", "N_coef", "N_opt@7.86e+20"}
    assert c["bootstrap"]["method"].startswith("cluster") and not c["bootstrap"]["base_refit"]
    assert any("hold the base's E, A, alpha fixed" in w for w in c["warnings"])
    # the base refitted per resample from the scratch runs: E, A, alpha get intervals too
    refit = tmp_path / "cpt_refit.json"
    capsys.readouterr()
    assert main(["fit", "--law", "cpt", "--runs", cpt, "--base-runs", scratch,
                 "--output", str(refit), "--bootstrap", "8", "--compute", "1e20", "1e21"]) == 0
    r = json.loads(refit.read_text())
    assert r["bootstrap"]["base_refit"] and r["base"]["alpha"] == pytest.approx(s["alpha"])
    assert {"alpha", "E", "base_beta", "flops_saved@1e+21", "D_opt@1e+20"} <= set(r["intervals"])
    assert not any("hold the base" in w for w in r["warnings"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["intervals"]["gamma"] == r["intervals"]["gamma"]

    assert main(["compare", "--runs", cpt, "--base", str(scratch_fit),
                 "--output", str(tmp_path / "table.json")]) == 0
    table = json.loads((tmp_path / "table.json").read_text())["laws"]
    assert table["cpt"]["huber"] < table["chinchilla_inherited"]["huber"]
    assert "chinchilla_inherited" in capsys.readouterr().out

    front = tmp_path / "front.json"
    assert main(["fit", "--law", "frontier", "--runs", scratch, "--output", str(front),
                 "--levels", "12"]) == 0
    assert 0 < json.loads(front.read_text())["g"] < 1

    figs = {"isoloss": ["--scratch-fit", str(scratch_fit), "--cpt-fit", str(cpt_fit),
                        "--scratch", scratch, "--cpt", cpt],
            "compute": ["--scratch", scratch, "--cpt", cpt, "--levels", "12"],
            "transfer": ["--scratch", scratch, "--cpt", cpt]}
    for kind, extra in figs.items():
        assert main(["plot", "--kind", kind, "--output", str(tmp_path / f"{kind}.png")]
                    + extra) == 0
    for name in ("fit", "isoloss", "compute", "transfer"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in (tmp_path / f"{name}.svg").read_bytes()[:2000]


def test_cli_errors(tmp_path, study_dir, capsys):
    with pytest.raises(SystemExit, match="needs --base"):
        main(["fit", "--law", "cpt", "--runs", str(study_dir / "cpt"),
              "--output", str(tmp_path / "x.json")])
    bad = tmp_path / "few.csv"
    bad.write_text("N,D,loss\n1e8,1e9,3\n2e8,1e9,2.9\n")
    assert main(["fit", "--law", "chinchilla", "--input", str(bad),
                 "--output", str(tmp_path / "x.json")]) == 2
    assert "needs more points" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --scratch-fit --cpt-fit"):
        main(["plot", "--kind", "isoloss", "--output", str(tmp_path / "x.png")])
