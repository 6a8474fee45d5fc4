"""The training loop on CPU: exact resume, CPT init, blend accounting, validation, NaN skip."""
import math

import numpy as np
import pytest
import torch

from megacpt.training.faults import NonFiniteError
from megacpt.training.loop import Trainer, train
from megacpt.training.metrics import read_metrics

from _train_helpers import config, mock_args, nan_loss_streak, real_args


class Boom(Exception):
    pass


def crash_at(iteration):
    def after_step(trainer, row):
        if row["iteration"] == iteration:
            raise Boom(f"simulated crash after step {iteration}")
    return {"after_step": after_step}


def test_exact_resume_real_data(corpus, tmp_path):
    full = train(*config(real_args(corpus)))
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    run = real_args(corpus, "--save", ck, "--save-interval", "3", "--log-dir", logs)
    with pytest.raises(Boom):  # dies after step 5; the last checkpoint is step 3
        train(*config(run), callbacks=crash_at(5))
    assert open(f"{ck}/latest_checkpointed_iteration.txt").read().strip() == "3"
    resumed = train(*config(run + ["--load", ck]))
    assert sorted(resumed.losses) == [4, 5, 6]
    for it, loss in resumed.losses.items():
        assert loss == full.losses[it], f"step {it}: resumed {loss} != {full.losses[it]}"
    rows = read_metrics(logs, "train")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]  # rows 4, 5 of the crash dropped
    assert [r["lm_loss"] for r in rows] == [full.losses[i] for i in range(1, 7)]
    assert read_metrics(logs, "resume")[0]["iteration"] == 3
    assert rows[-1]["consumed_tokens"] == 6 * 4 * 16


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    """A 3-step mock-data run saved at step 3 (the 'source-language' model)."""
    ck = str(tmp_path_factory.mktemp("src") / "ck")
    train(*config(mock_args("--data-path", "1.0", "en", "--save", ck, iters=3)))
    return ck


def test_cpt_init_from_checkpoint(source_ckpt, tmp_path):
    from megacpt.checkpoint import load_model

    logs = str(tmp_path / "log")
    cfg, opts = config(mock_args("--init-from", source_ckpt, "--data-path", "0.7", "zh", "0.3",
                                 "en", "--log-dir", logs, "--lr-warmup-iters", "4", iters=8))
    tr = Trainer(cfg, opts)
    assert tr.iteration == 0 and not tr.resumed
    src = dict(load_model(source_ckpt).named_parameters())
    for name, p in tr.model.named_parameters():
        assert torch.equal(p.detach(), src[name].detach()), name
    sd = tr.optimizer.state_dict()
    assert sd["step"] == 0
    assert all(float(v.abs().sum()) == 0 for st in sd["state"].values()
               for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    result = tr.run()
    header = read_metrics(logs, "header")[0]
    assert header["run_kind"] == "cpt" and header["init_from"] == source_ckpt
    assert header["blend"] == {"zh": 0.7, "en": 0.3} and header["target"] == "zh"
    lrs = [r["lr"] for r in read_metrics(logs, "train")]
    assert lrs[:4] == pytest.approx([3e-3 * k / 4 for k in (1, 2, 3, 4)])  # LR re-warm-up
    assert result.iteration == 8


def greedy_counts(weights, n):
    """Reference blend: sample i goes to argmax_d(w_d (i + 1) - c_d), ties to the first."""
    c = [0] * len(weights)
    for i in range(n):
        errs = [w * (i + 1) - k for w, k in zip(weights, c)]
        c[errs.index(max(errs))] += 1
    return c


def test_blend_ratios_and_blend_change_on_resume(tmp_path):
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    common = ["--global-batch-size", "10", "--save", ck, "--log-dir", logs]
    first = mock_args("--data-path", "0.7", "zh", "0.3", "en", *common, "--exit-interval", "3")
    train(*config(first))
    rows = read_metrics(logs, "train")
    for r in rows:
        zh, en = greedy_counts([0.7, 0.3], 10 * r["iteration"])
        assert r["consumed_samples_per_dataset"] == {"zh": zh, "en": en}
        assert r["consumed_tokens_per_dataset"] == {"zh": zh * 16, "en": en * 16}
        assert abs(zh - 0.7 * 10 * r["iteration"]) < 1
    second = mock_args("--data-path", "0.5", "zh", "0.5", "en", *common, "--load", ck)
    train(*config(second))
    after = read_metrics(logs, "train")[3:]
    zh0, en0 = greedy_counts([0.7, 0.3], 30)
    for r in after:  # each dataset continues from where it was, at the new ratio
        zh, en = greedy_counts([0.5, 0.5], 10 * (r["iteration"] - 3))
        assert r["consumed_samples_per_dataset"] == {"zh": zh0 + zh, "en": en0 + en}
        assert r["flops_per_dataset"]["en"] == pytest.approx(
            (en0 + en) * 16 * read_metrics(logs, "header")[0]["flops_per_token"])
    assert read_metrics(logs, "resume")[0]["blend"] == {"zh": 0.5, "en": 0.5}


def test_per_language_validation_rows(corpus, tmp_path):
    logs = str(tmp_path / "log")
    cfg, opts = config(real_args(corpus, "--eval-interval", "2", "--log-dir", logs, iters=4))
    tr = Trainer(cfg, opts)
    result = tr.run()
    rows = read_metrics(logs, "valid")
    assert [(r["name"], r["iteration"]) for r in rows] == [
        (n, i) for i in (0, 2, 4) for n in ("zh", "en")]
    assert all(r["split"] == "valid" for r in rows)
    by_it = {r["iteration"]: r for r in read_metrics(logs, "train")}
    for r in rows[2:]:
        assert r["consumed_tokens"] == by_it[r["iteration"]]["consumed_tokens"]
        assert r["flops"] == by_it[r["iteration"]]["flops"]
    with torch.no_grad():  # the logged loss is the model's mean loss on the fixed samples
        for name in ("zh", "en"):
            mbs = tr.data.valid_microbatches(name)
            direct = np.mean([float(tr.model(m["tokens"], m["labels"]).mean()) for m in mbs])
            assert result.valid[name] == pytest.approx(direct, rel=1e-6)
            assert rows[-2 if name == "zh" else -1]["loss"] == pytest.approx(direct, rel=1e-6)
    assert read_metrics(logs, "header")[0]["valid_sets"] == ["zh", "en"]


def poison_grads_at(iterations):
    def after_backward(trainer, iteration, loss):
        if iteration in iterations:
            p = dict(trainer.model.named_parameters())["layers.0.mlp.down.weight"]
            p.main_grad.fill_(float("nan"))
    return {"after_backward": after_backward}


def test_nonfinite_grad_step_is_skipped(tmp_path):
    logs = str(tmp_path / "log")
    cfg, opts = config(mock_args("--log-dir", logs, iters=5))
    snapshots = {}

    def after_step(trainer, row):
        snapshots[row["iteration"]] = {n: p.detach().clone()
                                       for n, p in trainer.model.named_parameters()}
    cbs = {**poison_grads_at({3}), "after_step": after_step}
    result = Trainer(cfg, opts, callbacks=cbs).run()
    assert result.skipped_steps == 1 and result.iteration == 5
    for n, p in snapshots[3].items():  # step 3 changed nothing
        assert torch.equal(p, snapshots[2][n]), n
    assert not torch.equal(snapshots[4]["output.weight"], snapshots[3]["output.weight"])
    rows = read_metrics(logs, "train")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[2]["grad_norm"] is None and all(math.isfinite(r["lm_loss"]) for r in rows)


def test_nonfinite_loss_k_in_a_row_stops(tmp_path):
    ck = str(tmp_path / "ck")
    nan_loss_streak(ck, 2, 2, r"step 4: 2 consecutive.*iter_0000002")
