"""Llama 3.x / Qwen2.5 / Mistral interop on random models transformers itself builds: tied
embeddings, llama3 RoPE scaling (positions past the original context), head_dim apart from
hidden/heads, Qwen2's q/k/v biases, Mistral's sliding window. Imported into tp2, pp2 and
tp2pp2 the logits equal transformers' (fp32, 1e-4); the export gives transformers the same
weights bit for bit; training steps in tp2pp2 (and pp2dp2 with ZeRO-1) equal one process;
vocabulary extension works with tied embeddings; --init-from takes the architecture."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _ckpt_helpers import make_corpora  # noqa: E402
from megacpt.checkpoint import load_model  # noqa: E402
from megacpt.checkpoint.convert import main as convert_main  # noqa: E402
from megacpt.checkpoint.registry import open_source  # noqa: E402
from _harness import (random_global_batches, run_distributed, tiny_model_config,  # noqa: E402
                             tiny_optim_config, train_losses)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SEQ = 40  # > the original context (16) of the llama3 scaling
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5)
FAMILIES = {  # name: (model class, config class, variant fields)
    "llama3": ("LlamaForCausalLM", "LlamaConfig",
               dict(tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING, head_dim=32,
                    rope_theta=500000.0)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=64)),
}


def hf_model(family: str):
    model_cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(len(family))
    cfg = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # transformers zero-inits biases: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_variants")
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        model.save_pretrained(root / family)
        with torch.no_grad():
            out[family] = (str(root / family), model(tokens).logits)
    return out, tokens


def pipeline_logits(model, ctx, tokens):
    """Logits [b, s, V] of a model in (tp, pp <= 2) on the last stage, None elsewhere."""
    import torch.distributed as dist

    with torch.no_grad():
        if ctx.pp == 1:
            return model(tokens)
        if ctx.is_first_stage:
            dist.send(model(tokens).contiguous(), ctx.next_stage_rank)
            return None
        h = torch.empty(tokens.shape[1], tokens.shape[0], model.cfg.hidden_size)  # [s, b, h]
        dist.recv(h, ctx.prev_stage_rank)
        return model(h)


def layouts_worker(dirs: dict, tokens) -> dict:
    """4 ranks: each family's HF weights loaded into tp2 (dp2), pp2 (dp2) and tp2pp2."""
    from megacpt.checkpoint import load_weights
    from megacpt.model.llama import LlamaModel
    from megacpt.parallel.context import ParallelContext

    out = {}
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        ctx = ParallelContext.build(tp=tp, pp=pp, device="cpu")
        for family, path in dirs.items():
            with open_source(path) as src:
                mcfg = src.cfg.model
            mcfg.attention_backend, mcfg.use_kernels = "eager", False
            model = LlamaModel(mcfg, ctx, seed=None)
            load_weights(path, model, ctx)
            logits = pipeline_logits(model, ctx, tokens)
            if logits is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0:
                out[f"{family} tp{tp}pp{pp}"] = logits
    return out


def test_import_in_every_layout_equals_transformers(hf_dirs):
    dirs, tokens = hf_dirs
    got = {}
    for part in run_distributed(layouts_worker, 4, {f: d for f, (d, _) in dirs.items()},
                                tokens, timeout=300):
        got.update(part)
    assert len(got) == 3 * len(FAMILIES)
    for key, logits in got.items():
        want = dirs[key.split()[0]][1]
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4, msg=key)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_bit_exact_and_loads_in_transformers(family, hf_dirs, tmp_path):
    dirs, tokens = hf_dirs
    path, want = dirs[family]
    convert_main(["--from-hf", path, "--save-dir", str(tmp_path / "ours"),
                  "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                  "--no-progress"])
    convert_main(["--load-dir", str(tmp_path / "ours"), "--to-hf", str(tmp_path / "back"),
                  "--no-progress"])
    model_cls = getattr(transformers, FAMILIES[family][0])
    orig = model_cls.from_pretrained(path).state_dict()
    back_model = model_cls.from_pretrained(str(tmp_path / "back")).eval()
    back = back_model.state_dict()
    assert orig.keys() == back.keys()
    for k in orig:
        assert orig[k].dtype == back[k].dtype and torch.equal(orig[k], back[k]), k
    assert back_model.config.tie_word_embeddings == FAMILIES[family][2].get(
        "tie_word_embeddings", False)
    with torch.no_grad():
        assert torch.equal(back_model(tokens).logits, want)


def train_worker(cfg, batches) -> list:
    return [train_losses(cfg, tiny_optim_config(), batches, 2, tp=2, pp=2),
            train_losses(cfg, tiny_optim_config(), batches, 2, tp=1, pp=2,
                         use_distributed_optimizer=True)]


def test_variant_training_in_tp2pp2_equals_one_process():
    cfg = tiny_model_config(tie_word_embeddings=True, add_qkv_bias=True, kv_channels=8,
                            rope_scaling=dict(LLAMA3_SCALING, original_max_position_embeddings=4))
    batches = random_global_batches(3, 8, cfg.seq_length, cfg.vocab_size)
    ref = train_losses(cfg, tiny_optim_config(), batches, 2)
    results = run_distributed(train_worker, 4, cfg, batches, timeout=300)
    for res in results[0]:
        torch.testing.assert_close(res["losses"], ref["losses"], rtol=1e-5, atol=0,
                                   msg=res["layout"])
        # (the norm sums fp32 squares in layout-dependent order: rel 1e-4 as test_layouts)
        assert res["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4), res["layout"]
        assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert max(ref["grad_norms"]) > tiny_optim_config().clip_grad  # the clip binds


def test_vocab_extension_with_tied_embeddings(tmp_path):
    from megacpt.checkpoint.reader import MegacptSource
    from megacpt.checkpoint.vocab import main as extend_main

    corp = make_corpora(str(tmp_path))
    import sentencepiece as spm

    v = spm.SentencePieceProcessor(model_file=corp["tokenizer"]).get_piece_size()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**COMMON, "vocab_size": v}, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert extend_main(["--tokenizer-model", corp["tokenizer"], "--corpus", corp["corpus"],
                        "--new-pieces", "20", "--from-hf", str(tmp_path / "hf"), "--save-dir",
                        str(tmp_path / "ext"), "--target-pipeline-parallel-size", "2"]) == 0
    with MegacptSource(str(tmp_path / "ext")) as s:
        assert s.cfg.model.tie_word_embeddings and s.cfg.model.vocab_size == v + 20
        assert "output.weight" not in s.names()
        emb = s.get("embedding.weight")
    assert torch.equal(emb[:v], hf.model.embed_tokens.weight.detach())
    ours = load_model(str(tmp_path / "ext"))
    tokens = torch.randint(0, v, (1, 24))
    with torch.no_grad():  # old tokens keep their logits; new rows feed the tied head too
        torch.testing.assert_close(ours(tokens)[..., :v], hf(tokens).logits, rtol=0, atol=1e-5)
        assert torch.equal(ours.output_weight[v:v + 20], emb[v:v + 20])


def test_init_from_takes_the_architecture(hf_dirs, capsys):
    from megacpt.arguments import parse_args
    from megacpt.config import ConfigError

    path = hf_dirs[0]["llama3"][0]
    base = ["--init-from", path, "--mock-data", "--train-iters", "1", "--seq-length", "32"]
    m = parse_args(base)[0].model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
            m.head_dim, m.vocab_size) == (2, 64, 4, 2, 32, 300)
    assert m.tie_word_embeddings and m.rope_scaling["rope_type"] == "llama3"
    assert (m.rotary_base, m.norm_eps, m.seq_length) == (500000.0, 1e-5, 32)
    assert parse_args(base + ["--hidden-size", "64", "--kv-channels", "32"])[0].model == m
    with pytest.raises(ConfigError, match=r"--hidden-size 128 contradicts the --init-from "
                                          r"checkpoint .* which has hidden_size = 64"):
        parse_args(base + ["--hidden-size", "128"])
    with pytest.raises(ConfigError, match="--rotary-base 10000.0 contradicts .* rotary_base = "
                                          "500000.0"):
        parse_args(base + ["--rotary-base", "10000"])
    with pytest.raises(ConfigError, match="--model-size tiny has ffn_hidden_size = 176 but the "
                                          "--init-from checkpoint"):
        parse_args(base + ["--model-size", "tiny"])
    assert load_model(path).cfg.add_qkv_bias is False
    assert load_model(hf_dirs[0]["qwen2"][0]).cfg.add_qkv_bias is True


def test_trainer_cpt_from_qwen2_saves_and_resumes(hf_dirs, tmp_path):
    """python -m megacpt.train --init-from a tied, biased Qwen2 directory (no shape flags):
    trains, saves, and a --load resume continues with the same losses as a straight run."""
    from megacpt.train import main
    from megacpt.training.metrics import read_metrics

    flags = ["--init-from", hf_dirs[0]["qwen2"][0], "--mock-data", "--seq-length", "16",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
             "--lr", "1e-3", "--attention-backend", "eager", "--no-use-kernels",
             "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1000",
             "--num-workers", "0", "--no-tensorboard"]
    assert main(flags + ["--log-dir", str(tmp_path / "a")]) == 0
    assert main(flags + ["--log-dir", str(tmp_path / "b"), "--save", str(tmp_path / "ck"),
                         "--save-interval", "2", "--exit-interval", "2"]) == 0
    assert main(flags + ["--log-dir", str(tmp_path / "b"), "--save", str(tmp_path / "ck"),
                         "--load", str(tmp_path / "ck")]) == 0
    straight = [r["lm_loss"] for r in read_metrics(str(tmp_path / "a"), "train")]
    resumed = [r["lm_loss"] for r in read_metrics(str(tmp_path / "b"), "train")]
    assert len(straight) == 4 and resumed == pytest.approx(straight, rel=1e-6)
    ours = load_model(str(tmp_path / "ck"))
    assert ours.cfg.tie_word_embeddings and ours.cfg.add_qkv_bias
