"""WSD (warmup-stable-decay): our LRSchedule against megatron-core's OptimizerParamScheduler,
the flags that select it, and resuming a stable run into a cooldown branch."""
import pytest

from megacpt.arguments import parse_args
from megacpt.flags import config_to_argv
from megacpt.config import ConfigError, OptimizerConfig
from megacpt.training.schedule import LRSchedule

BASE = ["--model-size", "tiny", "--mock-data", "--vocab-size", "512", "--train-iters", "100"]


class _Opt:
    """The param_groups a scheduler drives (megatron-core only reads and writes them)."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


@pytest.mark.parametrize("style", ["exponential", "linear", "cosine", "minus_sqrt"])
def test_wsd_matches_megatron_core(style):
    sched_mod = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    ours = LRSchedule(3e-3, 3e-4, 7, 100, "WSD", wsd_decay_iters=23, wsd_decay_style=style)
    ref = sched_mod.OptimizerParamScheduler(
        _Opt(), init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=7, lr_decay_steps=100,
        lr_decay_style="WSD", start_wd=0.0, end_wd=0.0, wd_incr_steps=100,
        wd_incr_style="constant", wsd_decay_steps=23, lr_wsd_decay_style=style)
    for it in range(110):
        ref.num_steps = it + 1  # megatron-core: lr of the update after `it` steps
        assert ours.lr(it) == pytest.approx(ref.get_lr({}), rel=1e-12, abs=1e-15), it
    assert ours.lr(76) == 3e-3 and ours.lr(99) == pytest.approx(3e-4)


def test_wsd_flags_round_trip_and_errors():
    cfg, opts = parse_args(BASE + ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
                                   "--lr-wsd-decay-samples", "150", "--global-batch-size", "8",
                                   "--micro-batch-size", "8", "--save-iters", "40", "60"])
    assert cfg.optim.lr_wsd_decay_iters == 19 and cfg.checkpoint.save_iters == [40, 60]
    assert parse_args(config_to_argv(cfg, opts)) == (cfg, opts)
    sched = LRSchedule.from_config(cfg.optim, 100)
    assert sched.lr(80) == cfg.optim.lr and sched.lr(99) == pytest.approx(cfg.optim.min_lr)
    with pytest.raises(ConfigError, match="lr_wsd_decay_iters"):
        parse_args(BASE + ["--lr-decay-style", "WSD"])
    with pytest.raises(ConfigError, match="WSD: the decay"):
        LRSchedule.from_config(OptimizerConfig(lr_decay_style="WSD", lr_wsd_decay_iters=99), 100)


def test_stable_state_resumes_into_a_branch_only_with_override():
    trunk = LRSchedule(1e-3, 1e-4, 5, 60, "constant")
    for _ in range(40):
        trunk.step()
    branch = LRSchedule(1e-3, 1e-4, 5, 50, "WSD", wsd_decay_iters=10, wsd_decay_style="linear")
    with pytest.raises(ConfigError, match="override-opt-param-scheduler"):
        branch.load_state_dict(trunk.state_dict())
    branch.load_state_dict(trunk.state_dict(), override=True)
    lrs = [branch.step() for _ in range(10)]
    assert lrs[0] == pytest.approx(1e-4 + 0.9e-3 * 0.9) and lrs[-1] == pytest.approx(1e-4)
