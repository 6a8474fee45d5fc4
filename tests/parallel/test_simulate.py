"""The schedule simulator against the closed forms (uniform costs, free P2P) and its CLI.

The orders it times are the ones the real schedules run: test_pipeline_schedule.py records
them from `run_1f1b`, `run_interleaved` and `run_zb_h1` and compares with `schedule_order`.
"""
import pytest

from megacpt.parallel.interleaved import interleaved_warmup
from megacpt.parallel.simulate import (SCHEDULES, Costs, closed_form_bubble, main, model_costs,
                                       simulate)

CASES = [(2, 2), (2, 4), (2, 8), (3, 6), (4, 4), (4, 8), (4, 12), (8, 16), (8, 32)]


@pytest.mark.parametrize("pp,num", CASES)
@pytest.mark.parametrize("vp", [2, 3])
def test_bubble_and_peak_equal_closed_forms(pp, num, vp):
    one = simulate("1f1b", pp, num, 1, Costs.uniform(pp, 1.0, 2.0))
    assert one.bubble == pytest.approx(closed_form_bubble("1f1b", pp, num), abs=1e-12)
    assert one.peak == [min(pp - p, num) for p in range(pp)]
    inter = simulate("interleaved", pp, num, vp, Costs.uniform(pp * vp, 1.0 / vp, 2.0 / vp))
    assert inter.bubble == pytest.approx(closed_form_bubble("interleaved", pp, num, vp),
                                         abs=1e-12)
    assert inter.peak == pytest.approx(
        [min(interleaved_warmup(pp, p, vp, num, False) + 1, num * vp) / vp
         for p in range(pp)])
    zb = simulate("zb-h1", pp, num, 1, Costs.uniform(pp, 1.0, 2.0, wgrad_share=0.5))
    assert zb.bubble == pytest.approx(closed_form_bubble("zb-h1", pp, num), abs=1e-12)
    assert max(zb.peak) == max(one.peak)  # ZB-H1 keeps 1F1B's peak memory (counted until W)


def test_makespan_is_work_plus_bubble():
    for name in SCHEDULES:
        res = simulate(name, 4, 8, 2, Costs.uniform(8 if name == "interleaved" else 4,
                                                    0.5 if name == "interleaved" else 1.0,
                                                    1.0 if name == "interleaved" else 2.0))
        busy = [sum(e - s for s, e, _ in tl) for tl in res.timeline]
        assert busy == pytest.approx([24.0] * 4)
        assert res.makespan == pytest.approx(24.0 / (1 - res.bubble))
        for tl in res.timeline:  # one op at a time per rank
            assert all(a[1] <= b[0] + 1e-12 for a, b in zip(tl, tl[1:]))


def test_p2p_time_and_uneven_costs_only_add_idle():
    base = simulate("1f1b", 4, 8, 1, Costs.uniform(4))
    slow = simulate("1f1b", 4, 8, 1, Costs.uniform(4, p2p=0.3))
    assert slow.makespan > base.makespan
    from megacpt.sizes import get_size
    c = model_costs(get_size("1393M"), 2048, 1, 36152, 2, 13, 400.0)
    assert len(c.forward) == 26 and c.forward[-1] > c.forward[0]  # LM head on the last stage
    assert sum(c.act_bytes) == pytest.approx(34 * 2048 * 1792 * 26)


def test_cli_writes_png_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["--pipeline-model-parallel-size", "4", "--num-microbatches", "8",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "bubble 27.3%" in text and "bubble 15.8%" in text and "bubble 11.1%" in text
    assert main(["--pipeline-model-parallel-size", "3", "--num-microbatches", "4"]) == 2
    assert "must be a multiple of --pipeline-model-parallel-size 3" in capsys.readouterr().err
    assert main(["--pipeline-model-parallel-size", "2", "--num-microbatches", "4",
                 "--schedules", "gpipe"]) == 2


def test_measured_costs_drive_the_simulation(capsys):
    assert main(["--model-size", "tiny", "--seq-length", "16", "--micro-batch-size", "2",
                 "--measure", "--pipeline-model-parallel-size", "2",
                 "--num-microbatches", "4"]) == 0
    out = capsys.readouterr().out
    assert "measured on cpu: F" in out and out.count("bubble") == 3
    assert main(["--measure", "--pipeline-model-parallel-size", "2",
                 "--num-microbatches", "4"]) == 2
