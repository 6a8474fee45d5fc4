"""The one mapping between `Config` and flags: every flag is a field, and
parse_args(config_to_argv(cfg, opts)) gives back exactly (cfg, opts)."""
import pytest

from megacpt.arguments import RunOptions, build_parser, parse_args
from megacpt.flags import apply_flags, config_to_argv, flag_fields
from megacpt.config import (CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig,
                            ModelConfig, OptimizerConfig, TrainingConfig)

ARGVS = [
    ["--model-size", "tiny", "--mock-data", "--vocab-size", "512", "--train-iters", "20"],
    ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
     "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "300",
     "--data-path", "0.7", "zh=a", "0.3", "en=b", "--valid-data-path", "zh=x", "en=y",
     "--tokens-per-param", "0.05", "--lr", "3e-3", "--lr-warmup-iters", "3",
     "--no-use-kernels", "--bf16", "--no-tensorboard", "--no-gradient-accumulation-fusion",
     "--max-position-embeddings", "256", "--init-from", "/x", "--min-lr", "0",
     "--override-opt-param-scheduler", "--save-iters", "5", "9"],
    ["--model-size", "49M", "--data-path", "p", "--vocab-size", "36152", "--train-tokens",
     "1000000", "--seq-length", "256", "--micro-batch-size", "2", "--global-batch-size", "8",
     "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10", "--lr-wsd-decay-style",
     "minus_sqrt", "--use-kernels", "--save", "c", "--load", "c", "--save-interval", "7",
     "--tensor-model-parallel-size", "2", "--sequence-parallel", "--device", "cpu",
     "--seed", "7", "--eval-interval", "3", "--clip-grad", "0.5", "--run-kind", "cpt"],
]


def test_every_flag_is_one_config_field():
    fields = flag_fields()
    dests = {a.dest for a in build_parser()._actions} - {"help"}
    assert dests - set(fields) == {"group_query_attention", "fp16", "lr_wsd_decay_samples",
                                   "use_rope_scaling", "rope_scaling_factor"}


@pytest.mark.parametrize("argv", ARGVS)
def test_config_to_argv_round_trips(argv):
    cfg, opts = parse_args(argv)
    assert parse_args(config_to_argv(cfg, opts)) == (cfg, opts)


def test_configs_built_in_code_round_trip():
    """What studies and the quickstart build (typed configs) is what the CLI would run."""
    cfg = Config(model=ModelConfig.from_size("debug-xs", vocab_size=2048, seq_length=64),
                 data=DataConfig(data_path=["1.0", "zh=/d/zh"], split="1,0,0",
                                 valid_data_path={"zh": "/d/zv", "en": "/d/ev"},
                                 num_workers=0, target="zh"),
                 optim=OptimizerConfig(lr=3e-3, min_lr=3e-4, lr_warmup_fraction=None,
                                       lr_warmup_iters=4, lr_decay_style="WSD",
                                       lr_wsd_decay_iters=6, lr_wsd_decay_style="linear"),
                 training=TrainingConfig(micro_batch_size=8, global_batch_size=8,
                                         train_iters=30, eval_interval=6, eval_iters=2),
                 checkpoint=CheckpointConfig(save="/c", load="/c", save_iters=[12, 24]),
                 logging=LoggingConfig(log_dir="/r", tensorboard=False, run_kind="scratch"))
    opts = RunOptions(override_opt_param_scheduler=True)
    assert parse_args(config_to_argv(cfg, opts)) == (cfg, opts)


def test_apply_flags_sets_plain_fields_and_refuses_the_rest():
    cfg, _ = parse_args(ARGVS[0])
    out = apply_flags(cfg, ["--save-interval", "500", "--bf16", "--no-tensorboard"])
    assert (out.checkpoint.save_interval, out.training.bf16, out.logging.tensorboard) == \
        (500, True, False)
    assert cfg.checkpoint.save_interval is None  # a copy
    with pytest.raises(ConfigError, match="--train-iters cannot be set here"):
        apply_flags(cfg, ["--train-iters", "5"], "extra_args")
    with pytest.raises(ConfigError, match="micro_batch_size"):  # validated again
        apply_flags(cfg, ["--global-batch-size", "3", "--micro-batch-size", "2"])
