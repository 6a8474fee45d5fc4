"""Assets of the evaluation tests, built once per session from the bundled corpus, offline:
a bilingual (en + zh, byte-fallback) tokenizer, a tiny model trained a few steps on both
languages, its HF export and demo tasks in both languages. Also the multi-process workers
(module-level so spawn can pickle them)."""
from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "examples", "data")
SEQ = 128


def build_assets(out: str, iters: int = 10) -> dict:
    from megacpt import train
    from megacpt.checkpoint import export_to_hf
    from megacpt.data import preprocess, tokenizer_train
    from megacpt.evaluation.demo_tasks import write_demo_task

    tok = os.path.join(out, "tok")
    tokenizer_train.main(["--input", f"{DATA}/en_train.jsonl.gz", f"{DATA}/zh_train.jsonl.gz",
                          "--vocab-size", "1000", "--character-coverage", "0.98",
                          "--model-prefix", tok, "--num-threads", "1",
                          "--input-sentence-size", "3000"])
    prefixes = {}
    for lang in ("en", "zh"):
        prefix = os.path.join(out, f"{lang}_valid")
        preprocess.main(["--input", f"{DATA}/{lang}_valid.jsonl.gz", "--tokenizer-model",
                         tok + ".model", "--output-prefix", prefix, "--append-eod",
                         "--workers", "1"])
        prefixes[lang] = prefix + "_text_document"
    ckpt = os.path.join(out, "ckpt")
    code = train.main([
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2",
        "--tokenizer-model", tok + ".model", "--seq-length", str(SEQ),
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(iters),
        "--lr", "3e-3", "--data-path", "0.5", f"en={prefixes['en']}", "0.5",
        f"zh={prefixes['zh']}", "--split", "1,0,0", "--eval-interval", "1000",
        "--log-interval", "1000", "--num-workers", "0", "--no-tensorboard",
        "--attention-backend", "eager", "--no-use-kernels",
        "--data-cache-path", os.path.join(out, "cache"), "--save", ckpt])
    assert code == 0, code
    hf = export_to_hf(ckpt, os.path.join(out, "hf"), progress=False)
    tasks = {}
    for lang, chars in (("en", 160), ("zh", 60)):  # some items longer than SEQ, some not
        tasks[lang] = write_demo_task(f"{DATA}/{lang}_valid.jsonl.gz", lang,
                                      os.path.join(out, f"demo_{lang}.jsonl"), num_items=10,
                                      context_chars=chars)
    return {"tokenizer": tok + ".model", "ckpt": ckpt, "hf": hf, "tasks": tasks}


def read_items(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_worker(load: str, tasks: dict, tp: int, pp: int, batch_size: int) -> dict:
    """Our evaluator in layout tp x pp (dp = the rest) inside a run_distributed world:
    per-choice log-likelihoods and metrics."""
    from megacpt.evaluate import evaluate_tasks
    from megacpt.evaluation.runner import EvalModel
    from megacpt.evaluation.tasks import read_task_file
    from megacpt.parallel.context import ParallelContext

    ctx = ParallelContext.build(tp=tp, pp=pp, device="cpu")
    model = EvalModel.load(load, ctx, dtype=None, attention_backend="eager")
    items = {n: read_task_file(p) for n, p in tasks.items()}
    results, _ = evaluate_tasks(model, items, batch_size=batch_size, progress=False,
                                return_lls=True)
    return results


def layouts_worker(load: str, tasks: dict) -> dict:
    """In a 4-rank world: tp2 x dp2, then pp2 x dp2 (batch size 4)."""
    return {"tp2dp2": eval_worker(load, tasks, 2, 1, 4),
            "pp2dp2": eval_worker(load, tasks, 1, 2, 4)}


LM_EVAL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_lm_eval_tasks(tasks: dict[str, str], out: str) -> str:
    """An lm-eval include directory with one local-data YAML task per task file (each file's
    items share one delimiter, the first item's)."""
    os.makedirs(out, exist_ok=True)
    for name, path in tasks.items():
        delim = read_items(path)[0].get("target_delimiter", " ")
        with open(os.path.join(out, f"{name}.yaml"), "w") as f:
            f.write(LM_EVAL_YAML.format(name=name, path=path, delimiter=delim))
    return out


def lm_eval_hf(hf_dir: str, include: str, names: list[str], batch_size: int = 4) -> dict:
    """lm-eval's own `hf` model on an HF directory: {task: {"acc", "acc_norm",
    "lls": per-doc per-choice log-likelihoods}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=hf_dir, batch_size=batch_size, device="cpu", dtype="float32")
    res = lm_eval.simple_evaluate(model=lm, tasks=names, log_samples=True,
                                  task_manager=TaskManager(include_path=include,
                                                           include_defaults=False))
    out = {}
    for name in names:
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        out[name] = {"acc": res["results"][name]["acc,none"],
                     "acc_norm": res["results"][name]["acc_norm,none"],
                     "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}
    return out
