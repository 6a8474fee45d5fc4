"""Tensor, sequence, pipeline and data parallelism (README.md, "Parallelism").

- `context`: `ParallelContext` (tp/pp/dp axes, groups, rank order), `init_distributed()`
- `comm`: tp/sp communication primitives as autograd functions
- `layers`: Column/RowParallelLinear, VocabParallelEmbedding, vocab-parallel cross entropy
- `sharding`: the per-parameter tensor-parallel split rules (global names)
- `schedule`: `split_global_batch`, `forward_backward` (1F1B pipeline when pp > 1), the
  p2p exchange between pipeline stages (`PipeComm`)
- `grads`: bucketed fp32 main gradients, dp all-reduce / reduce-scatter
- `optimizer`: `build_optimizer` -> AdamW on fp32 masters, ZeRO-1, global-norm clipping
- `volume`: communication bytes per step by layout
"""
