"""Single-process save/resume, weights-only loading, and the errors for bad checkpoints."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _ckpt_helpers import build, failing_save_worker, fake_state, run_steps, tiny_config
from megacpt.checkpoint import (CheckpointError, load_checkpoint, load_model, load_weights,
                                save_checkpoint)
from megacpt.checkpoint import checkpointing
from megacpt.checkpoint.convert import convert_checkpoint
from megacpt.checkpoint.format import TRACKER, read_tracker
from megacpt.checkpoint.safetensors_io import (SafetensorsError, SafetensorsReader,
                                               SafetensorsWriter, load_tensors, save_tensors)
from megacpt.parallel.context import ParallelContext
from _harness import random_global_batches, run_distributed


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(num_layers=2)


@pytest.fixture(scope="module")
def batches(cfg):
    return random_global_batches(4, 4, cfg.model.seq_length, cfg.model.vocab_size, seed=3)


def test_exact_resume_bf16_with_master_weights(cfg, batches, tmp_path):
    ctx, model, opt = build(cfg, 1, 1, dtype=torch.bfloat16)
    run_steps(model, opt, ctx, batches[:2], cfg.optim.lr)
    state = fake_state(2)
    state["data"]["np_scalar"] = np.int64(7)  # numpy scalars become JSON numbers
    save_checkpoint(str(tmp_path), 2, model, opt, cfg, ctx, state)
    ref = run_steps(model, opt, ctx, batches[2:], cfg.optim.lr)
    ctx2, model2, opt2 = build(cfg, 1, 1, seed=999, dtype=torch.bfloat16)
    it, st = load_checkpoint(str(tmp_path), model2, opt2, cfg, ctx2)
    assert it == 2 and st["data"]["np_scalar"] == 7 and st["scheduler"] == state["scheduler"]
    assert torch.equal(st["rng"]["torch"], state["rng"]["torch"])
    sd = opt2.state_dict()
    assert set(sd["state"]["layers.0.mlp.down.weight"]) == {"exp_avg", "exp_avg_sq", "master"}
    assert run_steps(model2, opt2, ctx2, batches[2:], cfg.optim.lr) == ref
    meta = json.load(open(tmp_path / "iter_0000002" / "meta.json"))
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1} and meta["dtype"] == "bfloat16"
    assert read_tracker(str(tmp_path)) == 2


def test_crash_mid_save_keeps_previous_checkpoint(cfg, batches, tmp_path, monkeypatch):
    ctx, model, opt = build(cfg, 1, 1)
    save_checkpoint(str(tmp_path), 1, model, opt, cfg, ctx, fake_state(1))
    real = checkpointing.save_tensors

    def crash(path, tensors, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpointing, "save_tensors", crash)
    with pytest.raises(CheckpointError, match="iter_0000002.tmp failed: OSError: disk full; "
                       "the previous checkpoint and the tracker are untouched"):
        save_checkpoint(str(tmp_path), 2, model, opt, cfg, ctx, fake_state(2))
    assert read_tracker(str(tmp_path)) == 1  # the partial save's space is freed at once
    assert not os.path.exists(tmp_path / "iter_0000002.tmp")
    assert not os.path.exists(tmp_path / "iter_0000002")
    it, _ = load_checkpoint(str(tmp_path), model, opt, cfg, ctx)
    assert it == 1
    monkeypatch.setattr(checkpointing, "save_tensors", real)
    save_checkpoint(str(tmp_path), 2, model, opt, cfg, ctx, fake_state(2))
    save_checkpoint(str(tmp_path), 2, model, opt, cfg, ctx, fake_state(2))  # re-save in place
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("iter")) == [
        "iter_0000001", "iter_0000002"]


def test_layout_and_model_mismatch_errors(cfg, tmp_path):
    ctx, model, opt = build(cfg, 1, 1)
    save_checkpoint(str(tmp_path), 3, model, None, cfg, ctx, {"data": {}})
    fake_tp2 = ParallelContext(tp=2, pp=1, dp=1, world_size=2)  # a tp1 model in a tp2 context
    with pytest.raises(CheckpointError, match=r"'embedding.weight' gives shape \(128, 32\) at "
                                              r"tp2, the model expects \(256, 32\)"):
        load_checkpoint(str(tmp_path), model, None, cfg, fake_tp2)
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        load_checkpoint(str(tmp_path), model, opt, cfg, ctx)
    other = tiny_config(num_layers=2, ffn_hidden_size=96)
    _, m2, _ = build(other, 1, 1)
    with pytest.raises(CheckpointError, match="ffn_hidden_size: checkpoint 64 vs model 96"):
        load_checkpoint(str(tmp_path), m2, None, other, ctx)
    with pytest.raises(CheckpointError, match="ffn_hidden_size"):
        load_weights(str(tmp_path), m2)
    _, m3, _ = build(tiny_config(num_layers=2, rotary_base=5e5), 1, 1)
    with pytest.raises(CheckpointError, match="rotary_base = 10000.0 but the model has 500000.0; "
                                              "pass --rotary-base 10000.0"):
        load_weights(str(tmp_path), m3)
    with pytest.raises(CheckpointError, match="neither latest_checkpointed_iteration.txt"):
        load_weights(str(tmp_path / "iter_0000003" / "mp_rank_00_000"), model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(str(tmp_path / "nope"), model)


def test_damaged_shards_are_named(cfg, tmp_path):
    ctx, model, _ = build(cfg, 1, 1)
    save_checkpoint(str(tmp_path), 1, model, None, cfg, ctx, {})
    f = tmp_path / "iter_0000001" / "mp_rank_00_000" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["layers.1.mlp.down.weight"] = torch.zeros(32, 65)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"down.weight' has shape \(32, 65\) but the config"):
        load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.safetensors: \w+ checksum mismatch"):
        load_checkpoint(str(tmp_path), model, None, cfg, ctx)  # refused before any shape check
    unverified = copy.deepcopy(cfg)
    unverified.checkpoint.verify_checksums = False
    with pytest.raises(CheckpointError, match=r"down.weight' has shape \(32, 65\) but the config"):
        load_checkpoint(str(tmp_path), model, None, unverified, ctx)
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(str(tmp_path))
    open(tmp_path / TRACKER, "w").write("banana")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        load_model(str(tmp_path))


def test_load_weights_and_load_model_from_any_layout(cfg, tmp_path):
    ctx, model, _ = build(cfg, 1, 1, seed=5)
    save_checkpoint(str(tmp_path / "a"), 0, model, None, cfg, ctx, {})
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"), 4, 2, progress=False)
    _, fresh, _ = build(cfg, 1, 1, seed=77)
    load_weights(str(tmp_path / "b"), fresh)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    single = load_model(str(tmp_path / "b"))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 8))
    with torch.no_grad():
        logits = single(tokens)
        assert logits.shape == (2, 8, cfg.model.vocab_size)
        torch.testing.assert_close(logits, model(tokens), rtol=0, atol=1e-6)


def test_safetensors_stream_io_matches_library(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16),
          "c": torch.tensor(7, dtype=torch.int64), "d": torch.zeros(0, 3), "e": torch.ones(2) > 0}
    save_tensors(str(tmp_path / "ours.safetensors"), ts, {"k": "v"})
    lib = load_file(str(tmp_path / "ours.safetensors"))
    save_file(ts, str(tmp_path / "lib.safetensors"))
    back = load_tensors(str(tmp_path / "lib.safetensors"))
    for n, t in ts.items():
        assert torch.equal(lib[n], t) and torch.equal(back[n], t) and back[n].dtype == t.dtype
    with SafetensorsReader(str(tmp_path / "ours.safetensors")) as r:
        assert r.metadata == {"k": "v"} and r.shape("a") == (3, 5)
    w = SafetensorsWriter(str(tmp_path / "x.safetensors"),
                          [("p", torch.float32, (2,)), ("q", torch.float32, (1,))])
    with pytest.raises(SafetensorsError, match="expected tensor 'p' next, got 'q'"):
        w.write("q", torch.zeros(1))
    with pytest.raises(SafetensorsError, match=r"should be torch.float32 \(2,\)"):
        w.write("p", torch.zeros(3))
    w.write("p", torch.zeros(2))
    with pytest.raises(SafetensorsError, match=r"closed before writing \['q'\]"):
        w.close()
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(SafetensorsError, match="truncated file"):
        SafetensorsReader(str(tmp_path / "junk.safetensors"))


def test_rank_failing_mid_save_fails_every_rank_promptly(tmp_path):
    """One rank cannot write (disk full): every rank raises a CheckpointError naming it at
    once instead of waiting for the distributed timeout, and iteration 1 stays current."""
    out = run_distributed(failing_save_worker, 2, str(tmp_path), timeout=120)
    for rank, r in enumerate(out):
        assert r["raised"].startswith("CheckpointError"), r
        assert "failed on rank(s) [1]" in r["raised"] and "previous checkpoint" in r["raised"]
        assert r["tracker"] == 1 and r["loaded"] == 1
    assert "No space left on device" in out[1]["raised"]  # the failing rank says why
    assert not os.path.exists(tmp_path / "iter_0000002")
