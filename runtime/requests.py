"""Requests: one JSON object per request, checked field by field before it reaches the engine.

A bad request raises RequestError with a message naming the field; the caller turns it into an
`error` result for that request alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from runtime.sampling import LIMITS, SamplingParams

PROMPT_FIELDS = ("prompt_token_ids", "prompt", "messages")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
KNOWN_FIELDS = {"id", "reasoning_effort", *PROMPT_FIELDS, *SAMPLING_FIELDS}
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
    """The request's id, or None when there is no usable one."""
    if isinstance(obj, dict) and (isinstance(obj.get("id"), str) or _is_int(obj.get("id"))):
        return obj["id"]
    return None


def parse_request(obj: Any, *, max_model_len: int, vocab_size: int, default_max_tokens: int,
                  harmony=None) -> Request:
    """A checked Request from a JSON object. `harmony` renders `messages` and encodes `prompt`."""
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
    if "reasoning_effort" in obj and "messages" not in obj:
        raise RequestError("field 'reasoning_effort' applies only to 'messages' requests")
    tokens = _prompt_tokens(obj, given[0], vocab_size, harmony)
    # a prompt that fills the context still gets its one next token, as in vLLM
    if len(tokens) > max_model_len:
        raise RequestError(f"prompt has {len(tokens)} tokens; the context limit (max_model_len) is "
                           f"{max_model_len}")
    params = parse_sampling_params(obj, default_max_tokens)
    stops = () if params.ignore_eos else EOS_TOKEN_IDS
    return Request(rid, tokens, params, chat=given[0] == "messages", stop_token_ids=stops)


def parse_sampling_params(obj: dict, default_max_tokens: int) -> SamplingParams:
    """The sampling fields of a request object, checked (RequestError names the field); the rest of
    the object is not looked at, so this runs without a model (launch.generate, before loading)."""
    defaults = SamplingParams(max_tokens=default_max_tokens)
    fields = {name: _number(obj, name, getattr(defaults, name)) for name in LIMITS}
    fields.update({name: _flag(obj, name, getattr(defaults, name)) for name in SAMPLING_FIELDS
                   if name not in LIMITS})
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
        return harmony.render_prompt(value, obj.get("reasoning_effort"))
    except HarmonyInputError as e:
        raise RequestError(str(e)) from None
