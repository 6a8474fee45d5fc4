"""Learning-rate schedule: linear warm-up, then cosine / linear / constant / WSD decay to min_lr.

The schedule is a pure function of the step number, so resuming only needs the step count and
the settings it was built with. Step `it` (0-based; the optimizer update that turns `it` done
steps into `it + 1`) uses the learning rate of step number `s = it + 1`:

    s <= W                : lr = max_lr * s / W                       (warm-up, W > 0)
    W < s <= D, cosine    : lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * r))
    W < s <= D, linear    : lr = min_lr + (max_lr - min_lr) * (1 - r)
    constant              : lr = max_lr after warm-up
    s > D                 : lr = min_lr (cosine / linear / WSD)
    WSD (warmup-stable-decay, Megatron's `--lr-decay-style WSD`): max_lr until the last K
    decay steps (K = `--lr-wsd-decay-iters`), then with q = (s - (D - K)) / K
                            lr = min_lr + (max_lr - min_lr) * c(q), c = 2 * 0.5^q - 1
                            (exponential), 1 - q (linear), 0.5 * (1 + cos(pi q)) (cosine),
                            1 - sqrt(q) (minus_sqrt)

with r = (s - W) / (D - W), W the warm-up steps and D the decay steps (default: train_iters).
So the first update never runs at lr 0, the last warm-up step reaches max_lr and the last
decay step lands exactly on min_lr. The paper's recipe is cosine from 2e-4 with W = 5% of
training; for continual pre-training the schedule restarts (re-warm-up) at iteration 0.

`state_dict()` records the settings and the step count; `load_state_dict()` refuses a schedule
built with different settings (naming the field) unless `override=True`, in which case this
run's settings win and only the step count is taken over (Megatron's
`--override-opt-param-scheduler`).
"""
from __future__ import annotations

import math

from megacpt.config import ConfigError, OptimizerConfig

_SETTINGS = ("max_lr", "min_lr", "warmup_iters", "decay_iters", "decay_style")
_WSD_SETTINGS = ("wsd_decay_iters", "wsd_decay_style")
_WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


class LRSchedule:
    """Learning rate per optimizer step; see the module docstring for the formula."""

    def __init__(self, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str = "cosine", wsd_decay_iters: int | None = None,
                 wsd_decay_style: str = "exponential"):
        if decay_style not in ("cosine", "linear", "constant", "WSD"):
            raise ConfigError(f"lr_decay_style must be cosine|linear|constant|WSD, got "
                              f"{decay_style!r}")
        if decay_style == "WSD":
            if wsd_decay_style not in _WSD_STYLES:
                raise ConfigError(f"lr_wsd_decay_style must be one of {_WSD_STYLES}, got "
                                  f"{wsd_decay_style!r}")
            if not wsd_decay_iters or not 1 <= wsd_decay_iters <= decay_iters - warmup_iters:
                raise ConfigError(f"WSD: the decay ({wsd_decay_iters} steps) must be >= 1 and "
                                  f"fit after the warm-up ({warmup_iters}) within the "
                                  f"{decay_iters} decay steps")
        if not 0 <= min_lr <= max_lr:
            raise ConfigError(f"need 0 <= min_lr ({min_lr}) <= lr ({max_lr})")
        if warmup_iters < 0 or decay_iters < 1:
            raise ConfigError(f"need warm-up steps >= 0 (got {warmup_iters}) and decay steps "
                              f">= 1 (got {decay_iters})")
        if decay_style != "constant" and warmup_iters >= decay_iters:
            raise ConfigError(f"warm-up ({warmup_iters} steps) must be shorter than the decay "
                              f"({decay_iters} steps); lower --lr-warmup-fraction or "
                              f"--lr-warmup-iters, or raise --lr-decay-iters/--train-iters")
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_iters, self.decay_iters = int(warmup_iters), int(decay_iters)
        self.decay_style = decay_style
        self.wsd = decay_style == "WSD"
        self.wsd_decay_iters = int(wsd_decay_iters) if self.wsd else None
        self.wsd_decay_style = wsd_decay_style if self.wsd else None
        self.num_steps = 0

    @classmethod
    def from_config(cls, optim: OptimizerConfig, train_iters: int) -> "LRSchedule":
        """The schedule of a run of `train_iters` steps with `optim`'s settings."""
        decay = optim.lr_decay_iters or train_iters
        if optim.lr_warmup_fraction is not None:
            warmup = int(round(optim.lr_warmup_fraction * decay))
        else:
            warmup = optim.lr_warmup_iters
        return cls(optim.lr, optim.min_lr, warmup, decay, optim.lr_decay_style,
                   optim.lr_wsd_decay_iters, optim.lr_wsd_decay_style)

    def lr(self, iteration: int) -> float:
        """Learning rate of the update made at 0-based `iteration`."""
        s = iteration + 1
        w, d = self.warmup_iters, self.decay_iters
        if w > 0 and s <= w:
            return self.max_lr * s / w
        if self.decay_style == "constant":
            return self.max_lr
        if s > d:
            return self.min_lr
        if self.wsd:
            start = d - self.wsd_decay_iters
            if s <= start:
                return self.max_lr
            q = (s - start) / self.wsd_decay_iters
            coeff = {"exponential": lambda: 2.0 * 0.5 ** q - 1.0, "linear": lambda: 1.0 - q,
                     "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * q)),
                     "minus_sqrt": lambda: 1.0 - math.sqrt(q)}[self.wsd_decay_style]()
            return self.min_lr + (self.max_lr - self.min_lr) * coeff
        r = (s - w) / (d - w)
        if self.decay_style == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * r))
        else:
            coeff = 1.0 - r
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

    def step(self) -> float:
        """Learning rate of the next update; advances the step count."""
        value = self.lr(self.num_steps)
        self.num_steps += 1
        return value

    def _settings(self) -> tuple[str, ...]:
        return _SETTINGS + (_WSD_SETTINGS if self.wsd else ())

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self._settings()}, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict, override: bool = False) -> None:
        """Take over the step count; settings must match unless `override`."""
        missing = [k for k in (*_SETTINGS, "num_steps") if k not in state]
        if missing:
            raise ValueError(f"LR schedule state is missing {missing}; got keys {sorted(state)}")
        if not override:
            for k in self._settings():
                mine, theirs = getattr(self, k), state.get(k)
                same = math.isclose(mine, theirs, rel_tol=1e-12) if isinstance(mine, float) \
                    else mine == theirs
                if not same:
                    raise ConfigError(
                        f"the checkpoint's LR schedule has {k} = {theirs!r} but this run's "
                        f"flags give {mine!r}; resume with the same flags, or pass "
                        f"--override-opt-param-scheduler to continue with this run's schedule")
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        wsd = f" over the last {self.wsd_decay_iters} ({self.wsd_decay_style})" if self.wsd else ""
        return (f"LRSchedule({self.decay_style}{wsd} {self.max_lr:g} -> {self.min_lr:g}, "
                f"warm-up {self.warmup_iters}, decay {self.decay_iters}, at step {self.num_steps})")
