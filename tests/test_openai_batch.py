"""OpenAI Batch API files through the batch job: lines in OpenAI's request shape beside native ones,
results in OpenAI's batch output shape, bad lines as OpenAI's errors, resume by custom_id."""

import json

import pytest

from batch_jobs import config
from launch import batch
from runtime import openai_batch
from runtime.requests import RequestError

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"


def openai_line(custom_id, url=CHAT_URL, **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-oss-20b", **body}}


def chat_line(custom_id, **body):
    return openai_line(custom_id, messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}], **body)


GOOD = [
    chat_line("chat", max_tokens=6, temperature=0),
    chat_line("chat-logprobs", max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
              reasoning_effort="low"),
    openai_line("text", COMPLETIONS_URL, prompt="The capital of France is", max_tokens=4, temperature=0,
                logprobs=2),
    openai_line("text-tokens", COMPLETIONS_URL, prompt=[200006, 1428, 200008], seed=3),
    {"id": "native", "prompt": "Hello", "max_tokens": 3, "temperature": 0},
]
# The native format's bad-input cases (tests/test_batch.py BAD), each in the OpenAI format, and the
# format's own: (line, words its error message holds)
BAD = [
    (chat_line("unknown-field", max_tokns=4), "max_tokns"),
    (openai_line("too-long", COMPLETIONS_URL, prompt=list(range(200)), max_tokens=4), "context limit"),
    (chat_line("negative", max_tokens=-1), "max_tokens"),
    ({"method": "POST", "url": CHAT_URL, "body": {"messages": [{"role": "user", "content": "x"}]}},
     "custom_id"),
    (chat_line("bad-url") | {"url": "/v1/embeddings"}, "url"),
    (chat_line("bad-method") | {"method": "GET"}, "method"),
    (chat_line("n", n=2), "body.n"),
    (chat_line("bad-role") | {"body": {"messages": [{"role": "robot", "content": "x"}]}}, "role"),
    (chat_line("no-body") | {"body": "text"}, "body"),
    (openai_line("bad-logprobs", COMPLETIONS_URL, prompt="x", logprobs=9), "body.logprobs"),
    (chat_line("bad-stop", stop=[1, 2]), "'stop'"),
    (chat_line("bad-top-logprobs", logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat_line("bad-schema", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format"),
    (chat_line("bad-tool-choice", tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_job(checkpoint, inp, out, **overrides):
    return batch.run(config("batch", checkpoint=checkpoint, input=inp, output=out, max_model_len=128,
                            progress=False, **overrides))


def check_record_shape(record):
    """OpenAI's batch output line: id, custom_id, response {status_code, request_id, body}, error."""
    # and "line" for a line without a usable custom_id (the line number identifies it)
    assert list(record) == ["id", "custom_id", "response", "error"] + (["line"] if record["custom_id"] is None
                                                                       else [])
    assert record["id"].startswith("batch_req_") and record["error"] is None
    response = record["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    assert response["request_id"].startswith("req_")


def check_usage(usage, completion_tokens):
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert usage["completion_tokens"] == completion_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + completion_tokens
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def check_chat_completion(body, max_tokens):
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-oss-20b" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"} and choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    message = choice["message"]
    assert message["role"] == "assistant" and set(message) <= {"role", "content", "reasoning_content",
                                                               "tool_calls"}
    assert all(message[k] is None or isinstance(message[k], str) for k in ("content", "reasoning_content"))
    tokens = body["usage"]["completion_tokens"]
    assert 1 <= tokens <= max_tokens
    check_usage(body["usage"], tokens)
    return choice


def check_text_completion(body, max_tokens):
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and isinstance(choice["text"], str)
    assert 1 <= body["usage"]["completion_tokens"] <= max_tokens
    check_usage(body["usage"], body["usage"]["completion_tokens"])
    return choice


def test_both_formats_in_one_file_each_line_answered_in_its_own(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, GOOD[:2] + [line for line, _ in BAD[:3]] + GOOD[2:] + [line for line, _ in BAD[3:]])
    stats = run_job(tiny_checkpoints["original"], inp, out)
    rows = read_output(out)
    assert len(rows) == len(GOOD) + len(BAD) and stats["errors"] == len(BAD)
    by_key = {r.get("custom_id", r.get("id")) or f"line {r['line']}": r for r in rows}

    chat = check_chat_completion(by_key["chat"]["response"]["body"], 6)
    assert chat["logprobs"] is None
    with_logprobs = check_chat_completion(by_key["chat-logprobs"]["response"]["body"], 5)
    content = with_logprobs["logprobs"]["content"]
    assert len(content) == by_key["chat-logprobs"]["response"]["body"]["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-4)  # greedy
    text = check_text_completion(by_key["text"]["response"]["body"], 4)
    logprobs = text["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["top_logprobs"]) == len(logprobs["text_offset"])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    # /v1/completions without max_tokens: OpenAI's default of 16
    assert check_text_completion(by_key["text-tokens"]["response"]["body"], 16)["logprobs"] is None
    assert by_key["text-tokens"]["response"]["body"]["usage"]["prompt_tokens"] == 3
    for key in ("chat", "chat-logprobs", "text", "text-tokens"):
        check_record_shape(by_key[key])
        assert by_key[key]["response"]["status_code"] == 200
    assert by_key["native"]["finish_reason"] in ("stop", "length") and "token_ids" in by_key["native"]

    for line, words in BAD:
        record = by_key[openai_batch.custom_id(line) or "line 9"]
        check_record_shape(record)
        assert record["response"]["status_code"] == 400
        error = record["response"]["body"]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert words in error["message"], (key, error["message"])
    assert by_key["line 9"]["custom_id"] is None and by_key["line 9"]["line"] == 9


def test_resume_by_custom_id_and_retry_errors(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    first = [chat_line("a", max_tokens=3, temperature=0), chat_line("b", max_tokens=-1)]
    write_lines(inp, first)
    assert run_job(tiny_checkpoints["original"], inp, out)["errors"] == 1
    done = out.read_text()
    # The user fixes "b" and adds "c" (and a native line whose id repeats a custom_id: one namespace).
    write_lines(inp, [first[0], chat_line("b", max_tokens=3, temperature=0),
                      openai_line("c", COMPLETIONS_URL, prompt="x", max_tokens=2),
                      {"id": "a", "prompt": "y", "max_tokens": 2}])
    stats = run_job(tiny_checkpoints["original"], inp, out)
    assert stats["requests"] == 2 and stats["skipped"] == 2  # "a" and "b" (its error) stay
    rows = read_output(out)
    assert out.read_text().startswith(done.splitlines()[0])
    assert [r.get("custom_id") for r in rows] == ["a", "b", "c", None]
    assert rows[1]["response"]["status_code"] == 400 and "already used by line 1" in rows[3]["error"]
    stats = run_job(tiny_checkpoints["original"], inp, out, retry_errors=True)
    rows = read_output(out)
    assert stats["requests"] == 2 and rows[1]["response"]["status_code"] == 200


def test_to_native_maps_the_body():
    native, reply = openai_batch.to_native(chat_line("x", max_completion_tokens=7, stop="\n", seed=1,
                                                     user="u", metadata={"k": "v"}), 256)
    assert native == {"id": "x", "messages": chat_line("x")["body"]["messages"], "stop": "\n", "seed": 1,
                      "max_tokens": 7}
    assert reply == {"custom_id": "x", "url": CHAT_URL, "model": "gpt-oss-20b"}
    native, _ = openai_batch.to_native(openai_line("t", COMPLETIONS_URL, prompt=["one prompt"]), 256)
    assert native == {"id": "t", "prompt": "one prompt", "max_tokens": 16}
    with pytest.raises(RequestError, match="body.prompt"):
        openai_batch.to_native(openai_line("t", COMPLETIONS_URL, prompt=["two", "prompts"]), 256)
    with pytest.raises(RequestError, match="body.frequency_penalty"):
        openai_batch.to_native(chat_line("x", frequency_penalty=0.5), 256)
    assert not openai_batch.is_openai({"id": 1, "prompt": "x"}) and openai_batch.is_openai({"body": {}})


def test_chat_logprobs_cover_the_message_content_only():
    """`logprobs.content` lists the tokens of `message.content` (the final channel's body), as OpenAI's
    chat completions do: not Harmony's headers, message ends or the analysis channel."""
    from runtime.engine import Result
    from runtime.harmony import get_harmony

    h = get_harmony()
    reply = ("<|channel|>analysis<|message|>let me think<|end|><|start|>assistant<|channel|>final"
             "<|message|>Hi there<|return|>")
    tokens = h.encoding.encode(reply, allowed_special="all")
    result = Result("r", tokens, [-0.5 - i for i in range(len(tokens))], finish_reason="stop",
                    chat=h.parse_completion(tokens), openai={"custom_id": "r", "url": CHAT_URL, "model": "m"})
    choice = openai_batch.output_record(result)["response"]["body"]["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"] == "Hi there"
    first = tokens.index(200008, tokens.index(200008) + 1) + 1  # the final message's first body token
    assert [e["logprob"] for e in content] == [-0.5 - i for i in range(first, first + len(content))]
    # where Harmony read no message, every generated token is content, as the text is
    text = [24912, 2375]
    garbage = Result("g", text, [-1.0, -2.0], finish_reason="length", chat=h.parse_completion(text),
                     openai={"custom_id": "g", "url": CHAT_URL, "model": "m"})
    choice = openai_batch.output_record(garbage)["response"]["body"]["choices"][0]
    assert len(choice["logprobs"]["content"]) == 2
