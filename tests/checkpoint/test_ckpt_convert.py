"""Layout conversion: a tp2pp2 run converted to tp1pp1 (dp4, ZeRO-1), tp4pp1 and tp1pp4 and
resumed gives the same losses as the tp2pp2 run continued; converted tensors are exact."""
import os

import pytest
import torch

from _ckpt_helpers import resume_worker
from megacpt.checkpoint import CheckpointError
from megacpt.checkpoint.convert import convert_checkpoint, main
from megacpt.checkpoint.reader import MegacptSource
from megacpt.params import LayoutError
from _harness import random_global_batches, run_distributed

STEPS, K = 4, 2


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """A random transformers LLaMA (GQA) on disk, a batch, and transformers' mean loss."""
    transformers = pytest.importorskip("transformers")
    d = str(tmp_path_factory.mktemp("hf"))
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=32)).eval()
    ref.save_pretrained(d)
    tokens, labels = random_global_batches(1, 4, 16, 300, seed=9)[0]
    with torch.no_grad():
        logits = ref(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1))
    return d, tokens, labels, float(loss)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, hf_case):
    tmp = str(tmp_path_factory.mktemp("convert"))
    out = run_distributed(resume_worker, 4, tmp, STEPS, K, hf_case[:3], timeout=300)
    return tmp, out


def test_hf_import_runs_at_tp2pp2_with_transformers_loss(resumed, hf_case):
    _, out = resumed
    for rank_out in out:
        assert abs(rank_out["hf_loss"] - hf_case[3]) < 1e-5, (rank_out["hf_loss"], hf_case[3])


def test_resume_in_new_layout_gives_same_losses(resumed):
    """`--load` of the converted checkpoint resumes at step K with the LR schedule, data
    position and optimizer state of the tp2pp2 run: the remaining losses agree."""
    _, out = resumed
    ref = out[0]["ref"]
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(o["ref"] == ref for o in out)
    for name in ("tp1pp1", "tp4pp1", "tp1pp4"):
        got = out[0][name]
        assert sorted(got) == list(range(K + 1, STEPS + 1)), (name, got)
        for it in got:
            assert abs(got[it] - ref[it]) < 2e-5, (name, it, got[it], ref[it])


def _all_tensors(path):
    with MegacptSource(path) as s:
        params = {n: s.get(n) for n in s.names()}
        optim = {(n, k): s.optimizer_get(n, k) for n in s.names()
                 for k, *_ in s.optimizer_entries(n)}
        return params, optim, s.optimizer_rest(), s.state, s.iteration


def test_converted_tensors_are_exact_unshards(resumed):
    tmp, _ = resumed
    src = _all_tensors(os.path.join(tmp, "tp2pp2", f"iter_{K:07d}"))
    for name in ("tp1pp1", "tp4pp1", "tp1pp4"):
        got = _all_tensors(os.path.join(tmp, name, f"iter_{K:07d}"))
        assert got[0].keys() == src[0].keys() and got[1].keys() == src[1].keys()
        for n in src[0]:
            assert torch.equal(got[0][n], src[0][n]), (name, n)
        for key in src[1]:
            assert torch.equal(got[1][key], src[1][key]), (name, key)
        assert {k for k, _ in src[1]} == set(src[0])  # every parameter has Adam state
        assert got[2]["step"] == src[2]["step"] == K
        for g_got, g_src in zip(got[2]["param_groups"], src[2]["param_groups"]):
            assert sorted(g_got["params"]) == sorted(g_src["params"])
        assert got[3] == src[3] and got[4] == src[4] == K
        assert src[3]["scheduler"] and src[3]["data"] and src[3]["counters"]


def test_zero1_resumed_state_matches_continued_run(resumed):
    """The tp1pp1 dp4 ZeRO-1 resume saves optimizer state (gathered over dp) that equals the
    tp2pp2 run's at the same step."""
    tmp, _ = resumed
    ref = _all_tensors(os.path.join(tmp, "tp2pp2", f"iter_{STEPS:07d}"))
    got = _all_tensors(os.path.join(tmp, "tp1pp1", f"iter_{STEPS:07d}"))
    for n in ref[0]:
        torch.testing.assert_close(got[0][n], ref[0][n], rtol=1e-4, atol=1e-5)
    for key in ref[1]:
        torch.testing.assert_close(got[1][key], ref[1][key], rtol=1e-3, atol=1e-6)


def test_roundtrip_is_bit_exact_and_no_optimizer(resumed, tmp_path):
    tmp, _ = resumed
    a = os.path.join(tmp, "tp4pp1", f"iter_{K:07d}")
    main(["--load-dir", a, "--save-dir", str(tmp_path / "x"), "--target-tensor-parallel-size",
          "2", "--target-pipeline-parallel-size", "3", "--no-progress"])
    convert_checkpoint(str(tmp_path / "x"), str(tmp_path / "y"), 4, 1, progress=False)
    convert_checkpoint(str(tmp_path / "y"), str(tmp_path / "z"), with_optimizer=False,
                       progress=False)
    for sub in ("mp_rank_00_000", "mp_rank_03_000"):
        for f in ("model.safetensors", "optimizer.safetensors"):
            p1 = os.path.join(a, sub, f)
            p2 = os.path.join(tmp_path, "y", f"iter_{K:07d}", sub, f)
            assert open(p1, "rb").read() == open(p2, "rb").read()
    z = os.path.join(tmp_path, "z", f"iter_{K:07d}")
    assert sorted(os.listdir(os.path.join(z, "mp_rank_00_000"))) == ["model.safetensors"]
    with MegacptSource(z) as s:
        assert not s.has_optimizer and (s.tp, s.pp) == (4, 1)


def test_bad_layout_and_missing_shard_are_clear(resumed, tmp_path, capsys):
    tmp, _ = resumed
    src = os.path.join(tmp, "tp2pp2")
    with pytest.raises(SystemExit):
        main(["--load-dir", src, "--save-dir", str(tmp_path / "o"),
              "--target-tensor-parallel-size", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert "num_attention_heads (--num-attention-heads) = 8 is not divisible by tensor-parallel " \
           "size 3" in err
    with pytest.raises(LayoutError, match="fewer than pipeline-parallel size 6"):
        convert_checkpoint(src, str(tmp_path / "o"), 1, 6)
    assert not os.path.exists(tmp_path / "o")  # nothing left behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o.tmp")]
    broken = tmp_path / "broken"
    convert_checkpoint(src, str(broken), progress=False)
    it = f"iter_{STEPS:07d}"
    os.rename(broken / it / "mp_rank_01_001", broken / it / "gone")
    with pytest.raises(CheckpointError, match="shard directory mp_rank_01_001 is missing"):
        convert_checkpoint(str(broken), str(tmp_path / "o2"), 1, 1)
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert_checkpoint(src, str(broken), 1, 1)
