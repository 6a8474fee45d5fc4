"""benchmarks/gpu_suite.sh: its --dry-run runs every stage's command at the tiny size on CPU,
so the one prepared GPU call can't rot between GPU sessions.

Checks: exit 0; at most 8 files in OUTDIR; every stage's result JSON is there with rows;
the e2e rows hold megacpt and hf measurements (hf+liger measured or its error recorded);
the logs are in one tarball with a summary naming every stage; bad options exit 2.
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
JSONS = ["e2e.json", "rmsnorm.json", "swiglu.json", "attention.json", "e2e_compile.json",
         "cross_entropy.json", "rope.json"]
STAGES = ["a1_e2e", "b1_rmsnorm", "b1_swiglu", "c_pytest_gpu", "d_attention",
          "a2_e2e_compile", "b2_cross_entropy", "b2_rope"]


def _run(*args, timeout=400):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", SUITE, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_runs_every_stage(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    proc = _run(str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    assert set(JSONS + ["logs.tar.gz"]) == set(files), files
    for name in JSONS:
        assert json.loads((out / name).read_text())["rows"], name
    e2e = {r["impl"]: r for r in json.loads((out / "e2e.json").read_text())["rows"]}
    assert set(e2e) == {"megacpt", "hf", "hf+liger"}
    for impl in ("megacpt", "hf"):
        assert e2e[impl]["error"] is None and e2e[impl]["tokens_per_sec"] > 0, e2e[impl]
    assert e2e["hf+liger"]["error"] or e2e["hf+liger"]["tokens_per_sec"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
        summary = tar.extractfile("logs/summary.txt").read().decode()
    assert {f"{s}.log" for s in STAGES} <= names and "env.txt" in names
    assert any(n.endswith(".trace.json.gz") for n in names)  # the profile, not in OUTDIR
    for s in STAGES:
        assert f"== {s}: rc 0" in summary, summary


@pytest.mark.parametrize("args", [[], ["--budget-s", "ten"], ["x", "--bogus"], ["a", "b"]])
def test_bad_arguments_exit_2(tmp_path, args):
    proc = _run(*[a if a not in ("x", "a", "b") else str(tmp_path / a) for a in args],
                timeout=30)
    assert proc.returncode == 2 and "usage" in (proc.stderr + proc.stdout).lower() \
        or "budget" in proc.stderr, proc.stderr
