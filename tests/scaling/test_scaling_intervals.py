"""Intervals that cover: cluster bootstrap over runs, the CPT base refitted per resample."""
import numpy as np
import pytest

from megacpt.scaling import bootstrap, chinchilla, fit_law
from megacpt.scaling.intervals import (allocation_arrays, cluster_weights, derived,
                                       expanded_tail, fit_points)
from megacpt.scaling.laws import allocation, optimal_allocation

from scaling_synth import CPT, GRID_C, GRID_S, SCRATCH, synth_points

TRUE_A_S = SCRATCH["beta"] / (SCRATCH["alpha"] + SCRATCH["beta"])
TRUE_A_C = CPT["beta"] / (CPT["alpha"] + CPT["beta"] - CPT["gamma"])


def _study(seed):
    """10-13 sizes, one run per size with a 0.5% offset, 12 checkpoints with 0.2% noise."""
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(1e7, 3e9, int(rng.integers(10, 14)))
    return (synth_points(rng, SCRATCH, sizes, label="scratch"),
            synth_points(rng, CPT, sizes, label="cpt"))


def test_intervals_are_calibrated_over_20_studies():
    """>= 85% of the 95% intervals cover the truth for alpha, beta, gamma and a (both laws)."""
    hits = {k: [] for k in ("alpha", "beta", "a", "cpt_beta", "cpt_gamma", "cpt_a")}
    for i in range(20):
        s, c = _study(2000 + i)
        fs = fit_points("chinchilla", s, bootstrap=150, seed=i, init=GRID_S, n_starts=1)
        fc = fit_points("cpt", c, base_points=s, bootstrap=150, seed=i, init=GRID_C,
                        base_init=GRID_S, n_starts=1)
        truth = {"alpha": (fs, "alpha", SCRATCH["alpha"]), "beta": (fs, "beta", SCRATCH["beta"]),
                 "a": (fs, "a", TRUE_A_S), "cpt_beta": (fc, "beta", CPT["beta"]),
                 "cpt_gamma": (fc, "gamma", CPT["gamma"]), "cpt_a": (fc, "a", TRUE_A_C)}
        for name, (fit, key, true) in truth.items():
            lo, hi = fit["intervals"][key]
            hits[name].append(lo <= true <= hi)
        assert fc["bootstrap"]["base_refit"] and "alpha" in fc["intervals"]
    rate = {k: np.mean(v) for k, v in hits.items()}
    assert all(r >= 0.85 for r in rate.values()), rate


def test_cluster_intervals_are_wider_than_point_resampling():
    """Checkpoints of a run share its offset: resampling points understates the spread."""
    s, _ = _study(7)
    fit = fit_points("chinchilla", s, bootstrap=100, seed=0, init=GRID_S, n_starts=1)
    pts = bootstrap(chinchilla(), fit, s.loss, N=s.N, D=s.D, K=100, seed=0, n_starts=1)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(fit["intervals"]["alpha"]) > 2 * width(pts["ci95"]["alpha"])
    assert width(fit["intervals"]["a"]) > 2 * width(pts["ci95"]["alloc_a"])
    assert fit["bootstrap"]["n_clusters"] == len(np.unique(s.N))
    assert len(fit["bootstrap"]["samples"]["alpha"]) == 100


def test_cpt_base_refit_widens_inherited_uncertainty():
    s, c = _study(11)
    base = fit_law(chinchilla(), s.loss, N=s.N, D=s.D, init=GRID_S)
    fixed = fit_points("cpt", c, base=base, bootstrap=100, init=GRID_C, n_starts=1)
    refit = fit_points("cpt", c, base_points=s, bootstrap=100, init=GRID_C, base_init=GRID_S,
                       n_starts=1)
    assert "alpha" not in fixed["intervals"] and "alpha" in refit["intervals"]
    assert refit["alpha"] == pytest.approx(base["alpha"], abs=1e-6)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(refit["intervals"]["a"]) > 1.5 * width(fixed["intervals"]["a"])
    assert refit["base"]["B"] == pytest.approx(base["B"], rel=1e-6)
    assert {"base_B", "base_beta", "flops_saved@%.3g" % c.C.max()} <= set(refit["intervals"])


def test_cluster_weights_draw_whole_runs():
    groups = np.array(["r0"] * 3 + ["r1"] * 2 + ["r2"] * 4)
    W = cluster_weights(groups, 50, np.random.default_rng(0))
    assert W.shape == (50, 9)
    for w in W:
        assert len(set(w[:3])) == len(set(w[3:5])) == len(set(w[5:])) == 1
        assert w[0] + w[3] + w[5] == 3  # three runs drawn


def test_derived_quantities_match_laws_and_brute_force():
    for p in (SCRATCH, CPT):
        arr = allocation_arrays({k: np.array([v, v]) for k, v in p.items()})
        ref = allocation(p)
        for k in ref:
            assert arr[k] == pytest.approx([ref[k]] * 2, rel=1e-12)
    C = 1e21
    d = derived(CPT, [C], scratch=SCRATCH)
    from megacpt.scaling.laws import predict

    grid = np.geomspace(1e8, 1e11, 200001)
    l_cpt = predict(CPT, N=grid, D=C / (6 * grid)).min()
    assert float(d["L_opt@1e+21"]) == pytest.approx(l_cpt, rel=1e-9)
    # the scratch law needs C_s = C / (1 - saved) to reach the same loss compute-optimally
    C_s = C / (1 - float(d["flops_saved@1e+21"]))
    assert predict(SCRATCH, N=grid, D=C_s / (6 * grid)).min() == pytest.approx(l_cpt, rel=1e-9)
    # the paper's Table 2a: CPT worse than scratch at this budget (negative saving)
    assert float(d["flops_saved@1e+21"]) < 0
    n_opt, d_opt = optimal_allocation(CPT, C)
    assert float(d["N_opt@1e+21"]) == pytest.approx(n_opt, rel=1e-12)
    assert float(d["D_opt@1e+21"]) == pytest.approx(d_opt, rel=1e-12)


def test_expanded_tail():
    assert expanded_tail(None) == pytest.approx(0.025)
    assert 0.009 < expanded_tail(12) < 0.012
    assert expanded_tail(10_000) == pytest.approx(0.025, rel=0.01)
