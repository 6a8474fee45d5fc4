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
from megacpt.config import ConfigError
from megacpt.parallel.context import ParallelContext, resolve_virtual_stages
from megacpt.parallel.schedule import (StageRunner, microbatch_loss, run_1f1b, run_cooldown,
                                       run_steady, run_warmup, run_zb_h1, split_global_batch,
                                       warmup_count)
from megacpt.parallel.grads import GradBuffer
from megacpt.parallel.interleaved import interleaved_warmup, run_interleaved
from megacpt.parallel.simulate import schedule_order
from _harness import tiny_model_config

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

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """PipeComm.exchange on the ring (stage pp - 1's next is stage 0)."""
        if send_next is not None:
            self.chans[("fwd", self.rank)].put(_detach(send_next))
        if send_prev is not None:
            self.chans[("bwd", self.rank)].put(_detach(send_prev))
        x = self._get(("fwd", (self.rank - 1) % self.pp)) if recv_prev else None
        g = self._get(("bwd", (self.rank + 1) % self.pp)) if recv_next else None
        return x, g


def _detach(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def run_in_threads(pp: int, run_rank) -> None:
    """`run_rank(r)` for every stage r in a thread of its own; fails on any stage's error or a
    stage still stuck after 4 x TIMEOUT."""
    errors = []

    def body(r):
        try:
            run_rank(r)
        except BaseException as e:  # surfaced in the main thread below
            errors.append((r, e))

    threads = [threading.Thread(target=body, args=(r,)) for r in range(pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * TIMEOUT)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a stage thread is stuck"


def run_threads(stages: list, vp: int = 1, zb: bool = False) -> None:
    pp = len(stages)
    chans = {(k, r): queue.Queue() for k in ("fwd", "bwd") for r in range(pp)}

    def run_rank(r):
        if zb:
            run_zb_h1(stages[r], QueueComm(r, pp, chans), pp, r)
        elif vp == 1:
            run_1f1b(stages[r], QueueComm(r, pp, chans), pp, r)
        else:
            run_interleaved(stages[r], QueueComm(r, pp, chans), pp, r, vp)

    run_in_threads(pp, run_rank)


class RecordingStage(StageRunner):
    """Replaces the model by tokens naming (virtual stage, micro-batch) and records every
    step as (kind, chunk, micro-batch); checks each received token is the right one."""

    def __init__(self, rank: int, pp: int, num: int, forward_only: bool = False, vp: int = 1,
                 split: bool = False):
        ctx = ParallelContext(pp=pp, rank=rank, world_size=pp, vp=vp)
        super().__init__(None, [{}] * num, ctx, forward_only, chunks=vp, split_backward=split)
        self.rank, self.events = rank, []

    def _vstage(self, chunk):
        return chunk * self.ctx.pp + self.rank

    def forward_step(self, x, chunk=0):
        i, v = self.forwards[chunk], self._vstage(chunk)
        assert x == (None if v == 0 else ("act", v - 1, i)), (self.rank, chunk, x)
        self.forwards[chunk] += 1
        self.events.append(("F", chunk, i))
        if not self.forward_only:
            self._remember(chunk, i, None)
        return ("act", v, i)

    def backward_step(self, g, chunk=0):
        i, _ = self.pending[chunk].popleft()
        self.alive -= 1
        v, last = self._vstage(chunk), self.ctx.pp * self.chunks - 1
        assert g == (None if v == last else ("grad", v + 1, i)), (self.rank, chunk, g)
        self.backwards[chunk] += 1
        self.events.append(("B", chunk, i))
        if self.split_backward:
            self.wpending.append(i)
        return None if v == 0 else ("grad", v, i)

    def wgrad_step(self):
        self.events.append(("W", 0, self.wpending.popleft()))
        self.wgrads += 1


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
        fwd = [i for k, _, i in st.events if k == "F"]
        bwd = [i for k, _, i in st.events if k == "B"]
        assert fwd == list(range(num)) and bwd == list(range(num))
        warm = warmup_count(pp, r, num, False)
        # warm-up forwards, then strictly alternating F/B, then the cool-down backwards
        expect = [("F", 0, i) for i in range(warm)]
        for i in range(num - warm):
            expect += [("F", 0, warm + i), ("B", 0, i)]
        expect += [("B", 0, i) for i in range(num - warm, num)]
        assert st.events == expect == schedule_order("1f1b", pp, r, num)  # what is simulated
        assert st.max_pending == min(pp - r, num)


def test_forward_only_runs_no_backward():
    stages = [RecordingStage(r, 3, 4, forward_only=True) for r in range(3)]
    run_threads(stages)
    for st in stages:
        assert st.events == [("F", 0, i) for i in range(4)] and st.max_pending == 0


def test_phase_functions_compose():
    """warm-up + steady + cool-down called by hand equal run_1f1b on a single stage."""
    st = RecordingStage(0, 1, 3)
    comm = QueueComm(0, 1, {})
    run_warmup(st, comm, 0)
    run_steady(st, comm, 3)
    run_cooldown(st, comm, 0)
    assert st.events == [("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1), ("F", 0, 2),
                         ("B", 0, 2)]


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


def _reference(num_layers: int, num: int):
    """The tiny model (seed 7) over `num` random micro-batches of 2 in one process: its
    config, the micro-batches, the model with its gradients, and the mean loss."""
    torch.manual_seed(0)
    cfg = tiny_model_config(num_layers=num_layers)
    tokens = torch.randint(0, cfg.vocab_size, (num * 2, cfg.seq_length))
    labels = torch.randint(0, cfg.vocab_size, (num * 2, cfg.seq_length))
    mbs = split_global_batch(tokens, labels, 2, ParallelContext())
    ref = LlamaModel(cfg, seed=7)
    ref_loss = sum(ref(mb["tokens"], mb["labels"]).mean() for mb in mbs) / num
    ref_loss.backward()
    return cfg, mbs, ref, ref_loss.item()


def _assert_matches_reference(stages, num, ref, ref_loss, got):
    """The last stage's mean loss and every stage's gradients (`got`: name -> grad) equal the
    unsplit model's."""
    assert stages[-1].loss_sum.item() / num == pytest.approx(ref_loss, rel=1e-6)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert sorted(got) == sorted(ref_grads)
    for n, g in got.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_threaded_pipeline_matches_single_model():
    """pp = 3 over 5 layers (uneven 2/2/1), 4 micro-batches: loss and every gradient."""
    pp, num = 3, 4
    cfg, mbs, ref, ref_loss = _reference(5, num)
    stages = []
    for r in range(pp):
        ctx = ParallelContext(pp=pp, rank=r, world_size=pp)
        stages.append(StageRunner(LlamaModel(cfg, ctx, seed=7), mbs, ctx))
    assert [list(s.model.layers) for s in stages] == [["0", "1"], ["2", "3"], ["4"]]
    run_threads(stages)
    _assert_matches_reference(stages, num, ref, ref_loss,
                              {n: p.grad for s in stages for n, p in s.model.named_parameters()})


@pytest.mark.parametrize("pp,vp,num", [(2, 2, 2), (2, 2, 4), (2, 3, 6), (3, 2, 6), (4, 2, 4),
                                       (4, 2, 8), (4, 3, 12)])
def test_interleaved_order_messages_and_memory(pp, vp, num):
    """Every stage gets the right activation and gradient for each (chunk, micro-batch),
    in Megatron's order - the order the simulator times (recorded here) - holding at most
    warm-up + 1 chunk activations."""
    stages = [RecordingStage(r, pp, num, vp=vp) for r in range(pp)]
    run_threads(stages, vp)
    for r, st in enumerate(stages):
        assert st.events == schedule_order("interleaved", pp, r, num, vp), r
        warm = interleaved_warmup(pp, r, vp, num, False)
        assert st.max_pending == min(warm + 1, num * vp)
        assert st.forwards == st.backwards == [num] * vp


def test_interleaved_forward_only():
    stages = [RecordingStage(r, 2, 4, forward_only=True, vp=2) for r in range(2)]
    run_threads(stages, 2)
    for st in stages:
        assert [e[0] for e in st.events] == ["F"] * 8 and st.max_pending == 0


def test_interleaved_needs_microbatches_multiple_of_pp():
    stages = [RecordingStage(r, 2, 3, vp=2) for r in range(2)]
    with pytest.raises(ValueError, match="multiple of --pipeline-model-parallel-size 2"):
        run_interleaved(stages[0], None, 2, 0, 2)


def test_megatron_layer_assignment_and_uneven_refusal():
    ctx = ParallelContext(pp=2, rank=1, world_size=2, vp=2)
    assert ctx.chunk_layers(8) == [range(2, 4), range(6, 8)]
    assert ctx.stage_layers(8) == [2, 3, 6, 7]
    assert ParallelContext(pp=4, rank=0, world_size=4, vp=3).stage_layers(12) == [0, 4, 8]
    with pytest.raises(ConfigError, match="--num-layers 5 is not divisible by "
                                          "--pipeline-model-parallel-size 2 x 2 virtual"):
        ctx.check_model(tiny_model_config(num_layers=5))
    assert resolve_virtual_stages(8, 2, None, 2) == 2  # --num-layers-per-virtual-pipeline-stage
    assert resolve_virtual_stages(8, 2, None, None) == 1
    with pytest.raises(ConfigError, match="must be a multiple of it"):
        resolve_virtual_stages(8, 2, None, 3)
    with pytest.raises(ConfigError, match="not both"):
        resolve_virtual_stages(8, 2, 2, 2)


@pytest.mark.parametrize("pp,vp,layers", [(2, 2, 4), (2, 3, 6)])
def test_threaded_interleaved_matches_single_model(pp, vp, layers):
    """Interleaved LLaMA chunks in threads: loss and every gradient equal the unsplit model."""
    num = 2 * pp
    cfg, mbs, ref, ref_loss = _reference(layers, num)
    stages = []
    for r in range(pp):
        ctx = ParallelContext(pp=pp, rank=r, world_size=pp, vp=vp)
        stages.append(StageRunner(LlamaModel(cfg, ctx, seed=7), mbs, ctx, chunks=vp))
    run_threads(stages, vp)
    _assert_matches_reference(stages, num, ref, ref_loss,
                              {n: p.grad for s in stages for n, p in s.model.named_parameters()})


@pytest.mark.parametrize("pp,num", [(2, 2), (2, 5), (3, 6), (4, 4), (4, 8), (4, 3)])
def test_zb_h1_order_is_the_simulated_one(pp, num):
    stages = [RecordingStage(r, pp, num, split=True) for r in range(pp)]
    run_threads(stages, zb=True)
    for r, st in enumerate(stages):
        assert st.events == schedule_order("zb-h1", pp, r, num), r
        assert [i for k, _, i in st.events if k == "W"] == list(range(num))


@pytest.mark.parametrize("fuse_ok", [True, False])
def test_threaded_zb_h1_matches_single_model(fuse_ok):
    """pp 3 over 5 layers (uneven), split backward: every main gradient equals the unsplit
    model's; without gradient-accumulation fusion the split is refused."""
    pp, num = 3, 4
    cfg, mbs, ref, ref_loss = _reference(5, num)
    stages = []
    for r in range(pp):
        ctx = ParallelContext(pp=pp, rank=r, world_size=pp)
        model = LlamaModel(cfg, ctx, seed=7)
        buf = GradBuffer(list(model.named_parameters()), ctx, bucket_size_mb=0.01,
                         fuse_wgrad=fuse_ok)
        stages.append(StageRunner(model, mbs, ctx, grad_sync=buf, split_backward=True))
    if not fuse_ok:
        with pytest.raises(RuntimeError, match="needs gradient-accumulation fusion"):
            stages[-1].forward_step(None if pp == 1 else torch.zeros(16, 2, 32))
            stages[-1].backward_step(None)
        return
    run_threads(stages, zb=True)
    assert all(s.wgrads == num and not s.wpending for s in stages)
    got = {}
    for s in stages:
        s.grad_sync.finish()
        got.update({n: p.main_grad for n, p in s.model.named_parameters()})
    _assert_matches_reference(stages, num, ref, ref_loss, got)


def test_split_backward_defers_linear_weight_grads_to_w():
    cfg = tiny_model_config(num_layers=2)
    ctx = ParallelContext()
    model = LlamaModel(cfg, ctx, seed=3)
    buf = GradBuffer(list(model.named_parameters()), ctx, fuse_wgrad=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    st = StageRunner(model, [{"tokens": tokens, "labels": tokens}], ctx, grad_sync=buf,
                     split_backward=True)
    st.forward_step(None)
    st.backward_step(None)
    qkv = model.get_parameter("layers.0.attention.qkv.weight")
    norm = model.get_parameter("layers.0.input_norm.weight")
    assert len(st.wpending[0]) >= 8 and not qkv.main_grad.any() and norm.main_grad.any()
    st.wgrad_step()
    assert qkv.main_grad.any() and not st.wpending


def test_schedule_flags_reach_the_config():
    from megacpt.arguments import parse_args
    base = ["--model-size", "debug-l", "--vocab-size", "300", "--mock-data", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
            "--pipeline-model-parallel-size", "2"]
    cfg, _ = parse_args(base + ["--num-layers-per-virtual-pipeline-stage", "2"])
    p = cfg.parallel
    assert resolve_virtual_stages(8, 2, p.virtual_pipeline_model_parallel_size,
                                  p.num_layers_per_virtual_pipeline_stage) == 2
    cfg, _ = parse_args(base + ["--pipeline-schedule", "zb-h1"])
    assert cfg.parallel.pipeline_schedule == "zb-h1"
    with pytest.raises(ConfigError, match="zb-h1 runs without virtual pipeline stages"):
        parse_args(base + ["--pipeline-schedule", "zb-h1",
                           "--virtual-pipeline-model-parallel-size", "2"])


class UntaggedComm(QueueComm):
    """NCCL-like: one FIFO per ordered pair of ranks, no tags; with pp 2 both neighbours are
    the same rank, so activations and gradients share a channel and must arrive in order."""

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        nxt, prv = (self.rank + 1) % self.pp, (self.rank - 1) % self.pp
        if send_next is not None:
            self.chans[(self.rank, nxt)].put(send_next)
        if send_prev is not None:
            self.chans[(self.rank, prv)].put(send_prev)
        x = self._get((prv, self.rank)) if recv_prev else None
        g = self._get((nxt, self.rank)) if recv_next else None
        assert x is None or x[0] == "act", f"rank {self.rank} expected an activation, got {x}"
        assert g is None or g[0] == "grad", f"rank {self.rank} expected a gradient, got {g}"
        return x, g


@pytest.mark.parametrize("pp,vp,num", [(2, 2, 2), (2, 2, 8), (2, 3, 6), (4, 2, 8)])
def test_interleaved_messages_match_without_tags(pp, vp, num):
    stages = [RecordingStage(r, pp, num, vp=vp) for r in range(pp)]
    chans = {(a, b): queue.Queue() for a in range(pp) for b in range(pp)}
    run_in_threads(pp, lambda r: run_interleaved(stages[r], UntaggedComm(r, pp, chans), pp, r,
                                                 vp))
