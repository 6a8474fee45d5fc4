"""launch: slurm against a real one-node Slurm (started by .ci/start_slurm.sh in CI).

A tiny study (one size, source + CPT) is written as sbatch scripts (dry run), then submitted:
data -> source array -> target array -> analysis, chained by afterok dependencies; the test
waits for the analysis job and checks the report. Resubmission only covers unfinished runs and
is refused while the study's jobs are still queued. Outside CI the test skips when Slurm is
not running; in CI (CI=true) a missing Slurm fails it.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from megacpt import study
from megacpt.study import slurm

from _harness import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _slurm_up() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch/sinfo not installed"
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    if p.returncode or not any(s.strip("*~#") in ("idle", "mixed", "allocated")
                               for s in p.stdout.split()):
        return f"no Slurm node answers (sinfo: {(p.stdout + p.stderr).strip()!r})"
    return None


@pytest.fixture(scope="module")
def slurm_ready():
    why = _slurm_up()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm test: {why}; .ci/start_slurm.sh starts it")
        pytest.skip(f"Slurm is not available: {why} (run .ci/start_slurm.sh as root)")


def _tool():
    return load_script("tools/run_study.py")


def _config(tmp_path) -> str:
    cfg = {"name": f"slurmtest{os.getpid()}", "out_dir": str(tmp_path / "o"), "launch": "slurm",
           "launcher": f"{sys.executable} -m megacpt.train", "sizes": ["tiny"],
           "target_langs": ["zh"], "kinds": ["cpt"], "replay_ratios": [0.0],
           "tokens_per_param": 0.01, "seq_length": 32, "micro_batch_size": 4,
           "global_batch_size": 4, "lr": 3e-3, "evals_per_run": 2, "eval_iters": 1,
           "device": "cpu", "fit": {"bootstrap": 0}, "downstream": {"demo_items": 4},
           "data": {"corpus_dir": os.path.join(REPO, "examples", "data"), "vocab_size": 2048,
                    "character_coverage": 0.99},
           "slurm": {"python": sys.executable, "time": "00:15:00",
                     "setup": ["export OMP_NUM_THREADS=1"]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _wait(job_ids, timeout=420):
    t0 = time.time()
    while time.time() - t0 < timeout:
        q = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True).stdout
        if not set(q.split()) & set(job_ids):
            return
        time.sleep(2)
    subprocess.run(["scancel", *job_ids])
    pytest.fail(f"slurm jobs {job_ids} still queued after {timeout}s")


def test_slurm_stages_with_dependencies_and_resume(slurm_ready, tmp_path):
    run_study = _tool()
    path = _config(tmp_path)
    out = tmp_path / "o"
    # dry run: the scripts only
    assert run_study.main(["--config", path, "--dry-run"]) == 0
    sdir = out / "slurm"
    assert sorted(p.name for p in sdir.glob("*.sbatch")) == [
        "analysis.sbatch", "data.sbatch", "source.sbatch", "target.sbatch"]
    assert not (sdir / "jobs.json").exists()
    target = (sdir / "target.sbatch").read_text()
    assert "#SBATCH --array=0-0" in target and "--init-from" in target
    assert "zh_tiny_cpt" in target and "en_tiny_source" in (sdir / "source.sbatch").read_text()
    assert "--evaluate-run zh_tiny_cpt\n" in target  # in the run's array task, after training
    assert "--fit-only" in (sdir / "analysis.sbatch").read_text()
    # submit for real
    assert run_study.main(["--config", path]) == 0
    jobs = {j["stage"]: j for j in json.loads((sdir / "jobs.json").read_text())["jobs"]}
    assert list(jobs) == ["data", "source", "target", "analysis"]
    ids = [j["job_id"] for j in jobs.values()]
    dep = subprocess.run(["scontrol", "show", "job", jobs["target"]["job_id"]],
                         capture_output=True, text=True).stdout
    assert jobs["source"]["job_id"] in dep and "afterok" in dep  # CPT after its source
    cfg = study.load_config(path)
    with pytest.raises(slurm.SlurmError, match="queued or running"):  # not twice
        slurm.submit(cfg, study.plan_runs(cfg, 2048), run_study.TOOL)
    _wait(ids)
    logs = "\n".join(p.read_text() for p in (sdir / "logs").glob("*.out"))
    runs = study.plan_runs(cfg, 2048)
    assert all(study.run_finished(r) for r in runs), logs[-3000:]
    assert (out / "report.md").is_file() and (out / "results.json").is_file(), logs[-3000:]
    for r in runs:  # scored by the array tasks, each on its final checkpoint
        ev = json.loads(open(os.path.join(r.run_dir, "eval.json"), encoding="utf-8").read())
        assert ev["iteration"] == r.train_iters and set(ev["tasks"]) == {"demo_en", "demo_zh"}
    assert "## Downstream evaluation" in (out / "report.md").read_text()
    # resumable: only what is unfinished is submitted again (dry run: nothing waits on it)
    victim = next(r for r in runs if r.kind == "cpt")
    os.remove(os.path.join(victim.ckpt_dir, "latest_checkpointed_iteration.txt"))
    for p in sdir.glob("*.sbatch"):
        p.unlink()
    assert run_study.main(["--config", path, "--dry-run"]) == 0
    assert sorted(p.name for p in sdir.glob("*.sbatch")) == ["analysis.sbatch", "target.sbatch"]
