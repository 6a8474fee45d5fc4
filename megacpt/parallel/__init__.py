"""Tensor, sequence, pipeline and data parallelism (README.md, "Parallelism").

- `context`: `ParallelContext` (tp/pp/dp axes, groups, rank order), `init_distributed()`
- `comm`: tp/sp communication primitives as autograd functions
- `layers`: Column/RowParallelLinear, VocabParallelEmbedding
- `cross_entropy`: the LM loss: vocab-parallel cross entropy (torch or Triton kernels), the
  chunked LM head + loss
- `sharding`: the per-parameter tensor-parallel split rules (global names)
- `schedule`: `forward_backward` (1F1B pipeline when pp > 1, ZB-H1 on request), the
  p2p exchange between pipeline stages (`PipeComm`); re-exports `split_global_batch`
- `interleaved`: interleaved 1F1B over virtual stages (Megatron's order)
- `simulate`: `python -m megacpt.parallel.simulate`, schedule timelines, bubble, memory
- `grads`: bucketed fp32 main gradients, dp all-reduce / reduce-scatter
- `optimizer`: `build_optimizer` -> AdamW on fp32 masters, ZeRO-1, global-norm clipping
- `volume`: communication bytes per step by layout
"""
