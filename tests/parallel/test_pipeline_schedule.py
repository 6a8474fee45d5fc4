"""1F1B step functions and the global-batch rule, tested in one process.

Pipeline stages run as threads joined by queues (`QueueComm` has the same six exchanges as
`megacpt.parallel.schedule.PipeComm`); a stuck exchange times out, so a deadlocking schedule
fails instead of hanging. The real-model test runs LLaMA stages this way and compares the loss and
every gradient with the unsplit model.
"""
import queue
import threading

import pytest
import torch

from megacpt.model import LlamaModel
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.schedule import (StageRunner, microbatch_loss, run_1f1b, run_cooldown,
                                       run_steady, run_warmup, split_global_batch,
                                       warmup_count)
from megacpt.testing import tiny_model_config

TIMEOUT = 30.0


class QueueComm:
    """In-process stand-in for PipeComm between stage threads."""

    def __init__(self, rank: int, pp: int, chans: dict):
        self.rank, self.pp, self.chans = rank, pp, chans
        self.first, self.last = rank == 0, rank == pp - 1

    def _get(self, key):
        try:
            return self.chans[key].get(timeout=TIMEOUT)
        except queue.Empty:
            raise RuntimeError(f"stage {self.rank}: nothing arrived on {key} (deadlock)") from None

    def recv_forward(self):
        return None if self.first else self._get(("fwd", self.rank - 1))

    def send_forward(self, y):
        if not self.last:
            self.chans[("fwd", self.rank)].put(_detach(y))

    def recv_backward(self):
        return None if self.last else self._get(("bwd", self.rank + 1))

    def send_backward(self, g):
        if not self.first:
            self.chans[("bwd", self.rank)].put(_detach(g))

    def send_forward_recv_backward(self, y):
        self.send_forward(y)
        return self.recv_backward()

    def send_backward_recv_forward(self, g):
        self.send_backward(g)
        return self.recv_forward()


def _detach(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def run_threads(stages: list, forward_only: bool = False) -> None:
    pp = len(stages)
    chans = {(k, r): queue.Queue() for k in ("fwd", "bwd") for r in range(pp)}
    errors = []

    def body(r):
        try:
            run_1f1b(stages[r], QueueComm(r, pp, chans), pp, r)
        except BaseException as e:  # surfaced in the main thread below
            errors.append((r, e))

    threads = [threading.Thread(target=body, args=(r,)) for r in range(pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * TIMEOUT)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a stage thread is stuck"


class RecordingStage(StageRunner):
    """Replaces the model by tokens naming (stage, micro-batch) and records every step."""

    def __init__(self, rank: int, pp: int, num: int, forward_only: bool = False):
        ctx = ParallelContext(pp=pp, rank=rank, world_size=pp)
        super().__init__(None, [{}] * num, ctx, forward_only)
        self.rank, self.events, self.fwd_queue = rank, [], []

    def forward_step(self, x):
        i = self.forwards
        assert x == (None if self.rank == 0 else ("act", self.rank - 1, i))
        self.forwards += 1
        self.events.append(("F", i))
        if not self.forward_only:
            self.pending.append((i, None))
            self.max_pending = max(self.max_pending, len(self.pending))
        return ("act", self.rank, i)

    def backward_step(self, g):
        i, _ = self.pending.popleft()
        last = self.rank == self.ctx.pp - 1
        assert g == (None if last else ("grad", self.rank + 1, i))
        self.backwards += 1
        self.events.append(("B", i))
        return None if self.rank == 0 else ("grad", self.rank, i)


def test_warmup_count():
    assert [warmup_count(4, r, 8, False) for r in range(4)] == [3, 2, 1, 0]
    assert [warmup_count(4, r, 2, False) for r in range(4)] == [2, 2, 1, 0]
    assert warmup_count(4, 1, 5, True) == 5


@pytest.mark.parametrize("pp", [1, 2, 3, 4])
@pytest.mark.parametrize("num", [1, 2, 3, 6])
def test_1f1b_order_and_memory_bound(pp, num):
    stages = [RecordingStage(r, pp, num) for r in range(pp)]
    run_threads(stages)
    for r, st in enumerate(stages):
        fwd = [i for k, i in st.events if k == "F"]
        bwd = [i for k, i in st.events if k == "B"]
        assert fwd == list(range(num)) and bwd == list(range(num))
        warm = warmup_count(pp, r, num, False)
        # warm-up forwards, then strictly alternating F/B, then the cool-down backwards
        expect = [("F", i) for i in range(warm)]
        for i in range(num - warm):
            expect += [("F", warm + i), ("B", i)]
        expect += [("B", i) for i in range(num - warm, num)]
        assert st.events == expect
        assert st.max_pending == min(pp - r, num)


def test_forward_only_runs_no_backward():
    stages = [RecordingStage(r, 3, 4, forward_only=True) for r in range(3)]
    run_threads(stages)
    for st in stages:
        assert st.events == [("F", i) for i in range(4)] and st.max_pending == 0


def test_phase_functions_compose():
    """warm-up + steady + cool-down called by hand equal run_1f1b on a single stage."""
    st = RecordingStage(0, 1, 3)
    comm = QueueComm(0, 1, {})
    run_warmup(st, comm, 0)
    run_steady(st, comm, 3)
    run_cooldown(st, comm, 0)
    assert st.events == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]


def test_split_global_batch_rule():
    tokens = torch.arange(12).repeat_interleave(3).view(12, 3)  # row i is all i
    labels = tokens + 100
    mask = torch.ones(12, 3)
    for dp in (1, 2, 3):
        seen = []
        for r in range(dp):
            ctx = ParallelContext(tp=2, dp=dp, rank=2 * r, world_size=2 * dp)
            mbs = split_global_batch(tokens, labels, 2, ctx, loss_mask=mask)
            rows = [mb["tokens"][:, 0].tolist() for mb in mbs]
            # rank r takes micro-batches r, r + dp, ... of 2 consecutive samples
            assert rows == [[2 * j, 2 * j + 1] for j in range(r, 6, dp)]
            assert all(torch.equal(mb["labels"], mb["tokens"] + 100) for mb in mbs)
            seen += sum(rows, [])
        assert sorted(seen) == list(range(12))
    with pytest.raises(ValueError, match="not divisible by micro-batch size 2 x data-parallel"):
        split_global_batch(tokens[:10], labels[:10], 2,
                           ParallelContext(dp=3, rank=0, world_size=3))


def test_microbatch_loss_mask():
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert microbatch_loss(per_token, {}).item() == pytest.approx(2.5)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert microbatch_loss(per_token, {"loss_mask": mask}).item() == pytest.approx(8 / 3)


def test_threaded_pipeline_matches_single_model():
    """pp = 3 over 5 layers (uneven 2/2/1), 4 micro-batches: loss and every gradient."""
    torch.manual_seed(0)
    cfg = tiny_model_config(num_layers=5)
    pp, num = 3, 4
    tokens = torch.randint(0, cfg.vocab_size, (num * 2, cfg.seq_length))
    labels = torch.randint(0, cfg.vocab_size, (num * 2, cfg.seq_length))
    mbs = split_global_batch(tokens, labels, 2, ParallelContext())

    ref = LlamaModel(cfg, seed=7)
    ref_loss = sum(ref(mb["tokens"], mb["labels"]).mean() for mb in mbs) / num
    ref_loss.backward()

    stages = []
    for r in range(pp):
        ctx = ParallelContext(pp=pp, rank=r, world_size=pp)
        stages.append(StageRunner(LlamaModel(cfg, ctx, seed=7), mbs, ctx))
    assert [list(s.model.layers) for s in stages] == [["0", "1"], ["2", "3"], ["4"]]
    run_threads(stages)

    assert stages[-1].loss_sum.item() / num == pytest.approx(ref_loss.item(), rel=1e-6)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    got = {n: p.grad for s in stages for n, p in s.model.named_parameters()}
    assert sorted(got) == sorted(ref_grads)
    for n, g in got.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
