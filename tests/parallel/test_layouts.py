"""The proof: every parallel layout trains exactly like one process (CPU, gloo, spawn).

Each world size is spawned once (module fixtures) and runs all of its layouts inside; the
single-process reference runs here. Per-step losses of 5 AdamW steps (clipping active), the
forward-only loss after training and the gradient norms must match the reference: losses
within 1e-5 relative in fp32. Also checked in the same worlds: the comm primitives against
their definitions, tp2/tp4 (with and without sequence parallelism) forward loss, logits,
initial weights and every unsharded gradient against the unsplit model, and ZeRO-1 optimizer
state against plain data parallelism, reloaded into one process. Interleaved 1F1B (virtual
stages 2: pp2, pp4, tp2pp2, pp2dp2) runs an 8-layer model against its own single-process
reference, and a pp2vp2 checkpoint continues in one process like the uninterrupted run.
"""
import pytest
import torch

from megacpt.checkpoint import convert_checkpoint, load_checkpoint
from megacpt.config import Config
import _harness as T
from megacpt.model import LlamaModel
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.optimizer import build_optimizer
from megacpt.parallel.schedule import forward_backward, split_global_batch
from megacpt.parallel.volume import Layout, step_bytes

CFG = T.tiny_model_config()
OPT = T.tiny_optim_config()
MBS, GLOBAL, STEPS = 2, 8, 5
BATCHES = T.random_global_batches(STEPS, GLOBAL, CFG.seq_length, CFG.vocab_size, seed=11)
GRAD_TOKENS, GRAD_LABELS = T.random_global_batches(1, 4, CFG.seq_length, CFG.vocab_size,
                                                   seed=5)[0]

CFG8 = T.tiny_model_config(num_layers=8)  # 8 = pp4 x vp2 chunks of one layer
# a smaller LR than OPT's: this model at lr 1e-2 is chaotic enough that tp2's summation order
# alone moves step 5 by 4e-4 (measured with and without virtual stages alike); the clip binds
OPT8 = T.tiny_optim_config(lr=3e-3)
ZB = {2: [dict(pp=2)], 4: [dict(pp=4), dict(pp=2, use_distributed_optimizer=True),
                           dict(tp=2, pp=2, sequence_parallel=True)]}
ZB_NAMES = {2: ["tp1pp2dp1+zb-h1"], 4: ["tp1pp4dp1+zb-h1", "tp1pp2dp2+zero1+zb-h1",
                                         "tp2pp2dp1+sp+zb-h1"]}
VIRTUAL = {2: [dict(pp=2, vp=2)],
           4: [dict(pp=4, vp=2), dict(tp=2, pp=2, vp=2), dict(pp=2, vp=2)]}
VIRTUAL_NAMES = {2: ["tp1pp2dp1vp2"], 4: ["tp1pp4dp1vp2", "tp2pp2dp1vp2", "tp1pp2dp2vp2"]}

LAYOUTS = {
    2: [dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2), dict(),
        dict(use_distributed_optimizer=True),
        # one bucket per parameter: reductions start mid-backward, ZeRO shards cut params
        dict(bucket_size_mb=0.002), dict(use_distributed_optimizer=True, bucket_size_mb=0.002)],
    4: [dict(tp=4), dict(pp=4), dict(tp=2, pp=2), dict(tp=2), dict(pp=2)],
    8: [dict(tp=2, pp=2), dict(tp=2, pp=2, sequence_parallel=True,
                               use_distributed_optimizer=True)],
}
EXPECTED = {2: ["tp2pp1dp1", "tp2pp1dp1+sp", "tp1pp2dp1", "tp1pp1dp2", "tp1pp1dp2+zero1",
                "tp1pp1dp2", "tp1pp1dp2+zero1"],
            4: ["tp4pp1dp1", "tp1pp4dp1", "tp2pp2dp1", "tp2pp1dp2", "tp1pp2dp2"],
            8: ["tp2pp2dp2", "tp2pp2dp2+sp+zero1"]}


def _train(**layout):
    return ("train_losses", dict(model_cfg=CFG, optim_cfg=OPT, batches=BATCHES,
                                 micro_batch_size=MBS, **layout))


def _grads(tp, sp):
    return ("tp_forward_grads", dict(model_cfg=CFG, tokens=GRAD_TOKENS, labels=GRAD_LABELS,
                                     tp=tp, sequence_parallel=sp))


def _state_jobs():
    """dp2 with and without ZeRO-1 for 2 steps, returning weights and optimizer state; and
    the same in bf16 (masters in the state)."""
    kw = dict(model_cfg=CFG, optim_cfg=OPT, batches=BATCHES[:2], micro_batch_size=MBS,
              return_state=True)
    return [("train_losses", dict(kw, use_distributed_optimizer=z, dtype=dt))
            for dt in (torch.float32, torch.bfloat16) for z in (False, True)]


def _virtual(world):
    return [("train_losses", dict(model_cfg=CFG8, optim_cfg=OPT8, batches=BATCHES,
                                  micro_batch_size=MBS, **lay)) for lay in VIRTUAL[world]]


def _zb(world):
    return [_train(schedule="zb-h1", **lay) for lay in ZB[world]]


def _spawn(world, extra=()):
    jobs = list(extra) + [_train(**lay) for lay in LAYOUTS[world]]
    return T.run_distributed(T.jobs_worker, world, jobs, timeout=420)


@pytest.fixture(scope="module")
def reference():
    with T.torch_threads(1):
        return T.train_losses(CFG, OPT, BATCHES, MBS)


@pytest.fixture(scope="module")
def reference8():
    with T.torch_threads(1):
        ref = T.train_losses(CFG8, OPT8, BATCHES, MBS)
    assert max(ref["grad_norms"]) > OPT8.clip_grad and len(set(ref["losses"])) == STEPS
    return ref


@pytest.fixture(scope="module")
def interleaved_ckpt(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pp2vp2") / "ckpt")


@pytest.fixture(scope="module")
def world2(interleaved_ckpt):
    save = ("train_and_save", dict(model_cfg=CFG8, optim_cfg=OPT8, batches=BATCHES[:2],
                                   micro_batch_size=MBS, save_dir=interleaved_ckpt, pp=2, vp=2))
    return _spawn(2, [("comm_check", {}), _grads(2, False), _grads(2, True)] + _state_jobs()
                  + [("vocab_ce_check", {"vocab_size": 100}), save] + _virtual(2) + _zb(2))


# interleaved: pp4vp2 and pp2dp2vp2 have M == P (all warm-up), tp2pp2vp2 M = 2P (steady state)
COUNTED = [dict(tp=2, pp=2), dict(tp=2, pp=2, sequence_parallel=True),
           dict(pp=2, use_distributed_optimizer=True), dict(tp=2),
           dict(pp=2, vp=2), dict(pp=4, vp=2), dict(tp=2, pp=2, vp=2),
           dict(tp=2, pp=2, vp=2, sequence_parallel=True), dict(pp=2, schedule="zb-h1")]


def _count_cfg(layout):
    return CFG8 if layout.get("vp", 1) > 1 else CFG  # CFG8: 8 layers for pp4 x vp2 chunks


def _count(**layout):
    return ("comm_bytes_of_step", dict(model_cfg=_count_cfg(layout), optim_cfg=OPT,
                                       batch=BATCHES[0], micro_batch_size=MBS, **layout))


@pytest.fixture(scope="module")
def world4():
    return _spawn(4, [_grads(4, False), _grads(4, True)] + [_count(**c) for c in COUNTED]
                  + _virtual(4) + _zb(4))


GROUP_LAYOUTS = [(2, 2), (4, 1), (1, 4), (2, 4), (8, 1)]


@pytest.fixture(scope="module")
def world8():
    return _spawn(8, [("process_group_members", {"layouts": GROUP_LAYOUTS})])


def _layout_results(ranks, world):
    n = len(LAYOUTS[world])
    per_rank = [r[-n:] for r in ranks]
    for r in per_rank[1:]:  # the contract: every rank reports the same numbers
        assert [x["losses"] for x in r] == [x["losses"] for x in per_rank[0]]
        assert [x["grad_norms"] for x in r] == [x["grad_norms"] for x in per_rank[0]]
    return per_rank[0]


def _check_against(reference, results, names):
    assert [r["layout"] for r in results] == names
    for r in results:
        assert r["losses"] == pytest.approx(reference["losses"], rel=1e-5), r["layout"]
        assert r["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5), r["layout"]
        assert r["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4), r["layout"]


def test_reference_is_not_trivial(reference):
    # the clip binds and the loss moves, so a layout that diverged would show
    assert max(reference["grad_norms"]) > OPT.clip_grad
    assert len(set(round(v, 4) for v in reference["losses"])) == STEPS


@pytest.mark.parametrize("world", [2, 4, 8])
def test_layouts_equal_single_process(reference, world, request):
    ranks = request.getfixturevalue(f"world{world}")
    _check_against(reference, _layout_results(ranks, world), EXPECTED[world])


@pytest.mark.parametrize("world", [2, 4])
def test_interleaved_layouts_equal_single_process(reference8, world, request):
    ranks = request.getfixturevalue(f"world{world}")
    n, k, z = len(LAYOUTS[world]), len(VIRTUAL[world]), len(ZB[world])
    got = [r[-n - z - k:-n - z] for r in ranks]
    for r in got[1:]:
        assert [x["losses"] for x in r] == [x["losses"] for x in got[0]]
    _check_against(reference8, got[0], VIRTUAL_NAMES[world])


@pytest.mark.parametrize("world", [2, 4])
def test_zero_bubble_layouts_equal_single_process(reference, world, request):
    """ZB-H1 (weight gradients deferred, 5 layers split unevenly) trains like one process."""
    ranks = request.getfixturevalue(f"world{world}")
    n, k = len(LAYOUTS[world]), len(ZB[world])
    _check_against(reference, ranks[0][-n - k:-n], ZB_NAMES[world])


def test_interleaved_checkpoint_continues_in_one_process(reference8, world2, interleaved_ckpt,
                                                          tmp_path):
    """pp2vp2 (layers 0,1,4,5 | 2,3,6,7 per rank) saved after 2 steps, converted to tp1pp1 with
    its optimizer state: steps 3-5 give the uninterrupted single-process losses."""
    assert world2[0][8] == pytest.approx(reference8["losses"][:2], rel=1e-5)
    conv = convert_checkpoint(interleaved_ckpt, str(tmp_path / "tp1pp1"), tp=1, pp=1)
    model = LlamaModel(CFG8, seed=None)
    opt = build_optimizer(model, OPT8, model.ctx)
    it, _ = load_checkpoint(conv, model, opt, Config(model=CFG8, optim=OPT8), model.ctx)
    assert it == 2
    losses = []
    for tokens, labels in BATCHES[2:]:
        opt.zero_grad()
        losses.append(forward_backward(model, split_global_batch(tokens, labels, MBS,
                                                                 model.ctx), model.ctx,
                                       grad_sync=opt.grad_sync))
        opt.step(OPT8.lr)
    assert losses == pytest.approx(reference8["losses"][2:], rel=1e-5)


def test_sequence_parallel_equals_without(world2):
    res = {r["layout"]: r for r in _layout_results(world2, 2)}
    a, b = res["tp2pp1dp1"], res["tp2pp1dp1+sp"]
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)


def test_comm_primitives(world2):
    x = [T.comm_input(r) for r in range(2)]
    got = [ranks[0] for ranks in world2]
    for name in T.COMM_FUNCS:
        outs = [got[r][name][0] for r in range(2)]
        grads = [got[r][name][1] for r in range(2)]
        gy = [T.comm_grad(name, r, outs[r].shape) for r in range(2)]
        if name == "copy_to_tp":
            exp_out, exp_grad = x, [gy[0] + gy[1]] * 2
        elif name == "reduce_from_tp":
            exp_out, exp_grad = [x[0] + x[1]] * 2, gy
        elif name == "scatter_to_tp":
            exp_out = [x[r].chunk(2, -1)[r] for r in range(2)]
            exp_grad = [torch.cat(gy, -1)] * 2
        elif name == "gather_from_tp":
            exp_out = [torch.cat(x, -1)] * 2
            exp_grad = [gy[r].chunk(2, -1)[r] for r in range(2)]
        elif name == "scatter_to_sp":
            exp_out = [x[r].chunk(2, 0)[r] for r in range(2)]
            exp_grad = [torch.cat(gy, 0)] * 2
        elif name == "gather_from_sp":
            exp_out = [torch.cat(x, 0)] * 2
            exp_grad = [(gy[0] + gy[1]).chunk(2, 0)[r] for r in range(2)]
        else:  # reduce_scatter_to_sp
            exp_out = [(x[0] + x[1]).chunk(2, 0)[r] for r in range(2)]
            exp_grad = [torch.cat(gy, 0)] * 2
        for r in range(2):
            assert torch.equal(outs[r], exp_out[r]), f"{name} forward on rank {r}"
            assert torch.equal(grads[r], exp_grad[r]), f"{name} backward on rank {r}"


@pytest.fixture(scope="module")
def unsplit():
    with T.torch_threads(1):
        model = LlamaModel(CFG, seed=1234)
        loss = model(GRAD_TOKENS, GRAD_LABELS)
        loss.mean().backward()
        with torch.no_grad():
            logits = model(GRAD_TOKENS)
    return {"loss": loss.detach(), "logits": logits,
            "weights": {n: p.detach() for n, p in model.named_parameters()},
            "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("world,index,sp", [(2, 1, False), (2, 2, True), (4, 0, False),
                                            (4, 1, True)])
def test_tensor_parallel_forward_and_every_gradient(unsplit, world, index, sp, request):
    got = request.getfixturevalue(f"world{world}")[0][index]
    assert got["logits"].shape == (4, CFG.seq_length, CFG.vocab_size)
    assert sorted(got["grads"]) == sorted(unsplit["grads"])
    for name, w in unsplit["weights"].items():
        assert torch.equal(got["weights"][name], w), f"init of {name} depends on the layout"
    torch.testing.assert_close(got["loss"], unsplit["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["logits"], unsplit["logits"], rtol=1e-5, atol=1e-6)
    for name, g in unsplit["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


def _expected_members(tp, pp, world, rank):
    dp = world // (tp * pp)
    t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def g(t_, d_, p_):
        return t_ + tp * (d_ + dp * p_)

    exp = {"tp": [g(i, d, p) for i in range(tp)], "dp": [g(t, i, p) for i in range(dp)],
           "pp": [g(t, d, i) for i in range(pp)],
           "mp": sorted(g(i, d, j) for i in range(tp) for j in range(pp))}
    return {k: (v if len(v) > 1 else None) for k, v in exp.items()}


def test_process_groups_follow_the_rank_order(world8):
    for rank, results in enumerate(world8):
        for (tp, pp), (name, members) in zip(GROUP_LAYOUTS, results[0]):
            assert name == f"tp{tp}pp{pp}dp{8 // (tp * pp)}"
            assert members == _expected_members(tp, pp, 8, rank), (name, rank)


@pytest.mark.parametrize("index", range(len(COUNTED)))
def test_measured_traffic_matches_volume_formulas(world4, index):
    """Bytes actually sent per axis in one step equal megacpt.parallel.volume's formulas
    (fp32 activations and params; ZeRO-1 as gloo runs it; interleaved 1F1B and ZB-H1)."""
    lay = COUNTED[index]
    for rank, results in enumerate(world4):
        got = results[2 + index]
        layout = Layout(tp=lay.get("tp", 1), pp=lay.get("pp", 1), dp=got["dp_size"],
                        sequence_parallel=lay.get("sequence_parallel", False),
                        zero1=lay.get("use_distributed_optimizer", False), vp=lay.get("vp", 1))
        exp = step_bytes(_count_cfg(lay), layout, got["pp_rank"], MBS, got["num_microbatches"],
                         act_bytes=4, param_bytes=4, zero1_on_gloo=True)
        for axis in ("tp", "pp", "dp"):
            assert got[axis] == pytest.approx(exp[axis], rel=1e-9), (layout.name, rank, axis)
        assert got["tp"] + got["pp"] + got["dp"] > 0


def _state_results(world2):
    return world2[0][3:7]  # plain fp32, zero1 fp32, plain bf16, zero1 bf16


def test_vocab_parallel_cross_entropy_with_a_fully_padded_rank(world2):
    """vocab 100 padded to 256 over tp2: rank 1 holds only padding columns."""
    logits, target = T.ce_logits()
    full = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(full[..., :100].reshape(-1, 100), target.reshape(-1),
                                            reduction="none").view(target.shape)
    ref.sum().backward()
    for ranks in world2:
        loss, grad = ranks[7]
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, full.grad, rtol=1e-6, atol=1e-7)
        assert not grad[..., 100:].any()


def test_zero1_state_equals_plain_data_parallel(world2):
    plain, zero, plain16, zero16 = _state_results(world2)
    assert zero["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert zero16["losses"] == pytest.approx(plain16["losses"], rel=1e-3)
    for a, b in ((plain, zero), (plain16, zero16)):
        sa, sb = a["optimizer"], b["optimizer"]
        assert sa["step"] == sb["step"] == 2
        assert sorted(sa["state"]) == sorted(sb["state"]) == sorted(a["model"])
        for name, st in sa["state"].items():
            assert sorted(st) == sorted(sb["state"][name])
            for k, v in st.items():
                assert v.shape == a["model"][name].shape and v.dtype == torch.float32
                torch.testing.assert_close(sb["state"][name][k], v, rtol=1e-4, atol=1e-6,
                                           msg=f"{name}.{k}")
    assert all("master" in st for st in zero16["optimizer"]["state"].values())
    assert not any("master" in st for st in zero["optimizer"]["state"].values())


def test_zero1_state_reloads_into_one_process(reference, world2):
    """dp2 ZeRO-1 state after 2 steps, loaded by a single-process optimizer, continues
    exactly like the uninterrupted single-process run."""
    zero = _state_results(world2)[1]
    model = LlamaModel(CFG, seed=0)
    model.load_state_dict(zero["model"])
    opt = build_optimizer(model, OPT, model.ctx)
    opt.load_state_dict(zero["optimizer"])
    losses = []
    for tokens, labels in BATCHES[2:]:
        opt.zero_grad()
        losses.append(forward_backward(model, split_global_batch(tokens, labels, MBS,
                                                                 model.ctx), model.ctx))
        opt.step(OPT.lr)
    assert losses == pytest.approx(reference["losses"][2:], rel=1e-5)
