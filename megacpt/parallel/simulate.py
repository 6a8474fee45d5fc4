"""Pipeline schedule simulator: timelines, bubble share and peak activations per schedule.

    python -m megacpt.parallel.simulate --pipeline-model-parallel-size 4 \\
        --virtual-pipeline-model-parallel-size 2 --num-microbatches 8 --out pp4.png
    python -m megacpt.parallel.simulate --model-size 1393M --seq-length 2048 \\
        --micro-batch-size 1 --pipeline-model-parallel-size 2 --num-microbatches 8 ...

Each rank runs its ops in the order the real schedule runs them (`schedule_order`: 1F1B and
interleaved 1F1B are the orders `megacpt.parallel.schedule` / `.interleaved` execute, which
tests/parallel/test_pipeline_schedule.py records and compares; ZB-H1 is the zero-bubble
order of Qi et al. 2023 with the backward split into B, the input gradient, and W, the weight
gradient). An op starts when its rank is free and its inputs are there: F(v, m) needs
F(v - 1, m) (+ the P2P time), B(v, m) needs B(v + 1, m) (+ P2P), W(v, m) needs B(v, m); v is
the virtual stage c P + p of chunk c on rank p. Op costs are per virtual stage, given
(--forward-time/--backward-time/--wgrad-share, per stage; a chunk costs 1/vp) or computed from
a model shape's FLOPs (--model-size: layers, embedding on the first and LM head on the last
stage, at --tflops).

Reported per schedule: the makespan, the bubble share (idle time of all ranks over
ranks x makespan) and the peak activations per rank, in micro-batches of one whole stage
(a chunk counts 1/vp; a micro-batch counts from its F until its B, until its W for ZB-H1),
and in GiB for model shapes (Korthikanti et al.'s 34 s b h bytes per layer, bf16, flash
attention, no recomputation, tp = 1). Closed forms for uniform costs and no P2P time:

    1F1B         bubble (P - 1) / (M + P - 1)          peak on rank p: min(P - p, M)
    interleaved  bubble (P - 1) / (vp M + P - 1)       peak: min(2 (P - p - 1) + (vp - 1) P + 1,
                                                             vp M) / vp
    ZB-H1        bubble (P - 1)(F + B - W) / (M (F + B + W) + (P - 1)(F + B - W))
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from megacpt.parallel.interleaved import chunk_of, interleaved_warmup, microbatch_of
from megacpt.parallel.schedule import warmup_count

SCHEDULES = ("1f1b", "interleaved", "zb-h1")
Op = tuple  # (kind "F" | "B" | "W", chunk, micro-batch)


# ----- the order each rank runs its ops -----
def order_1f1b(pp: int, rank: int, num: int) -> list[Op]:
    warm = warmup_count(pp, rank, num, False)
    out = [("F", 0, i) for i in range(warm)]
    for i in range(num - warm):
        out += [("F", 0, warm + i), ("B", 0, i)]
    return out + [("B", 0, i) for i in range(num - warm, num)]


def order_interleaved(pp: int, rank: int, num: int, vp: int) -> list[Op]:
    total, warm = num * vp, interleaved_warmup(pp, rank, vp, num, False)

    def op(kind, k):
        return (kind, chunk_of(k, pp, vp, kind == "F"), microbatch_of(k, pp, vp))

    out = [op("F", k) for k in range(warm)]
    for k in range(total - warm):
        out += [op("F", k + warm), op("B", k)]
    return out + [op("B", k) for k in range(total - warm, total)]


def order_zb_h1(pp: int, rank: int, num: int) -> list[Op]:
    """1F1B's F/B order with the backward split: rank p holds back its first p weight-gradient
    passes W in the steady state (later stages' B reach earlier stages sooner), runs one W
    after each cool-down B (where 1F1B waits) and the rest at the end. Uniform costs give the
    closed-form bubble with at most P micro-batches alive (until W) on every rank (M >= P)."""
    warm = warmup_count(pp, rank, num, False)
    defer = rank
    out, w_next = [("F", 0, i) for i in range(warm)], 0
    for i in range(num - warm):
        out += [("F", 0, warm + i), ("B", 0, i)]
        if i + 1 - w_next > defer:
            out.append(("W", 0, w_next))
            w_next += 1
    for i in range(num - warm, num):
        out.append(("B", 0, i))
        if w_next <= i:
            out.append(("W", 0, w_next))
            w_next += 1
    return out + [("W", 0, j) for j in range(w_next, num)]


def schedule_order(name: str, pp: int, rank: int, num: int, vp: int = 1) -> list[Op]:
    if name == "1f1b":
        return order_1f1b(pp, rank, num)
    if name == "interleaved":
        return order_interleaved(pp, rank, num, vp)
    if name == "zb-h1":
        return order_zb_h1(pp, rank, num)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


# ----- costs -----
@dataclass
class Costs:
    """Time of F, B (input gradient) and W (weight gradient) of one micro-batch on each
    virtual stage (lists of length P vp); `p2p`: time of one activation/gradient message.
    Schedules without the split run B + W as one backward."""

    forward: list[float]
    backward: list[float]
    wgrad: list[float]
    p2p: float = 0.0
    #: activation bytes of one micro-batch on each virtual stage (None: not reported)
    act_bytes: list[float] | None = None

    @classmethod
    def uniform(cls, stages: int, forward: float = 1.0, backward: float = 2.0,
                wgrad_share: float = 0.5, p2p: float = 0.0) -> "Costs":
        """`stages` virtual stages of equal cost; backward = B + W with W its `wgrad_share`."""
        w = backward * wgrad_share
        return cls([forward] * stages, [backward - w] * stages, [w] * stages, p2p)


def model_costs(shape, seq: int, mbs: int, vocab: int, pp: int, vp: int, tflops: float,
                p2p_gbps: float = 0.0) -> Costs:
    """Costs of a model shape (`megacpt.sizes.ModelShape`) split as the real layer assignment:
    per token, a layer's forward is 2 x its weights + 2 s h for causal attention, the LM head
    2 h V (last stage); backward twice the forward, half of its linear part being W."""
    h, f, layers = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    heads, groups = shape.num_attention_heads, shape.num_query_groups or shape.num_attention_heads
    d = shape.kv_channels or h // heads
    w_layer = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * f
    tokens = seq * mbs
    lin, attn = 2 * w_layer * tokens, 2 * seq * h * tokens
    head = 2 * h * vocab * tokens
    per_stage = layers // (pp * vp) if vp > 1 else None
    fwd, bwd, wgr, act = [], [], [], []
    rate = tflops * 1e12 / 1e3  # FLOPs per ms
    for v in range(pp * vp):
        n = per_stage if per_stage else len(range(*_plain_range(layers, pp, v)))
        f_lin, f_attn = n * lin, n * attn
        if v == pp * vp - 1:
            f_lin += head
        fwd.append((f_lin + f_attn) / rate)
        wgr.append(f_lin / rate)
        bwd.append((f_lin + 2 * f_attn) / rate)
        act.append(34.0 * seq * mbs * h * n)
    p2p = 0.0 if not p2p_gbps else 2.0 * seq * mbs * h / (p2p_gbps * 1e9 / 1e3)
    return Costs(fwd, bwd, wgr, p2p, act)


def measure_costs(model_size: str, seq: int, mbs: int, reps: int = 3,
                  device: str = "cpu") -> tuple[float, float, float]:
    """Measured F, B (input gradient) and W (weight gradient) of the whole model in ms: the
    real split backward of the ZB-H1 schedule (`StageRunner` with a gradient buffer), the
    median of `reps` micro-batches after one warm-up."""
    import statistics
    import time

    import torch

    from megacpt.config import ModelConfig
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.grads import GradBuffer
    from megacpt.parallel.schedule import StageRunner

    cfg = ModelConfig.from_size(model_size, seq_length=seq, vocab_size=1024)
    ctx = ParallelContext.single(device)
    model = LlamaModel(cfg, ctx, seed=0)
    buf = GradBuffer(list(model.named_parameters()), ctx, fuse_wgrad=True)
    tokens = torch.randint(0, cfg.vocab_size, (mbs, seq), device=ctx.device)
    mb = {"tokens": tokens, "labels": tokens}

    def clock(fn):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t)

    times = []
    for _ in range(reps + 1):
        st = StageRunner(model, [mb], ctx, grad_sync=buf, split_backward=True)
        times.append((clock(lambda: st.forward_step(None)), clock(lambda: st.backward_step(None)),
                      clock(st.wgrad_step)))
        buf.zero()
    return tuple(statistics.median(t[i] for t in times[1:]) for i in range(3))


def _plain_range(layers: int, pp: int, p: int) -> tuple[int, int]:
    base, extra = divmod(layers, pp)
    start = p * base + min(p, extra)
    return start, start + base + (1 if p < extra else 0)


# ----- the event simulation -----
@dataclass
class Result:
    schedule: str
    pp: int
    vp: int
    num: int
    timeline: list[list[tuple[float, float, Op]]] = field(default_factory=list)
    makespan: float = 0.0
    bubble: float = 0.0
    peak: list[float] = field(default_factory=list)  # stage-micro-batches alive per rank
    peak_bytes: list[float] | None = None


def simulate(name: str, pp: int, num: int, vp: int = 1, costs: Costs | None = None) -> Result:
    """Run every rank's ops in `schedule_order` as early as dependencies allow."""
    vp = vp if name == "interleaved" else 1
    costs = costs or Costs.uniform(pp * vp)
    if len(costs.forward) != pp * vp:
        raise ValueError(f"costs are given for {len(costs.forward)} virtual stages, the "
                         f"schedule has {pp * vp}")
    split = name == "zb-h1"
    orders = [schedule_order(name, pp, r, num, vp) for r in range(pp)]
    done: dict[tuple, float] = {}
    pos, free = [0] * pp, [0.0] * pp
    res = Result(name, pp, vp, num, [[] for _ in range(pp)])
    last_v = pp * vp - 1
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, c, m = orders[r][pos[r]]
                v = c * pp + r
                if kind == "F":
                    dep = None if v == 0 else ("F", v - 1, m)
                elif kind == "B":
                    dep = ("F", v, m) if v == last_v else ("B", v + 1, m)
                else:
                    dep = ("B", v, m)
                if dep is not None and dep not in done:
                    break
                ready = 0.0 if dep is None else done[dep] + (
                    costs.p2p if dep[1] != v else 0.0)
                cost = {"F": costs.forward[v], "W": costs.wgrad[v],
                        "B": costs.backward[v] + (0.0 if split else costs.wgrad[v])}[kind]
                start = max(free[r], ready)
                free[r] = start + cost
                done[(kind, v, m)] = free[r]
                res.timeline[r].append((start, free[r], (kind, c, m)))
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{name}: the schedule deadlocks (pp {pp}, vp {vp}, M {num})")
    res.makespan = max(free)
    busy = sum(e - s for tl in res.timeline for s, e, _ in tl)
    res.bubble = 1.0 - busy / (pp * res.makespan)
    res.peak, res.peak_bytes = _peaks(res, costs, split)
    return res


def _peaks(res: Result, costs: Costs, split: bool) -> tuple[list[float], list[float] | None]:
    """Peak stage-micro-batches (and bytes) alive per rank: from F's start to the end of the
    op that frees it (B, or W for ZB-H1)."""
    free_kind = "W" if split else "B"
    peaks, peak_bytes = [], [] if costs.act_bytes else None
    for r, tl in enumerate(res.timeline):
        events = []
        for s, e, (kind, c, m) in tl:
            v = c * res.pp + r
            b = costs.act_bytes[v] if costs.act_bytes else 0.0
            if kind == "F":
                events.append((s, 1, 1.0 / res.vp, b))
            elif kind == free_kind:
                events.append((e, 0, -1.0 / res.vp, -b))
        events.sort()
        alive = alive_b = best = best_b = 0.0
        for _, _, d, db in events:
            alive, alive_b = alive + d, alive_b + db
            best, best_b = max(best, alive), max(best_b, alive_b)
        peaks.append(round(best, 9))
        if peak_bytes is not None:
            peak_bytes.append(best_b)
    return peaks, peak_bytes


def closed_form_bubble(name: str, pp: int, num: int, vp: int = 1, f: float = 1.0,
                       b: float = 1.0, w: float = 1.0) -> float:
    """The bubble shares of the module docstring (uniform costs; b + w = whole backward)."""
    if name == "1f1b":
        return (pp - 1) / (num + pp - 1)
    if name == "interleaved":
        return (pp - 1) / (vp * num + pp - 1)
    idle = (pp - 1) * (f + b - w)
    return idle / (num * (f + b + w) + idle)


# ----- report and pictures -----
COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#C6A15B"}


def report_line(res: Result) -> str:
    peak = ", ".join(f"{p:g}" for p in res.peak)
    line = (f"{res.schedule:12s} P={res.pp} vp={res.vp} M={res.num}: makespan "
            f"{res.makespan:.2f}, bubble {100 * res.bubble:.1f}%, peak activations per rank "
            f"[{peak}] stage-micro-batches")
    if res.peak_bytes:
        line += f" = max {max(res.peak_bytes) / 2**30:.1f} GiB"
    return line


def plot(results: list[Result], path: str, title: str = "") -> None:
    """One timeline per schedule (rows: ranks; F blue, B green, W ochre; number = micro-batch;
    chunks of interleaved runs shaded lighter), saved as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the timeline picture needs matplotlib: pip install matplotlib") \
            from None
    span = max(r.makespan for r in results)
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 1.0 + 0.42 * sum(
        r.pp for r in results) + 0.5 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        for rank, tl in enumerate(res.timeline):
            for s, e, (kind, c, m) in tl:
                alpha = 1.0 - 0.45 * (c / max(res.vp - 1, 1)) if res.vp > 1 else 1.0
                ax.barh(rank, e - s, left=s, height=0.8, color=COLORS[kind], alpha=alpha,
                        edgecolor="white", linewidth=0.4)
                if (e - s) / span > 0.012:
                    ax.text((s + e) / 2, rank, str(m), ha="center", va="center", fontsize=6,
                            color="white")
        ax.set_ylim(res.pp - 0.5, -0.5)
        ax.set_xlim(0, span)
        ax.set_yticks(range(res.pp))
        ax.set_yticklabels([f"rank {r}" for r in range(res.pp)], fontsize=7)
        peak = max(res.peak_bytes) / 2**30 if res.peak_bytes else max(res.peak)
        unit = "GiB" if res.peak_bytes else "stage-micro-batches"
        ax.set_title(f"{res.schedule} (vp={res.vp}): bubble {100 * res.bubble:.1f}%, "
                     f"peak activations {peak:.3g} {unit}", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("time (ms)" if results[0].peak_bytes else "time (forward = 1)",
                           fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megacpt.parallel.simulate",
                                description="Simulate pipeline schedules: timeline PNG, "
                                            "bubble share, peak activations.")
    p.add_argument("--pipeline-model-parallel-size", type=int, required=True)
    p.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=2,
                   help="model chunks per rank for the interleaved schedule")
    p.add_argument("--num-microbatches", type=int, required=True,
                   help="micro-batches per step and data-parallel rank (M)")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help=f"comma-separated, from {', '.join(SCHEDULES)}")
    p.add_argument("--forward-time", type=float, default=1.0, help="F of one stage")
    p.add_argument("--backward-time", type=float, default=2.0, help="B + W of one stage")
    p.add_argument("--wgrad-share", type=float, default=0.5,
                   help="share of the backward that is weight gradient (W)")
    p.add_argument("--p2p-time", type=float, default=0.0, help="one P2P message")
    p.add_argument("--model-size", help="registered shape (e.g. 1393M): costs from FLOPs")
    p.add_argument("--num-layers", type=int, help="override the shape's layer count")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--ffn-hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-query-groups", type=int)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=36152)
    p.add_argument("--tflops", type=float, default=400.0,
                   help="achieved TFLOP/s per GPU for model shapes")
    p.add_argument("--p2p-gbps", type=float, default=0.0,
                   help="P2P bandwidth in GB/s for model shapes (0: free)")
    p.add_argument("--measure", action="store_true",
                   help="time F, B and W of --model-size here (--device) and simulate with "
                        "those costs split evenly over the stages")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="PNG path for the timelines")
    p.add_argument("--title", default="")
    return p


def _shape(a):
    from megacpt import sizes

    shape = sizes.get_size(a.model_size)
    over = {k: getattr(a, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                       "num_attention_heads", "num_query_groups")
            if getattr(a, k) is not None}
    return sizes.ModelShape(**{**shape.__dict__, **over})


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    pp, vp, num = a.pipeline_model_parallel_size, a.virtual_pipeline_model_parallel_size, \
        a.num_microbatches
    names = [n.strip() for n in a.schedules.split(",") if n.strip()]
    try:
        if pp < 2 or num < 1 or vp < 1:
            raise ValueError("need --pipeline-model-parallel-size >= 2, "
                             "--num-microbatches >= 1 and virtual stages >= 1")
        bad = [n for n in names if n not in SCHEDULES]
        if bad:
            raise ValueError(f"--schedules: unknown {bad}; choose from {', '.join(SCHEDULES)}")
        if "interleaved" in names and num % pp:
            raise ValueError(f"interleaved: --num-microbatches {num} must be a multiple of "
                             f"--pipeline-model-parallel-size {pp} (as Megatron)")
        shape = _shape(a) if a.model_size else None
        if a.measure:
            if not a.model_size:
                raise ValueError("--measure needs --model-size")
            f, b, w = measure_costs(a.model_size, a.seq_length, a.micro_batch_size,
                                    device=a.device)
            print(f"measured on {a.device}: F {f:.2f} ms, B {b:.2f} ms, W {w:.2f} ms "
                  f"(whole model, one micro-batch)")
            a.forward_time, a.backward_time, a.wgrad_share = f / pp, (b + w) / pp, w / (b + w)
            shape = None
        results = []
        for n in names:
            v = vp if n == "interleaved" else 1
            if shape is not None:
                if v > 1 and shape.num_layers % (pp * v):
                    raise ValueError(f"interleaved: {shape.num_layers} layers do not split "
                                     f"into {pp} x {v} equal chunks")
                costs = model_costs(shape, a.seq_length, a.micro_batch_size, a.vocab_size,
                                    pp, v, a.tflops, a.p2p_gbps)
            else:
                costs = Costs.uniform(pp * v, a.forward_time / v, a.backward_time / v,
                                      a.wgrad_share, a.p2p_time)
            results.append(simulate(n, pp, num, v, costs))
    except (ValueError, KeyError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    for res in results:
        print(report_line(res))
    if a.out:
        plot(results, a.out, a.title)
        print(f"timelines written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
