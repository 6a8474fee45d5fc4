"""W&B logging beside metrics.jsonl (Megatron's --wandb-* flags), run in wandb's offline mode:
the offline run file holds the same numbers as metrics.jsonl; a resumed run continues the same
W&B run; a missing wandb is a clear configuration error."""
import glob
import json
import struct
import sys
import time

import pytest

from megacpt.train import main
from megacpt.training.metrics import read_metrics

from _train_helpers import mock_args

wandb = pytest.importorskip("wandb")


def wandb_records(path):
    """Records of an offline `.wandb` file: W&B's LevelDB-log framing (7-byte file header,
    32 KiB blocks, chunks of crc32c(4) length(2) type(1): 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def history(run_dir):
    """{step: {key: value}} and the run records of every offline run under run_dir."""
    steps, runs = {}, []
    for path in sorted(glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")):
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in r.history.item}
                steps.setdefault(row.pop("_step", r.history.step.num), {}).update(row)
            elif kind == "run":
                runs.append(r.run)
    return steps, runs


def test_offline_run_matches_metrics_and_resumes_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log, wdir = str(tmp_path / "log"), str(tmp_path / "wb")
    flags = ["--log-dir", log, "--wandb-project", "megacpt-test", "--wandb-exp-name", "tiny",
             "--wandb-save-dir", wdir, "--save", str(tmp_path / "ck"), "--save-interval", "2"]
    assert main(mock_args(*flags, "--exit-interval", "2", iters=4)) == 0
    # W&B names an offline run's directory by the second it started and the run id: a resume
    # within the same second would reuse (and overwrite) the first directory, which no real
    # restart does (start-up alone takes longer), so let the clock move on.
    time.sleep(1.1)
    assert main(mock_args(*flags, "--load", str(tmp_path / "ck"), iters=4)) == 0
    steps, runs = history(wdir)
    assert len(runs) == 2 and {r.run_id for r in runs} == {open(f"{wdir}/wandb_run_id").read()}
    assert runs[0].project == "megacpt-test" and runs[0].display_name == "tiny"
    rows = read_metrics(log, "train")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        got = steps[r["iteration"]]
        assert got["train/lm_loss"] == pytest.approx(r["lm_loss"], rel=1e-12)
        assert got["train/lr"] == pytest.approx(r["lr"], rel=1e-12)
        assert got["train/consumed_tokens"] == r["consumed_tokens"]
    for r in read_metrics(log, "valid"):
        assert steps[r["iteration"]][f"valid/{r['name']}"] == pytest.approx(r["loss"])


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec -> None: not installed
    assert main(mock_args("--log-dir", str(tmp_path), "--wandb-project", "p", iters=1)) == 2
    out = capsys.readouterr()
    assert "the wandb package is not installed; pip install 'megacpt[wandb]'" in out.out + out.err
    assert main(mock_args("--wandb-exp-name", "x", iters=1)) == 2
    out = capsys.readouterr()
    assert "--wandb-exp-name/--wandb-save-dir need --wandb-project" in out.out + out.err
