"""LR schedule formula, CLI -> Config resolution, and the resolved-config round trip."""
import json
import math

import pytest

from megacpt.arguments import build_parser, load_config, parse_args, save_config
from megacpt.config import ConfigError, OptimizerConfig
from megacpt.training.schedule import LRSchedule

BASE = ["--model-size", "tiny", "--vocab-size", "300", "--mock-data", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4"]


def reference_lr(s, max_lr, min_lr, w, d, style):
    """Direct transcription of the schedule (s = 1-based step number)."""
    if w and s <= w:
        return max_lr * s / w
    if style == "constant":
        return max_lr
    if s > d:
        return min_lr
    r = (s - w) / (d - w)
    c = 0.5 * (1 + math.cos(math.pi * r)) if style == "cosine" else 1 - r
    return min_lr + (max_lr - min_lr) * c


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_schedule_matches_reference(style):
    sch = LRSchedule(2e-4, 2e-5, 5, 100, style)
    lrs = [sch.step() for _ in range(110)]
    ref = [reference_lr(i + 1, 2e-4, 2e-5, 5, 100, style) for i in range(110)]
    assert lrs == pytest.approx(ref, rel=1e-12)
    assert lrs[0] == pytest.approx(2e-4 / 5)  # the first update is not at lr 0
    assert lrs[4] == pytest.approx(2e-4)  # warm-up ends at the peak
    if style != "constant":
        assert lrs[99] == pytest.approx(2e-5)  # the last decay step lands on min_lr
        assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_schedule_from_config_paper_defaults():
    sch = LRSchedule.from_config(OptimizerConfig(), 1000)
    assert (sch.max_lr, sch.warmup_iters, sch.decay_iters, sch.decay_style) == \
        (2e-4, 50, 1000, "cosine")


def test_schedule_state_roundtrip_and_mismatch():
    a = LRSchedule(1e-3, 1e-4, 10, 100)
    for _ in range(37):
        a.step()
    b = LRSchedule(1e-3, 1e-4, 10, 100)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.num_steps == 37 and b.step() == a.step()
    c = LRSchedule(1e-3, 1e-4, 10, 200)
    with pytest.raises(ConfigError, match="decay_iters = 100.*--override-opt-param-scheduler"):
        c.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict(), override=True)
    assert c.num_steps == a.num_steps and c.decay_iters == 200


def test_schedule_rejects_warmup_longer_than_decay():
    with pytest.raises(ConfigError, match="warm-up"):
        LRSchedule(1e-3, 0.0, 10, 10)


def test_cli_resolves_model_size_and_tokens_per_param():
    cfg, opts = parse_args(BASE + ["--tokens-per-param", "20"])
    n = cfg.model.num_parameters()
    assert cfg.model.name == "tiny" and cfg.model.hidden_size == 64
    assert cfg.model.padded_vocab_size == 384
    assert cfg.training.train_iters == math.ceil(20 * n / (4 * 16))
    assert opts.mock_data and cfg.optim.lr == 2e-4 and cfg.optim.lr_warmup_fraction == 0.05
    cfg, _ = parse_args(BASE + ["--train-tokens", "640"])
    assert cfg.training.train_iters == 10
    cfg, _ = parse_args(BASE + ["--train-iters", "7", "--lr", "1e-3"])
    assert cfg.training.train_iters == 7 and cfg.optim.min_lr == pytest.approx(1e-4)


def test_cli_megatron_flags_map_to_config():
    cfg, _ = parse_args([
        "--num-layers", "3", "--hidden-size", "32", "--ffn-hidden-size", "96",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--group-query-attention",
        "--seq-length", "32", "--max-position-embeddings", "64", "--vocab-size", "100",
        "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "5",
        "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-fraction", "0.1",
        "--lr-decay-style", "linear", "--weight-decay", "0.05", "--clip-grad", "0.5",
        "--seed", "7", "--data-path", "0.7", "zh", "0.3", "en", "--split", "98,2,0",
        "--valid-data-path", "zh=/v/zh", "en=/v/en", "--eval-interval", "3",
        "--eval-iters", "2", "--save", "/tmp/s", "--load", "/tmp/l", "--save-interval", "2",
        "--exit-interval", "4", "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--use-distributed-optimizer", "--bf16", "--init-from", "/tmp/src",
        "--distributed-timeout-minutes", "0.5", "--log-dir", "/tmp/log"])
    m, t, o = cfg.model, cfg.training, cfg.optim
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups, m.max_position_embeddings) == (3, 32, 96, 4, 2, 64)
    assert (o.lr, o.min_lr, o.lr_warmup_fraction, o.lr_decay_style, o.weight_decay,
            o.clip_grad) == (3e-4, 3e-5, 0.1, "linear", 0.05, 0.5)
    assert (t.micro_batch_size, t.global_batch_size, t.seed, t.bf16, t.eval_interval,
            t.eval_iters, t.exit_interval) == (1, 8, 7, True, 3, 2, 4)
    assert cfg.data.data_path == ["0.7", "zh", "0.3", "en"]
    assert cfg.data.valid_data_path == {"zh": "/v/zh", "en": "/v/en"}
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel,
            p.use_distributed_optimizer, p.distributed_timeout_minutes) == (2, 2, True, True, 0.5)
    c = cfg.checkpoint
    assert (c.save, c.load, c.save_interval, c.init_from) == ("/tmp/s", "/tmp/l", 2, "/tmp/src")


@pytest.mark.parametrize("argv, match", [
    (BASE, "exactly one of --train-iters"),
    (BASE + ["--train-iters", "5", "--train-tokens", "100"], "exactly one"),
    (["--model-size", "tiny", "--vocab-size", "9", "--train-iters", "1"], "no training data"),
    (["--model-size", "nope", "--vocab-size", "9", "--mock-data", "--train-iters", "1"],
     "unknown --model-size 'nope'"),
    (BASE + ["--hidden-size", "32", "--train-iters", "1"], "contradicts --model-size tiny"),
    (["--num-layers", "2", "--vocab-size", "9", "--mock-data", "--train-iters", "1"],
     "--hidden-size"),
    (["--model-size", "tiny", "--mock-data", "--train-iters", "1"], "vocabulary size is unknown"),
    (BASE + ["--train-iters", "1", "--fp16"], "--fp16 is not supported"),
    (BASE + ["--train-iters", "1", "--tokenizer-model", "/nonexistent.model"], "file not found"),
    (BASE + ["--train-iters", "1", "--valid-data-path", "zh="], "NAME=PREFIX"),
])
def test_cli_bad_input(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_config_json_roundtrip(tmp_path):
    cfg, opts = parse_args(BASE + ["--train-iters", "3", "--valid-data-path", "zh=/a/b"])
    path = save_config(cfg, opts, str(tmp_path))
    data = json.load(open(path))
    assert data["run"]["mock_data"] is True and data["training"]["train_iters"] == 3
    cfg2, opts2 = load_config(str(tmp_path))
    assert cfg2 == cfg and opts2 == opts


def test_help_lists_megatron_flags():
    text = build_parser().format_help()
    for flag in ("--num-query-groups", "--tokens-per-param", "--use-distributed-optimizer",
                 "--valid-data-path", "--init-from", "--exit-interval"):
        assert flag in text
