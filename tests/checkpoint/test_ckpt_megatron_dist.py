"""Megatron-Core torch_dist import: a checkpoint written by megatron-core itself (GPTModel with
the local spec, RMSNorm, SwiGLU, GQA, RoPE, untied embeddings, saved on CPU with gloo world
size 1 as Megatron-LM's save_checkpoint does) loads to a model whose logits match
megatron-core's own forward; the naming/stacking variants and the errors are tested on copies
rewritten with torch.distributed.checkpoint."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from _ckpt_helpers import MCORE_SHAPE, mcore_args
from megacpt.checkpoint import CheckpointError, load_model
from megacpt.checkpoint.convert import main
from megacpt.checkpoint.registry import detect_format, open_source

if importlib.util.find_spec("megatron") is None or \
        importlib.util.find_spec("megatron.core") is None:  # no import here: it takes 8 s
    pytest.skip("megatron-core is not installed", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
V = MCORE_SHAPE["vocab_size"]


@pytest.fixture(scope="module")
def mcore(tmp_path_factory):
    """(save dir, {"tokens", "logits"}) made by megatron-core in a fresh interpreter (its
    torch_dist writer starts a multiprocessing Manager, which re-imports __main__)."""
    d = tmp_path_factory.mktemp("mcore")
    root, ref = str(d / "ckpt"), str(d / "ref.pt")
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}, {ROOT!r}]\n"
            f"from _ckpt_helpers import "
            f"make_mcore_dist_checkpoint\nmake_mcore_dist_checkpoint({root!r}, {ref!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, torch.load(ref)


def stored_tensors(iter_dir: str) -> dict:
    """Every tensor entry of a torch_dist directory (bytes entries are not read)."""
    md = dcp.FileSystemReader(iter_dir).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items()
           if isinstance(m, TensorStorageMetadata)}
    dcp.load(out, storage_reader=dcp.FileSystemReader(iter_dir), no_dist=True)
    return out


def write_dist(d: str, tensors: dict, common_from: str | None = None, args=None,
               backend: str = "torch_dist") -> str:
    """A torch_dist iteration directory as megatron-core lays it out (metadata.json from
    megatron/core/dist_checkpointing/serialization.py, common.pt from its torch common
    strategy) holding `tensors`; common.pt copied or made from `args`."""
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(d), no_dist=True)
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": backend, "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}, f)
    if common_from:
        shutil.copy(os.path.join(common_from, "common.pt"), d)
    else:
        torch.save({"args": args, "iteration": 3, "checkpoint_version": 3.0},
                   os.path.join(d, "common.pt"))
    return d


def test_megatron_core_checkpoint_matches_its_forward(mcore):
    root, ref = mcore
    assert detect_format(root) == "megatron"
    with open_source(root) as src:
        assert src.kind == "megatron_dist" and src.dtype == torch.float32
        m = src.cfg.model
        assert (m.num_layers, m.num_query_groups, m.vocab_size, m.padded_vocab_size) == \
            (3, 4, V, 256)
    model = load_model(root)
    assert not model.embedding.weight[V:].any()  # Megatron's 384-row padding re-padded to 256
    with torch.no_grad():
        got = model(ref["tokens"])  # [b, s, V]
    torch.testing.assert_close(got, ref["logits"][..., :V], rtol=1e-5, atol=1e-5)


def test_convert_tp2pp2_and_back(mcore, tmp_path):
    root, _ = mcore
    iter_dir = os.path.join(root, "iter_0000010")
    main(["--from-megatron", iter_dir, "--save-dir", str(tmp_path / "a"), "--no-progress",
          "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"])
    main(["--load-dir", str(tmp_path / "a"), "--save-dir", str(tmp_path / "b"), "--no-progress",
          "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1"])
    with open_source(root) as src, open_source(str(tmp_path / "a")) as a, \
            open_source(str(tmp_path / "b")) as b:
        assert (a.tp, a.pp, b.tp, b.pp) == (2, 2, 1, 1)
        for name in src.names():
            want = src.get(name)
            assert torch.equal(a.get(name), want) and torch.equal(b.get(name), want), name
        # the tp2 shards are Megatron's own per-rank split of the stacked tensors
        raw = stored_tensors(iter_dir)
        qkv = raw["decoder.layers.self_attention.linear_qkv.weight"][2]  # [(nh+2ng)d, h]
        assert torch.equal(torch.cat([a.get_shard("layers.2.attention.qkv.weight", 2, r)
                                      for r in range(2)]), qkv)
        fc1 = raw["decoder.layers.mlp.linear_fc1.weight"][0]  # [gate; up], ffn = 64
        shard1 = a.get_shard("layers.0.mlp.gate_up.weight", 2, 1)
        assert torch.equal(shard1, torch.cat([fc1[32:64], fc1[96:128]]))


def test_name_variants(mcore, tmp_path):
    """Per-layer keys, a "model." prefix, fc1 as weight_w/_v, the older local-spec norm names:
    the same tensors as the stacked TE-named original."""
    root, _ = mcore
    iter_dir = os.path.join(root, "iter_0000010")
    raw = stored_tensors(iter_dir)
    old = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
           "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    per_layer, split = {}, {}
    for k, t in raw.items():
        if k.startswith("optimizer"):
            continue
        if k.startswith("decoder.layers."):
            rest = k[len("decoder.layers."):]
            for i in range(t.shape[0]):
                per_layer[f"model.decoder.layers.{i}.{old.get(rest, rest)}"] = t[i].clone()
            if rest == "mlp.linear_fc1.weight":
                split[k + "_w"], split[k + "_v"] = [h.contiguous() for h in t.chunk(2, dim=1)]
                continue
        per_layer.setdefault("model." + k, t)
        split[k] = t
    a = write_dist(str(tmp_path / "per_layer"), per_layer, common_from=iter_dir)
    b = write_dist(str(tmp_path / "split"), split, common_from=iter_dir)
    with open_source(root) as src, open_source(a) as sa, open_source(b) as sb:
        for name in src.names():
            want = src.get(name)
            assert torch.equal(sa.get(name), want) and torch.equal(sb.get(name), want), name


def _plain(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if not k.startswith("optimizer")}


def test_errors_name_the_path_and_what_was_expected(mcore, tmp_path):
    root, _ = mcore
    iter_dir = os.path.join(root, "iter_0000010")
    raw = _plain(stored_tensors(iter_dir))
    d = write_dist(str(tmp_path / "zarr"), raw, common_from=iter_dir, backend="zarr")
    with pytest.raises(CheckpointError, match=r"zarr.metadata\.json: sharded_backend is "
                                              r"'zarr', expected 'torch_dist'"):
        open_source(d)
    for change, match in [({"add_bias_linear": True}, "args.add_bias_linear is True, expected False"),
                          ({"untie_embeddings_and_output_weights": False},
                           "args.untie_embeddings_and_output_weights is False, expected True"),
                          ({"swiglu": False}, "args.swiglu is False, expected True")]:
        args = mcore_args()
        vars(args).update(change)
        d = write_dist(str(tmp_path / next(iter(change))), raw, args=args)
        with pytest.raises(CheckpointError, match=rf"common\.pt: {match}"):
            open_source(d)
    bias = dict(raw)
    bias["decoder.layers.self_attention.linear_qkv.bias"] = torch.zeros(3, 64)
    d = write_dist(str(tmp_path / "bias"), bias, common_from=iter_dir)
    # (q/k/v biases are a known variant now; these args do not declare them)
    with pytest.raises(CheckpointError, match=r"bias: holds 'layers\.0\.attention\.qkv\.bias'"):
        open_source(d)
    missing = {k: v for k, v in raw.items() if k != "decoder.final_layernorm.weight"}
    d = write_dist(str(tmp_path / "missing"), missing, common_from=iter_dir)
    with pytest.raises(CheckpointError, match="missing: no tensor for 'final_norm.weight' in "
                                              r"\.metadata \(expected e\.g\. 'decoder\."
                                              "final_layernorm.weight'"):
        open_source(d)
    args = mcore_args(unsafe=torch.nn.Linear)  # a global outside the allow-list
    d = write_dist(str(tmp_path / "unsafe"), raw, args=args)
    with pytest.raises(CheckpointError, match="common.pt: cannot be read with weights_only=True"):
        open_source(d)
    os.remove(os.path.join(d, "common.pt"))
    torch.save({"iteration": 3}, os.path.join(d, "common.pt"))
    with pytest.raises(CheckpointError, match="common.pt: has no 'args'"):
        open_source(d)


class _RunsCode:
    """Pickles to a call of os.getcwd: what a malicious .metadata would smuggle in."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_metadata_is_not_unpickled_blindly(mcore, tmp_path):
    """torch's own FileSystemReader pickle.loads .metadata; ours allows only the record
    classes a DCP metadata file holds and refuses anything else before calling it."""
    import pickle

    root, _ = mcore
    d = tmp_path / "evil"
    shutil.copytree(os.path.join(root, "iter_0000010"), d)
    with open(d / ".metadata", "wb") as f:
        pickle.dump(_RunsCode(), f)
    with pytest.raises(CheckpointError, match=r"evil/\.metadata: refers to posix\.getcwd, "
                                              "which a torch.distributed.checkpoint"):
        open_source(str(d))
    with open(d / ".metadata", "wb") as f:
        f.write(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable"):
        open_source(str(d))
