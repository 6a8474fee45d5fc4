"""megacpt.parallel.volume's interleaved-1F1B point-to-point closed form and its CLI (the
formulas themselves are proven against counted bytes in test_layouts.py)."""
import pytest

import _harness as T
from megacpt.parallel import volume
from megacpt.parallel.volume import Layout, step_bytes

CFG = T.tiny_model_config(num_layers=8)


@pytest.mark.parametrize("pp,vp", [(2, 2), (4, 2), (2, 4)])
def test_interleaved_sends_one_activation_per_chunk_boundary(pp, vp):
    """Per micro-batch a rank sends over each of its chunk boundaries once forward and once
    backward; the model's two ends (embedding, loss) send nothing."""
    act = 2 * CFG.seq_length * CFG.hidden_size * 4  # micro-batch 2, fp32
    plain = [step_bytes(CFG, Layout(pp=pp), r, 2, 4, act_bytes=4)["pp"] for r in range(pp)]
    inter = [step_bytes(CFG, Layout(pp=pp, vp=vp), r, 2, 4, act_bytes=4)["pp"]
             for r in range(pp)]
    tied = 2 * 4 * CFG.padded_vocab_size * CFG.hidden_size / 2 if CFG.tie_word_embeddings else 0
    ends = {0: tied, pp - 1: tied}
    for r in range(pp):
        sends = 2 * vp - (r == 0) - (r == pp - 1)
        assert inter[r] - ends.get(r, 0) == pytest.approx(sends * act * 4)
        assert plain[r] - ends.get(r, 0) == pytest.approx((2 - (r == 0) - (r == pp - 1)) * act * 4)
    # all ranks together: one message per virtual-stage boundary and direction
    total = sum(inter) - sum(ends.values())
    assert total == pytest.approx(2 * (pp * vp - 1) * act * 4)


def test_layout_refuses_virtual_stages_without_a_pipeline():
    with pytest.raises(ValueError, match="vp=2 needs"):
        Layout(vp=2)


def test_cli_adds_the_interleaved_layouts(capsys):
    volume.main(["--model-size", "1393M", "--virtual-pipeline-model-parallel-size", "13"])
    rows = [line.split(" | ")[0].lstrip("| ") for line in capsys.readouterr().out.splitlines()]
    assert "tp1pp2dp4vp13" in rows and "tp1pp2dp4" in rows
    assert "tp1pp4dp2vp13" not in rows  # 26 layers do not split into 4 x 13 chunks
    with pytest.raises(SystemExit) as e:
        volume.main(["--virtual-pipeline-model-parallel-size", "0"])
    assert e.value.code == 2
