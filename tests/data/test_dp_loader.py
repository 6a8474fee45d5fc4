"""build_loader: tensors, data-parallel order rule, resume offset, position reporting."""
import numpy as np
import pytest
import torch

from megacpt.data.blend import BlendedDataset
from megacpt.data.gpt_dataset import GPTDataset
from megacpt.data.indexed import IndexedDataset
from megacpt.data.loader import build_loader

from _data_helpers import random_sequences


@pytest.fixture
def blend(make_dataset):
    members = {}
    for k, name in enumerate(("zh", "en")):  # zh tokens in [0, 500), en in [500, 1000)
        seqs = [s % 500 + 500 * k for s in random_sequences(60, seed=k, max_len=30)]
        ds = IndexedDataset(make_dataset(f"{name}_text_document", seqs))
        members[name] = GPTDataset(ds, name, (0, 60), 200, 16, seed=k)
    return BlendedDataset(members, {"zh": 0.7, "en": 0.3}, 96)


def rows(batch):
    return [tuple(t) for t in batch["tokens"].tolist()]


def test_batches_are_long_tensors_with_names(blend):
    loader = build_loader(blend, micro_batch_size=4, consumed_samples=0, dp_rank=0,
                          dp_size=1, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 24
    b = batches[0]
    assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (4, 16)
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])
    for batch in batches:
        for row, name in zip(batch["tokens"], batch["dataset"]):
            assert ((row >= 500).all() if name == "en" else (row < 500).all())
    assert blend.consumed_samples == 96


@pytest.mark.parametrize("mbs,dp", [(2, 2), (1, 4), (4, 2)])
def test_global_batches_identical_for_any_dp_layout(blend, mbs, dp):
    gbs = 8
    reference = [blend[i]["tokens"].tolist() for i in range(len(blend))]
    per_rank = [list(build_loader(blend, mbs, 0, r, dp, 0)) for r in range(dp)]
    steps = len(blend) // gbs
    accumulation = gbs // (mbs * dp)
    for step in range(steps):
        got = []
        for a in range(accumulation):  # rank r's micro-batch a holds its contiguous chunk
            for r in range(dp):
                got += per_rank[r][step * accumulation + a]["tokens"].tolist()
        assert got == reference[step * gbs:(step + 1) * gbs]


def test_resume_offset_and_rule_errors(blend):
    full = [row for b in build_loader(blend, 2, 0, 1, 2, 0) for row in rows(b)]
    tail = [row for b in build_loader(blend, 2, 40, 1, 2, 0) for row in rows(b)]
    assert tail == full[20:]  # rank 1 holds half of every 4-sample group
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        build_loader(blend, 2, 6, 0, 2, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        build_loader(blend, 2, 0, 2, 2, 0)


def test_worker_processes_give_the_same_batches(blend):
    serial = [rows(b) for b in build_loader(blend, 4, 16, 0, 2, num_workers=0)]
    loader = build_loader(blend, 4, 16, 0, 2, num_workers=2)
    it = iter(loader)
    first = next(it)
    assert blend.consumed_samples == 16 + 8  # position reported before the yield
    parallel = [rows(first)] + [rows(b) for b in it]
    assert parallel == serial
    assert blend.state_dict()["consumed_samples"] == 96


def test_plain_gpt_dataset_gets_its_name(make_dataset):
    ds = IndexedDataset(make_dataset("v", random_sequences(20, seed=5)))
    gds = GPTDataset(ds, "valid-zh", (0, 20), None, 8, 0, shuffle=False)
    batch = next(iter(build_loader(gds, 2, 0, 0, 1, 0)))
    assert batch["dataset"] == ["valid-zh", "valid-zh"]
    np.testing.assert_array_equal(batch["tokens"][1].numpy(), gds[1]["tokens"])
