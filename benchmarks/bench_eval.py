"""Multiple-choice scoring throughput: our evaluator vs lm-evaluation-harness's `hf` model on
the same HF export, same requests, same batch size, side by side in one run.

    python benchmarks/bench_eval.py [--model-size debug-xs] [--items 64] [--batch-size 16]
                                    [--repeats 3] [--threads 2] [--quick] [--out FILE]

Setup (cached in --workdir): a bilingual SentencePiece tokenizer trained on the bundled
en + zh text, a randomly initialised model of --model-size (seq --seq-length) saved as our
checkpoint and exported with `megacpt.checkpoint.export_to_hf`, and the demo tasks (true
continuation among 4) built from the bundled held-out en and zh text, --items per language.

Methods, all on the same (context, continuation) requests:

* ours       `megacpt.evaluation` on our checkpoint: lm-eval's pair encoding, then
             `runner.loglikelihoods`: each item's context encoded once and its choices
             scored from that KV cache (`shared_context`), batched
* ours_per_request   the same with share_context=False: one padded sequence per request
             (sorted by length; the path of pp > 1), i.e. before the shared context
* ours_lm_eval   our lm-eval adapter `MegacptLM.loglikelihood` (lm-eval's own request
             encoding + our scoring)
* hf         lm-eval's `HFLM(pretrained=export, batch_size=B, dtype=float32)
             .loglikelihood` (its Collator, padding and log-softmax)

Each method's least wall time of --repeats runs (alternating methods), the model already
loaded. items/s = multiple-choice items / seconds (4 requests each). On a machine shared with
other jobs wall time is noisy, so each run also records this process's CPU seconds (all its
threads) and `cpu_items_per_s` = items / CPU seconds x threads, compared as
`cpu_ours_vs_hf`. The log-likelihoods of
ours and hf are compared (max abs difference) so the speed is of the same computation.

Rows: {"method", "items", "requests", "batch_size", "seconds", "items_per_s",
"requests_per_s", "cpu_seconds", "cpu_items_per_s"}, then {"method": "summary",
"ours_vs_hf", "ours_lm_eval_vs_hf", "cpu_ours_vs_hf", "cpu_ours_lm_eval_vs_hf",
"shared_vs_per_request", "cpu_shared_vs_per_request", "max_abs_ll_diff",
"max_abs_ll_diff_shared_vs_per_request", "model_size", "num_parameters", "seq_length", "threads",
"load_average_1min"}.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data")


def _import_pypi_kernels() -> None:
    """The checkout's `kernels/` folder shadows the PyPI `kernels` package that transformers
    imports when installed; import the real one first (if any), then add the checkout."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != REPO]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    sys.path.insert(0, REPO)


_import_pypi_kernels()

from benchmarks.common import write_results  # noqa: E402


def setup(workdir: str, model_size: str, seq: int, items: int) -> dict:
    """Tokenizer, random checkpoint + HF export, demo tasks (cached)."""
    import torch

    from megacpt import sizes
    from megacpt.checkpoint import export_to_hf, save_checkpoint
    from megacpt.config import Config, ModelConfig
    from megacpt.data import tokenizer_train
    from megacpt.evaluation.report import demo_task_files
    from megacpt.model.llama import LlamaModel
    from megacpt.parallel.context import ParallelContext

    os.makedirs(workdir, exist_ok=True)
    tok = os.path.join(workdir, "tok")
    if not os.path.exists(tok + ".model"):
        tokenizer_train.main(["--input", f"{DATA}/en_train.jsonl.gz", f"{DATA}/zh_train.jsonl.gz",
                              "--vocab-size", "4096", "--character-coverage", "0.995",
                              "--model-prefix", tok, "--num-threads", "2"])
    name = f"{model_size}_s{seq}"
    ckpt, hf = os.path.join(workdir, "ckpt_" + name), os.path.join(workdir, "hf_" + name)
    shape = sizes.get_size(model_size)
    if not os.path.isdir(hf):
        mcfg = ModelConfig(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                           ffn_hidden_size=shape.ffn_hidden_size,
                           num_attention_heads=shape.num_attention_heads,
                           num_query_groups=shape.num_query_groups, vocab_size=4096,
                           seq_length=seq)
        cfg = Config(model=mcfg)
        cfg.data.tokenizer_model = tok + ".model"
        ctx = ParallelContext.single("cpu")
        model = LlamaModel(mcfg, ctx, dtype=torch.float32, device="cpu", seed=1)
        save_checkpoint(ckpt, 0, model, None, cfg, ctx,
                        {"scheduler": {}, "data": {}, "counters": {}, "rng": None})
        export_to_hf(ckpt, hf, progress=False)
    tasks = demo_task_files(DATA, ["en", "zh"], os.path.join(workdir, f"tasks{items}"), items)
    return {"ckpt": ckpt, "hf": hf, "tasks": tasks}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def requests_of(tasks: dict) -> tuple[list[tuple[str, str]], int]:
    from megacpt.evaluation.tasks import item_requests, read_task_file

    reqs, n = [], 0
    for path in tasks.values():
        for item in read_task_file(path):
            reqs += item_requests(item, " ")
            n += 1
    return reqs, n


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-size", default="debug-xs")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--items", type=int, default=64, help="demo items per language")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/megacpt_bench_eval")
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 items, 1 repeat")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.model_size, args.seq_length, args.items, args.repeats = "tiny", 128, 8, 1
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from megacpt.evaluation.lm_eval_adapter import MegacptLM
    from megacpt.evaluation.runner import EvalModel, loglikelihoods
    from megacpt.evaluation.tasks import PairEncoder

    torch.set_num_threads(args.threads)
    assets = setup(args.workdir, args.model_size, args.seq_length, args.items)
    pairs, n_items = requests_of(assets["tasks"])
    ours_model = EvalModel.load(assets["ckpt"])
    adapter = MegacptLM(ours_model, batch_size=args.batch_size, progress=False)
    hf = HFLM(pretrained=assets["hf"], batch_size=args.batch_size, device="cpu",
              dtype="float32")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                 for i, p in enumerate(pairs)]

    def run_ours(share=True):
        enc = PairEncoder(ours_model.tokenizer)
        return loglikelihoods(ours_model, [enc.pair(c, x) for c, x in pairs], args.batch_size,
                              progress=False, share_context=share)

    methods = {"ours": run_ours, "ours_per_request": lambda: run_ours(False),
               "ours_lm_eval": lambda: adapter.loglikelihood(instances, disable_tqdm=True),
               "hf": lambda: hf.loglikelihood(instances, disable_tqdm=True)}
    best, cpu, outputs = {}, {}, {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            outputs[name] = fn()
            dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
            best[name] = min(best.get(name, float("inf")), dt)
            cpu[name] = min(cpu.get(name, float("inf")), dc)
            print(f"{name:>13}: {dt:.2f}s, {dc:.2f} CPU s ({n_items / dt:.1f} items/s)",
                  flush=True)
    rows = [{"method": m, "items": n_items, "requests": len(pairs),
             "batch_size": args.batch_size, "seconds": round(s, 4),
             "items_per_s": n_items / s, "requests_per_s": len(pairs) / s,
             "cpu_seconds": round(cpu[m], 4),
             "cpu_items_per_s": n_items / cpu[m] * args.threads}
            for m, s in best.items()]
    diff = max(abs(a[0] - b[0]) for a, b in zip(outputs["ours"], outputs["hf"]))
    diff_shared = max(abs(a[0] - b[0]) for a, b in zip(outputs["ours"],
                                                       outputs["ours_per_request"]))
    rows.append({"method": "summary", "ours_vs_hf": best["hf"] / best["ours"],
                 "ours_lm_eval_vs_hf": best["hf"] / best["ours_lm_eval"],
                 "cpu_ours_vs_hf": cpu["hf"] / cpu["ours"],
                 "cpu_ours_lm_eval_vs_hf": cpu["hf"] / cpu["ours_lm_eval"],
                 "shared_vs_per_request": best["ours_per_request"] / best["ours"],
                 "cpu_shared_vs_per_request": cpu["ours_per_request"] / cpu["ours"],
                 "max_abs_ll_diff": diff, "max_abs_ll_diff_shared_vs_per_request": diff_shared,
                 "model_size": args.model_size,
                 "num_parameters": sum(p.numel() for p in ours_model.model.parameters()),
                 "seq_length": args.seq_length, "threads": args.threads,
                 "load_average_1min": os.getloadavg()[0]})
    print(f"ours {best['hf'] / best['ours']:.2f}x lm-eval hf's items/s (CPU time "
          f"{cpu['hf'] / cpu['ours']:.2f}x; adapter {best['hf'] / best['ours_lm_eval']:.2f}x, "
          f"CPU {cpu['hf'] / cpu['ours_lm_eval']:.2f}x); max |ll diff| {diff:.2e}; shared "
          f"context {best['ours_per_request'] / best['ours']:.2f}x the per-request path (CPU "
          f"{cpu['ours_per_request'] / cpu['ours']:.2f}x, max |ll diff| {diff_shared:.2e})")
    return write_results("eval", rows, args.out)


if __name__ == "__main__":
    main()
