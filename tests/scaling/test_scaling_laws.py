"""Law forms, the LSE objective against an independent reference, and compute allocation."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import huber

from megacpt.scaling import allocation, chinchilla, cpt, frontier, optimal_allocation, predict
from megacpt.scaling.cli import main
from megacpt.scaling.fit import evaluate, residuals

# the paper's Table 2a
PAPER_SCRATCH = {"E": 1.55, "A": 420.0, "B": 719.5, "alpha": 0.40, "beta": 0.30}
PAPER_CPT = {"E": 1.55, "A": 420.0, "B": 433.3, "alpha": 0.40, "beta": 0.20, "gamma": 0.08}


def test_allocation_matches_paper_table_2b():
    s = allocation(PAPER_SCRATCH)
    assert s["N_coef"] == pytest.approx(0.324, abs=5e-4)
    assert s["a"] == pytest.approx(0.429, abs=5e-4)
    assert s["D_coef"] == pytest.approx(0.514, abs=5e-4)
    assert s["b"] == pytest.approx(0.571, abs=5e-4)
    c = allocation(PAPER_CPT)
    assert c["N_coef"] == pytest.approx(4.79, abs=5e-3)
    assert c["a"] == pytest.approx(0.385, abs=5e-4)
    assert c["D_coef"] == pytest.approx(0.035, abs=5e-4)
    assert c["b"] == pytest.approx(0.615, abs=5e-4)


@pytest.mark.parametrize("params", [PAPER_SCRATCH, PAPER_CPT])
def test_allocation_is_the_constrained_optimum(params):
    """N_opt(C) minimises L(N, C/(6N)) over N (brute force), and 6 N_opt D_opt = C."""
    for C in (1e19, 1e22):
        n_opt, d_opt = optimal_allocation(params, C)
        assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-9)
        grid = np.geomspace(n_opt / 30, n_opt * 30, 200001)
        brute = grid[np.argmin(predict(params, N=grid, D=C / (6 * grid)))]
        assert brute == pytest.approx(n_opt, rel=1e-3)


def test_allocation_rejects_no_optimum():
    with pytest.raises(ValueError, match="beta - gamma > 0"):
        allocation({**PAPER_CPT, "gamma": 0.3})
    with pytest.raises(ValueError, match="missing"):
        allocation({"A": 1.0, "B": 2.0, "alpha": 0.3}, "chinchilla")


def test_allocate_cli(tmp_path, capsys):
    params = tmp_path / "cpt.json"
    params.write_text(json.dumps(PAPER_CPT))
    assert main(["allocate", "--law", "cpt", "--params", str(params)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["N_coef"] == pytest.approx(4.79, abs=5e-3)
    assert out["D_coef"] == pytest.approx(0.035, abs=5e-4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"A": 1.0}))
    with pytest.raises(SystemExit, match="bad.json.*missing"):
        main(["allocate", "--law", "chinchilla", "--params", str(bad)])


def test_tool_wrapper_runs(tmp_path):
    params = tmp_path / "s.json"
    params.write_text(json.dumps(PAPER_SCRATCH))
    out = subprocess.run([sys.executable, "tools/fit_scaling_law.py", "allocate", "--law",
                          "chinchilla", "--params", str(params)], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["N_coef"] == pytest.approx(0.324, abs=5e-4)


def test_package_imports_neither_torch_nor_matplotlib():
    code = ("import sys, megacpt.scaling, megacpt.scaling.cli; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _data(rng, n=40):
    N = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n))
    D = np.exp(rng.uniform(np.log(1e8), np.log(1e12), n))
    return N, D


@pytest.mark.parametrize("law,params", [(chinchilla(), PAPER_SCRATCH),
                                        (cpt(PAPER_SCRATCH), PAPER_CPT),
                                        (cpt(PAPER_SCRATCH, gamma=0.05),
                                         {**PAPER_CPT, "gamma": 0.05}),
                                        (frontier(), {"E": 1.2, "A": 33.7, "g": 0.058})])
def test_design_reproduces_predict(law, params):
    rng = np.random.default_rng(1)
    N, D = _data(rng)
    data = {"C": 6 * N * D} if law.name == "frontier" else {"N": N, "D": D}
    theta = law.to_theta(params)
    loss = predict(params, **data)
    assert np.abs(residuals(theta, law.design(**data), np.log(loss))).max() < 1e-12
    back = law.to_natural(theta)
    for k, v in params.items():
        assert back[k] == pytest.approx(v, rel=1e-12)


def test_objective_matches_reference_and_gradient():
    """f = sum scipy huber(1e-3, log L_hat - log L); gradient vs central differences."""
    rng = np.random.default_rng(2)
    N, D = _data(rng)
    law = chinchilla()
    design = law.design(N=N, D=D)
    loss = predict(PAPER_SCRATCH, N=N, D=D) * np.exp(rng.normal(0, 0.01, N.size))
    logl = np.log(loss)
    thetas = law.to_theta(PAPER_SCRATCH) + rng.normal(0, 0.05, (4, 5))
    f, g, H = evaluate(thetas, design, logl, np.ones(N.size))
    for th, fi, gi, Hi in zip(thetas, f, g, H):
        p = law.to_natural(th)
        ref = huber(1e-3, np.log(predict(p, N=N, D=D)) - logl).sum()
        assert fi == pytest.approx(ref, rel=1e-10)
        eps = 1e-6
        fd = [(evaluate((th + eps * e)[None], design, logl, np.ones(N.size), order=0)[0]
               - evaluate((th - eps * e)[None], design, logl, np.ones(N.size), order=0)[0])
              / (2 * eps) for e in np.eye(5)]
        assert np.allclose(gi, fd, rtol=1e-4, atol=1e-9)
        assert np.linalg.eigvalsh(Hi).min() > -1e-9 * np.abs(Hi).max()  # IRLS curvature: PSD
    f32 = evaluate(thetas.astype(np.float32), design, logl, np.ones(N.size), order=0)
    assert f32.dtype == np.float32 and np.allclose(f32, f, rtol=1e-3)


def test_cpt_needs_base():
    with pytest.raises(ValueError, match="inherits E, A and alpha"):
        cpt({"E": 1.5})
