"""Figures: size labels, colorbar for many sizes, uncertainty bands, PDF/SVG beside PNG."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from megacpt.scaling import plots  # noqa: E402
from megacpt.scaling.checks import consistency_check  # noqa: E402
from megacpt.scaling.fit import _progress_bar  # noqa: E402
from megacpt.scaling.intervals import fit_points  # noqa: E402

from scaling_synth import CPT, GRID_C, GRID_S, SCRATCH, synth_points  # noqa: E402


@pytest.mark.parametrize("n,label", [(4e5, "0.4M"), (4.9e7, "49M"), (1.393e9, "1.4B"),
                                     (1.25e8, "125M"), (2.5e6, "2.5M"), (1.2e10, "12B"),
                                     (4e4, "40K")])
def test_size_labels_read_right_at_any_scale(n, label):
    assert plots.size_label(n) == label


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(3)
    sizes = np.geomspace(4e5, 1.4e9, 12)
    s = synth_points(rng, SCRATCH, sizes, label="scratch")
    c = synth_points(rng, CPT, sizes, label="cpt")
    fs = fit_points("chinchilla", s, bootstrap=40, init=GRID_S, n_starts=1)
    fc = fit_points("cpt", c, base_points=s, bootstrap=40, init=GRID_C, base_init=GRID_S,
                    n_starts=1)
    return s, c, fs, fc


def _texts(fig_path):
    svg = fig_path.with_suffix(".svg").read_text()
    return svg


def test_fit_plot_has_bands_colorbar_and_three_formats(study, tmp_path):
    s, _, fs, _ = study
    out = plots.plot_fit(s, fs, str(tmp_path / "fit.png"))
    assert out == str(tmp_path / "fit.png")
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fit.pdf").read_bytes()[:5] == b"%PDF-"
    svg = _texts(tmp_path / "fit.png")
    # 12 sizes: a colorbar labelled with readable sizes instead of a 12-entry legend
    assert "parameters N" in svg and "0.4M" in svg and "1.4B" in svg
    band = plots._curve_band(fs, np.full(5, 1e8), np.geomspace(1e8, 1e9, 5))
    assert band is not None and np.all(band[0] < band[1])
    plots.plot_fit(s, fs, str(tmp_path / "only.png"), formats=())
    assert not (tmp_path / "only.svg").exists()


def test_isoloss_shares_levels_and_marks_extrapolation(study, tmp_path):
    s, c, fs, fc = study
    plots.plot_isoloss({"scratch": fs, "cpt": fc}, str(tmp_path / "iso.png"),
                       (s.C.min() / 10, s.C.max() * 100), (s.N.min() / 3, s.N.max() * 10),
                       {"scratch": s, "cpt": c}, formats=("svg",))
    assert "extrapolation" in _texts(tmp_path / "iso.png")
    fields = [np.array([[2.0, 3.0], [4.0, 10.0]]), np.array([[2.5, 3.5], [5.0, 7.0]])]
    levels = plots._common_levels(fields)
    assert np.all(np.diff(levels) > 0)
    assert all(float(f"{v:.2g}") == v for v in levels)  # 2 significant digits


def test_consistency_plot(study, tmp_path):
    s, c, fs, fc = study
    chk = consistency_check(s, c, fs, fc)
    plots.plot_consistency(chk, str(tmp_path / "check.png"), formats=("svg",))
    assert "consistent" in _texts(tmp_path / "check.png")


def test_no_progress_bar_when_not_a_terminal():
    assert _progress_bar(10, "x", True).disable  # pytest captures stderr: not a tty
