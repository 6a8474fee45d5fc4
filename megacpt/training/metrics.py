"""Run metrics: the `metrics.jsonl` file, TensorBoard, Weights & Biases, and the console line.

TensorBoard (`LOG_DIR/tensorboard`, when installed) and W&B (with `--wandb-project`; files in
`--wandb-save-dir`, default `LOG_DIR/wandb`) get the same scalars: `train/lm_loss`, `train/lr`,
`train/grad_norm`, `train/tokens_per_sec` and `valid/NAME` at the optimizer step, W&B also
`train/consumed_tokens`; TensorBoard the loss curves against tokens as well. The W&B run id is
kept in `WANDB_DIR/wandb_run_id`, so a resumed run (`--load`) continues the same W&B run;
the run's config is `Config.to_dict()`.

`metrics.jsonl` (in `--log-dir`, written by global rank 0 only) holds one JSON object per line.
Every row has a `type`; readers should ignore types and keys they do not know.

header (first row of a fresh run)::

    {"type": "header", "model_size": "1393M" | null, "num_parameters": N,
     "run_kind": "scratch" | "cpt", "blend": {"zh": 0.7, "en": 0.3}, "seq_length": 2048,
     "flops_per_token": F, "init_from": str | null, "target": "zh",
     "global_batch_size": B, "train_iters": T, "layout": "tp1pp1dp8", "dtype": "bf16",
     "time": unix seconds}

train (one per optimizer step, skipped steps included)::

    {"type": "train", "iteration": i (steps done, 1-based), "lm_loss": float,
     "lr": float, "grad_norm": float | null, "consumed_tokens": int, "flops": float
     (cumulative, consumed_tokens x flops_per_token), "consumed_samples_per_dataset":
     {name: n}, "consumed_tokens_per_dataset": {name: n}, "flops_per_dataset": {name: f},
     "tokens_per_sec": float, "skipped_steps": int (cumulative), "skipped": bool,
     "time": unix seconds}

valid (one per named validation set per evaluation)::

    {"type": "valid", "split": "valid", "name": "zh", "iteration": i, "loss": float,
     "bpb": float (bits per UTF-8 byte, `megacpt.training.bits_per_byte`; only with a
     tokenizer, absent on mock data), "consumed_tokens": int, "flops": float,
     "time": unix seconds}

resume (a run resumed with `--load`)::

    {"type": "resume", "iteration": i, "blend": {...}, "time": unix seconds}

Non-finite floats are written as null (strict JSON). On resume at iteration k the rows of
types train/valid/resume with `iteration > k` are dropped (the file is rewritten atomically),
then new rows are appended, so the file never holds two rows for one step.
The resolved configuration is saved beside it as `config.json` (see `megacpt.arguments`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from megacpt.config import ConfigError
from megacpt.hardware import peak_bf16_flops

log = logging.getLogger("megacpt.train")

METRICS_FILE = "metrics.jsonl"

def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s (`megacpt.hardware`), None on CPU or when unknown.

    MFU is reported against the bf16 peak whatever the run's dtype (Megatron's convention).
    """
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def _clean(value):
    """Strict-JSON value: non-finite floats become None, tensors become Python numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Writes `metrics.jsonl` (and TensorBoard when installed) on the logging rank only."""

    def __init__(self, log_dir: str | None, enabled: bool = True, tensorboard: bool = True,
                 wandb: "WandbWriter | None" = None):
        self.enabled = enabled and log_dir is not None
        self.path = os.path.join(log_dir, METRICS_FILE) if log_dir else None
        self._tb = None
        self._wandb = wandb if enabled else None
        if not self.enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))

    # ----- rows -----
    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = _clean({**row, "time": row.get("time", time.time())})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")

    def header(self, **fields) -> None:
        self.write({"type": "header", **fields})

    def train(self, **fields) -> None:
        self.write({"type": "train", **fields})
        if self._tb is not None:
            it = fields["iteration"]
            for key in ("lm_loss", "lr", "grad_norm", "tokens_per_sec"):
                if fields.get(key) is not None and math.isfinite(fields[key]):
                    self._tb.add_scalar(f"train/{key}", fields[key], it)
            if fields.get("lm_loss") is not None and math.isfinite(fields["lm_loss"]):
                self._tb.add_scalar("train/lm_loss_vs_tokens", fields["lm_loss"],
                                    fields["consumed_tokens"])
        if self._wandb is not None:
            keys = ("lm_loss", "lr", "grad_norm", "tokens_per_sec", "consumed_tokens")
            self._wandb.log({f"train/{k}": fields[k] for k in keys
                             if fields.get(k) is not None}, fields["iteration"])

    def valid(self, name: str, iteration: int, loss: float, consumed_tokens: int,
              flops: float, bpb: float | None = None) -> None:
        row = {"type": "valid", "split": "valid", "name": name, "iteration": iteration,
               "loss": loss, "consumed_tokens": consumed_tokens, "flops": flops}
        if bpb is not None:
            row["bpb"] = bpb
        self.write(row)
        if self._tb is not None and math.isfinite(loss):
            self._tb.add_scalar(f"valid/{name}", loss, iteration)
            self._tb.add_scalar(f"valid_vs_tokens/{name}", loss, consumed_tokens)
            if bpb is not None:
                self._tb.add_scalar(f"valid_bpb/{name}", bpb, iteration)
        if self._wandb is not None:
            values = {f"valid/{name}": loss}
            if bpb is not None:
                values[f"valid_bpb/{name}"] = bpb
            self._wandb.log(values, iteration)

    def has_header(self) -> bool:
        if not self.path or not os.path.exists(self.path):
            return False
        return any(r.get("type") == "header" for r in read_metrics(self.path))

    def truncate_after(self, iteration: int) -> int:
        """Drop train/valid/resume rows past `iteration` (resume); returns how many."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        keep, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not is_torn(lines, n):
                    raise ConfigError(f"{self.path}:{n}: not a JSON object ({e.msg}); fix or "
                                      f"delete that line") from None
                log.warning("%s: dropped its torn last line %d (a crash or a full disk cut "
                            "it short)", self.path, n)
                continue
            if row.get("type") in ("train", "valid", "resume") and \
                    row.get("iteration", 0) > iteration:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        return dropped

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


class WandbWriter:
    """One W&B run (Megatron's `--wandb-project/--wandb-exp-name/--wandb-save-dir`).

    Build it on the logging rank only. `log` drops non-finite values (W&B charts them badly).
    """

    def __init__(self, project: str, name: str | None, save_dir: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError(f"--wandb-project {project}: the wandb package is not installed; "
                              f"pip install 'megacpt[wandb]'") from None
        os.makedirs(save_dir, exist_ok=True)
        id_file = os.path.join(save_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else None
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config,
                              id=run_id, resume="allow" if run_id else None)
        if run_id is None:
            with open(id_file, "w") as f:
                f.write(self.run.id)

    def log(self, values: dict, step: int) -> None:
        values = {k: float(_clean(v)) for k, v in values.items()
                  if _clean(v) is not None}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def is_torn(lines: list[str], n: int) -> bool:
    """Line n (1-based) is the last one and has no newline: a row whose write was cut short."""
    return n == len(lines) and not lines[-1].endswith("\n")


def read_metrics(path: str, kind: str | None = None) -> list[dict]:
    """Rows of a metrics.jsonl file (a run directory or the file itself), optionally of one type.

    A malformed line is an error naming the file and line number, except a last line without
    its newline: a crash or a full disk cut that row short, and it is skipped (on resume the
    trainer also drops it from the file).
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if is_torn(lines, n):  # a crash or a full disk cut it short: the row is lost
                continue
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if kind is None or row.get("type") == kind:
            rows.append(row)
    return rows


@dataclass
class Throughput:
    """Turns step timings into tokens/s, TFLOP/s per device, MFU and ETA."""

    flops_per_token: float
    world_size: int
    peak_flops: float | None
    train_iters: int

    def __post_init__(self):
        self._mark_time = time.perf_counter()
        self._mark_tokens = 0
        self._mark_iter = 0

    def start(self, iteration: int, consumed_tokens: int) -> None:
        self._mark_time = time.perf_counter()
        self._mark_iter, self._mark_tokens = iteration, consumed_tokens

    def interval(self, iteration: int, consumed_tokens: int) -> dict:
        """Rates since the last call (or start), then restart the interval."""
        now = time.perf_counter()
        dt = max(now - self._mark_time, 1e-9)
        steps = max(iteration - self._mark_iter, 1)
        tokens_per_sec = (consumed_tokens - self._mark_tokens) / dt
        tflops = tokens_per_sec * self.flops_per_token / self.world_size / 1e12
        mfu = tflops * 1e12 / self.peak_flops if self.peak_flops else None
        eta = dt / steps * max(self.train_iters - iteration, 0)
        self.start(iteration, consumed_tokens)
        return {"tokens_per_sec": tokens_per_sec, "tflops_per_device": tflops, "mfu": mfu,
                "eta_s": eta, "step_time_s": dt / steps}


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def console_line(iteration: int, train_iters: int, loss: float, lr: float,
                 grad_norm: float | None, rates: dict, skipped: int) -> str:
    """One progress line: iteration, loss, lr, grad norm, tokens/s, TFLOP/s/device, MFU, ETA."""
    gn = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
    mfu = "n/a" if rates["mfu"] is None else f"{100 * rates['mfu']:.1f}%"
    return (f"iter {iteration:>7d}/{train_iters} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad norm {gn} | {rates['tokens_per_sec']:,.0f} tok/s | "
            f"{rates['tflops_per_device']:.2f} TFLOP/s/dev | MFU {mfu} | "
            f"{1000 * rates['step_time_s']:.0f} ms/step | skipped {skipped} | "
            f"ETA {format_duration(rates['eta_s'])}")
