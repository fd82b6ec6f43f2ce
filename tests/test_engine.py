"""The LLM class: batching, chunked prefill, sampling and stopping, on the tiny model (float32, CPU)."""

import contextlib
import json

import pytest
import torch

from runtime.engine import LLM
from runtime.requests import Request
from runtime.sampling import SamplingParams, SeededNoise, sample


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=8,
               max_batch_tokens=256)


def prompts(n, seed=0, lo=5, hi=40):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 199998, (int(torch.randint(lo, hi, (1,), generator=gen)),),
                          generator=gen).tolist()
            for _ in range(n)]


def greedy(tokens, max_tokens=10, **kw):
    return Request(kw.pop("id", 0), tokens, SamplingParams(max_tokens=max_tokens, temperature=0, **kw),
                   stop_token_ids=())


@contextlib.contextmanager
def settings(llm, **values):
    """The engine with some of its scheduler's limits changed for one test."""
    saved = {k: getattr(llm.scheduler, k) for k in values}
    for k, v in values.items():
        setattr(llm.scheduler, k, v)
    try:
        yield llm
    finally:
        for k, v in saved.items():
            setattr(llm.scheduler, k, v)


def run_alone(llm, reqs):
    return [llm.generate([r])[0].token_ids for r in reqs]


def test_batched_generation_equals_each_request_alone(llm):
    reqs = [greedy(p, id=i) for i, p in enumerate(prompts(5))]
    alone = run_alone(llm, reqs)
    with settings(llm, max_batch_size=2):  # requests join and leave mid-batch
        batched = [r.token_ids for r in llm.generate(reqs)]
    assert batched == alone


def test_chunked_prefill_equals_one_shot(llm):
    reqs = [greedy(p, id=i) for i, p in enumerate(prompts(3, seed=1, lo=30, hi=60))]
    one_shot = run_alone(llm, reqs)
    with settings(llm, max_batch_tokens=8):  # prompts of 30-60 tokens in chunks of <= 8
        chunked = [r.token_ids for r in llm.generate(reqs)]
    assert chunked == one_shot


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    target = Request("t", prompts(1, seed=2)[0], params, stop_token_ids=())
    others = [Request(i, p, SamplingParams(max_tokens=6, temperature=0.7), stop_token_ids=())
              for i, p in enumerate(prompts(3, seed=3))]
    alone = llm.generate([target])[0].token_ids
    mixed = llm.generate(others[:2] + [target] + others[2:])[2].token_ids
    assert alone == mixed


def test_unseeded_sampling_depends_on_the_engine_seed_and_the_id_alone(llm, tiny_checkpoints):
    """A request without a seed samples from the engine's seed and its id, never from the order of
    admission, so a resumed batch job gives what an uninterrupted one does. (A collision over 8
    sampled tokens is vanishingly unlikely.)"""
    tokens = prompts(1, seed=2)[0]

    def unseeded(rid):
        return Request(rid, tokens, SamplingParams(max_tokens=8, temperature=1.0), stop_token_ids=())

    others = [unseeded(f"other{i}") for i in range(3)]
    alone = llm.generate([unseeded("u")])[0].token_ids
    after_others = [r.token_ids for r in llm.generate(others)] + [llm.generate([unseeded("u")])[0].token_ids]
    reordered = llm.generate([others[2], unseeded("u"), others[0], others[1]])
    assert after_others[-1] == reordered[1].token_ids == alone
    assert [r.token_ids for r in reordered[2:] + reordered[:1]] == after_others[:3]
    assert len({tuple(t) for t in after_others}) == 4  # the same prompt, four ids: four samples
    reseeded = LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", seed=1)
    assert reseeded.generate([unseeded("u")])[0].token_ids != alone


def test_a_temperature_too_small_to_sample_stably_is_greedy(llm):
    """Dividing by 1e-38 overflowed the logits, so the softmax was NaN and every token 0."""
    tokens = prompts(1, seed=6)[0]
    want = llm.generate([greedy(tokens)])[0].token_ids
    got = llm.generate([Request(0, tokens, SamplingParams(max_tokens=10, temperature=1e-38),
                                stop_token_ids=())])[0].token_ids
    assert got == want


def test_generate_takes_strings_and_token_lists_as_vllm_does(llm, monkeypatch):
    text = "Hello <|start|>"  # a control string typed in a raw prompt stays text
    tokens = llm.harmony.encode_text(text)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    as_json = llm.generate([{"id": "j", "prompt": text, "max_tokens": 4, "temperature": 0,
                             "ignore_eos": True}])[0].token_ids
    single = llm.generate(text, params)
    listed = llm.generate([text, tokens], params)
    assert [r.id for r in single + listed] == [0, 0, 1]  # a string or token list's id is its index
    assert single[0].token_ids == listed[0].token_ids == listed[1].token_ids == as_json
    assert len(as_json) == 4
    per_prompt = llm.generate([text, tokens], [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                               SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)])
    assert [r.token_ids for r in per_prompt] == [as_json[:2], as_json[:3]]
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate([text, tokens], [params])
    monkeypatch.setattr(llm, "default_max_tokens", 3)  # without params: the engine's defaults
    unparametrized = llm.generate(["Hello"])[0]
    assert unparametrized.error is None and 1 <= len(unparametrized.token_ids) <= 3


def test_generate_refuses_bad_prompts_one_by_one(llm):
    mixed = llm.generate([{"id": "d", "prompt_token_ids": [5, 6, 7], "max_tokens": 2}, "", [1, "a"],
                          [llm.config.vocab_size], "fine", 5], SamplingParams(max_tokens=2))
    assert [r.id for r in mixed] == ["d", 1, 2, 3, 4, None]
    assert [r.error is None for r in mixed] == [True, False, False, False, True, False]
    assert "field 'prompt' must be a non-empty string" in mixed[1].error
    assert "prompt_token_ids[1] = 'a' is not a token id" in mixed[2].error
    assert f"prompt_token_ids[0] = {llm.config.vocab_size} is not a token id" in mixed[3].error
    assert "got int" in mixed[5].error
    assert len(llm.generate({"id": "alone", "prompt": "x", "max_tokens": 1})) == 1  # one dict, not its keys


def test_logprobs_are_those_of_the_model(llm):
    tokens = prompts(1, seed=4)[0]
    res = llm.generate([Request(0, tokens, SamplingParams(max_tokens=3, temperature=0, logprobs=True),
                                stop_token_ids=())])[0]
    assert len(res.logprobs) == 3 and all(lp <= 0 for lp in res.logprobs)
    from runtime.step import SequenceChunk, Step

    n = len(tokens)
    full = tokens + res.token_ids[:1]
    step = Step(torch.tensor(full), torch.arange(n + 1), [SequenceChunk(0, n + 1, llm.model.new_cache())],
                torch.tensor([n - 1, n]))
    logp = torch.log_softmax(llm.model(step), -1)
    assert res.logprobs[0] == pytest.approx(float(logp[0, res.token_ids[0]]), abs=1e-5)
    assert res.logprobs[1] == pytest.approx(float(logp[1, res.token_ids[1]]), abs=1e-5)


def test_stop_token_and_max_tokens(llm):
    tokens = prompts(1, seed=5)[0]
    first = llm.generate([greedy(tokens, max_tokens=4)])[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 4
    stop = first.token_ids[1]
    stopped = llm.generate([Request(0, tokens, SamplingParams(max_tokens=4, temperature=0),
                                    stop_token_ids=(stop,))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop) + 1]


def test_stop_strings_end_the_output_before_them(llm):
    """A stop string ends generation at the token completing it; the text ends before it (OpenAI's
    behaviour) and the tokens are those up to that point, whatever other rows share the steps."""
    free = llm.generate([{"id": "free", "prompt": "Tell me", "max_tokens": 24, "temperature": 0,
                          "ignore_eos": True}])[0]
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]  # mid-text, likely across a token boundary
    assert stop and text.find(stop) > 0
    both = llm.generate([{"id": "stopped", "prompt": "Tell me", "max_tokens": 24, "temperature": 0,
                          "ignore_eos": True, "stop": ["never appears \u2603", stop]},
                         {"id": "beside", "prompt": "Other", "max_tokens": 24, "temperature": 0}])
    stopped = both[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.find(stop)]
    n = len(stopped.token_ids)
    assert stopped.token_ids == free.token_ids[:n] and stop in llm.harmony.decode(stopped.token_ids)
    assert stop not in llm.harmony.decode(stopped.token_ids[:-1])  # ended at the completing token


def test_top_logprobs_are_the_models_most_likely_tokens(llm):
    tokens = prompts(1, seed=4)[0]
    res = llm.generate([Request(0, tokens, SamplingParams(max_tokens=3, temperature=0, top_logprobs=4),
                                stop_token_ids=())])[0]
    assert len(res.top_logprobs) == len(res.logprobs) == 3 and all(len(top) == 4 for top in res.top_logprobs)
    for token, logprob, top in zip(res.token_ids, res.logprobs, res.top_logprobs):
        assert top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-5)  # greedy: the first
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert res.to_json()["top_logprobs"][0] == [list(pair) for pair in res.top_logprobs[0]]


def test_chat_takes_conversations_and_sampling_params_as_vllm_does(llm):
    conversation = [{"role": "user", "content": "Hi"}]
    params = SamplingParams(max_tokens=5, temperature=0)
    one = llm.chat(conversation, params)
    two = llm.chat([conversation, [{"role": "system", "content": "Be brief."}, *conversation]],
                   [params, SamplingParams(max_tokens=3, temperature=0)], reasoning_effort="low")
    assert [r.id for r in one] == [0] and [r.id for r in two] == [0, 1]
    assert one[0].chat is not None and len(two[1].token_ids) <= 3
    same = llm.generate([{"id": 0, "messages": conversation, "max_tokens": 5, "temperature": 0}])
    assert one[0].token_ids == same[0].token_ids  # a thin adaptor over a `messages` request
    [bad] = llm.chat([{"role": "robot", "content": "x"}])
    assert "role" in bad.error


def test_context_limit_cuts_generation(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_model_len=20)
    res = llm.generate([greedy(prompts(1, lo=15, hi=16)[0], max_tokens=50)])[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 20 - 15


def test_a_prompt_filling_the_context_gets_one_token(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_model_len=20)
    tokens = prompts(1, lo=21, hi=22)[0]
    full, over = llm.generate([{"id": "full", "prompt_token_ids": tokens[:20], "max_tokens": 5},
                               {"id": "over", "prompt_token_ids": tokens, "max_tokens": 5}])
    assert full.error is None and full.finish_reason == "length" and len(full.token_ids) == 1
    assert "prompt has 21 tokens" in over.error and "max_model_len" in over.error


def test_sample_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(1000)
    gen = SeededNoise(0, "cpu")
    best = int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), gen)[0] == best
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), gen)[0] == best
    token, logprob = sample(logits, SamplingParams(temperature=0), gen)
    assert token == best and logprob == pytest.approx(float(torch.log_softmax(logits, -1)[best]))


def test_sample_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    gen = SeededNoise(0, "cpu")
    seen = {sample(probs.log(), SamplingParams(temperature=1.0, top_p=0.8), gen)[0] for _ in range(300)}
    assert seen == {0, 1}


def test_the_engine_runs_without_triton(tiny_checkpoints):
    """Triton is a test extra: the base install (CPU torch alone) must import and run the reference path."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
            "from runtime.engine import LLM\n"
            f"out = LLM({tiny_checkpoints['original']!r}, dtype='float32', device='cpu')"
            ".generate([{'id': 0, 'prompt_token_ids': [1, 2, 3], 'max_tokens': 2, 'temperature': 0}])\n"
            "assert out[0].error is None and len(out[0].token_ids) == 2, out\n")
    env = {k: v for k, v in os.environ.items() if k != "GPT_OSS_TRITON"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.gpu
def test_batch_llm_on_cuda_bf16(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["original"], dtype="bfloat16", device="cuda")
    results = llm.generate([{"id": i, "prompt_token_ids": [1000 + i] * (5 + i), "max_tokens": 6,
                             "temperature": 0, "ignore_eos": True} for i in range(4)])
    assert [len(r.token_ids) for r in results] == [6] * 4
    assert json.dumps([r.to_json() for r in results])


def test_expert_load_counts_every_row_the_model_ran(tiny_checkpoints):
    """count_expert_load: each layer counts k rows per token the model ran (each prompt once, then
    each fed-back token), none for a CUDA graph's padding rows (PagedStep.real_rows 0);
    reset_expert_load starts again from zero; without the setting there is no count."""
    import dataclasses

    from runtime.config import preset
    from runtime.model import GptOss

    gen = torch.Generator().manual_seed(9)
    lengths, max_tokens = (6, 11, 3), 5
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True} for i, n in enumerate(lengths)]
    llm = LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", count_expert_load=True)
    llm.generate(reqs)
    load, cfg = llm.expert_load(), llm.config
    rows = cfg.experts_per_token * (sum(lengths) + len(lengths) * (max_tokens - 1))
    assert [sum(layer) for layer in load["tokens_per_expert"]] == [rows] * cfg.num_hidden_layers
    assert load["rows_per_rank"] == [[rows]] * cfg.num_hidden_layers
    llm.reset_expert_load()
    assert all(count == 0 for layer in llm.expert_load()["tokens_per_expert"] for count in layer)
    assert LLM(tiny_checkpoints["original"], dtype="float32", device="cpu").expert_load() is None

    model = GptOss(dataclasses.replace(preset("tiny"), num_hidden_layers=1), torch.float32).randomize(1)
    model.count_expert_load()
    x, delta = torch.randn(2, 3, cfg.hidden_size, generator=gen)
    with torch.inference_mode():
        model.block[0].mlp(x, delta, real_rows=torch.tensor([1, 0, 1]))
    assert int(model.expert_load().sum()) == 2 * cfg.experts_per_token
