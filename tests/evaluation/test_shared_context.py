"""The shared context (megacpt.evaluation.shared_context): an item's choices scored from its
context encoded once give the per-request path's log-likelihoods and greedy flags (which
test_lm_eval_exactness ties to lm-eval's `hf` model), with and without left truncation that
shifts the choices' inputs differently, for empty contexts and for groups larger than a
batch (cut into pieces); only the prefix identical across the choices' token sequences is shared."""
import pytest

from megacpt.evaluation import shared_context
from megacpt.evaluation.runner import EvalModel, loglikelihoods, truncate
from megacpt.evaluation.tasks import PairEncoder, item_requests, read_task_file


def test_shared_length_stops_where_the_tokens_or_the_scoring_start():
    # same context tokens, no truncation: everything before the last context token
    reqs = [([1, 5, 6, 7], [8, 9]), ([1, 5, 6, 7], [4])]
    inps = [truncate(c, x, 16) for c, x in reqs]
    assert shared_context.shared_length(inps, [x for _, x in reqs]) == 3
    # left truncation to 4 tokens shifts the longer choice's input: nothing in common
    inps = [truncate(c, x, 4) for c, x in reqs]
    assert inps == [[5, 6, 7, 8], [1, 5, 6, 7]]
    assert shared_context.shared_length(inps, [x for _, x in reqs]) == 0
    gs = shared_context.groups(reqs + [([1], [3, 3])], [truncate(c, x, 16)
                                                        for c, x in reqs + [([1], [3, 3])]])
    assert gs == [([0, 1], 3), ([2], 0)]
    assert shared_context.batches(gs * 2, 3) == [gs, gs]  # whole groups, <= 3 requests
    # a group larger than a batch is cut into pieces that keep its shared prefix
    assert shared_context.batches(gs, 1) == [[([0], 3)], [([1], 3)], [([2], 0)]]


@pytest.fixture(scope="module")
def model_and_requests(eval_assets):
    model = EvalModel.load(eval_assets["ckpt"], attention_backend="eager")
    enc = PairEncoder(model.tokenizer)
    reqs = []
    for path in eval_assets["tasks"].values():
        for item in read_task_file(path):
            reqs += [enc.pair(c, x) for c, x in item_requests(item, " ")]
    reqs += [enc.pair("", "The house"), enc.pair("", "of the"), enc.pair("子曰", "学而")]
    return model, reqs


@pytest.mark.parametrize("max_length, batch_size", [(None, 5), (4, 3), (None, 64), (None, 2)])
def test_shared_context_gives_the_per_request_scores(model_and_requests, max_length,
                                                     batch_size):
    model, reqs = model_and_requests
    saved = model.max_length
    try:
        if max_length:  # most items truncated from the left, by choice-dependent amounts
            model.max_length = max(len(x) for _, x in reqs) + max_length
        L = model.max_length
        inputs = [truncate(c, x, L) for c, x in reqs]
        gs = shared_context.groups(reqs, inputs)
        assert max(len(idx) for idx, _ in gs) == 4 and any(p > 0 for _, p in gs)
        if max_length:
            assert any(p == 0 and len(idx) == 4 for idx, p in gs)
        shared = loglikelihoods(model, reqs, batch_size, progress=False)
        plain = loglikelihoods(model, reqs, batch_size, progress=False, share_context=False)
    finally:
        model.max_length = saved
    assert [g for _, g in shared] == [g for _, g in plain]
    for (a, _), (b, _) in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-5 * max(1.0, abs(b)))
