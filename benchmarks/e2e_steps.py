"""The training steps `bench_e2e.py` times: megacpt's and transformers' LlamaForCausalLM, set up
alike (see bench_e2e's docstring, "Fair comparison"), and the torch.profiler summary.

`build_step(impl, cfg, batch, device, dtype, accum) -> (step, notes)`: `step()` runs one
optimizer step (zero grads, `accum` forward/backward passes, clip, AdamW) and returns the
mean loss as a float; `notes` says what still differs from megacpt's setup.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil

import torch

from benchmarks.common import hf_imports
from megacpt.config import ModelConfig, OptimizerConfig


def megacpt_step_fn(cfg: ModelConfig, batch, device, dtype, variant: str = "megacpt",
                    accum: int = 1):
    from megacpt.model import LlamaModel
    from megacpt.parallel.context import ParallelContext
    from megacpt.parallel.optimizer import build_optimizer
    from megacpt.parallel.schedule import forward_backward

    if variant == "megacpt+compile":
        cfg = dataclasses.replace(cfg, compile=True)
    elif variant == "megacpt-kernels":  # the same model with the torch references
        cfg = dataclasses.replace(cfg, use_kernels=False)
    ctx = ParallelContext.single(device)
    model = LlamaModel(cfg, ctx, dtype=dtype, device=device)
    print(model.describe(), flush=True)
    opt = build_optimizer(model, OptimizerConfig(), ctx)
    micro = [batch] * accum

    def step() -> float:
        opt.zero_grad()
        loss = forward_backward(model, micro, ctx, grad_sync=opt.grad_sync)
        opt.step(1e-4)
        return float(loss)

    return step, model.describe()


class _ModulePatch:
    """What `apply_liger_kernel_to_llama` changed in transformers' llama module, so the patch
    is on only while the hf+liger step runs (other HF rows keep the plain model)."""

    def __init__(self, module):
        self.module = module
        self.before = self._snapshot()

    def _snapshot(self) -> dict:
        snap = {("mod", k): v for k, v in vars(self.module).items()}
        for k, v in vars(self.module).items():
            if isinstance(v, type) and v.__module__ == self.module.__name__:
                snap.update({(v, a): x for a, x in vars(v).items()})
        return snap

    def capture(self) -> None:
        """Call after patching: remember the patched entries and switch back to plain."""
        after = self._snapshot()
        self.patched = {k: v for k, v in after.items() if self.before.get(k, v) is not v
                        or k not in self.before}
        self._apply({k: self.before.get(k) for k in self.patched})

    def _apply(self, entries: dict) -> None:
        for (owner, name), v in entries.items():
            target = self.module if owner == "mod" else owner
            if v is None:
                if hasattr(target, name):
                    delattr(target, name)
            else:
                setattr(target, name, v)

    def __enter__(self):
        self._apply(self.patched)

    def __exit__(self, *exc):
        self._apply({k: self.before.get(k) for k in self.patched})


def hf_step_fn(cfg: ModelConfig, batch, device, dtype, variant: str, accum: int = 1):
    hf_imports()
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    patch = None
    if variant == "hf+liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        patch = _ModulePatch(modeling_llama)
        apply_liger_kernel_to_llama()
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_hidden_size,
                         num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim,
                         max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
                         tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    with torch.device(device):  # initialise on the device: a CPU init of 1.8B params is slow
        model = LlamaForCausalLM(hf_cfg)
    if patch is not None:
        patch.capture()  # the model holds liger's modules; the module-level patch goes off
    model.to(dtype=dtype)
    if cfg.recompute_activations:
        model.gradient_checkpointing_enable()
    model.train()
    fwd = torch.compile(model) if variant == "hf+compile" else model
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimizerConfig()
    if dtype == torch.float32:
        masters = params
    else:  # fp32 masters and fp32 accumulation of each micro-batch's gradient, like megacpt
        masters = [p.detach().float().clone().requires_grad_() for p in params]
        for p, m in zip(params, masters):
            p.register_post_accumulate_grad_hook(_accumulate_into(m))
    fused = {"fused": True} if device.type == "cuda" else {}
    groups = [{"params": [m for m in masters if m.dim() >= 2]},  # decay on matrices only
              {"params": [m for m in masters if m.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(optim.adam_beta1, optim.adam_beta2),
                            eps=optim.adam_eps, weight_decay=optim.weight_decay, **fused)
    tokens, labels = batch["tokens"], batch["labels"]

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            # labels are already shifted: shift_labels keeps HF from shifting them again
            out = fwd(input_ids=tokens, labels=labels, shift_labels=labels)
            (out.loss / accum).backward()
            total += out.loss.detach()
        torch.nn.utils.clip_grad_norm_(masters, optim.clip_grad)
        opt.step()
        if masters is not params:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
        return float(total) / accum

    def step() -> float:
        if patch is None:
            return run()
        with patch:
            return run()

    notes = ("HF LlamaForCausalLM, sdpa attention, HF's own init, torch AdamW's default "
             "implementation for the device" + (", liger kernels" if patch else ""))
    return step, notes


def _accumulate_into(master: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = p.grad.float()
        else:
            master.grad.add_(p.grad)
        p.grad = None
    return hook


def build_step(impl: str, cfg: ModelConfig, batch, device, dtype, accum: int):
    if impl.startswith("megacpt"):
        return megacpt_step_fn(cfg, batch, device, dtype, impl, accum)
    return hf_step_fn(cfg, batch, device, dtype, impl, accum)


def profile_steps(step, steps: int, device, trace_path: str, top: int = 25) -> list[dict]:
    """Run `steps` steps under torch.profiler: the `top` ops by self device time per step
    (CPU ops on CPU); the Chrome trace goes to trace_path + '.gz'."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
    prof.export_chrome_trace(trace_path)
    with open(trace_path, "rb") as src, gzip.open(trace_path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)  # chrome://tracing and Perfetto read .json.gz
    os.remove(trace_path)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:120], "self_ms_per_step": getattr(e, attr) / 1e3 / steps,
             "pct": 100.0 * getattr(e, attr) / total, "calls_per_step": e.count / steps}
            for e in events[:top]]
