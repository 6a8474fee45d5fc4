"""The training loop: build everything from the config, then step, log, validate and save.

`Trainer(cfg, opts, ctx)` builds, in this order, so that bad input fails before any compute:
input checks (`megacpt.training.checks`) -> parallel context (and the layout of a `--load`
checkpoint) -> LR schedule -> data (`megacpt.training.data.TrainData`, at the checkpoint's
position when resuming) -> model (`LlamaModel`, one pipeline stage) -> weights-only init
(`--init-from`, CPT: iteration 0, LR re-warm-up) -> optimizer (`build_optimizer`, fresh) ->
exact resume (`--load`: model, optimizer, counters, RNG).
`Trainer.run()` then loops over optimizer steps:

    global batch [G, s] -> this dp rank's micro-batches -> forward_backward (1F1B when pp > 1)
    -> optimizer.step(lr) (skipped, and counted, when the loss or grad norm is not finite)
    -> metrics row -> validation every --eval-interval -> checkpoint every --save-interval

and stops at --train-iters, after --exit-interval (saving first), or on SIGTERM/SIGUSR1/SIGINT
(saving first, then returning normally so the CLI exits 0). Iterations are counted as steps
done: the row/checkpoint of iteration k comes after k optimizer steps.

`callbacks` (tests, fault injection) maps event names to functions:
`after_backward(trainer, iteration, loss) -> float | None` (runs between backward and the
optimizer step; a returned float replaces the loss) and `after_step(trainer, row)`.

State a checkpoint's `state` dict holds beside model and optimizer (the checkpoint module
stores it: `meta.json` keeps the JSON parts, `rng/rank_{r}.pt` the per-rank RNG):

    {"scheduler": LRSchedule.state_dict(),
     "data": TrainData.state_dict(),        # the blend's position (megacpt.data.blend)
     "counters": Counters.state_dict(),     # consumed samples/tokens, skipped steps, ...
     "rng": get_rng_state(),                # this rank's RNG streams (tensors / ints only)
     "run_options": {...}}                  # megacpt.arguments.RunOptions of the saving run

RNG states are converted to tensors, ints and strings, so `torch.load(weights_only=True)`
reads them back (numpy's state array and Python's state tuple are not plain tensors).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megacpt.arguments import RunOptions, save_config
from megacpt.config import Config
from megacpt.model.llama import LlamaModel
from megacpt.parallel.context import ParallelContext, init_distributed, resolve_virtual_stages
from megacpt.parallel.optimizer import build_optimizer
from megacpt.parallel.schedule import forward_backward
from megacpt.training import checks
from megacpt.training.bits_per_byte import bits_per_byte, bytes_per_token
from megacpt.training.data import TrainData
from megacpt.training.faults import (NonFiniteTracker, PreemptionHandler, Watchdog,
                                     collective_guard)
from megacpt.training.metrics import MetricsLogger, Throughput, console_line, peak_flops
from megacpt.training.schedule import LRSchedule

log = logging.getLogger("megacpt.train")


@dataclass
class Counters:
    """Cumulative progress counters (all ranks hold the same values)."""

    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    #: name -> samples / tokens drawn from each dataset of the blend (training only)
    samples_per_dataset: dict = field(default_factory=dict)
    tokens_per_dataset: dict = field(default_factory=dict)

    def add_batch(self, samples_per_dataset: dict[str, int], seq_length: int) -> None:
        """Account one global batch given how many of its samples came from each dataset."""
        for name, n in samples_per_dataset.items():
            self.samples_per_dataset[name] = self.samples_per_dataset.get(name, 0) + int(n)
            self.tokens_per_dataset[name] = (self.tokens_per_dataset.get(name, 0)
                                             + int(n) * seq_length)
            self.consumed_samples += int(n)
            self.consumed_tokens += int(n) * seq_length

    def flops(self, flops_per_token: float) -> float:
        return float(self.consumed_tokens) * flops_per_token

    def flops_per_dataset(self, flops_per_token: float) -> dict[str, float]:
        return {k: float(v) * flops_per_token for k, v in self.tokens_per_dataset.items()}

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Counters":
        known = set(cls.__dataclass_fields__)
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"checkpoint state 'counters' has unknown fields {sorted(unknown)}")
        return cls(**state)


def get_rng_state() -> dict:
    """This process's RNG streams (Python, numpy, torch CPU, CUDA) as tensors/ints/strings."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore streams saved by `get_rng_state` (CUDA only when both sides have it)."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"checkpoint RNG state is missing {missing}; got {sorted(state)}")
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, numpy and torch for this rank (different ranks get different streams)."""
    s = (seed + 7919 * rank) % (2**32)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@dataclass
class TrainResult:
    """What a run did (returned by `Trainer.run`, identical on every rank)."""

    iteration: int
    reason: str  # "done" | "exit_interval" | "signal"
    losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: int = 0
    last_checkpoint: str | None = None
    valid: dict[str, float] = field(default_factory=dict)


def build_context(cfg: Config) -> ParallelContext:
    """Initialise torch.distributed when launched by torchrun/mpiexec and build the context."""
    p = cfg.parallel
    init_distributed(p.distributed_backend, p.distributed_timeout_minutes)
    vp = resolve_virtual_stages(cfg.model.num_layers, p.pipeline_model_parallel_size,
                                p.virtual_pipeline_model_parallel_size,
                                p.num_layers_per_virtual_pipeline_stage)
    return ParallelContext.build(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                 p.sequence_parallel, device=cfg.training.device,
                                 timeout_minutes=p.distributed_timeout_minutes, vp=vp)


class Trainer:
    def __init__(self, cfg: Config, opts: RunOptions | None = None,
                 ctx: ParallelContext | None = None, callbacks: dict | None = None):
        self.cfg, self.opts = cfg, opts or RunOptions()
        self.callbacks = callbacks or {}
        t = cfg.training
        checks.check_inputs(cfg, self.opts)
        self.ctx = ctx or build_context(cfg)
        self.ctx.check_model(cfg.model)
        ck = cfg.checkpoint
        self.resumed = bool(ck.load) and checks.has_checkpoint(ck.load)
        if self.resumed:
            checks.check_resume_layout(ck.load, self.ctx)
        self.dtype = torch.bfloat16 if t.bf16 else torch.float32
        self.train_iters = t.train_iters
        self.flops_per_token = cfg.model.flops_per_token()
        saved = checks.saved_state(ck.load) if self.resumed else {}
        self.schedule = LRSchedule.from_config(cfg.optim, self.train_iters)
        if self.resumed:
            self.schedule.load_state_dict(saved["scheduler"],
                                          override=self.opts.override_opt_param_scheduler)
        self.data = TrainData(cfg, self.opts, self.ctx, saved.get("data"))
        seed_everything(t.seed, self.ctx.rank)
        self.model = LlamaModel(cfg.model, self.ctx, dtype=self.dtype, device=self.ctx.device,
                                seed=t.seed)
        self.counters = Counters()
        self.iteration = 0
        self.last_checkpoint: str | None = None
        #: the newest checkpoint saved outside a streak of skipped (non-finite) steps
        self.last_good_checkpoint: str | None = None
        self._bytes_per_token: dict[str, float | None] = {}  # per validation set
        self.async_saver = None  # --async-save: an AsyncCheckpointSaver after the first save
        if not self.resumed:  # weights first, so the optimizer's fp32 masters copy them
            self._init_weights()
        self.optimizer = build_optimizer(
            self.model, cfg.optim, self.ctx,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            bucket_size_mb=cfg.parallel.grad_bucket_size_mb,
            gradient_accumulation_fusion=cfg.parallel.gradient_accumulation_fusion)
        if self.resumed:
            self._resume()
        if ck.async_save and ck.save:  # snapshot buffers allocated (pages touched) up front
            self._async_saver()
        self.nonfinite = NonFiniteTracker(t.max_nonfinite_steps, self.counters.skipped_steps)
        self.metrics = MetricsLogger(cfg.logging.log_dir, enabled=self.ctx.rank == 0,
                                     tensorboard=cfg.logging.tensorboard,
                                     wandb=self._wandb_writer())
        self._start_metrics()
        self.throughput = Throughput(self.flops_per_token, self.ctx.world_size,
                                     peak_flops(self.ctx.device), self.train_iters)
        if self.ctx.rank == 0:
            log.info("%s | %s", self.model.describe(), self.schedule)

    # ----- start-up -----
    def _wandb_writer(self):
        """The W&B run on the logging rank when `--wandb-project` is given, else None."""
        lg = self.cfg.logging
        if lg.wandb_project is None or self.ctx.rank != 0:
            return None
        from megacpt.training.metrics import WandbWriter

        return WandbWriter(lg.wandb_project, lg.wandb_exp_name,
                           lg.wandb_save_dir or os.path.join(lg.log_dir, "wandb"),
                           self.cfg.to_dict())

    def _init_weights(self) -> None:
        from megacpt.checkpoint import load_weights

        ck = self.cfg.checkpoint
        if ck.load:
            self._log0("no checkpoint in --load %s yet: starting at iteration 0", ck.load)
        if ck.init_from:
            load_weights(ck.init_from, self.model, self.ctx, verify=ck.verify_checksums)
            self._log0("initialised weights from %s (CPT: fresh optimizer, iteration 0, "
                       "LR warm-up over %d steps)", ck.init_from, self.schedule.warmup_iters)

    def _resume(self) -> None:
        from megacpt.checkpoint import load_checkpoint

        ck = self.cfg.checkpoint
        it, state = load_checkpoint(ck.load, self.model, self.optimizer, self.cfg, self.ctx)
        self.counters = Counters.from_state_dict(state["counters"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        self.iteration = int(it)
        self.last_checkpoint = self.last_good_checkpoint = checks.resolved_iter_dir(ck.load)
        self._log0("resumed from %s at iteration %d (%d tokens consumed)",
                   self.last_checkpoint, self.iteration, self.counters.consumed_tokens)
        old_blend = ((state.get("data") or {}).get("segment") or {}).get("weights")
        if old_blend and self.ctx.rank == 0 and not checks.same_blend(old_blend, self.data.blend):
            log.warning("the blend changed on resume: checkpoint %s -> now %s (a new blend "
                        "segment starts at sample %d; each dataset continues where it stopped)",
                        _fmt_blend(old_blend), _fmt_blend(self.data.blend),
                        self.data.consumed_samples)

    def run_kind(self) -> str:
        return self.cfg.logging.run_kind or ("cpt" if self.cfg.checkpoint.init_from else "scratch")

    def _start_metrics(self) -> None:
        cfg = self.cfg
        if self.ctx.rank != 0:
            return
        if cfg.logging.log_dir:
            save_config(cfg, self.opts, cfg.logging.log_dir)
        if self.resumed and self.metrics.enabled and os.path.exists(self.metrics.path):
            dropped = self.metrics.truncate_after(self.iteration)
            if dropped:
                log.info("metrics.jsonl: dropped %d rows past iteration %d", dropped,
                         self.iteration)
        elif self.metrics.enabled and os.path.exists(self.metrics.path):
            log.warning("%s exists and this run starts at iteration 0: replacing it",
                        self.metrics.path)
            os.remove(self.metrics.path)
        if not self.metrics.has_header():
            self.metrics.header(
                model_size=cfg.model.name, num_parameters=cfg.model.num_parameters(),
                num_parameters_non_embedding=cfg.model.num_parameters(include_embeddings=False),
                run_kind=self.run_kind(), blend=self.data.blend, seq_length=cfg.model.seq_length,
                flops_per_token=self.flops_per_token, init_from=cfg.checkpoint.init_from,
                target=self.data.target, valid_sets=self.data.valid_names,
                global_batch_size=cfg.training.global_batch_size, train_iters=self.train_iters,
                layout=self.ctx.layout, dtype="bf16" if cfg.training.bf16 else "fp32")
        if self.resumed:
            self.metrics.write({"type": "resume", "iteration": self.iteration,
                                "blend": self.data.blend})

    def _log0(self, msg: str, *args) -> None:
        if self.ctx.rank == 0:
            log.info(msg, *args)

    # ----- one step -----
    def train_step(self) -> dict:
        """One optimizer step; returns its metrics row (iteration = steps done afterwards)."""
        ctx = self.ctx
        start = time.perf_counter()
        mbs, counts = self.data.next_microbatches()  # this dp rank's [mbs, s] batches
        lr = self.schedule.step()
        self.optimizer.zero_grad()
        loss = forward_backward(self.model, mbs, ctx, grad_sync=self.optimizer.grad_sync,
                                schedule=self.cfg.parallel.pipeline_schedule)
        hook = self.callbacks.get("after_backward")
        if hook is not None:
            replaced = hook(self, self.iteration + 1, loss)
            loss = loss if replaced is None else float(replaced)
        if NonFiniteTracker.finite(loss):
            grad_norm, applied = self.optimizer.step(lr)
        else:  # identical on every rank: all skip together
            grad_norm, applied = None, False
            self.optimizer.zero_grad()
        self.iteration += 1
        self.counters.add_batch(counts, self.cfg.model.seq_length)
        skipped = not applied or not NonFiniteTracker.finite(grad_norm)
        self.nonfinite.record(self.iteration, skipped, loss, grad_norm, self.last_good_checkpoint)
        self.counters.skipped_steps = self.nonfinite.total
        dt = time.perf_counter() - start
        c, fpt = self.counters, self.flops_per_token
        row = {"iteration": self.iteration, "lm_loss": loss, "lr": lr, "grad_norm": grad_norm,
               "consumed_tokens": c.consumed_tokens, "flops": c.flops(fpt),
               "consumed_samples_per_dataset": dict(c.samples_per_dataset),
               "consumed_tokens_per_dataset": dict(c.tokens_per_dataset),
               "flops_per_dataset": c.flops_per_dataset(fpt),
               "tokens_per_sec": sum(counts.values()) * self.cfg.model.seq_length / dt,
               "skipped_steps": c.skipped_steps, "skipped": skipped}
        self.metrics.train(**row)
        if self.iteration % self.cfg.logging.log_interval == 0 or \
                self.iteration == self.train_iters:
            rates = self.throughput.interval(self.iteration, c.consumed_tokens)
            self._log0("%s", console_line(self.iteration, self.train_iters, loss, lr, grad_norm,
                                          rates, c.skipped_steps))
        after = self.callbacks.get("after_step")
        if after is not None:
            after(self, row)
        return row

    # ----- validation -----
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss on each named validation set (the same samples every time)."""
        out = {}
        self.model.eval()
        bpbs = {}
        for name in self.data.valid_names:
            mbs = self.data.valid_microbatches(name)
            loss = forward_backward(self.model, mbs, self.ctx, forward_only=True)
            out[name] = loss
            bpbs[name] = bits_per_byte(loss, self._valid_bytes_per_token(name, mbs))
            self.metrics.valid(name, self.iteration, loss, self.counters.consumed_tokens,
                               self.counters.flops(self.flops_per_token), bpb=bpbs[name])
        self.model.train()
        if out:
            self._log0("validation at iteration %d: %s", self.iteration, ", ".join(
                f"{k} {v:.4f}" + (f" ({bpbs[k]:.4f} bpb)" if bpbs[k] is not None else "")
                for k, v in out.items()))
        return out

    def _valid_bytes_per_token(self, name: str, mbs: list[dict]) -> float | None:
        """UTF-8 bytes per token of validation set `name` (cached; None without a tokenizer)."""
        cache = self._bytes_per_token
        if name not in cache:
            tok = self.cfg.data.tokenizer_model
            cache[name] = None
            if tok and os.path.exists(tok):
                from megacpt.data.tokenizer import load_tokenizer

                table = load_tokenizer(tok, self.cfg.data.tokenizer_type).token_bytes()
                table = torch.tensor(table, dtype=torch.float64)
                cache[name] = bytes_per_token(mbs, table, self.ctx)
        return cache[name]

    # ----- checkpoints -----
    def save(self) -> str:
        from megacpt.checkpoint import save_checkpoint

        start = time.perf_counter()
        state = {"scheduler": self.schedule.state_dict(), "data": self.data.state_dict(),
                 "counters": self.counters.state_dict(), "rng": get_rng_state(),
                 "run_options": asdict(self.opts)}
        if self.cfg.checkpoint.async_save:
            self._save_async(state)
        else:
            save_checkpoint(self.cfg.checkpoint.save, self.iteration, self.model,
                            self.optimizer, self.cfg, self.ctx, state)
        self.last_checkpoint = checks.iteration_dir(self.cfg.checkpoint.save, self.iteration)
        if self.nonfinite.consecutive == 0:  # not saved inside a streak of skipped steps
            self.last_good_checkpoint = self.last_checkpoint
        self._log0("checkpoint of iteration %d %s %.2fs%s", self.iteration,
                   "blocked training for" if self.cfg.checkpoint.async_save else "took",
                   time.perf_counter() - start,
                   f" ({self.async_saver.last_wait_s:.2f}s of it waiting for the previous "
                   f"save to finish)" if self.async_saver and self.async_saver.last_wait_s
                   > 0.01 else "")
        return self.last_checkpoint

    def _save_async(self, state: dict) -> None:
        """--async-save: snapshot now, write in the background (the previous one finished)."""
        self._async_saver().save(self.cfg.checkpoint.save, self.iteration, self.model,
                                 self.optimizer, self.cfg, state)

    def _async_saver(self):
        """The run's AsyncCheckpointSaver, created with its snapshot buffers on first use."""
        from megacpt.checkpoint.async_save import AsyncCheckpointSaver

        if self.async_saver is None:
            timeout = 60 * self.cfg.parallel.distributed_timeout_minutes
            self.async_saver = AsyncCheckpointSaver(self.ctx, timeout)
            self.async_saver.prepare(self.model, self.optimizer, self.cfg)
        return self.async_saver

    def finish_saves(self, collective: bool = True) -> None:
        """Wait for an --async-save still in flight (end of run, after a SIGTERM's save)."""
        if self.async_saver is not None:
            self.async_saver.finish(collective)

    # ----- the loop -----
    def run(self, preempt: PreemptionHandler | None = None) -> TrainResult:
        """Train to --train-iters (or until --exit-interval / a preemption signal).

        `preempt`: a handler installed earlier (the CLI installs one before start-up, so a
        signal during start-up is kept); by default one is installed for the run."""
        result = TrainResult(self.iteration, "done")
        timeout = self.cfg.parallel.distributed_timeout_minutes
        watchdog = Watchdog(60 * timeout, self.ctx.rank, enabled=self.ctx.distributed)
        try:
            with (contextlib.nullcontext(preempt) if preempt else PreemptionHandler()) as preempt, \
                    watchdog, collective_guard(self.ctx.rank, timeout):
                if preempt.should_stop():  # signalled during start-up: nothing new to save
                    self._log0("stopped by %s before the first step (iteration %d)",
                               preempt.signal_name or "a signal on another rank",
                               self.iteration)
                    result.reason = "signal"
                elif not self.resumed and self.iteration == 0:
                    result.valid = self.evaluate()
                self.throughput.start(self.iteration, self.counters.consumed_tokens)
                while self.iteration < self.train_iters and result.reason != "signal":
                    watchdog.beat(f"step {self.iteration + 1}")
                    row = self.train_step()
                    result.losses[row["iteration"]] = row["lm_loss"]
                    watchdog.beat(f"validation/checkpoint after step {self.iteration}")
                    stop = self._after_step(preempt, result)
                    if stop:
                        result.reason = stop
                        break
                watchdog.beat("finishing the checkpoint save in flight")
                self.finish_saves()
        except BaseException:
            self.finish_saves(collective=False)  # let the write end; no collectives now
            raise
        finally:
            self.metrics.close()
        result.iteration = self.iteration
        result.skipped_steps = self.counters.skipped_steps
        result.last_checkpoint = self.last_checkpoint
        return result

    def _after_step(self, preempt: PreemptionHandler, result: TrainResult) -> str | None:
        """Validate and save as scheduled; the reason to stop now, if any."""
        cfg, t, it = self.cfg, self.cfg.training, self.iteration
        if it % t.eval_interval == 0 or it == self.train_iters:
            result.valid = self.evaluate()
        signalled = preempt.should_stop()
        exiting = bool(t.exit_interval) and it % t.exit_interval == 0
        periodic = bool(cfg.checkpoint.save_interval) and it % cfg.checkpoint.save_interval == 0
        periodic = periodic or it in cfg.checkpoint.save_iters
        if cfg.checkpoint.save and (periodic or signalled or exiting or it == self.train_iters):
            self.save()
        elif signalled or exiting:
            self._log0("stopping at iteration %d without a checkpoint (no --save)", it)
        if signalled:
            self._log0("stopped by %s at iteration %d",
                       preempt.signal_name or "a signal on another rank", it)
            return "signal"
        if exiting and it < self.train_iters:
            return "exit_interval"
        return None


def _fmt_blend(weights: dict) -> str:
    return "{" + ", ".join(f"{n}: {float(w):.4g}" for n, w in weights.items()) + "}"


def train(cfg: Config, opts: RunOptions | None = None, ctx: ParallelContext | None = None,
          callbacks: dict | None = None) -> TrainResult:
    """Build a `Trainer` and run it."""
    return Trainer(cfg, opts, ctx, callbacks).run()
