"""Golden losses: the first 10 training losses of the tiny model on a fixed synthetic corpus
(fp32, CPU, eager attention, torch reference kernels) must not drift, so a regression in the
model, optimizer, LR schedule or data pipeline shows up here.

Regenerate `tests/golden/tiny_losses.json` (only after a deliberate change, and say why in
the commit) with:

    python tests/training/test_train_golden.py --write
"""
import json
import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_helpers import build_corpus, config, real_args  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden", "tiny_losses.json")
STEPS = 10
TOLERANCE = 1e-4


def golden_argv(corpus: dict) -> list:
    return real_args(corpus, "--seed", "1234", "--lr-warmup-iters", "2", iters=STEPS)


def golden_losses(root: str) -> list:
    import torch

    from megacpt.training.loop import train

    torch.set_num_threads(1)
    result = train(*config(golden_argv(build_corpus(root))))
    return [result.losses[i] for i in range(1, STEPS + 1)]


def test_tiny_losses_match_golden(tmp_path):
    with open(GOLDEN) as f:
        golden = json.load(f)
    losses = golden_losses(str(tmp_path))
    assert len(golden["losses"]) == STEPS
    for i, (got, want) in enumerate(zip(losses, golden["losses"]), 1):
        assert got == pytest.approx(want, abs=TOLERANCE), (
            f"step {i}: loss {got} differs from the golden {want} by more than {TOLERANCE}; "
            f"if the change is intended, regenerate with: {golden['command']}")


def main() -> None:
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {os.path.relpath(__file__)} --write")
    with tempfile.TemporaryDirectory() as root:
        losses = golden_losses(root)
        argv = golden_argv({k: f"<corpus>/{k}_text_document"
                            for k in ("zh", "en", "zh_valid", "en_valid")})
    import torch

    out = {"command": "python tests/training/test_train_golden.py --write",
           "description": "first 10 lm losses, tiny model, fp32 CPU, synthetic corpus of "
                          "tests/training/_train_helpers.build_corpus",
           "argv": argv, "torch": torch.__version__, "losses": losses}
    with open(GOLDEN, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(GOLDEN)}: {losses}")


if __name__ == "__main__":
    main()
