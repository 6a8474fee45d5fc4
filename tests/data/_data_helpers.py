"""Helpers shared by the data tests (imported as a plain module; conftest holds fixtures)."""
import os

import numpy as np

from megacpt.data.indexed import IndexedDatasetBuilder, best_dtype

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO, "examples", "data")


def write_dataset(prefix: str, sequences, dtype=None) -> str:
    """Write one-sequence-per-document `prefix.bin/.idx`; returns the prefix."""
    dtype = dtype or best_dtype(1000)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for seq in sequences:
        builder.add_item(np.asarray(seq))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def random_sequences(n: int, seed: int, max_len: int = 40, vocab: int = 1000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, max_len))) for _ in range(n)]


def load_megatron():
    """megatron-core's indexed_dataset, helpers_cpp and index builders, or None if absent.

    Importing `megatron.core` pulls in its whole training stack (~10 s on 2 cores); the parts
    tested against here need only numpy/torch. So unless megatron.core is already loaded,
    the needed modules are imported under stand-in parent packages (pointing at the real
    directories, without running their __init__), and the megatron entries of sys.modules
    are removed again afterwards, so a later real `import megatron.core` is unaffected.
    """
    import ast
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "core")
    ns = types.SimpleNamespace()
    if "megatron.core" in sys.modules:
        ns.indexed_dataset = importlib.import_module("megatron.core.datasets.indexed_dataset")
        ns.helpers_cpp = importlib.import_module("megatron.core.datasets.helpers_cpp")
    else:
        saved = dict(sys.modules)
        try:
            for name, path in (("megatron", os.path.dirname(root)), ("megatron.core", root),
                               ("megatron.core.datasets", os.path.join(root, "datasets"))):
                pkg = types.ModuleType(name)
                pkg.__path__ = [path]
                sys.modules[name] = pkg
            utils = types.ModuleType("megatron.core.utils")
            utils.log_single_rank = lambda logger, *args, **kwargs: None
            sys.modules["megatron.core.utils"] = utils
            ns.indexed_dataset = importlib.import_module("megatron.core.datasets.indexed_dataset")
            ns.helpers_cpp = importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return None
        finally:  # drop the stand-ins and what was imported under them; keep torch & co
            for name in set(sys.modules) - set(saved):
                if name == "megatron" or name.startswith("megatron."):
                    del sys.modules[name]
            sys.modules.update({k: v for k, v in saved.items()
                                if k == "megatron" or k.startswith("megatron.")})
    # the two pure-numpy index builders of megatron/core/datasets/gpt_dataset.py, run as-is
    source = open(os.path.join(root, "datasets", "gpt_dataset.py")).read()
    wanted = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)
              and n.name in ("_build_document_index", "_build_shuffle_index")]
    module = ast.Module(body=wanted, type_ignores=[])
    scope = {"numpy": np, "Optional": object, "Tuple": object}
    exec(compile(module, "megatron/core/datasets/gpt_dataset.py", "exec"), scope)
    ns.build_document_index = scope["_build_document_index"]
    ns.build_shuffle_index = scope["_build_shuffle_index"]
    return ns
