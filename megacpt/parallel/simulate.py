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
    """1F1B's F/B order; rank p holds back up to P - p - 1 weight-gradient passes W in the
    steady state and runs one after each cool-down B (where 1F1B waits), the rest at the end."""
    warm = warmup_count(pp, rank, num, False)
    defer = pp - rank - 1
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
