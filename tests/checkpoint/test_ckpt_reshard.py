"""Resharding on load: `--load` of a checkpoint saved in another tp/pp/dp layout (with or
without ZeRO-1) continues with the losses of the original layout; each rank reads only the
bytes of its part."""
import math

import pytest
import torch

from _ckpt_helpers import RESHARD_CASES, build, fake_state, reshard_worker, tiny_config
from megacpt.checkpoint import convert_checkpoint, load_checkpoint, save_checkpoint
from megacpt.checkpoint.reader import MegacptSource
from megacpt.parallel import sharding
from _harness import run_distributed

STEPS, K = 3, 1


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """A tp1 model with Adam state after one step, saved, converted to tp2 (and tp4)."""
    tmp = tmp_path_factory.mktemp("reshard")
    cfg = tiny_config(num_layers=2)
    ctx, model, opt = build(cfg, 1, 1, seed=5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step(1e-2)
    save_checkpoint(str(tmp / "tp1"), 1, model, opt, cfg, ctx, fake_state(1))
    convert_checkpoint(str(tmp / "tp1"), str(tmp / "tp2"), 2, 1, progress=False)
    return tmp, cfg


@pytest.mark.parametrize("tp", [1, 4])
def test_parts_in_another_tp_read_only_their_bytes(tp2_checkpoint, tp):
    tmp, cfg = tp2_checkpoint
    with MegacptSource(str(tmp / "tp1")) as ref, MegacptSource(str(tmp / "tp2")) as src:
        for name in src.names():
            full = ref.get(name)
            before = src.bytes_read
            parts = [src.get_shard(name, tp, r) for r in range(tp)]
            read = src.bytes_read - before
            for r, part in enumerate(parts):
                assert torch.equal(part, sharding.shard(name, full, r, tp)), (name, tp, r)
            # each rank reads exactly the bytes of its part (a replicated tensor: all of it)
            assert read == sum(p.numel() * p.element_size() for p in parts), name
            for key, _, sharded, _ in src.optimizer_entries(name):
                want = ref.optimizer_get(name, key)
                for r in range(tp):
                    got = src.optimizer_get_shard(name, key, tp, r)
                    exp = sharding.shard(name, want, r, tp) if sharded else want
                    assert torch.equal(got, exp), (name, key, tp, r)


def test_load_checkpoint_reshards_model_and_optimizer(tp2_checkpoint):
    """A tp2 checkpoint loaded into a tp1 model (ZeRO-1 off) gives the tp1 run's tensors."""
    tmp, cfg = tp2_checkpoint
    ctx, model, opt = build(cfg, 1, 1, seed=99)
    it, state = load_checkpoint(str(tmp / "tp2"), model, opt, cfg, ctx)
    assert it == 1 and state["scheduler"]["num_steps"] == 1 and state["rng"] is None
    with MegacptSource(str(tmp / "tp1")) as ref:
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ref.get(name)), name
        sd = opt.state_dict()
        assert sd["step"] == 1
        for name, entry in sd["state"].items():
            for key, t in entry.items():
                assert torch.equal(t, ref.optimizer_get(name, key)), (name, key)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("reshard_runs"))
    return run_distributed(reshard_worker, 4, tmp, STEPS, K, timeout=400)


@pytest.mark.parametrize("case", [f"{s}->{t}" for s, (_, ts) in RESHARD_CASES.items()
                                  for t in ts])
def test_resume_in_any_layout_continues_the_losses(resharded, case):
    src = case.split("->")[0]
    ref, got = resharded[0][src], resharded[0][case]
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(got) == list(range(K + 1, STEPS + 1)), got
    for it in got:
        assert math.isclose(got[it], ref[it], rel_tol=1e-5), (case, it, got[it], ref[it])


def test_resharding_load_reads_only_this_ranks_part(tp2_checkpoint):
    """Streaming by slices: in a tp1 -> tp2 load each rank reads exactly the tensor bytes of
    its own part (about half the checkpoint's; norms are replicated, so a little more), and
    a tp2 -> tp1 load reads each byte once."""
    from _ckpt_helpers import reshard_read_worker
    from megacpt.checkpoint import integrity

    tmp, cfg = tp2_checkpoint
    with MegacptSource(str(tmp / "tp1")) as ref:
        total = sum(ref.get(n).nbytes + sum(ref.optimizer_get(n, k).nbytes
                                            for k, *_ in ref.optimizer_entries(n))
                    for n in ref.names())
    integrity.record_all(str(tmp / "tp2" / "iter_0000001"))  # converted: no checksums yet
    ranks = run_distributed(reshard_read_worker, 2, str(tmp / "tp1"), 2)
    for r in ranks:
        assert r["bytes_read"] == r["part"] and r["bytes_read"] < 0.55 * total, (r, total)
    one = reshard_read_worker(str(tmp / "tp2"), 1)
    assert one["bytes_read"] == one["part"] == total


def test_resharding_load_verifies_every_file_it_reads(tp2_checkpoint, tmp_path):
    """tp2 -> tp1: the single rank reads both saved shards, so a flipped bit in the second
    one (not "its own" shard in the saved layout) is refused, naming the file."""
    import shutil

    from megacpt.checkpoint import integrity

    tmp, cfg = tp2_checkpoint
    ck = str(tmp_path / "tp2")
    shutil.copytree(str(tmp / "tp2"), ck)
    integrity.record_all(f"{ck}/iter_0000001")
    ctx, model, opt = build(cfg, 1, 1, seed=99)
    load_checkpoint(ck, model, opt, cfg, ctx)  # verifies
    bad = f"{ck}/iter_0000001/mp_rank_01_000/optimizer.safetensors"
    data = bytearray(open(bad, "rb").read())
    data[-3] ^= 0x10
    open(bad, "wb").write(bytes(data))
    with pytest.raises(integrity.IntegrityError, match=f"{bad}: .* checksum mismatch"):
        load_checkpoint(ck, model, opt, cfg, ctx)
