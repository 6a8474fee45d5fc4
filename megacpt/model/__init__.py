"""LLaMA2 model: `LlamaModel` (one pipeline stage, or the whole model at pp = 1)."""
from megacpt.model.llama import LlamaModel, init_weights  # noqa: F401
