"""Scaling studies of cross-lingual CPT: plan, run (here, as commands, or on Slurm), analyse.

`tools/run_study.py --config study.yaml` reads a YAML file (`config`), plans the runs
(`plan`: every run a typed `megacpt.config.Config`, its command line from the one
Config <-> flags mapping in `megacpt.flags`), trains them (`run`: in this process, as
`commands.sh`, or as sbatch job arrays per stage with dependencies, `slurm`), then fits and
checks the laws (`analysis`) and writes the report (`report`).

    for each size:     {source}_{size}_source              source-language model from scratch
    for each target language, size and strategy (scratch, cpt, cpt_replay{r}):
      design cosine:   {lang}_{size}_{strategy}[_d{b}]     a cosine run per budget b
      design wsd:      {lang}_{size}_{strategy}_stable     warm-up + constant LR, checkpoints
                                                           where each cooldown starts
                       {lang}_{size}_{strategy}_d{b}       cooldown branch ending at b x N
                                                           tokens (Megatron's WSD decay)

A run is finished when its checkpoint tracker and its metrics both reach its last
iteration; finished runs are skipped, unfinished ones resume from their own checkpoint.

Config file (YAML; relative paths are relative to the config file's directory)::

    name: tiny-study                 # report title
    out_dir: ../runs/study_tiny      # everything is written here (--out overrides)
    launch: local                    # local | print | slurm
    launcher: python -m megacpt.train   # command prefix in print/slurm mode (e.g. torchrun
                                        # --nproc-per-node 8 -m megacpt.train)
    source_lang: en
    target_langs: [zh]               # several: a cross-language summary (e.g. [fr, ru, zh])
    sizes: [tiny, debug-xs]          # names in megacpt.sizes (49M ... 5534M, debug sizes)
    kinds: [scratch, cpt]            # any of scratch, cpt
    replay_ratios: [0.0, 0.3]        # CPT runs: source-language share of the data, in [0, 1)
    design: cosine                   # cosine | wsd (stable run + cooldown branches)
    budgets: [5, 10, 20, 40]         # tokens per parameter (or tokens_per_param: 20 for one)
    source_tokens_per_param: null    # source models' budget (default: the largest budget)
    cooldown_fraction: 0.2           # wsd: share of each budget's steps in its cooldown
    wsd_decay_style: linear          # wsd: exponential | linear | cosine | minus_sqrt
    seq_length: 2048
    micro_batch_size: 1
    global_batch_size: 1024          # sequences per step, or per size with:
    batch_tokens: null               # paper (1M tokens up to 1B params, 2M to 2.5B, 4M above)
                                     # or rows [[max_params, tokens], ..., [.inf, tokens]]
    lr: 2.0e-4                       # decayed to min_lr (default lr / 10)
    min_lr: null
    lr_warmup_fraction: 0.05         # wsd: of the smallest budget's steps
    evals_per_run: 10                # validations per run
    eval_iters: 10                   # validation micro-batches per language, or instead
    valid_tokens: null               # held-out tokens per language (paper: 1000000), whole
                                     # documents sampled across the held-out set
    seed: 1234
    device: null                     # cuda | cpu | null (cuda when available)
    bf16: false
    threads: 0                       # local launch: torch CPU threads (0: torch's default)
    extra_args: []                   # trainer flags for every run (plain fields only)
    data:                            # either a raw corpus to prepare ...
      corpus_dir: ../examples/data   #   {lang}_train.jsonl.gz and {lang}_valid.jsonl.gz
      vocab_size: 36152              #   bilingual (multilingual) SentencePiece BPE
      character_coverage: 0.9995
      # ... or prepared data (then corpus_dir is left out):
      # tokenizer_model: tok.model
      # train: {en: data/en_text_document, zh: ...}    indexed-dataset prefixes
      # valid: {en: data/en_valid_text_document, zh: ...}
    fit:
      checkpoints: final             # final: end-of-schedule points only; all: also
                                     # intermediate checkpoints (biased; flagged in the report)
      min_tokens_fraction: 0.1       # all: drop a run's points before this share of its tokens
      bootstrap: 100                 # resamples for 95% intervals (0: none)
      holdout_largest: 0             # K > 0: fit without the K largest sizes, score them
    slurm:                           # launch: slurm (see megacpt.study.slurm)
      partition: null
      time: "1-00:00:00"
      cpus_per_task: 1
      gpus_per_node: 0
      mem: null
      max_parallel: 0                # array tasks at once (0: no limit)
      sbatch_args: []                # more #SBATCH lines, e.g. ["--account=abc"]
      setup: []                      # shell lines run first (module load, venv activate)
      python: python
    downstream:                      # zero-shot tasks on every final checkpoint (optional;
                                     # megacpt.study.downstream); any of:
      demo_items: 32                 #   demo tasks per language from corpus_dir's held-out
                                     #   text (a smoke signal, not a benchmark)
      tasks: {xcopa_zh: xcopa_zh.jsonl}   # task files {"context", "choices", "gold"} per line
      lm_eval_tasks: [xnli_zh]       #   lm-eval tasks (pip install 'megacpt[eval]', data local)
      languages: null                #   demo languages (default: source and targets)
      batch_size: 16

Outputs in `out_dir`: `data/` (tokenizer, binaries, held-out samples), `runs/NAME/`
(metrics.jsonl, the trainer's `--log-dir`), `checkpoints/NAME/`, `plan.json` (every run's
config and argv); `commands.sh` (print mode) or `slurm/` (scripts, submitted job ids);
`runs/NAME/eval.json` (downstream scores), `fits/*.json`, `plots/*.png`, `results.json` and
`report.md`.
"""
from megacpt.study.analysis import analyze, analyze_language, fit_quality
from megacpt.study.config import (DESIGNS, KINDS, LAUNCH, StudyConfig, StudyConfigError,
                                  load_config)
from megacpt.study.downstream import evaluate_pending, evaluate_run
from megacpt.study.plan import (Run, check_plan, data_commands, data_files, load_plan,
                                plan_runs, run_finished, vocab_size)
from megacpt.study.run import (pending_data_commands, prepare_data, prepare_run, run_local,
                               run_one, write_commands)

__all__ = [
    "DESIGNS", "KINDS", "LAUNCH", "Run", "StudyConfig", "StudyConfigError", "analyze",
    "analyze_language", "check_plan", "data_commands", "data_files", "evaluate_pending",
    "evaluate_run", "fit_quality",
    "load_config", "load_plan", "pending_data_commands", "plan_runs", "prepare_data",
    "prepare_run", "run_finished", "run_local", "run_one", "vocab_size", "write_commands",
]
