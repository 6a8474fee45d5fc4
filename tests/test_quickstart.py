"""examples/quickstart.py: a shrunken end-to-end run, and its analysis against hand-made curves.

The full default run (which must SHOW that CPT beats scratch and that replay limits
forgetting) takes minutes and is checked by hand; here the whole pipeline runs with tiny
flags and the summary it writes is checked for completeness and internal consistency.
"""
import json
import math
import os

import pytest

from _harness import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


qs = load_script("examples/quickstart.py")

SMALL = ["--model-size", "tiny", "--seq-length", "64", "--micro-batch-size", "8",
         "--global-batch-size", "8", "--source-iters", "40", "--target-iters", "24",
         "--evals", "3", "--eval-iters", "2", "--eval-items", "8"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    summary = qs.main(["--out", str(out), *SMALL])
    return out, summary


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_small_run_writes_complete_summary(small_run):
    out, returned = small_run
    with open(out / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["target_valid_loss"] == returned["target_valid_loss"]
    assert set(summary["target_valid_loss"]) == {"scratch", "cpt", "cpt_replay"}
    assert set(summary["source_valid_loss"]) == {"source_model", "cpt", "cpt_replay"}
    for group in ("target_valid_loss", "source_valid_loss"):
        for name, loss in summary[group].items():
            assert _finite(loss) and 0 < loss < 20, (group, name, loss)
    # 24 steps x 8 sequences x 64 tokens, all Chinese without replay, ~70% with 30% replay
    assert summary["target_tokens"]["scratch"] == summary["target_tokens"]["cpt"] == 24 * 8 * 64
    assert 0.6 * 24 * 8 * 64 <= summary["target_tokens"]["cpt_replay"] <= 0.75 * 24 * 8 * 64
    saved = summary["tokens_saved_fraction"]
    beats = summary["findings"]["cpt_beats_scratch"]
    assert beats == (summary["target_valid_loss"]["cpt"] <
                     summary["target_valid_loss"]["scratch"])
    if beats:  # CPT ended below scratch's final loss, so it got there with fewer tokens
        assert _finite(saved) and 0 < saved < 1
    else:
        assert saved is None or (_finite(saved) and saved <= 0.05)
    for name in ("source", "scratch", "cpt", "cpt_replay"):
        assert _finite(summary["flops"][name]) and summary["flops"][name] > 0
        curve = summary["curves"][name]
        assert curve["iteration"][0] == 0 and len(curve["iteration"]) == 4
        assert set(curve["valid_loss"]) == {"en", "zh"}
        assert all(_finite(v) for losses in curve["valid_loss"].values() for v in losses)


def test_small_run_artifacts(small_run):
    out, summary = small_run
    for png in ("loss_vs_tokens.png", "loss_vs_compute.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer.model").is_file()
    for name in ("source", "scratch", "cpt", "cpt_replay"):
        assert (out / "runs" / name / "metrics.jsonl").is_file()
        tracker = out / "checkpoints" / name / "latest_checkpointed_iteration.txt"
        assert tracker.read_text().strip() == str(40 if name == "source" else 24)
    # CPT runs start from the source model: their first validation equals its final one
    src_final = summary["curves"]["source"]["valid_loss"]["en"][-1]
    for name in ("cpt", "cpt_replay"):
        assert summary["curves"][name]["valid_loss"]["en"][0] == pytest.approx(src_final,
                                                                               rel=1e-5)
        assert "--init-from" in summary["commands"][name]
    assert "--init-from" not in summary["commands"]["scratch"]


def test_small_run_downstream_accuracy(small_run):
    out, summary = small_run
    down = summary["downstream"]
    assert down["metric"] == "acc_norm"
    assert set(down["runs"]) == {"source_model", "scratch", "cpt", "cpt_replay"}
    for res in down["runs"].values():
        assert set(res) == {"zh", "en"}
        for m in res.values():
            assert m["num_items"] == 8 and 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1
    for lang in ("zh", "en"):
        assert (out / "tasks" / f"demo_{lang}.jsonl").is_file()
    with open(out / "downstream.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tokens_to_reach_interpolates():
    tokens, losses = [0, 100, 200, 300], [9.0, 6.0, 4.0, 3.0]
    assert qs.tokens_to_reach(tokens, losses, 5.0) == pytest.approx(150.0)
    assert qs.tokens_to_reach(tokens, losses, 6.0) == pytest.approx(100.0)
    assert qs.tokens_to_reach(tokens, losses, 3.5) == pytest.approx(250.0)
    assert qs.tokens_to_reach(tokens, losses, 9.5) == 0.0
    assert qs.tokens_to_reach(tokens, losses, 2.0) is None
    # the FIRST crossing counts, after a bump
    assert qs.tokens_to_reach([0, 10, 20, 30], [5, 3, 6, 2], 4.0) == pytest.approx(5.0)


def _curve(target_tokens, zh, en):
    n = len(target_tokens)
    return {"iteration": list(range(n)), "target_tokens": target_tokens,
            "tokens": target_tokens, "flops": [6.0 * t for t in target_tokens],
            "valid_loss": {"zh": zh, "en": en}}


def test_summarize_hand_made_curves():
    args = qs.get_args(["--out", "unused"])
    curves = {
        "source": _curve([0, 100], [9.0, 9.0], [8.0, 3.0]),
        "scratch": _curve([0, 100, 200, 400], [8.0, 6.0, 5.0, 4.0], [8.0, 8, 8, 8]),
        "cpt": _curve([0, 100, 200, 400], [9.0, 5.0, 3.0, 2.5], [3.0, 4, 4.5, 5.0]),
        "cpt_replay": _curve([0, 70, 140, 280], [9.0, 5.5, 3.5, 3.0], [3.0, 3.2, 3.1, 3.1]),
    }
    s = qs.summarize(args, curves)
    assert s["target_valid_loss"] == {"scratch": 4.0, "cpt": 2.5, "cpt_replay": 3.0}
    assert s["source_valid_loss"] == {"source_model": 3.0, "cpt": 5.0, "cpt_replay": 3.1}
    # CPT reaches 4.0 halfway between 100 (5.0) and 200 (3.0) tokens: 150 of scratch's 400
    assert s["tokens_saved_fraction"] == pytest.approx(1 - 150 / 400)
    assert s["findings"] == {"cpt_beats_scratch": True, "replay_limits_forgetting": True}
    curves["cpt_replay"]["valid_loss"]["en"][-1] = 4.5  # keeps only 0.5 of CPT's 2.0 rise
    assert not qs.summarize(args, curves)["findings"]["replay_limits_forgetting"]
    curves["cpt"]["valid_loss"]["zh"] = [9.0, 7.0, 6.0, 4.5]  # never reaches 4.0
    s = qs.summarize(args, curves)
    assert s["tokens_saved_fraction"] is None and not s["findings"]["cpt_beats_scratch"]


@pytest.mark.parametrize("argv,message", [
    (["--data-dir", "{tmp}"], "en_train.jsonl.gz not found"),
    (["--replay", "1.5"], "--replay must be in (0, 1)"),
    (["--target-lang", "en"], "must differ"),
    (["--model-size", "huge"], "--model-size 'huge' is not registered"),
    (["--target-iters", "0"], "--target-iters must be >= 1, got 0")])
def test_bad_arguments_name_the_problem(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        qs.get_args([a.format(tmp=tmp_path) for a in argv])
    assert message in capsys.readouterr().err


def test_shape_flags_override_the_size():
    from megacpt.flags import config_to_argv
    from megacpt.config import Config

    args = qs.get_args(["--model-size", "debug-xs", "--hidden-size", "96",
                        "--num-attention-heads", "6"])
    argv = config_to_argv(Config(model=qs.model_config(args, 2048)))
    pairs = dict(zip(argv[:10:2], argv[1:10:2]))
    assert pairs == {"--num-layers": "4", "--hidden-size": "96", "--ffn-hidden-size": "176",
                     "--num-attention-heads": "6", "--num-query-groups": "2"}
    argv = config_to_argv(Config(model=qs.model_config(qs.get_args([]), 2048)))
    assert argv[:2] == ["--model-size", "debug-xs"] and "--hidden-size" not in argv


def test_cpt_recipe_commands_parse_with_the_trainer(tmp_path):
    """examples/cpt_1.4b.sh (DRY_RUN=1): every training command uses real trainer flags."""
    import shlex
    import subprocess

    from megacpt.arguments import build_parser

    env = {**os.environ, "DRY_RUN": "1", "WORK": str(tmp_path)}
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "cpt_1.4b.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout
    runs = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ torchrun")]
    assert len(runs) == 2  # source, then CPT
    parsed = [build_parser().parse_args(r[r.index("megacpt.train") + 1:]) for r in runs]
    for a in parsed:
        assert (a.model_size, a.seq_length, a.bf16, a.lr, a.min_lr) == \
            ("1393M", 2048, True, 2e-4, 2e-5)
        assert a.global_batch_size * a.seq_length == 1024 * 2048  # 2M-token batches
        assert (a.tokens_per_param, a.lr_warmup_fraction, a.lr_decay_style) == \
            (20, 0.05, "cosine")
    source, cpt = parsed
    assert source.init_from is None and source.data_path[0] == "1.0"
    assert cpt.init_from == source.save
    assert cpt.data_path[0::2] == ["0.7", "0.3"]
    assert cpt.data_path[1].startswith("zh=") and cpt.data_path[3].startswith("en=")


def test_llama32_cpt_recipe_commands_parse(tmp_path):
    """examples/cpt_llama3.2_1b.sh (DRY_RUN=1): HF tokenizer preprocessing of parquet/zst
    inputs, CPT --init-from the HF directory without shape flags, 25% replay, export."""
    import shlex
    import subprocess

    from megacpt.arguments import build_parser

    env = {**os.environ, "DRY_RUN": "1", "WORK": str(tmp_path)}
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "cpt_llama3.2_1b.sh")],
                         env=env, capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    pre = [w for w in lines if "preprocess_data.py" in w[1]]
    assert len(pre) == 4 and all("HuggingFaceTokenizer" in w for w in pre)
    assert any(w[w.index("--input") + 1].endswith("*.parquet") for w in pre)
    train = [w for w in lines if w[0] == "torchrun"]
    assert len(train) == 1
    a = build_parser().parse_args(train[0][train[0].index("megacpt.train") + 1:])
    assert a.init_from == "/models/Llama-3.2-1B" and a.model_size is None
    assert a.tokenizer_model == a.init_from and a.tokenizer_type == "HuggingFaceTokenizer"
    assert a.num_layers is None and a.hidden_size is None  # the architecture from config.json
    assert a.data_path[0::2] == ["0.75", "0.25"] and a.global_batch_size * a.seq_length == 2**21
    assert any("--to-hf" in w for w in lines)
    env.update(NEW_TOKENS="8192", STEPS="extend preprocess cpt")  # vocabulary extension first
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "cpt_llama3.2_1b.sh")],
                         env=env, capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    ext = [w for w in lines if "extend_vocab.py" in w[1]]
    assert len(ext) == 1 and ext[0][ext[0].index("--new-pieces") + 1] == "8192"
    saved = ext[0][ext[0].index("--save-dir") + 1]
    pre = [w for w in lines if "preprocess_data.py" in w[1]]
    assert all(w[w.index("--tokenizer-model") + 1] == saved for w in pre)
    train = [w for w in lines if w[0] == "torchrun"][0]
    a = build_parser().parse_args(train[train.index("megacpt.train") + 1:])
    assert a.init_from == a.tokenizer_model == saved
