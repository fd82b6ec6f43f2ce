"""OpenAI Batch API lines (the `/v1/batches` file format, which vLLM's run-batch also reads).

An input line `{"custom_id", "method": "POST", "url", "body"}` with url `/v1/chat/completions` or
`/v1/completions` means the native request `to_native` makes of its body (runtime/requests.py parses
and checks that), keyed by its custom_id; its result is written back as OpenAI's batch output writes
it (`output_record`): `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`, the body a `chat.completion` or `text_completion` object, or for a request that cannot run
a 400 whose body is OpenAI's error object. Lines in this format and native lines may be mixed in one
file: each line is told apart by its fields (`is_openai`).

Ids derive from the custom_id (no clock, no counter), so a resumed job writes what an uninterrupted
one would; only `created` is the time the result was made, as OpenAI's is.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from runtime.requests import RequestError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LINE_FIELDS = ("custom_id", "method", "url", "body")
# Body fields taken as they are into the native request
CHAT_PASSED = ("messages", "temperature", "top_p", "seed", "stop", "logprobs", "top_logprobs",
               "reasoning_effort", "tools", "tool_choice", "response_format", "top_k", "ignore_eos")
COMPLETION_PASSED = ("temperature", "top_p", "seed", "stop", "response_format", "top_k", "ignore_eos")
# Accepted and not used: they change nothing in an offline batch (`model`: the job's model runs)
IGNORED = ("model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options")
# Accepted only at the value that means "off" (OpenAI's default), else the request fails naming them
ONLY_DEFAULT = {"n": 1, "best_of": 1, "stream": False, "echo": False, "suffix": None,
                "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the completions API's `logprobs`


def is_openai(obj: Any) -> bool:
    """Whether a parsed input line is an OpenAI Batch line (it has custom_id or body, which native
    requests never have)."""
    return isinstance(obj, dict) and ("custom_id" in obj or "body" in obj)


def custom_id(obj: dict) -> str | None:
    value = obj.get("custom_id")
    return value if isinstance(value, str) and value else None


def reply_settings(obj: dict) -> dict:
    """What writing a line's result needs from the line: its custom_id, url and model."""
    body = obj.get("body") if isinstance(obj.get("body"), dict) else {}
    url = obj.get("url") if obj.get("url") in (CHAT, COMPLETIONS) else CHAT
    return {"custom_id": custom_id(obj), "url": url, "model": body.get("model")}


def to_native(obj: dict, default_max_tokens: int) -> tuple[dict, dict]:
    """(the native request an OpenAI Batch line means, its reply settings); RequestError names the
    field (`body.n`, `url`, ...)."""
    unknown = sorted(set(obj) - set(LINE_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))} in an OpenAI Batch line; "
                           f"known: {', '.join(LINE_FIELDS)}")
    if custom_id(obj) is None:
        raise RequestError(f"field 'custom_id' must be a non-empty string, got {obj.get('custom_id')!r}")
    if obj.get("method", "POST") != "POST":
        raise RequestError(f"field 'method' must be 'POST', got {obj.get('method')!r}")
    if obj.get("url") not in (CHAT, COMPLETIONS):
        raise RequestError(f"field 'url' must be {CHAT!r} or {COMPLETIONS!r}, got {obj.get('url')!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise RequestError(f"field 'body' must be an object, got {type(body).__name__}")
    chat = obj["url"] == CHAT
    passed = CHAT_PASSED if chat else COMPLETION_PASSED
    own = {"max_tokens", "max_completion_tokens"} if chat else {"prompt", "max_tokens", "logprobs"}
    unknown = sorted(set(body) - set(passed) - set(IGNORED) - set(ONLY_DEFAULT) - own)
    if unknown:
        raise RequestError(f"unknown or unsupported body field(s) {', '.join(map(repr, unknown))} for "
                           f"{obj['url']}")
    for name, default in ONLY_DEFAULT.items():
        if body.get(name, default) not in (default, None) and not (name == "logit_bias" and body[name] == {}):
            raise RequestError(f"field 'body.{name}' = {body[name]!r} is not supported (only {default!r})")
    native = {"id": obj["custom_id"], **{name: body[name] for name in passed if body.get(name) is not None}}
    if chat:
        tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        native["max_tokens"] = default_max_tokens if tokens is None else tokens
    else:
        native.update(_completion_prompt(body))
        native["max_tokens"] = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        native.update(_completion_logprobs(body.get("logprobs")))
    return native, reply_settings(obj)


def _completion_prompt(body: dict) -> dict:
    """A completion's prompt: text, or token ids (one prompt per line; several are several lines)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": prompt}
    raise RequestError("field 'body.prompt' must be a string or a list of token ids (one prompt per "
                       f"line), got {type(prompt).__name__}")


def _completion_logprobs(value) -> dict:
    """The completions API's `logprobs` (an integer: how many top tokens per position)."""
    if value is None:
        return {}
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise RequestError(f"field 'body.logprobs' must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], "
                           f"got {value!r}")
    return {"logprobs": True, "top_logprobs": value}


# ---- results out ----

def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def output_record(result, line_number: int | None = None) -> dict:
    """The batch output line of an engine Result (runtime/engine.py) of an OpenAI Batch line: a 200
    with the completion, or a 400 with OpenAI's error object for a request that could not run."""
    settings = result.openai
    cid = settings["custom_id"]
    key = cid if cid is not None else f"line {line_number}"
    record = {"id": f"batch_req_{_digest(key)}", "custom_id": cid}
    if result.error is not None:
        body = {"error": {"message": result.error, "type": "invalid_request_error", "param": None,
                          "code": None}}
        status = 400
    else:
        body = (_chat_completion if settings["url"] == CHAT else _text_completion)(result, settings, key)
        status = 200
    record["response"] = {"status_code": status, "request_id": f"req_{_digest(key)}", "body": body}
    record["error"] = None
    if cid is None:
        record["line"] = line_number  # no usable custom_id: the line number identifies it
    return record


def _usage(result) -> dict:
    prompt, completion = result.prompt_tokens, len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _chat_completion(result, settings: dict, key: str) -> dict:
    chat = result.chat or {"messages": [], "channels": {}}
    channels = chat["channels"]
    message = {"role": "assistant", "content": channels.get("final"),
               "reasoning_content": channels.get("analysis")}
    if not chat["messages"]:  # nothing Harmony could read (a reply cut before its first message)
        message["content"] = result.text or None
    reason = result.finish_reason
    if chat.get("tool_calls"):
        message["tool_calls"] = chat["tool_calls"]
        reason = "tool_calls" if reason == "stop" else reason
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    if result.logprobs is not None:
        choice["logprobs"] = {"content": _chat_logprobs(result)}
    return {"id": f"chatcmpl-{_digest(key)}", "object": "chat.completion", "created": int(time.time()),
            "model": settings["model"], "choices": [choice], "usage": _usage(result)}


def _text_completion(result, settings: dict, key: str) -> dict:
    choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    if result.logprobs is not None:
        choice["logprobs"] = _completion_logprobs_object(result)
    return {"id": f"cmpl-{_digest(key)}", "object": "text_completion", "created": int(time.time()),
            "model": settings["model"], "choices": [choice], "usage": _usage(result)}


def _token_text(token: int) -> tuple[str, list[int]]:
    from runtime.harmony import get_harmony

    harmony = get_harmony()
    try:
        raw = bytes(harmony.encoding.decode_bytes([token]))
    except Exception:  # noqa: BLE001 - an id outside harmony's table
        raw = harmony.decode([token]).encode()
    return raw.decode("utf-8", errors="replace"), list(raw)


def _chat_logprobs(result) -> list[dict]:
    """OpenAI's chat `logprobs.content`: per token of `message.content` (the final channel's body;
    every generated token where Harmony read no message) its text, bytes, logprob and the most likely
    alternatives. Harmony's headers, message ends and the analysis channel are not content."""
    entries = []
    owners = result.chat["token_channels"] if result.chat and result.chat["messages"] else None
    for i, (token, logprob) in enumerate(zip(result.token_ids, result.logprobs)):
        if owners is not None and owners[i] != "final":
            continue
        text, raw = _token_text(token)
        entry = {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": []}
        for alt, alt_logprob in (result.top_logprobs[i] if result.top_logprobs else []):
            alt_text, alt_raw = _token_text(alt)
            entry["top_logprobs"].append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        entries.append(entry)
    return entries


def _completion_logprobs_object(result) -> dict:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, offset = [], [], 0
    for token in result.token_ids:
        text, _ = _token_text(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = None
    if result.top_logprobs:
        top = [{_token_text(t)[0]: lp for t, lp in pairs} for pairs in result.top_logprobs]
    return {"tokens": tokens, "token_logprobs": list(result.logprobs), "top_logprobs": top,
            "text_offset": offsets}


def is_record(record: Any) -> bool:
    """Whether a parsed output line is a batch output line this module writes."""
    return (isinstance(record, dict) and isinstance(record.get("id"), str)
            and record["id"].startswith("batch_req_") and "custom_id" in record
            and isinstance(record.get("response"), dict) and "error" in record)


def record_key(record: dict) -> tuple:
    cid = record.get("custom_id")
    return ("id", cid) if isinstance(cid, str) else ("line", record.get("line"))


def record_failed(record: dict) -> bool:
    return record.get("error") is not None or record["response"].get("status_code") != 200
