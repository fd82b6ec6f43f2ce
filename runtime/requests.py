"""Requests: one JSON object per request, checked field by field before it reaches the engine.

A bad request raises RequestError with a message naming the field; the caller turns it into an
`error` result for that request alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from runtime.sampling import LIMITS, SamplingParams
from runtime.stop_strings import StopStrings

PROMPT_FIELDS = ("prompt_token_ids", "prompt", "messages")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
CHAT_FIELDS = ("reasoning_effort", "tools", "tool_choice")  # for `messages` requests only
KNOWN_FIELDS = {"id", *CHAT_FIELDS, *PROMPT_FIELDS, *SAMPLING_FIELDS}
# Raw prompts stop on <|return|>, <|call|> (Harmony's assistant stops) and <|endoftext|>, as the
# Hugging Face generation config does; Harmony chats add nothing to that set.
EOS_TOKEN_IDS = (200002, 200012, 199999)


class RequestError(ValueError):
    """A request that cannot run; the message names the field."""


@dataclasses.dataclass
class Request:
    id: Any
    prompt_token_ids: list[int]
    params: SamplingParams = SamplingParams()
    chat: bool = False  # a Harmony chat: the output is parsed into channels
    stop_token_ids: tuple[int, ...] = EOS_TOKEN_IDS
    grammar: str | None = None  # what it may generate (runtime/structured.py), None: anything
    stop_strings: StopStrings | None = None  # params.stop, matched in the decoded text
    openai: dict | None = None  # an OpenAI Batch line: how its result is written (runtime/openai_batch.py)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(obj: dict, name: str, default):
    """A numeric field, of the JSON type LIMITS gives it (an integer, or any number); its range is
    SamplingParams' to check."""
    value = obj.get(name)
    if value is None:
        return default
    integer = LIMITS[name].integer
    ok = _is_int(value) if integer else (_is_int(value) or isinstance(value, float))
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise RequestError(f"field {name!r} must be {kind}, got {value!r}")
    return value if integer else float(value)


def _flag(obj: dict, name: str, default: bool) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"field {name!r} must be true or false, got {value!r}")
    return value


def request_id(obj: Any):
    """The request's id (an OpenAI Batch line's custom_id), or None when there is no usable one."""
    from runtime import openai_batch

    if openai_batch.is_openai(obj):
        return openai_batch.custom_id(obj)
    if isinstance(obj, dict) and (isinstance(obj.get("id"), str) or _is_int(obj.get("id"))):
        return obj["id"]
    return None


def parse_request(obj: Any, *, max_model_len: int, vocab_size: int, default_max_tokens: int,
                  harmony=None) -> Request:
    """A checked Request from a JSON object: a native request, or an OpenAI Batch line (the native
    request its body means, runtime/openai_batch.py). `harmony` renders `messages` and encodes
    `prompt`."""
    from runtime import openai_batch

    if openai_batch.is_openai(obj):
        native, reply = openai_batch.to_native(obj, default_max_tokens)
        request = parse_request(native, max_model_len=max_model_len, vocab_size=vocab_size,
                                default_max_tokens=default_max_tokens, harmony=harmony)
        request.openai = reply
        return request
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(sorted(KNOWN_FIELDS))}")
    rid = request_id(obj)
    if rid is None:
        raise RequestError(f"field 'id' must be a string or an integer, got {obj.get('id')!r}")
    given = [f for f in PROMPT_FIELDS if f in obj]
    if len(given) != 1:
        raise RequestError(f"exactly one of {', '.join(PROMPT_FIELDS)} is needed, got {given or 'none'}")
    chat = given[0] == "messages"
    for name in CHAT_FIELDS:
        if name in obj and not chat:
            raise RequestError(f"field {name!r} applies only to 'messages' requests")
    tokens = _prompt_tokens(obj, given[0], vocab_size, harmony)
    # a prompt that fills the context still gets its one next token, as in vLLM
    if len(tokens) > max_model_len:
        raise RequestError(f"prompt has {len(tokens)} tokens; the context limit (max_model_len) is "
                           f"{max_model_len}")
    params = parse_sampling_params(obj, default_max_tokens)
    stops = () if params.ignore_eos else EOS_TOKEN_IDS
    grammar = _grammar(obj, params, chat)
    stop_strings = StopStrings(params.stop, harmony.decode) if params.stop else None
    return Request(rid, tokens, params, chat=chat, stop_token_ids=stops, grammar=grammar,
                   stop_strings=stop_strings)


def _grammar(obj: dict, params: SamplingParams, chat: bool) -> str | None:
    """The request's grammar, checked to compile (a bad schema fails the request here, not mid-run);
    None when nothing constrains it."""
    if params.response_format is None and obj.get("tool_choice") in (None, "auto", "none"):
        return None  # the common case: not even llguidance is loaded
    from runtime import structured

    try:
        grammar = structured.grammar_for(params.response_format, chat=chat, tools=obj.get("tools"),
                                         tool_choice=obj.get("tool_choice"))
    except structured.StructureError as e:
        raise RequestError(str(e)) from None
    if grammar is not None and params.ignore_eos:
        raise RequestError("field 'ignore_eos' cannot be combined with a constrained output "
                           "(response_format or tool_choice): the output must end where it is complete")
    return grammar


def parse_sampling_params(obj: dict, default_max_tokens: int) -> SamplingParams:
    """The sampling fields of a request object, checked (RequestError names the field); the rest of
    the object is not looked at, so this runs without a model (launch.generate, before loading)."""
    defaults = SamplingParams(max_tokens=default_max_tokens)
    fields = {name: _number(obj, name, getattr(defaults, name)) for name in LIMITS}
    fields.update({name: _flag(obj, name, getattr(defaults, name)) for name in ("logprobs", "ignore_eos")})
    fields["stop"] = obj.get("stop") or ()  # SamplingParams checks the strings
    response_format = obj.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise RequestError(f"field 'response_format' must be an object, got {response_format!r}")
    fields["response_format"] = None if response_format == {"type": "text"} else response_format
    try:
        return SamplingParams(**fields)
    except ValueError as e:  # a value out of its range, named by SamplingParams
        raise RequestError(str(e)) from None


def _prompt_tokens(obj: dict, field: str, vocab_size: int, harmony) -> list[int]:
    value = obj[field]
    if field == "prompt_token_ids":
        if not isinstance(value, list) or not value:
            raise RequestError("field 'prompt_token_ids' must be a non-empty list of token ids")
        for i, t in enumerate(value):
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise RequestError(f"prompt_token_ids[{i}] = {t!r} is not a token id in [0, {vocab_size})")
        return list(value)
    if field == "prompt":
        if not isinstance(value, str) or not value:
            raise RequestError("field 'prompt' must be a non-empty string")
        return harmony.encode_text(value)
    from runtime.harmony import HarmonyInputError

    try:
        # tool_choice "none": the model is not shown the tools, so it cannot call them
        tools = None if obj.get("tool_choice") == "none" else obj.get("tools")
        return harmony.render_prompt(value, obj.get("reasoning_effort"), tools=tools)
    except HarmonyInputError as e:
        raise RequestError(str(e)) from None
