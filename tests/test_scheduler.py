"""The scheduler over a fixed KV pool: admission by free pages, preemption and recompute, no page
leaked or shared, and every request's tokens equal to running it alone (tiny model, fp32, CPU)."""

import pytest
import torch

from runtime.engine import LLM
from runtime.requests import Request
from runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def roomy(tiny_checkpoints):
    return LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=1, max_batch_tokens=256)


def tight(tiny_checkpoints, tokens, batch, step_tokens):
    return LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=batch,
               max_batch_tokens=step_tokens, kv_cache_tokens=tokens)


def random_requests(seed, n, max_prompt=40, max_new=12):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    reqs = []
    for i in range(n):
        prompt = torch.randint(0, 199998, (draw(1, max_prompt),), generator=gen).tolist()
        if draw(0, 1):
            params = SamplingParams(max_tokens=draw(1, max_new), temperature=0, logprobs=True)
        else:  # sampled, with its own seed: the same tokens whatever else is in the batch
            params = SamplingParams(max_tokens=draw(1, max_new), temperature=0.8, top_k=draw(0, 50), top_p=0.95,
                                    seed=draw(0, 2**30), logprobs=True)
        reqs.append(Request(i, prompt, params, stop_token_ids=()))
    return reqs


def watch_pages(llm):
    """Check every step: the chunks' sequences hold disjoint pages covering what they write."""
    forward = llm.model.forward
    steps = []

    def checked(step):
        seen = set()
        for c in step.chunks:
            pages = set(c.cache.pages)
            assert not pages & seen, "a KV page is shared by two sequences"
            assert len(c.cache.pages) * llm.pool.page_size >= c.start + c.length
            seen |= pages
        steps.append(len(step.chunks))
        return forward(step)

    llm.model.forward = checked
    return steps


@pytest.mark.parametrize("seed", range(2))
def test_random_mixes_under_preemption_match_each_request_alone(tiny_checkpoints, roomy, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(3, 7, (1,), generator=gen))
    step_tokens = int(torch.randint(batch, 48, (1,), generator=gen))
    llm = tight(tiny_checkpoints, 64, batch, step_tokens)  # 4 pages of 16: too few for the batch
    steps = watch_pages(llm)
    # Short prompts that generate a lot: admitted on one page each, they outgrow the pool together.
    reqs = random_requests(seed, 6, max_prompt=12, max_new=24)
    got = llm.generate(reqs)
    alone = [roomy.generate([r])[0] for r in reqs]
    for g, a in zip(got, alone):
        assert g.error is None and g.token_ids == a.token_ids, (g.id, g.token_ids, a.token_ids)
        assert max(abs(x - y) for x, y in zip(g.logprobs, a.logprobs)) < 1e-4
    assert llm.pool.free_pages == llm.pool.num_pages  # nothing leaked
    sliding = llm.model.sliding_pool
    assert sliding.free_pages == sliding.num_pages and not sliding.growable
    assert llm.preemptions > 0 and max(steps) > 1  # the pool really was too small for the batch


@pytest.mark.parametrize("seed", range(2))
def test_stop_tokens_under_preemption_match_each_request_alone(tiny_checkpoints, roomy, seed):
    """Requests that end on a stop token partway. A step is always in flight, so such a request's
    next row is already computing when its stop token reaches the host (and it may have been
    preempted meanwhile): its result must still end at the stop token, as when run alone, and every
    page must come back."""
    reqs = []
    for r in random_requests(seed + 10, 6, max_prompt=12, max_new=24):
        out = roomy.generate([r])[0].token_ids
        stop = (out[len(out) // 2],) if len(out) > 2 else ()  # a token it produces: it stops there
        reqs.append(Request(r.id, r.prompt_token_ids, r.params, stop_token_ids=stop))
    llm = tight(tiny_checkpoints, 64, 6, 24)
    got = llm.generate(reqs)
    alone = [roomy.generate([r])[0] for r in reqs]
    assert sum(a.finish_reason == "stop" for a in alone) >= 2
    for g, a in zip(got, alone):
        assert g.error is None and (g.token_ids, g.finish_reason) == (a.token_ids, a.finish_reason), g.id
    assert llm.pool.free_pages == llm.pool.num_pages and llm.preemptions > 0


def test_a_sequence_preempted_while_its_last_token_is_in_flight_finishes(tiny_checkpoints, roomy):
    """Two pages of 16 positions, two 10-token prompts. When A needs its second page (writing
    position 16, step 8), B is preempted while step 7, which samples B's 7th and last token, is
    still in flight: that token lands while B waits, B finishes from the queue, and A then runs on."""
    a = Request("a", list(range(300, 310)), SamplingParams(max_tokens=12, temperature=0), stop_token_ids=())
    b = Request("b", list(range(400, 410)), SamplingParams(max_tokens=7, temperature=0), stop_token_ids=())
    llm = tight(tiny_checkpoints, 32, 2, 64)
    got = llm.generate([a, b])
    for g, r in zip(got, (a, b)):
        want = roomy.generate([r])[0]
        assert g.error is None and (g.token_ids, g.finish_reason) == (want.token_ids, "length"), g.id
    assert llm.preemptions == 1 and llm.pool.free_pages == llm.pool.num_pages == 2


def test_a_request_longer_than_the_cache_fails_alone(tiny_checkpoints, roomy):
    llm = tight(tiny_checkpoints, 32, 4, 64)
    short = Request(0, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), stop_token_ids=())
    long = Request(1, list(range(100, 130)), SamplingParams(max_tokens=8, temperature=0), stop_token_ids=())
    first, second = llm.generate([short, long])
    assert first.error is None and first.token_ids == roomy.generate([short])[0].token_ids
    assert second.error and "38 positions" in second.error and "32" in second.error
    assert llm.pool.free_pages == llm.pool.num_pages


def test_cache_size_is_reported_and_checked(tiny_checkpoints):
    llm = tight(tiny_checkpoints, 100, 2, 16)
    assert llm.kv_cache_tokens == 112 and llm.pool.num_pages == 7 and not llm.pool.growable
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        tight(tiny_checkpoints, 0, 2, 16)
