"""--async-save (snapshot, background write, atomic publication) and --keep-last-checkpoints."""
import json
import os
import threading

import pytest
import torch

from _ckpt_helpers import build, fake_state, tiny_config
from megacpt.checkpoint import CheckpointError, checkpointing, load_checkpoint, save_checkpoint
from megacpt.checkpoint.async_save import AsyncCheckpointSaver
from megacpt.checkpoint.checkpointing import prune_checkpoints
from megacpt.checkpoint.format import TRACKER, read_tracker
from megacpt.checkpoint.reader import MegacptSource


@pytest.fixture
def setup():
    cfg = tiny_config(num_layers=2)
    ctx, model, opt = build(cfg, 1, 1, seed=5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step(1e-2)
    return cfg, ctx, model, opt


def _dirs(path):
    return sorted(e for e in os.listdir(path) if e.startswith("iter_"))


def test_async_save_writes_the_snapshot_and_publishes_only_when_complete(
        setup, tmp_path, monkeypatch):
    cfg, ctx, model, opt = setup
    save_checkpoint(str(tmp_path), 1, model, opt, cfg, ctx, fake_state(1))
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    want_opt = {n: {k: v.clone() for k, v in e.items()} for n, e in
                opt.state_dict()["state"].items()}
    gate, real = threading.Event(), checkpointing.save_tensors

    def slow_save(*a, **k):  # the background write waits until the test lets it go
        assert gate.wait(60)
        return real(*a, **k)
    monkeypatch.setattr(checkpointing, "save_tensors", slow_save)
    saver = AsyncCheckpointSaver(ctx)
    final = saver.save(str(tmp_path), 2, model, opt, cfg, fake_state(2))
    assert saver.in_flight
    with torch.no_grad():  # training goes on and changes everything meanwhile
        for p in model.parameters():
            p.add_(1.0)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step(1e-2)
    assert read_tracker(str(tmp_path)) == 1 and not os.path.exists(final)  # not yet published
    gate.set()
    saver.finish()
    assert read_tracker(str(tmp_path)) == 2 and _dirs(tmp_path) == ["iter_0000001",
                                                                   "iter_0000002"]
    assert not os.path.exists(os.path.join(final, ".async"))
    with MegacptSource(final) as src:  # the state at snapshot time, not the changed one
        for n, t in want.items():
            assert torch.equal(src.get(n), t), n
        for n, entry in want_opt.items():
            for k, t in entry.items():
                assert torch.equal(src.optimizer_get(n, k), t), (n, k)
    it, state = load_checkpoint(str(tmp_path), model, opt, cfg, ctx)
    assert it == 2 and state["scheduler"]["num_steps"] == 2


def test_failed_async_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    cfg, ctx, model, opt = setup
    saver = AsyncCheckpointSaver(ctx)
    saver.save(str(tmp_path), 1, model, opt, cfg, fake_state(1))
    saver.finish()

    def disk_full(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(checkpointing, "save_tensors", disk_full)
    saver.save(str(tmp_path), 2, model, opt, cfg, fake_state(2))
    with pytest.raises(CheckpointError, match="No space left on device"):
        saver.finish()
    assert read_tracker(str(tmp_path)) == 1 and _dirs(tmp_path) == ["iter_0000001"]
    saver.finish()  # nothing in flight any more


def test_retention_keeps_the_newest_and_the_tracked(setup, tmp_path):
    cfg, ctx, model, opt = setup
    cfg.checkpoint.keep_last_checkpoints = 2
    for it in range(1, 5):
        save_checkpoint(str(tmp_path), it, model, None, cfg, ctx, {})
    assert _dirs(tmp_path) == ["iter_0000003", "iter_0000004"]
    os.makedirs(tmp_path / "iter_0000009.tmp")  # a save being written is never a candidate
    (tmp_path / TRACKER).write_text("3\n")  # the tracker names the older one: it stays
    assert prune_checkpoints(str(tmp_path), 1) == []
    (tmp_path / TRACKER).write_text("4\n")
    assert prune_checkpoints(str(tmp_path), 1) == [3]
    assert _dirs(tmp_path) == ["iter_0000004", "iter_0000009.tmp"]


@pytest.mark.gpu
def test_async_save_from_gpu_snapshots_into_pinned_buffers(tmp_path):
    from megacpt.model.llama import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer

    cfg = tiny_config(num_layers=2)
    ctx = ParallelContext.single("cuda")
    model = LlamaModel(cfg.model, ctx, device="cuda", seed=5)
    opt = build_optimizer(model, cfg.optim, ctx)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step(1e-2)
    want = {n: p.detach().cpu() for n, p in model.named_parameters()}
    saver = AsyncCheckpointSaver(ctx)
    saver.prepare(model, opt, cfg)  # pinned buffers allocated once, before the first save
    before = {k: b.data_ptr() for k, b in saver.buffers._bufs.items()}
    assert before and all(b.is_pinned() for b in saver.buffers._bufs.values())
    saver.save(str(tmp_path), 1, model, opt, cfg, fake_state(1))
    assert {k: b.data_ptr() for k, b in saver.buffers._bufs.items()} == before  # reused
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    saver.finish()
    with MegacptSource(str(tmp_path)) as src:
        for n, t in want.items():
            assert torch.equal(src.get(n), t), n


def test_async_checkpoint_records_checksums_and_a_flipped_bit_is_refused(setup, tmp_path):
    """The background writer records the same per-file checksums as a synchronous save: the
    async checkpoint loads verified, and one flipped bit is refused in one line naming the
    file."""
    from megacpt.checkpoint import integrity

    cfg, ctx, model, opt = setup
    sync_dir, async_dir = str(tmp_path / "s"), str(tmp_path / "a")
    save_checkpoint(sync_dir, 1, model, opt, cfg, ctx, fake_state(1))
    saver = AsyncCheckpointSaver(ctx)
    final = saver.save(async_dir, 1, model, opt, cfg, fake_state(1))
    saver.finish()
    meta = {d: json.load(open(f"{d}/iter_0000001/meta.json")) for d in (sync_dir, async_dir)}
    assert meta[async_dir]["checksums"] == meta[sync_dir]["checksums"]  # same files, bytes
    assert len(meta[async_dir]["checksums"]["files"]) == 4 and integrity.problems(final) == []
    assert not [n for n in os.listdir(final) if n.startswith(".")]  # markers gone
    load_checkpoint(async_dir, model, opt, cfg, ctx)  # verified (verify_checksums default)
    bad = f"{final}/mp_rank_00_000/optimizer.safetensors"
    data = bytearray(open(bad, "rb").read())
    data[-3] ^= 0x10
    open(bad, "wb").write(bytes(data))
    with pytest.raises(integrity.IntegrityError) as e:
        load_checkpoint(async_dir, model, opt, cfg, ctx)
    msg = str(e.value)
    assert bad in msg and "checksum mismatch" in msg and "\n" not in msg


def test_snapshot_buffers_are_prepared_once_and_zero1_state_is_not_copied_again(tmp_path):
    """`prepare` allocates every buffer a snapshot copies into before the first save; saves
    reuse them. ZeRO-1's state_dict() already gathers into new memory: on the CPU its tensors
    go to the writer as they are (no buffers), and later steps leave the snapshot alone."""
    cfg = tiny_config(num_layers=2)
    for zero1 in (False, True):
        ctx, model, opt = build(cfg, 1, 1, zero1=zero1, seed=5)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step(1e-2)
        saver = AsyncCheckpointSaver(ctx)
        saver.prepare(model, opt, cfg)
        before = {k: b.data_ptr() for k, b in saver.buffers._bufs.items()}
        n_opt = sum(k.startswith("optim/") for k in before)
        assert n_opt == (0 if zero1 else 2 * (len(before) - n_opt)), (zero1, n_opt)  # 2 moments
        want = opt.state_dict()["state"]
        want = {n: {k: v.clone() for k, v in e.items()} for n, e in want.items()}
        d = str(tmp_path / f"z{int(zero1)}")
        for it in (1, 2):
            saver.save(d, it, model, opt, cfg, fake_state(it))
            assert {k: b.data_ptr() for k, b in saver.buffers._bufs.items()} == before
            if it == 1:
                with torch.no_grad():  # a step while the first save is in flight
                    for p in model.parameters():
                        p.grad = torch.randn_like(p)
                    opt.step(1e-2)
            saver.finish()
            if it == 1:
                with MegacptSource(d) as src:
                    for n, e in want.items():
                        for k, t in e.items():
                            assert torch.equal(src.optimizer_get(n, k), t), (zero1, n, k)
