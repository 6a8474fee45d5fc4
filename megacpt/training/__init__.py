"""Training: the loop and what it needs beyond model, parallelism, data and checkpoints.

    schedule.LRSchedule(max_lr, min_lr, warmup_iters, decay_iters, style)  .lr(it) .step()
        .from_config(optim_cfg, train_iters), .state_dict() / .load_state_dict(sd, override)
    loop.train(cfg, opts=None, ctx=None, callbacks=None) -> TrainResult
    loop.Trainer(cfg, opts, ctx, callbacks)  .run() .train_step() .evaluate() .save()
    metrics.MetricsLogger / read_metrics(path, kind)   the metrics.jsonl format
    data.TrainData        blend micro-batches, fixed validation batches, data state
    checks.check_inputs   bad-input checks run before any compute
    faults                non-finite step skipping, dead-rank errors, watchdog
    signals               SIGTERM/SIGUSR1/SIGINT -> save at the next step boundary, exit 0

The command line is `python -m megacpt.train` (`megacpt.train`, flags in `megacpt.arguments`).
"""
