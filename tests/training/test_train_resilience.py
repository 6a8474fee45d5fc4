"""Nothing lost: torn metrics rows, a missing tracker, full disks, skipped-step streaks, blend
mistakes, RNG streams across a resume, and the small things around them (issue 14)."""
import logging
import os
import resource
import shutil

import numpy as np
import pytest
import torch

from megacpt.checkpoint import integrity
from megacpt.config import ConfigError
from megacpt.train import EXIT_BAD_INPUT, main
from megacpt.training import checks
from megacpt.training.faults import NonFiniteError
from megacpt.training.loop import Trainer, train
from megacpt.training.metrics import read_metrics
from _train_helpers import (config, mock_args, nan_loss_streak, output, real_args, start_cli,
                            tiny_args, write_indexed)


def test_torn_last_metrics_row_is_dropped_on_resume(tmp_path):
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    run = mock_args("--save", ck, "--log-dir", logs, iters=4)
    train(*config(run + ["--exit-interval", "2"]))
    with open(f"{logs}/metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iteration": 3, "lm_lo')  # a crash cut this row short
    assert [r["iteration"] for r in read_metrics(logs, "train")] == [1, 2]
    train(*config(run + ["--load", ck]))
    assert [r["iteration"] for r in read_metrics(logs, "train")] == [1, 2, 3, 4]
    with open(f"{logs}/metrics.jsonl", "a") as f:
        f.write('{"bad"\n{"type": "train", "iteration": 5}\n')  # not torn: an edit
    with pytest.raises(ValueError, match=r"metrics.jsonl:\d+: not a JSON object"):
        read_metrics(logs)


def test_load_dir_without_tracker_resumes_from_newest_verified_checkpoint(tmp_path, caplog):
    """A deleted tracker (or a save killed between its rename and the tracker update) must
    not start again at iteration 0 over the existing checkpoints."""
    ck = str(tmp_path / "ck")
    train(*config(mock_args("--save", ck, "--save-interval", "1", iters=3)))
    os.remove(f"{ck}/latest_checkpointed_iteration.txt")
    data = bytearray(open(f"{ck}/iter_0000003/rng/rank_0.pt", "rb").read())
    data[-30] ^= 1
    open(f"{ck}/iter_0000003/rng/rank_0.pt", "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING, logger="megacpt.train"):
        resumed = Trainer(*config(mock_args("--save", ck, "--load", ck, iters=3)))
    assert resumed.iteration == 2
    assert resumed.last_checkpoint == f"{ck}/iter_0000002"  # not .../iter_0000002/iter_0000002
    assert f"no latest_checkpointed_iteration.txt: resuming from its newest complete " \
           f"checkpoint {ck}/iter_0000002 (skipping iter_0000003" in caplog.text
    assert open(f"{ck}/latest_checkpointed_iteration.txt").read().strip() == "2"  # repaired
    caplog.clear()
    with caplog.at_level(logging.INFO):  # --load of an iter_* directory: no doubled path
        direct = Trainer(*config(mock_args("--load", f"{ck}/iter_0000002", iters=3)))
    assert direct.iteration == 2 and direct.last_checkpoint == f"{ck}/iter_0000002"
    assert f"resumed from {ck}/iter_0000002 at iteration 2" in caplog.text
    assert "iter_0000002/iter_0000002" not in caplog.text
    os.remove(f"{ck}/latest_checkpointed_iteration.txt")
    shutil.rmtree(f"{ck}/iter_0000002")
    shutil.rmtree(f"{ck}/iter_0000001")
    with pytest.raises(ConfigError, match="none of its checkpoints verifies: iter_0000003"):
        Trainer(*config(mock_args("--save", ck, "--load", ck, iters=3)))


def test_save_failures_are_one_line_and_keep_the_previous_checkpoint(tmp_path):
    """A file-size limit (what a full disk does to a save) in a real CLI process."""
    ck, logs = str(tmp_path / "ck"), str(tmp_path / "log")
    run = mock_args("--save", ck, "--log-dir", logs, iters=4)
    assert main(run + ["--exit-interval", "2"]) == 0
    limit = os.path.getsize(f"{ck}/iter_0000002/mp_rank_00_000/model.safetensors") // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start_cli(run + ["--load", ck], preexec_fn=small_files)
    proc.wait(timeout=180)
    out = output(proc)
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    assert "training stopped: saving checkpoint" in out and "File too large" in out, out
    assert "previous checkpoint and the tracker are untouched" in out
    assert open(f"{ck}/latest_checkpointed_iteration.txt").read().strip() == "2"
    assert sorted(os.listdir(ck)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert integrity.problems(f"{ck}/iter_0000002") == []


def test_unwritable_save_dir_is_found_at_start_up(tmp_path, caplog):
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: use a read-only fs
        target = "/sys/kernel"
    else:
        target = str(tmp_path / "ro")
        os.makedirs(target)
        os.chmod(target, 0o500)
    with pytest.raises(ConfigError, match=f"--save {target}: the directory is not writable"):
        checks.check_writable("--save", target)
    free = shutil.disk_usage(tmp_path).free
    with caplog.at_level(logging.WARNING, logger="megacpt.train"):
        assert checks.check_free_space(str(tmp_path), 2 * free)
        assert not checks.check_free_space(str(tmp_path), 1000)
    assert "one checkpoint needs about" in caplog.text
    cfg, _ = config(mock_args(iters=1))
    n = cfg.model.num_parameters()
    assert checks.checkpoint_bytes(cfg) == n * (4 + 8)  # fp32 weights + Adam moments


def test_last_good_checkpoint_predates_the_skip_streak(tmp_path):
    ck = str(tmp_path / "ck")
    nan_loss_streak(ck, 1, 3, r"step 5: 3 consecutive.*iter_0000002\. ")
    assert os.path.isdir(f"{ck}/iter_0000004")  # saved during the streak, but not named


@pytest.mark.parametrize("words,match", [
    (lambda c: ["0.5", f"a={c['zh']}", "0.5", f"b={c['zh']}"], "'a' and 'b' are the same prefix"),
    (lambda c: ["0.7", f"zh={c['zh']}", "0", f"en={c['en']}"], "'en' .* has weight 0"),
])
def test_blend_mistakes_are_refused(corpus, words, match):
    argv = real_args(corpus) + ["--data-path", *words(corpus)]
    with pytest.raises(ConfigError, match=match):
        Trainer(*config(argv))


def test_empty_train_split_is_a_clean_error(corpus, capsys):
    assert main(real_args(corpus) + ["--split", "0,100,0"]) == EXIT_BAD_INPUT
    out = capsys.readouterr().out
    assert "--split 0,100,0: the train split of dataset 'zh'" in out and "Traceback" not in out


def test_device_cuda_without_cuda_is_bad_input(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(mock_args("--device", "cuda")) == EXIT_BAD_INPUT
    assert "--device cuda: CUDA is not available" in capsys.readouterr().out


def test_out_of_vocabulary_at_run_time_names_dataset_and_file(tmp_path):
    docs = [np.arange(20) % 200 for _ in range(30)] + [np.full(40, 250)]
    prefix = write_indexed(f"{tmp_path}/late_text_document", docs)
    argv = tiny_args("--data-path", "1.0", f"late={prefix}", "--split", "100,0,0",
                     "--vocab-size", "240", "--data-check-tokens", "100", iters=20)
    with pytest.raises(ConfigError, match=rf"dataset 'late', file {prefix}.bin\) holds token "
                                          r"id 250, outside the model's vocabulary of 240"):
        train(*config(argv))


def test_rng_streams_after_resume_equal_the_uninterrupted_run(tmp_path):
    """The first validation after a resume must not draw from the training RNG."""
    ck = str(tmp_path / "ck")
    common = ["--data-path", "0.7", "zh", "0.3", "en", "--eval-interval", "2"]
    train(*config(mock_args(*common, iters=4)))
    full = torch.get_rng_state()
    train(*config(mock_args(*common, "--save", ck, "--exit-interval", "1", iters=4)))
    torch.manual_seed(123)  # whatever happens between the two processes must not matter
    train(*config(mock_args(*common, "--load", ck, iters=4)))
    assert torch.equal(torch.get_rng_state(), full)


def test_blend_change_on_resume_is_logged(tmp_path, caplog):
    ck = str(tmp_path / "ck")
    train(*config(mock_args("--data-path", "0.7", "zh", "0.3", "en", "--save", ck,
                            "--exit-interval", "1", iters=2)))
    with caplog.at_level(logging.WARNING, logger="megacpt.train"):
        Trainer(*config(mock_args("--data-path", "0.5", "zh", "0.5", "en", "--load", ck,
                                  iters=2)))
    assert "the blend changed on resume: checkpoint {zh: 0.7, en: 0.3} -> now {zh: 0.5, " \
           "en: 0.5}" in caplog.text


def test_stale_tracker_temp_files_are_removed(tmp_path):
    ck = str(tmp_path / "ck")
    os.makedirs(ck)
    open(f"{ck}/.tracker-abc123", "w").write("7")  # a save killed between write and rename
    os.makedirs(f"{ck}/iter_0000009.tmp")  # a save killed mid-write
    train(*config(mock_args("--save", ck, iters=1)))
    assert sorted(os.listdir(ck)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
