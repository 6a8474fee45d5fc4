"""Checksums in meta.json: recorded at save, verified on load; a flipped bit is refused with
the file's name and the newest older checkpoint that verifies."""
import json
import os
import sys

import pytest

from megacpt.checkpoint import CheckpointError, integrity
from megacpt.training.loop import Trainer, train
from _harness import torch_threads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "training"))
from _train_helpers import config, mock_args  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def saved(_one_thread, tmp_path_factory):
    """A save dir with iter_1..iter_3 (one per step) of a tiny mock run."""
    ck = str(tmp_path_factory.mktemp("ck") / "ck")
    train(*config(mock_args("--save", ck, "--save-interval", "1", iters=3)))
    return ck


def _copy(saved, tmp_path):
    import shutil

    dst = str(tmp_path / "ck")
    shutil.copytree(saved, dst)
    return dst


def _flip_bit(path: str, offset_from_end: int = 3) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) - offset_from_end] ^= 0x10  # inside the last tensor's bytes
    open(path, "wb").write(bytes(data))


def test_checksums_cover_every_file(saved):
    it3 = f"{saved}/iter_0000003"
    meta = json.load(open(f"{it3}/meta.json"))
    sums = meta["checksums"]
    assert sums["algorithm"] == integrity.default_algorithm()  # xxh3_128 with xxhash
    files = sorted(os.path.relpath(os.path.join(r, f), it3) for r, _, fs in os.walk(it3)
                   for f in fs if f != "meta.json")
    assert sorted(sums["files"]) == files and len(files) == 4
    assert integrity.problems(it3) == []


def test_flipped_bit_is_refused_naming_file_and_older_good_checkpoint(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    bad = f"{ck}/iter_0000003/mp_rank_00_000/model.safetensors"
    _flip_bit(bad)
    argv = mock_args("--save", ck, "--load", ck, iters=3)
    with pytest.raises(CheckpointError) as e:
        Trainer(*config(argv))
    msg = str(e.value)
    assert bad in msg and "checksum mismatch" in msg
    assert f"newest older checkpoint that verifies is {ck}/iter_0000002" in msg
    assert f"--load {ck}/iter_0000002" in msg and "--no-verify-checksums" in msg
    _flip_bit(f"{ck}/iter_0000002/rng/rank_0.pt", 40)  # the older one is damaged too
    with pytest.raises(CheckpointError, match="verifies is .*iter_0000001"):
        Trainer(*config(argv))
    trainer = Trainer(*config(argv + ["--no-verify-checksums"]))  # the user's explicit choice
    assert trainer.iteration == 3


def test_edited_meta_is_refused(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    path = f"{ck}/iter_0000003/meta.json"
    meta = json.load(open(path))
    meta["state"]["counters"]["consumed_samples"] += 4
    json.dump(meta, open(path, "w"))
    with pytest.raises(CheckpointError, match="meta.json: its content does not match"):
        Trainer(*config(mock_args("--load", ck, iters=3)))


def test_init_from_verifies_the_weights(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    _flip_bit(f"{ck}/iter_0000003/mp_rank_00_000/model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: \w+ checksum mismatch"):
        Trainer(*config(mock_args("--init-from", ck, iters=1)))
    from megacpt.checkpoint import load_model  # evaluation and generation

    with pytest.raises(CheckpointError, match=r"model.safetensors: \w+ checksum mismatch"):
        load_model(ck)
    assert load_model(ck, verify=False).cfg.num_layers > 0


def test_sha256_fallback_and_old_checkpoints(saved, tmp_path, monkeypatch):
    """Without xxhash, sha256 is recorded and verified; a checkpoint without the field (an
    older megacpt) loads unverified."""
    monkeypatch.setattr(integrity, "default_algorithm", lambda: "sha256")
    ck = str(tmp_path / "ck")
    train(*config(mock_args("--save", ck, iters=1)))
    meta = json.load(open(f"{ck}/iter_0000001/meta.json"))
    assert meta["checksums"]["algorithm"] == "sha256"
    assert integrity.problems(f"{ck}/iter_0000001") == []
    _flip_bit(f"{ck}/iter_0000001/mp_rank_00_000/optimizer.safetensors")
    assert "sha256 checksum mismatch" in integrity.problems(f"{ck}/iter_0000001")[0]
    del meta["checksums"]
    json.dump(meta, open(f"{ck}/iter_0000001/meta.json", "w"))
    assert integrity.problems(f"{ck}/iter_0000001") == []


# ----- converted checkpoints (tools/convert_checkpoint.py) carry checksums too -----

@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    """iter_3 of `saved` converted to tp1pp2 (with optimizer state)."""
    from megacpt.checkpoint.convert import convert_checkpoint

    out = str(tmp_path_factory.mktemp("conv") / "ck")
    convert_checkpoint(f"{saved}/iter_0000003", out, 1, 2, progress=False)
    return out


def test_converted_checkpoint_loads_verified(converted, caplog):
    it3 = f"{converted}/iter_0000003"
    sums = json.load(open(f"{it3}/meta.json"))["checksums"]
    from megacpt.checkpoint import format as fmt

    assert sorted(sums["files"]) == sorted(
        f"mp_rank_00_{p:03d}/{n}" for p in (0, 1)
        for n in (fmt.MODEL_FILE, fmt.OPTIM_TENSORS, fmt.OPTIM_REST))
    assert integrity.problems(it3) == []
    with caplog.at_level("INFO", logger="megacpt.checkpoint.integrity"):
        trainer = Trainer(*config(mock_args("--load", converted, iters=3)))
    assert trainer.iteration == 3
    assert not [r for r in caplog.records if "not verified" in r.getMessage()]


def test_flipped_bit_in_converted_checkpoint_is_one_line_error(converted, tmp_path, capsys):
    from megacpt.train import main

    ck = _copy(converted, tmp_path)
    bad = f"{ck}/iter_0000003/mp_rank_00_000/model.safetensors"
    _flip_bit(bad)
    assert main(mock_args("--load", ck, iters=3)) == 2
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in out.out + out.err, errors
    assert "checkpoint error: " in errors[0] and bad in errors[0]
    assert "checksum mismatch" in errors[0] and "No older checkpoint" in errors[0]


def test_converter_refuses_a_corrupt_source(saved, tmp_path, capsys):
    """A conversion must not carry a flipped bit into a new checkpoint with fresh checksums."""
    from megacpt.checkpoint.convert import main

    ck = _copy(saved, tmp_path)
    bad = f"{ck}/iter_0000003/mp_rank_00_000/optimizer.safetensors"
    _flip_bit(bad)
    argv = ["--load-dir", f"{ck}/iter_0000003", "--target-pipeline-parallel-size", "2",
            "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--save-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and bad in err and "checksum mismatch" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["--load-dir", f"{ck}/iter_0000003", "--to-hf", str(tmp_path / "hf"),
              "--no-progress"])
    assert bad in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert main(argv + ["--save-dir", str(tmp_path / "out"), "--no-verify-checksums"]) == 0
    assert integrity.problems(f"{tmp_path}/out/iter_0000003") == []  # recorded as read



def test_same_layout_resume_verifies_only_this_ranks_files(saved):
    """meta.json's layout (tp, pp, vp) decides: in the layout it was saved in (here tp1pp1, as
    rank 0 of a dp2 world) a rank checks its own shard and RNG file; in another layout the
    recorded files are dealt out over the ranks (a resharding load)."""
    from types import SimpleNamespace

    it = os.path.join(saved, "iter_0000003")
    same = SimpleNamespace(tp=1, pp=1, vp=1, tp_rank=0, pp_rank=0, rank=0, world_size=2)
    mine = integrity.files_to_verify(it, same)
    assert mine == integrity.rank_files(it, same) and any(r.startswith("mp_rank_00_000/")
                                                          for r in mine)
    other = SimpleNamespace(**{**vars(same), "tp": 2})
    dealt = [integrity.files_to_verify(it, SimpleNamespace(**{**vars(other), "rank": r}))
             for r in (0, 1)]
    recorded = json.load(open(os.path.join(it, "meta.json")))[integrity.FIELD]["files"]
    assert sorted(dealt[0] + dealt[1]) == sorted(recorded) and dealt[1]
