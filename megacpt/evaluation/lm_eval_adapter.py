"""lm-evaluation-harness model adapter: run any lm-eval task on our checkpoints, no export.

    python -m megacpt.evaluate --load ckpt/cpt --lm-eval-tasks xnli_zh,xcopa_zh
    lm_eval --model megacpt --model_args load=ckpt/cpt --tasks hellaswag_fr   # after
                                       # `import megacpt.evaluation.lm_eval_adapter`

`MegacptLM` (registered as lm-eval model "megacpt") is a `TemplateLM`: lm-eval's own
`loglikelihood` does the context/continuation encoding through our `tok_encode`, which
encodes like the exported HF tokenizer (BOS + pieces); `_loglikelihood_tokens` scores with
`megacpt.evaluation.runner.loglikelihoods` (batched, any tp/pp/dp layout);
`loglikelihood_rolling` uses lm-eval's own rolling windows; `generate_until` uses
`megacpt.generate` (greedy unless the task asks for sampling, stop strings, max_gen_toks).

Under torchrun every rank runs the same lm-eval loop over all requests (lm-eval sees one
process); the layout splits the work inside (dp splits the batches), and every rank gets every
result, so only rank 0 needs to write anything. lm-eval is optional:
`pip install 'megacpt[eval]'`.
"""
from __future__ import annotations

from megacpt.evaluation.tasks import EvalInputError, PairEncoder

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    _MISSING = None
except ImportError as e:  # the adapter class below needs lm-eval's base class
    TemplateLM, _MISSING = object, e

    def register_model(*_names):
        return lambda cls: cls

INSTALL_HINT = ("--lm-eval-tasks needs lm-evaluation-harness: pip install 'megacpt[eval]' "
                "(lm-eval, transformers, accelerate)")


def require_lm_eval() -> None:
    if _MISSING is not None:
        raise EvalInputError(f"{INSTALL_HINT} ({_MISSING})")


@register_model("megacpt")
class MegacptLM(TemplateLM):
    """An `EvalModel` (any checkpoint, any layout) as an lm-eval language model."""

    def __init__(self, model=None, load: str | None = None, batch_size: int = 16,
                 max_gen_toks: int = 256, progress: bool = True, **_ignored):
        require_lm_eval()
        super().__init__()
        if model is None:
            from megacpt.evaluation.runner import EvalModel

            if not load:
                raise EvalInputError("the megacpt lm-eval model needs model_args load=PATH")
            model = EvalModel.load(load)
        self.em, self.enc = model, PairEncoder(model.tokenizer)
        self.batch_size_per_gpu = int(batch_size)
        self._max_gen_toks, self.progress = int(max_gen_toks), progress

    # ----- what lm-eval asks of a TemplateLM -----
    @property
    def eot_token_id(self) -> int:
        return self.em.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.enc.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.em.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = self.enc.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.em.tokenizer.detokenize(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from megacpt.evaluation.runner import loglikelihoods

        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        return loglikelihoods(self.em, pairs, self.batch_size,
                              self.progress and not disable_tqdm, "lm-eval loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scored = self._loglikelihood_tokens(windows, disable_tqdm)
        out = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scored):
            out[k] += ll
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megacpt.generate import generate_ids

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            ids = self.tok_encode(context, left_truncate_len=max(1, self.max_length - max_new))
            tok = self.em.tokenizer

            def stop(new, _until=until):
                text = tok.detokenize(new)
                return any(s and s in text for s in _until)

            new = generate_ids(self.em.model, [ids], max_new, self.eot_token_id, temperature,
                               int(kwargs.pop("top_k", 0) or 0),
                               float(kwargs.pop("top_p", 1.0) or 1.0), stop=stop)[0]
            text = tok.detokenize(new)
            for s in until:
                if s:
                    text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def run_lm_eval(model, tasks: list[str], batch_size: int = 16, num_fewshot: int = 0,
                limit: int | None = None, include_path: str | None = None) -> dict:
    """lm-eval's simple_evaluate on an `EvalModel`; {task: {metric: value}} with lm-eval's
    ",none" filter suffixes dropped (plus num_items)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks if t.strip()]
    tm = None
    if include_path:  # indexing lm-eval's own ~15k task configs takes a while: only if needed
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in tm.all_tasks for t in names):
            tm = None
    tm = tm or TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        raise EvalInputError(f"--lm-eval-tasks: unknown task(s) {unknown} (lm-eval knows "
                             f"{len(tm.all_tasks)} tasks; add YAML tasks with "
                             f"--lm-eval-include-path DIR)")
    lm = MegacptLM(model, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot,
                                      limit=limit, task_manager=tm)
    except (ConnectionError, FileNotFoundError) as e:  # datasets offline / not downloaded
        raise EvalInputError(f"--lm-eval-tasks {','.join(names)}: the task data is not "
                             f"available locally ({type(e).__name__}: {e}); download it into "
                             f"the HuggingFace datasets cache first, or point a YAML task at "
                             f"local files with --lm-eval-include-path") from None
    out = {}
    for name, metrics in (res or {}).get("results", {}).items():
        row = {k.split(",")[0]: v for k, v in metrics.items()
               if "," in k and isinstance(v, (int, float))}
        n = (res.get("n-samples") or {}).get(name, {})
        if n:
            row["num_items"] = n.get("effective", n.get("original"))
        out[name] = row
    return out
