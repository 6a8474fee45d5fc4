"""The checkpoint package is acyclic: no module imports (even lazily) one that imports it
back, the `Source` base knows no format, and no module takes another's private names."""
import ast
import os

import megacpt.checkpoint as pkg

DIR = os.path.dirname(pkg.__file__)
PREFIX = "megacpt.checkpoint."


def _imports() -> dict[str, set[tuple[str, tuple]]]:
    """module -> {(imported checkpoint module, names taken)}, lazy imports included."""
    out = {}
    for f in sorted(os.listdir(DIR)):
        if not f.endswith(".py") or f == "__init__.py":
            continue
        tree = ast.parse(open(os.path.join(DIR, f)).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PREFIX):
                deps.add((node.module[len(PREFIX):], tuple(a.name for a in node.names)))
            elif isinstance(node, ast.ImportFrom) and node.module == "megacpt.checkpoint":
                deps |= {(a.name, ()) for a in node.names}
        out[f[:-3]] = deps
    return out


def test_checkpoint_modules_form_no_cycle():
    graph = {m: {d for d, _ in deps if d != m} for m, deps in _imports().items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])
    assert not any(d in ("reader", "hf", "megatron_legacy", "megatron_dist", "registry")
                   for d in graph["source"])  # the base knows no format


def test_no_private_names_cross_modules():
    taken = [(m, d, n) for m, deps in _imports().items() for d, names in deps for n in names
             if n.startswith("_")]
    assert not taken, taken
