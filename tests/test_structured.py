"""Structured outputs: random "models" (noise logits) driven through the grammars end to end, the
bitmask helpers against naive references, every bad input's error naming its field, and the engine
(the random tiny model) giving valid JSON and tool calls that end with `stop`."""

import contextlib
import json
import random

import jsonschema
import openai_harmony as oh
import pytest
import torch

from runtime.harmony import get_harmony
from runtime.structured import (VOCAB_SIZE, Constraint, StructureError, apply_bitmask, bitmask_words,
                                fill_bitmasks, grammar_for, tokenizer)

WORDS = bitmask_words(VOCAB_SIZE)
END_OF_TEXT, RETURN, END, CALL = 199999, 200002, 200007, 200012
RAW_ENDS = (RETURN, CALL, END_OF_TEXT)
CAP = 1500  # tokens; every grammar below ends long before (see random_schema)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
           "required": ["city", "days"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, "many"]}},
          "required": ["ok", "n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "no-args", "description": "nothing to give",
                                           "parameters": {"type": "object", "additionalProperties": False}}}]


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def encode(text: str) -> list[int]:
    return get_harmony().encoding.encode(text, allowed_special="all")


def text_of(tokens: list[int]) -> str:
    return tokenizer().decode_bytes(tokens).decode("utf-8")  # strict: the grammar keeps UTF-8 whole


def generate(constraints: list[Constraint], seed: int, scripts=None, cap: int = CAP) -> list[list[int]]:
    """Sample the constrained rows together, as the engine does, from noise logits (uniform noise, half
    the cost of randn): the argmax of iid noise over the allowed tokens is a uniform draw among them.
    A script's tokens get +200 while it lasts, so the scripted token is taken exactly when the mask
    allows it. <|end|> always gets +100: noise would almost never pick it among the 200k tokens an
    analysis message allows, and the message would run to the cap. Stops at `cap` tokens."""
    gen = torch.Generator().manual_seed(seed)
    scripts = scripts or [()] * len(constraints)
    out: list[list[int]] = [[] for _ in constraints]
    for _ in range(cap):
        live = [i for i, c in enumerate(constraints) if not c.finished and c.error is None]
        if not live:
            break
        bitmask = torch.zeros(len(live), WORDS, dtype=torch.int32)
        fill_bitmasks([constraints[i] for i in live], bitmask)
        logits = torch.rand(len(live), VOCAB_SIZE, generator=gen)
        logits[:, END] += 100.0
        for row, i in enumerate(live):
            if len(out[i]) < len(scripts[i]):
                logits[row, scripts[i][len(out[i])]] += 200.0
        apply_bitmask(logits, bitmask)
        for i, token in zip(live, logits.argmax(-1).tolist()):
            constraints[i].consume(token)
            out[i].append(token)
    return out


def parse(tokens: list[int]) -> list:
    return get_harmony().encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)


def allowed(constraint: Constraint) -> list[int]:
    """The ids the constraint allows next, from a one-row fill (apply_bitmask is checked against the
    naive unpack below)."""
    bitmask = torch.zeros(1, WORDS, dtype=torch.int32)
    fill_bitmasks([constraint], bitmask)
    logits = torch.zeros(1, VOCAB_SIZE)
    apply_bitmask(logits, bitmask)
    return torch.nonzero(logits[0] == 0).flatten().tolist()


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [rows, vocab]: bit t%32 of word t//32, ids past the mask False (the naive reference)."""
    rows, words = bitmask.shape
    out = torch.zeros(rows, vocab, dtype=torch.bool)
    for r in range(rows):
        for t in range(min(vocab, words * 32)):
            out[r, t] = (int(bitmask[r, t // 32]) >> (t % 32)) & 1 == 1
    return out


def assert_compact(text: str) -> None:
    """No whitespace outside JSON strings."""
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        else:
            assert not ch.isspace(), f"whitespace at {i} in {text!r}"


def check_json(text: str, schema: dict):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert_compact(text)
    return value


# ---- random schemas, random models ----

def random_schema(rng: random.Random, depth: int = 0, kind: str | None = None) -> dict:
    """A random schema whose every value has a bounded length, so that noise logits end it quickly.

    Noise logits draw uniformly among the allowed tokens, and almost all of the 200k tokens continue
    an open string or a number's digits: an unbounded string, an integer without both bounds or a
    number without multipleOf (its fraction has no last digit) would run for thousands of tokens, and
    an object open to additionalProperties would invent keys of any JSON. Hence: strings always have
    maxLength, integers minimum and maximum, numbers both bounds and a binary multipleOf (exact in
    floats, so jsonschema's check agrees), arrays maxItems, objects additionalProperties false.
    """
    leaves = ["integer", "number", "boolean", "string", "enum", "null"]
    kind = kind or rng.choice(leaves + ["object", "array"] * (2 - depth))  # containers above depth 2
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([0, 9, 500, 10**6])}
    if kind == "number":
        lo = rng.randint(-20, 20) / 2
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 50),
                "multipleOf": rng.choice([0.5, 0.25])}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 8)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "a b", 'q"uote', 7, -1.5, True, None], rng.randint(1, 4))}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    if kind == "object":
        names = rng.sample(["id", "name", "tags", "x", "y", "deep", "ok", "ünï"], rng.randint(1, 4))
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": [n for n in names if rng.random() < 0.6], "additionalProperties": False}
    return {"type": kind}


@pytest.mark.parametrize("chat", [False, True])
def test_random_schemas(chat):
    """40 random schemas: each answer is compact JSON valid under its schema. A raw completion is the
    answer then one stop token; a chat reply (with or without an analysis message) is the final
    message holding the answer, ended by <|return|>."""
    rng = random.Random(1234 + chat)
    schemas = [random_schema(rng, kind="object") for _ in range(40)]  # a root object, as OpenAI asks
    constraints = [Constraint(grammar_for(json_format(s), chat=chat)) for s in schemas]
    for schema, c, tokens in zip(schemas, constraints, generate(constraints, seed=5 + chat)):
        assert c.error is None and c.finished, (schema, text_of(tokens[:200]))
        assert tokens[-1] in ((RETURN,) if chat else RAW_ENDS)
        assert not any(t in RAW_ENDS for t in tokens[:-1])
        if chat:
            final = parse(tokens)[-1]
            assert final.channel == "final"
            check_json(final.content[0].text, schema)
        else:
            check_json(text_of(tokens[:-1]), schema)


def test_json_object_is_compact_even_if_the_schema_asks_for_whitespace():
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True}}
    for grammar in (grammar_for({"type": "json_object"}, chat=False),
                    grammar_for(json_format(schema), chat=False)):
        c = Constraint(grammar)
        ids = allowed(c)
        assert ids == [t for t in ids if text_of([t]).startswith("{")]  # no leading blank
        for t in encode('{"a":[1,{"b":null}]'):
            c.consume(t)
        after = set(allowed(c))
        assert encode(",")[0] in after and encode("}")[0] in after
        assert not any(text_of([t])[:1].isspace() for t in after), "whitespace allowed between tokens"
        for t in encode('}<|return|>'):
            c.consume(t)
        assert c.finished and c.error is None


# ---- chat: free analysis, constrained final, tool calls ----

ANALYSIS = '<|channel|>analysis<|message|>Hmm: {"a": [1, 2,,, }} is not JSON\n<|end|><|start|>assistant'


def test_chat_analysis_runs_free_and_final_is_constrained():
    c = Constraint(grammar_for(json_format(ANSWER), chat=True))
    script = encode(ANALYSIS + "<|channel|>final<|message|>")
    tokens = generate([c], seed=3, scripts=[script])[0]
    assert tokens[:len(script)] == script  # every scripted token was allowed: the analysis is free
    assert c.finished and tokens[-1] == RETURN
    check_json(text_of(tokens[len(script):-1]), ANSWER)
    messages = parse(tokens)
    assert [m.channel for m in messages] == ["analysis", "final"]

    # in the final message, prose is not allowed; nor is a special token other than the structure's
    c = Constraint(grammar_for(json_format(ANSWER), chat=True))
    for t in script:
        c.consume(t)
    assert encode("Sure")[0] not in allowed(c)


def test_chat_analysis_allows_no_special_token_but_end():
    c = Constraint(grammar_for({"type": "json_object"}, chat=True))
    for t in encode("<|channel|>analysis<|message|>hmm"):
        c.consume(t)
    ids = allowed(c)
    assert [t for t in ids if t >= END_OF_TEXT] == [END]  # no reserved id, no <|return|>
    assert len(ids) > 150_000  # ordinary text: almost every token


@pytest.mark.parametrize("tool_choice, names", [("required", {"get_weather", "no-args"}),
                                                ({"type": "function", "function": {"name": "get_weather"}},
                                                 {"get_weather"})])
def test_forced_tool_call(tool_choice, names):
    """Whatever the model would rather say, the reply (after an optional analysis) is a call of an
    allowed tool, with arguments valid under its parameters, ended by <|call|>."""
    grammar = grammar_for(json_format(ANSWER), chat=True, tools=TOOLS, tool_choice=tool_choice)
    wants_final = encode("<|channel|>final<|message|>Hello<|return|>")
    scripts = [wants_final] * 4 + [encode(ANALYSIS) + wants_final] * 4
    constraints = [Constraint(grammar) for _ in scripts]
    called = set()
    for c, script, tokens in zip(constraints, scripts, generate(constraints, seed=11, scripts=scripts)):
        assert c.finished and tokens[-1] == CALL
        *thoughts, call = parse(tokens)
        # noise may open an (empty) analysis of its own where the script wanted "final"
        expected = [["analysis"]] if script != wants_final else [[], ["analysis"]]
        assert [m.channel for m in thoughts] in expected
        assert call.channel == "commentary" and call.content_type == "<|constrain|>json"
        name = call.recipient.removeprefix("functions.")
        called.add(name)
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
        check_json(call.content[0].text, schema)
    assert called <= names and (len(names) == 1 or called == names)


def test_auto_with_response_format_allows_answer_or_call():
    grammar = grammar_for(json_format(ANSWER), chat=True, tools=TOOLS)
    assert grammar == grammar_for(json_format(ANSWER), chat=True, tools=TOOLS, tool_choice="auto")
    call_header = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    scripts = [encode("<|channel|>final<|message|>"), encode(ANALYSIS + call_header)]
    constraints = [Constraint(grammar) for _ in scripts]
    answer, call = generate(constraints, seed=2, scripts=scripts)
    assert answer[-1] == RETURN and call[-1] == CALL and all(c.finished for c in constraints)
    check_json(parse(answer)[-1].content[0].text, ANSWER)
    check_json(parse(call)[-1].content[0].text, WEATHER)


def test_unconstrained_requests_have_no_grammar():
    assert grammar_for(None, chat=False) is None
    assert grammar_for({"type": "text"}, chat=True) is None
    assert grammar_for(None, chat=True, tools=TOOLS) is None  # auto: the model may or may not call
    assert grammar_for({"type": "text"}, chat=True, tools=TOOLS, tool_choice="none") is None
    none = grammar_for(json_format(ANSWER), chat=True, tools=TOOLS, tool_choice="none")
    assert none == grammar_for(json_format(ANSWER), chat=True) and "functions" not in none


def test_a_token_outside_the_mask_is_an_error_not_an_exception():
    c = Constraint(grammar_for({"type": "json_object"}, chat=False))
    c.consume(encode("x")[0])
    assert c.error and not c.finished
    assert allowed(c) == [END_OF_TEXT]  # a failed row can only stop


# ---- masks ----

@pytest.mark.parametrize("vocab", [70, 96, 130])  # words * 32 = 96: vocab smaller, equal, larger
def test_apply_bitmask_matches_naive_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-2**31, 2**31, (4, 3), dtype=torch.int32, generator=gen)
    bitmask[0] = -1  # all allowed
    bitmask[1] = 0  # none allowed
    logits = torch.randn(4, vocab, generator=gen)
    logits[2, ::7] = float("inf")  # poisoned values are masked like any other
    keep = unpack(bitmask, vocab)
    expected = torch.where(keep, logits, torch.full_like(logits, float("-inf")))
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def test_fill_bitmasks_rows_equal_each_constraint_alone():
    grammars = [grammar_for({"type": "json_object"}, chat=False), grammar_for(json_format(ANSWER), chat=True),
                grammar_for(None, chat=True, tools=TOOLS, tool_choice="required")]
    prefixes = ["", '{"k":', "<|channel|>final<|message|>", "<|channel|>commentary to=functions.get_weather"]
    constraints = []
    for grammar in grammars:
        for prefix in prefixes:
            c = Constraint(grammar)
            for t in encode(prefix):
                c.consume(t)
            constraints.append(c)
    bitmask = torch.full((len(constraints), WORDS), 7, dtype=torch.int32)  # stale values are overwritten
    fill_bitmasks(constraints, bitmask)
    for row, c in zip(bitmask, constraints):
        # compute_bitmask gives one more word than the vocab needs, always 0
        alone = torch.frombuffer(bytearray(c.matcher.compute_bitmask()), dtype=torch.int32)
        assert torch.equal(row, alone[:WORDS]) and not alone[WORDS:].any()
    assert len({tuple(row.tolist()) for row in bitmask}) > 5  # the states really differ


def test_fill_bitmasks_checks_the_tensor():
    c = Constraint(grammar_for({"type": "json_object"}, chat=False))
    with pytest.raises(ValueError, match="bitmask must be"):
        fill_bitmasks([c], torch.zeros(1, WORDS - 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="bitmask must be"):
        fill_bitmasks([c], torch.zeros(1, WORDS, dtype=torch.int64))


# ---- bad inputs name their field ----

def weather_tools(**function) -> list[dict]:
    return [TOOLS[0], {"type": "function", "function": {"name": "b", **function}}]


@pytest.mark.parametrize("kwargs, message", [
    (dict(response_format="json"), "response_format: must be an object"),
    (dict(response_format={"type": "xml"}),
     "response_format.type: must be one of text, json_object, json_schema, got 'xml'"),
    (dict(response_format={"type": "json_object", "schema": {}}),
     "response_format: unknown field(s) 'schema'"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema: must be an object"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a"}}),
     "response_format.json_schema.schema: missing"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
     "response_format.json_schema.name: must be 1 to 64"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": 1}}),
     "response_format.json_schema.strict: must be true or false"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}),
     "response_format.json_schema.schema: must be an object, got list"),
    (dict(response_format=json_format({"type": "foo"})),
     "response_format.json_schema.schema: Invalid type: foo"),
    (dict(response_format=json_format({"not": {"type": "string"}})),
     "response_format.json_schema.schema: Unimplemented keys"),
    (dict(response_format=json_format({"type": "integer", "minimum": 5, "maximum": 1})),
     "response_format.json_schema.schema: Unsatisfiable schema"),
    (dict(tools={"name": "a"}), "tools: must be a list"),
    (dict(tools=[TOOLS[0], {"type": "retrieval"}]), "tools[1].type: must be 'function', got 'retrieval'"),
    (dict(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "a", "params": {}}}]),
     "tools[0].function: unknown field(s) 'params'"),
    (dict(tools=weather_tools(parameters={"type": "string"})),
     "tools[1].function.parameters: must be an object"),
    (dict(tools=weather_tools(parameters={"type": "object", "properties": {"x": {"type": "wat"}}})),
     "tools[1].function.parameters: Invalid type: wat"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].function.name: 'get_weather' is defined twice"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice: must be one of auto, none, required"),
    (dict(tools=TOOLS, tool_choice={"type": "custom"}), "tool_choice.type: must be 'function'"),
    (dict(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice.function: must be an object"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "zzz"}}),
     "tool_choice.function.name: no tool named 'zzz' in tools"),
    (dict(tool_choice="required"), "tool_choice: 'required' needs at least one tool"),
    (dict(tools=TOOLS, chat=False), "tools: only chat requests"),
])
def test_bad_inputs_name_the_field(kwargs, message):
    kwargs = {"response_format": None, "chat": True, **kwargs}
    with pytest.raises(StructureError) as e:
        grammar_for(kwargs.pop("response_format"), **kwargs)
    assert message in str(e.value)


def test_a_grammar_that_does_not_compile():
    """(Requests' grammars are checked when they are parsed; this is the guard behind that.) The compile
    runs in the background: its error comes with the first use of the matcher."""
    constraint = Constraint("start: nothing_defined")
    for _ in range(2):  # every use, not only the first
        with pytest.raises(StructureError, match="grammar: .*unknown name"):
            constraint.finished


# ---- through the engine, on the random tiny model ----

@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoints):
    from runtime.engine import LLM

    return LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=16,
               max_batch_tokens=512)


@contextlib.contextmanager
def favouring_end(llm, bonus=30.0):
    """The tiny model with <|end|> made likely: random weights would otherwise write a free analysis
    message until max_tokens. Only a model's preference changes; the masks still decide what may
    come (inside the JSON, <|end|> is never allowed)."""
    forward = llm._forward

    def biased(plan, agreed=None):
        logits, _ = forward(plan, agreed)
        logits = logits.clone()
        logits[:, END] += bonus
        return logits, None  # no graph-sampled tokens: they would not see the bonus

    llm._forward = biased
    try:
        yield llm
    finally:
        llm._forward = forward


def test_engine_structured_outputs_parse_validate_and_stop(tiny_llm):
    """Raw prompts, greedy and sampled, constrained rows beside free ones in the same steps: every
    constrained output parses, validates and ends with `stop`; the free rows' tokens are those they
    get alone (a mask touches only its own row). The schemas bound every string and number
    (random_schema): random weights write an unbounded string (json_object's) until max_tokens."""
    rng = random.Random(11)
    schemas = [random_schema(rng, kind="object") for _ in range(12)]
    constrained = [{"id": i, "prompt": f"JSON number {i}:", "max_tokens": 400, "temperature": i % 2,
                    "response_format": json_format(schema)} for i, schema in enumerate(schemas)]
    free = [{"id": f"free{i}", "prompt": f"Free text {i}", "max_tokens": 12, "temperature": 0,
             "ignore_eos": True} for i in range(3)]
    results = tiny_llm.generate(constrained + free)
    for result, schema in zip(results, schemas):
        assert result.finish_reason == "stop" and result.token_ids[-1] in RAW_ENDS, result
        check_json(result.text, schema)
    alone = tiny_llm.generate(free)
    assert [r.token_ids for r in results[-len(free):]] == [r.token_ids for r in alone]


def test_engine_chat_reply_and_tool_call_round_trip(tiny_llm):
    """A chat's final channel holds JSON valid under its schema; a forced tool call comes back as
    OpenAI tool_calls with valid arguments; its reply renders into the next turn, which answers."""
    from runtime.sampling import SamplingParams

    question = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather?"}]
    with favouring_end(tiny_llm):
        [call] = tiny_llm.chat(question, SamplingParams(max_tokens=300, temperature=0), tools=TOOLS,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert call.finish_reason == "stop" and call.token_ids[-1] == CALL
        [tool_call] = call.chat["tool_calls"]
        assert tool_call["function"]["name"] == "get_weather" and tool_call["id"].startswith("call_")
        jsonschema.validate(json.loads(tool_call["function"]["arguments"]), WEATHER)
        follow_up = question + [{"role": "assistant", "content": None, "tool_calls": [tool_call]},
                                {"role": "tool", "tool_call_id": tool_call["id"],
                                 "content": '{"temp_c": 18}'}]
        [answer] = tiny_llm.chat(follow_up, SamplingParams(max_tokens=300, temperature=0,
                                                           response_format=json_format(ANSWER)), tools=TOOLS)
    assert answer.finish_reason == "stop" and answer.token_ids[-1] == RETURN
    check_json(answer.chat["channels"]["final"], ANSWER)
    assert "tool_calls" not in answer.chat


@pytest.mark.gpu
def test_engine_structured_outputs_on_cuda_with_graphs(tiny_checkpoints):
    """On the GPU (bf16, decode graphs captured): constrained rows leave the graph's own greedy
    samples aside and choose under their masks; the outputs validate, and free rows beside them keep
    the tokens they get alone."""
    from runtime.engine import LLM

    llm = LLM(tiny_checkpoints["original"], device="cuda", dtype="bfloat16", max_batch_size=16,
              max_batch_tokens=512)
    assert llm.graph_sizes
    rng = random.Random(5)
    schemas = [random_schema(rng, kind="object") for _ in range(8)]
    constrained = [{"id": i, "prompt": f"JSON {i}:", "max_tokens": 400, "temperature": i % 2,
                    "response_format": json_format(schema)} for i, schema in enumerate(schemas)]
    free = [{"id": f"free{i}", "prompt": f"Free {i}", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            for i in range(4)]
    alone = [r.token_ids for r in llm.generate(free)]
    for greedy_only in (False, True):  # all greedy: the constrained rows re-choose after the graph's
        requests = [{**r, "temperature": 0} if greedy_only else r for r in constrained]
        results = llm.generate(requests + free)
        for result, schema in zip(results, schemas):
            assert result.finish_reason == "stop", result
            check_json(result.text, schema)
        assert [r.token_ids for r in results[len(schemas):]] == alone
    assert llm.graph_replays > 0


def test_masked_greedy_rows_equal_greedy_sampling_under_the_masks():
    """What the engine runs after a decode graph when its constrained rows are greedy (ops.
    masked_greedy_into, over those rows only) equals sampling every row with the masks: the same
    tokens, the model's own logprobs; the free rows keep what the graph wrote."""
    from runtime import ops
    from runtime.sampling import SamplingParams, sample_on_device

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, VOCAB_SIZE, generator=gen) * 4
    rows = torch.tensor([3, 0])
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, WORDS), generator=gen, dtype=torch.int32)
    bitmask[1] &= 0x00010001
    tokens, logprobs = sample_on_device(logits, [SamplingParams(temperature=0)] * 5, [None] * 5,
                                        (rows, bitmask))
    graph_tokens, graph_pairs = torch.full((5,), -7), torch.full((5, 2), -7.0, dtype=torch.float64)
    ops.masked_greedy_into(logits, rows, bitmask, graph_tokens, graph_pairs)
    assert torch.equal(graph_tokens[rows], tokens[rows]) and (graph_tokens[[1, 2, 4]] == -7).all()
    assert torch.equal(graph_pairs[rows, 0], tokens[rows].double())
    assert torch.allclose(graph_pairs[rows, 1], logprobs[rows].double())


def test_every_request_starts_its_grammar_from_the_start(tiny_llm):
    """The same schemas again in a second generate call: each request's matcher starts at the
    grammar's start. (llguidance's reset of a finished matcher left three of these eight inside the
    object it had finished, and their second outputs began mid-object.) A released constraint keeps
    no matcher."""
    rng = random.Random(5)
    schemas = [random_schema(rng, kind="object") for _ in range(8)]
    requests = [{"id": i, "prompt": f"JSON {i}:", "max_tokens": 400, "temperature": 0,
                 "response_format": json_format(schema)} for i, schema in enumerate(schemas)]
    for _ in range(2):
        for result, schema in zip(tiny_llm.generate(requests), schemas):
            assert result.finish_reason == "stop", result
            check_json(result.text, schema)
    constraint = Constraint(grammar_for(json_format(WEATHER), chat=False))
    assert not constraint.finished
    constraint.release()
    with pytest.raises(RuntimeError, match="released"):
        constraint.consume(RETURN)
