"""Fitting: recovery of known parameters from noisy synthetic runs, bootstrap, bad input."""
import numpy as np
import pytest

from megacpt.scaling import (bootstrap, chinchilla, cpt, fit_frontier, fit_law, frontier,
                             load_runs, points_from_runs, predict)
from megacpt.scaling.fit import evaluate, init_grid, polish

from scaling_synth import CPT, SCRATCH


@pytest.fixture(scope="module")
def scratch_points(study_dir):
    return points_from_runs(load_runs(study_dir / "scratch"))


@pytest.fixture(scope="module")
def scratch_fit(scratch_points):
    p = scratch_points
    return fit_law(chinchilla(), p.loss, N=p.N, D=p.D, source=p.source)


def test_chinchilla_grid_is_epochs(scratch_points):
    grid = init_grid(chinchilla())
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 0])) == [0, 5, 10, 15, 20, 25]  # a
    assert sorted(set(grid[:, 2])) == [-1, -0.5, 0, 0.5, 1]  # e
    assert sorted(set(grid[:, 3])) == [0, 0.5, 1, 1.5, 2]  # alpha


def test_recovers_chinchilla_from_noisy_runs(scratch_points, scratch_fit):
    p, fit = scratch_points, scratch_fit
    assert fit["n_points"] == len(p) == 56
    assert fit["E"] == pytest.approx(SCRATCH["E"], rel=0.02)
    assert fit["alpha"] == pytest.approx(SCRATCH["alpha"], abs=0.02)
    assert fit["beta"] == pytest.approx(SCRATCH["beta"], abs=0.01)
    assert np.log(fit["A"]) == pytest.approx(np.log(SCRATCH["A"]), abs=0.25)
    assert np.log(fit["B"]) == pytest.approx(np.log(SCRATCH["B"]), abs=0.15)
    # the data were drawn with 0.2% noise: the fit explains them that well
    assert fit["rmse_log"] < 0.003
    # no better optimum nearby: L-BFGS from a perturbed optimum does not go lower
    law, design = chinchilla(), chinchilla().design(N=p.N, D=p.D)
    ones = np.ones(len(p))
    for shift in (0.05, -0.05):
        _, f = polish(np.array(fit["theta"]) + shift, design, np.log(p.loss), ones)
        assert f >= fit["huber"] * (1 - 1e-9)
    true = evaluate(law.to_theta(SCRATCH)[None], design, np.log(p.loss), ones, order=0)[0]
    assert fit["huber"] <= true
    assert fit["allocation"]["a"] == pytest.approx(0.3 / 0.7, abs=0.03)


def test_recovers_cpt_extension(study_dir, scratch_fit):
    p = points_from_runs(load_runs(study_dir / "cpt"))
    fit = fit_law(cpt(scratch_fit), p.loss, N=p.N, D=p.D)
    for k in ("E", "A", "alpha"):
        assert fit[k] == scratch_fit[k]  # inherited, not refitted
    assert fit["beta"] == pytest.approx(CPT["beta"], abs=0.01)
    assert fit["gamma"] == pytest.approx(CPT["gamma"], abs=0.01)
    assert np.log(fit["B"]) == pytest.approx(np.log(CPT["B"]), abs=0.15)
    assert fit["inherited"] == ["A", "E", "alpha"]
    # the Chinchilla form with inherited E, A, alpha (gamma = 0) fits this data worse
    fixed = fit_law(cpt(scratch_fit, gamma=0.0), p.loss, N=p.N, D=p.D)
    assert fixed["gamma"] == 0.0 and fixed["huber"] > 3 * fit["huber"]


def test_bootstrap_intervals_cover_truth(scratch_points, scratch_fit):
    p = scratch_points
    bs = bootstrap(chinchilla(), scratch_fit, p.loss, N=p.N, D=p.D, K=40, seed=3)
    assert bs["K"] == 40
    for k in ("E", "alpha", "beta"):
        lo, hi = bs["ci95"][k]
        assert lo < scratch_fit[k] < hi
        assert lo < SCRATCH[k] * 1.02 and hi > SCRATCH[k] * 0.98
        assert bs["se"][k] > 0
    assert bs["ci95"]["alloc_a"][0] < 0.3 / 0.7 + 0.03


def test_optuna_init_finds_same_optimum(scratch_points, scratch_fit):
    p = scratch_points
    fit = fit_law(chinchilla(), p.loss, N=p.N, D=p.D, init="optuna", optuna_trials=150)
    assert fit["init"] == "optuna"
    assert fit["huber"] == pytest.approx(scratch_fit["huber"], rel=1e-6)
    assert fit["alpha"] == pytest.approx(scratch_fit["alpha"], abs=1e-4)


def test_frontier_fit_recovers_power_law():
    rng = np.random.default_rng(5)
    C = np.geomspace(1e18, 1e23, 40)
    true = {"E": 1.2, "A": 33.7, "g": 0.058}
    loss = predict(true, C=C) * np.exp(rng.normal(0, 0.001, C.size))
    fit = fit_law(frontier(), loss, C=C)
    assert fit["g"] == pytest.approx(true["g"], rel=0.1)
    assert np.abs(predict(fit, C=C) / predict(true, C=C) - 1).max() < 0.003
    pure = fit_law(frontier(offset=False), predict({"A": 33.69907, "g": 0.0579}, C=C), C=C)
    assert pure["E"] == 0.0 and pure["A"] == pytest.approx(33.69907, rel=1e-4)
    assert pure["g"] == pytest.approx(0.0579, rel=1e-4)


def test_frontier_from_runs_lies_below_every_run(scratch_points):
    fit = fit_frontier(scratch_points, n_levels=12)
    fp = fit["frontier_points"]
    assert len(fp["C"]) >= 8
    assert np.all(np.diff(fp["loss"]) <= 0)  # the best loss for a budget never rises with it
    for c, l in zip(fp["C"], fp["loss"]):
        cheaper = scratch_points.C <= c * (1 + 1e-9)
        assert l <= scratch_points.loss[cheaper].min() * 1.01
        assert l >= scratch_points.loss.min()
    # 5 sizes give a bumpy frontier: the power law follows it only roughly
    assert np.abs(np.log(predict(fit, C=np.array(fp["C"])) / fp["loss"])).max() < 0.1


@pytest.mark.parametrize("bad,match", [
    ({"loss": [3.0, -1.0]}, "loss must be finite and > 0"),
    ({"D": [1e9, np.nan]}, "D must be finite and > 0"),
    ({"N": [0.0, 1e8]}, "N must be finite and > 0"),
])
def test_bad_values_rejected(bad, match):
    data = {"N": [1e8, 2e8] * 5, "D": [1e9, 4e9] * 5, "loss": [3.0, 2.9] * 5}
    for k, v in bad.items():
        data[k] = list(v) + data[k][len(v):]
    with pytest.raises(ValueError, match=match):
        fit_law(chinchilla(), data["loss"], N=data["N"], D=data["D"], source="pts.csv")


def test_too_few_points_rejected():
    with pytest.raises(ValueError, match="5 free parameters.*got 5"):
        fit_law(chinchilla(), [3, 2.9, 2.8, 2.7, 2.6], N=[1e8, 2e8, 3e8, 4e8, 5e8],
                D=[1e9] * 4 + [2e9])
    with pytest.raises(ValueError, match="2 distinct values of N"):
        fit_law(cpt(SCRATCH), [3, 2.9, 2.8, 2.7], N=[1e8] * 4, D=[1e9, 2e9, 3e9, 4e9])
    with pytest.raises(ValueError, match="init must be"):
        fit_law(frontier(), [3, 2.9, 2.8, 2.7], C=[1e18, 1e19, 1e20, 1e21], init="random")
