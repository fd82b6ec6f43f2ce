"""Harmony chat format (openai-harmony): prompts in, channels out, and the tokenizer vocab offline.

openai-harmony downloads the o200k_base vocabulary on first use unless TIKTOKEN_ENCODINGS_BASE names
a folder holding it, so machines without the internet would fail. ensure_vocab() points it at a
local copy instead: the folder already named there, our cache folder, or a copy unpacked from the
bpe-openai package, each checked by sha256. Only when none exists is harmony left to download.

The system message carries no date (harmony's SystemContent.new() adds none, and we never set one):
the same request must render to the same tokens, and so give the same output, on any day.

Chats are OpenAI Chat Completions messages (system, developer, user, assistant with reasoning_content
and tool_calls, tool) with optional OpenAI function tools; tool_calls() turns a parsed completion's
calls back into OpenAI's shape, with ids derived from the calls (no randomness either).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from runtime.cache import cache_dir

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant", "tool")
INSTRUCTION_ROLES = ("system", "developer")  # the user's "system prompt": Harmony's developer message
FIELDS = {  # each field a message may carry -> the roles that take it
    "role": ROLES,
    "content": ROLES,
    "name": ROLES,  # OpenAI's optional participant name: ignored, except as a tool message's function
    "channel": ("assistant",),
    "reasoning_content": ("assistant",),  # vLLM's field for the analysis channel
    "reasoning": ("assistant",),  # newer vLLM's name for it
    "tool_calls": ("assistant",),
    "tool_call_id": ("tool",),
}
CHANNELS = ("analysis", "commentary", "final")
FUNCTIONS = "functions."  # Harmony's namespace for the developer's tools: a call goes to=functions.NAME
JSON_CALL = "<|constrain|>json"  # the content type gpt-oss writes in a call's header
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a tool's name
END_OF_TEXT = 199999  # a stop token for the engine (raw-text mode) that harmony's parser treats as text
MESSAGE_ENDS = (200002, 200007, 200012)  # <|return|>, <|end|>, <|call|>
MESSAGE = 200008  # <|message|>: a header's end, a body's start

_vocab_folder: list = []  # memo of ensure_vocab's answer: [folder or None]
_singleton: list = []  # memo of get_harmony's Harmony


class HarmonyInputError(ValueError):
    """A chat that cannot be rendered; the message names the message index and field."""


# ---- the vocab, offline ----

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundled_vocab() -> Path | None:
    """bpe-openai's gzipped copy of the vocab; find_spec locates it without importing the package."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{VOCAB_FILE}.gz"
    return path if path.is_file() else None


def _unpack(source: Path, folder: Path) -> bool:
    """Gunzip `source` to folder/VOCAB_FILE. A temp file and os.replace mean that a concurrent reader
    (another rank, another process) never sees half a file; a wrong checksum leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{VOCAB_FILE}.")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
        if _sha256(Path(tmp)) != VOCAB_SHA256:
            print(f"warning: {source} does not unpack to the expected o200k_base vocab; not using it",
                  file=sys.stderr)
            return False
        os.replace(tmp, folder / VOCAB_FILE)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _local_vocab_folder() -> str | None:
    given = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if given and (Path(given) / VOCAB_FILE).is_file():
        return given  # the user's choice, used as is
    try:
        cache = cache_dir("tiktoken")
        cached = cache / VOCAB_FILE
        if cached.is_file() and _sha256(cached) == VOCAB_SHA256:
            return str(cache)
        bundled = _bundled_vocab()
        if bundled is not None and _unpack(bundled, cache):
            return str(cache)
    except OSError as e:  # e.g. a read-only home: harmony may still manage by downloading
        print(f"warning: cannot prepare the o200k_base vocab in the cache folder: {e}", file=sys.stderr)
    return None


def ensure_vocab() -> str | None:
    """Point openai-harmony at a local o200k_base vocab; returns the folder, or None to let it download.

    Harmony reads only TIKTOKEN_ENCODINGS_BASE for this (TIKTOKEN_RS_CACHE_DIR is not needed)."""
    if not _vocab_folder:
        folder = _local_vocab_folder()
        if folder is not None:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
        _vocab_folder.append(folder)
    return _vocab_folder[0]


# ---- the encoding ----

class Harmony:
    """The gpt-oss Harmony encoding: render chats, encode/decode text, parse completions."""

    def __init__(self):
        import openai_harmony as oh  # loads the vocab: only after ensure_vocab()

        ensure_vocab()
        self._oh = oh
        self.encoding = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)

    def stop_token_ids(self) -> list[int]:
        """What ends an assistant turn while sampling: <|return|> and <|call|> (not <|end|>)."""
        return list(self.encoding.stop_tokens_for_assistant_actions())

    def encode_text(self, text: str) -> list[int]:
        # "<|start|>" typed by a user stays ordinary text, never a control token: a raw prompt must
        # not be able to forge message boundaries. (harmony raises on such text by default.)
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, token_ids: list[int]) -> str:
        """Text with special tokens spelled out; bad UTF-8 becomes U+FFFD rather than an error."""
        token_ids = list(token_ids)
        try:
            return self.encoding.decode(token_ids, errors="replace")
        except (self._oh.HarmonyError, OverflowError, TypeError):  # an id outside harmony's table
            # (>= 201089, or negative): decode around it rather than lose the whole text
            return "".join(self._decode_one(t) for t in token_ids)

    def _decode_one(self, token: int) -> str:
        try:
            return self.encoding.decode([token], errors="replace")
        except (self._oh.HarmonyError, OverflowError, TypeError):
            return f"<|reserved_{token}|>"

    def render_prompt(self, messages: list[dict], reasoning_effort: str | None = None,
                      tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat (OpenAI Chat Completions messages, and OpenAI function `tools` if any)
        followed by `<|start|>assistant`."""
        oh = self._oh
        effort = _check_effort(reasoning_effort)
        functions = check_tools(tools)
        chat = _check_messages(messages)
        system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
        rendered = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        developer = self._developer_message(chat, functions)
        if developer is not None:
            rendered.append(developer)
        for m in chat:
            rendered += self._harmony_messages(m)
        conversation = oh.Conversation.from_messages(_drop_finished_reasoning(rendered))
        # harmony's own dropping is off: it drops only before the first final message, and only when
        # the last assistant message is final, so a multi-turn chat would keep finished turns' reasoning
        config = oh.RenderConversationConfig(auto_drop_analysis=False)
        return list(self.encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT, config))

    def _developer_message(self, chat: list[dict], functions: list[dict]):
        """The leading system/developer messages' text, joined, and the function tools; None for neither."""
        oh = self._oh
        instructions = [m["content"] for m in chat if m["role"] in INSTRUCTION_ROLES]
        if not instructions and not functions:
            return None
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if functions:
            developer = developer.with_function_tools(
                [oh.ToolDescription.new(f["name"], f["description"], f["parameters"]) for f in functions])
        return oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer)

    def _harmony_messages(self, m: dict) -> list:
        """One checked chat message as Harmony messages (an assistant message may become several)."""
        oh = self._oh
        if m["role"] == "user":
            return [oh.Message.from_role_and_content(oh.Role.USER, m["content"])]
        if m["role"] == "tool":  # a function's answer, from functions.NAME to the assistant
            author = oh.Author.new(oh.Role.TOOL, FUNCTIONS + m["function"])
            return [oh.Message.from_author_and_content(author, m["content"])
                    .with_channel("commentary").with_recipient("assistant")]
        if m["role"] == "assistant":
            return self._assistant_messages(m)
        return []  # system and developer messages went into the developer message

    def _assistant_messages(self, m: dict) -> list:
        """In the order the model writes them: reasoning, then text (a preamble beside calls), then calls."""
        oh = self._oh

        def says(text: str, channel: str):
            return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)

        out = []
        if m["reasoning"]:
            out.append(says(m["reasoning"], "analysis"))
        if m["content"] or (m["content"] is not None and not m["calls"]):  # "" beside calls says nothing
            out.append(says(m["content"], m["channel"]))
        for call in m["calls"]:
            out.append(says(call["arguments"], "commentary").with_recipient(FUNCTIONS + call["name"])
                       .with_content_type(JSON_CALL))
        return out

    def tool_calls(self, parsed: dict) -> list[dict]:
        """The module's tool_calls(parsed), for callers that hold a Harmony."""
        return tool_calls(parsed)

    def parse_completion(self, token_ids: list[int]) -> dict:
        """Generated assistant tokens -> {"messages": [{channel, recipient, content}],
        "channels": {channel: text}, "token_channels": [channel or None per token]}.

        Never raises: a reply cut short keeps its partial last message, and on garbage the messages
        parsed so far are kept and `parse_error` says what went wrong.
        """
        tokens = list(token_ids)
        if tokens and tokens[-1] == END_OF_TEXT:
            tokens.pop()  # the engine stopped on it; harmony would add "<|endoftext|>" to the text
        parser = self._oh.StreamableParser(self.encoding, self._oh.Role.ASSISTANT)
        error, consumed = None, tokens
        for i, token in enumerate(tokens):
            try:
                parser.process(token)
            except Exception as e:  # noqa: BLE001 - model output, however bad, must not fail the request
                error, consumed = f"token {i} (id {token}): {e}", tokens[:i]
                break
        messages = [_message_dict(m.channel, m.recipient, "".join(getattr(c, "text", "") for c in m.content))
                    for m in parser.messages]
        partial, header_error = self._unfinished(parser, consumed)
        if partial is not None:
            messages.append(partial)
        out = {"messages": messages, "channels": by_channel(messages),
               "token_channels": _token_channels(consumed, messages, len(token_ids))}
        if error or header_error:
            out["parse_error"] = error or header_error
        return out

    def _unfinished(self, parser, consumed: list[int]) -> tuple[dict | None, str | None]:
        """The message the completion stopped in: (partial message, None) inside its content, or
        (None, error) for a header that swallowed a message end (strict harmony reports nothing)."""
        state = parser.state_data
        if state.get("state") == "Content":
            # The body is everything after the first <|message|> since the last message end. Decoded
            # here because harmony holds back the bytes of a character cut in half, even from
            # state_data's content_tokens; we show them as U+FFFD instead.
            start = max((i for i, t in enumerate(consumed) if t in MESSAGE_ENDS), default=-1) + 1
            body = consumed[consumed.index(MESSAGE, start) + 1:]
            return _message_dict(parser.current_channel, parser.current_recipient, self.decode(body)), None
        header = state.get("header_tokens") or []
        if state.get("state") == "Header" and any(t in MESSAGE_ENDS for t in header):
            return None, f"a message ended before <|message|>; its header reads {self.decode(header)!r}"
        return None, None


def _token_channels(consumed: list[int], messages: list[dict], count: int) -> list[str | None]:
    """Per generated token, the channel whose message body holds it (None for headers, message ends
    and tokens after a parse error): the k-th <|message|> opens the k-th parsed message's body."""
    owners, channel, opened = [], None, 0
    for token in consumed:
        if token == MESSAGE:
            owners.append(None)
            channel = messages[opened]["channel"] if opened < len(messages) else None
            opened += 1
        elif token in MESSAGE_ENDS:
            owners.append(None)
            channel = None
        else:
            owners.append(channel)
    return owners + [None] * (count - len(owners))


def _message_dict(channel, recipient, content: str) -> dict:
    return {"channel": channel, "recipient": recipient, "content": content}


def by_channel(messages: list[dict]) -> dict[str, str]:
    channels: dict[str, str] = {}
    for m in messages:
        if m["channel"] is not None:
            channels[m["channel"]] = channels.get(m["channel"], "") + m["content"]
    return channels


def _drop_finished_reasoning(messages: list) -> list:
    """Without the analysis messages that come before the last final message.

    gpt-oss's format shows the model its reasoning only for the turn in progress: once a turn ended in
    a final answer its reasoning is dropped, while reasoning that led to tool calls still awaiting a
    final answer is kept (the model reasons on from it after the tools' results)."""
    last_final = max((k for k, msg in enumerate(messages) if msg.author.role == "assistant"
                      and msg.channel == "final"), default=-1)
    return [msg for k, msg in enumerate(messages) if not (k < last_final and msg.channel == "analysis")]


def tool_calls(parsed: dict) -> list[dict]:
    """OpenAI `tool_calls` ({id, type: "function", function: {name, arguments}}) for the messages of a
    parse_completion() result that call one of the developer's functions (recipient functions.NAME), in
    order. The arguments are the model's text as is: the caller decides what to do with bad JSON, or
    with a call cut short (parse_completion keeps a partial last message)."""
    calls = []
    for m in parsed["messages"]:
        recipient = m["recipient"] or ""
        name = recipient[len(FUNCTIONS):]
        if recipient.startswith(FUNCTIONS) and name:  # other recipients (browser.search, python) aren't ours
            calls.append({"id": _call_id(len(calls), name, m["content"]), "type": "function",
                          "function": {"name": name, "arguments": m["content"]}})
    return calls


def _call_id(index: int, name: str, arguments: str) -> str:
    # Derived from the call rather than random: a batch job resumed after a crash redoes requests and must
    # write the same lines again. The index keeps two identical calls in one reply apart.
    key = json.dumps([index, name, arguments])
    return "call_" + hashlib.sha256(key.encode()).hexdigest()[:24]


# ---- input checks: errors name the message index and field, for API users ----

def _check_effort(effort) -> str:
    if effort is None:
        return "medium"  # harmony's own default
    if effort not in REASONING_EFFORTS:
        raise HarmonyInputError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                                f"got {effort!r}")
    return effort


def _reject_unknown(where: str, obj: dict, known) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise HarmonyInputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(messages) -> list[dict]:
    """The chat checked, each message in one shape: {role, content (a string, or None beside tool calls),
    channel, reasoning, calls: [{id, name, arguments}], function (a tool message's function)}."""
    if not isinstance(messages, list) or not messages:
        raise HarmonyInputError("field 'messages' must be a non-empty list of {role, content} objects")
    chat: list[dict] = []
    call_names: dict[str, str] = {}  # tool call id -> function name, for the tool messages that answer
    for i, m in enumerate(messages):
        _check_envelope(i, m)
        if m["role"] in INSTRUCTION_ROLES and chat and chat[-1]["role"] not in INSTRUCTION_ROLES:
            raise HarmonyInputError(
                f"messages[{i}].role: a {m['role']} message must come before all other messages")
        if m["role"] == "assistant":
            checked = _check_assistant(i, m)
            call_names.update((call["id"], call["name"]) for call in checked["calls"])
        elif m["role"] == "tool":
            checked = _check_tool_message(i, m, call_names)
        else:
            checked = _checked(m["role"], _check_content(i, m.get("content")))
        chat.append(checked)
    return chat


def _checked(role: str, content: str | None, channel=None, reasoning=None, calls=(), function=None) -> dict:
    return {"role": role, "content": content, "channel": channel, "reasoning": reasoning,
            "calls": list(calls), "function": function}


def _check_envelope(i: int, m) -> None:
    """What every message needs: an object, known fields that its role takes, a known role."""
    if not isinstance(m, dict):
        raise HarmonyInputError(f"messages[{i}] must be an object with 'role' and 'content'")
    _reject_unknown(f"messages[{i}]", m, FIELDS)
    if m.get("role") not in ROLES:
        raise HarmonyInputError(
            f"messages[{i}].role: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
    for field in m:
        if m["role"] not in FIELDS[field]:
            raise HarmonyInputError(f"messages[{i}].{field}: only {' and '.join(FIELDS[field])} messages "
                                    f"may have it, not {m['role']} messages")
    if "name" in m and not isinstance(m["name"], str):
        raise HarmonyInputError(f"messages[{i}].name: must be a string, got {_type_name(m['name'])}")


def _check_content(i: int, content) -> str:
    """A string, or OpenAI's content parts: text parts only, joined with nothing between them (as
    vLLM's gpt-oss path and harmony's own multi-part messages do)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_check_part(f"messages[{i}].content[{j}]", part) for j, part in enumerate(content))
    raise HarmonyInputError(f"messages[{i}].content: must be a string or a list of text parts, "
                            f"got {_type_name(content)}")


def _check_part(where: str, part) -> str:
    if not isinstance(part, dict):
        raise HarmonyInputError(f"{where}: must be an object {{type: 'text', text}}, got {_type_name(part)}")
    if part.get("type") != "text":
        raise HarmonyInputError(f"{where}.type: only 'text' parts are supported, got {part.get('type')!r}")
    _reject_unknown(where, part, ("type", "text"))
    if not isinstance(part.get("text"), str):
        raise HarmonyInputError(f"{where}.text: must be a string, got {_type_name(part.get('text'))}")
    return part["text"]


def _check_assistant(i: int, m: dict) -> dict:
    calls = _check_tool_calls(i, m.get("tool_calls"))
    content = m.get("content")
    if content is not None or not calls:  # OpenAI's content is null when the message only calls tools
        content = _check_content(i, content)
    if m.get("reasoning_content") is not None and m.get("reasoning") is not None:
        raise HarmonyInputError(f"messages[{i}].reasoning: give reasoning_content or reasoning, not both")
    field = "reasoning" if m.get("reasoning") is not None else "reasoning_content"
    reasoning = m.get(field)
    if reasoning is not None and not isinstance(reasoning, str):
        raise HarmonyInputError(f"messages[{i}].{field}: must be a string, got {_type_name(reasoning)}")
    # text beside tool calls is a preamble, on commentary: a final message would end the turn before them
    channel = m.get("channel", "commentary" if calls else "final")
    if channel not in CHANNELS:
        raise HarmonyInputError(f"messages[{i}].channel: must be one of {', '.join(CHANNELS)}, "
                                f"got {channel!r}")
    return _checked("assistant", content, channel, reasoning, calls)


def _check_tool_calls(i: int, calls) -> list[dict]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise HarmonyInputError(f"messages[{i}].tool_calls: must be a list, got {_type_name(calls)}")
    return [_check_tool_call(f"messages[{i}].tool_calls[{j}]", call) for j, call in enumerate(calls)]


def _check_tool_call(where: str, call) -> dict:
    if not isinstance(call, dict):
        raise HarmonyInputError(f"{where}: must be an object {{id, type: 'function', function}}, "
                                f"got {_type_name(call)}")
    _reject_unknown(where, call, ("id", "type", "function"))
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise HarmonyInputError(f"{where}.id: must be a non-empty string, got {call.get('id')!r}")
    if call.get("type", "function") != "function":
        raise HarmonyInputError(f"{where}.type: must be 'function', got {call['type']!r}")
    function = call.get("function")
    if not isinstance(function, dict):
        raise HarmonyInputError(f"{where}.function: must be an object {{name, arguments}}, "
                                f"got {_type_name(function)}")
    _reject_unknown(f"{where}.function", function, ("name", "arguments"))
    name = function.get("name")
    # no regex here, as the model may have called a name no tool has; but no space, which would end the
    # recipient in the header: "to=functions.a b" reads back as a call of "a"
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise HarmonyInputError(f"{where}.function.name: must be a non-empty string without spaces, "
                                f"got {name!r}")
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        raise HarmonyInputError(f"{where}.function.arguments: must be a string holding JSON, "
                                f"got {_type_name(arguments)}")
    try:
        json.loads(arguments)
    except ValueError as e:
        raise HarmonyInputError(f"{where}.function.arguments: not JSON ({e})") from None
    return {"id": call["id"], "name": name, "arguments": arguments}  # the text as given: what the model wrote


def _check_tool_message(i: int, m: dict, call_names: dict[str, str]) -> dict:
    """A function's result: its name is that of the earlier assistant call with this tool_call_id (or the
    message's own name, where no earlier call has the id)."""
    call_id, name = m.get("tool_call_id"), m.get("name")
    if not isinstance(call_id, str):
        raise HarmonyInputError(f"messages[{i}].tool_call_id: must be the id of the assistant's tool call "
                                f"this message answers, got {_type_name(call_id)}")
    if name is not None and (not name or any(c.isspace() for c in name)):
        raise HarmonyInputError(f"messages[{i}].name: must be a non-empty string without spaces, "
                                f"got {name!r}")
    called = call_names.get(call_id)
    if called is None and name is None:
        raise HarmonyInputError(f"messages[{i}].tool_call_id: {call_id!r} is the id of no earlier assistant "
                                f"tool call (and the message has no name)")
    if called is not None and name is not None and name != called:
        raise HarmonyInputError(f"messages[{i}].name: {name!r}, but tool call {call_id!r} called {called!r}")
    return _checked("tool", _check_content(i, m.get("content")), function=called or name)


def check_tools(tools) -> list[dict]:
    """OpenAI function tools -> [{name, description, parameters (None if not given)}], checked; the
    one check of a tool list (runtime/structured.py builds its call grammars on it)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise HarmonyInputError(f"tools: must be a list of {{type: 'function', function}} objects, "
                                f"got {_type_name(tools)}")
    functions = [_check_tool(f"tools[{i}]", tool) for i, tool in enumerate(tools)]
    names = [f["name"] for f in functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise HarmonyInputError(f"tools[{i}].function.name: {name!r} is defined twice")
    return functions


def _check_tool(where: str, tool) -> dict:
    if not isinstance(tool, dict):
        raise HarmonyInputError(f"{where}: must be an object {{type: 'function', function}}, "
                                f"got {_type_name(tool)}")
    _reject_unknown(where, tool, ("type", "function"))
    if tool.get("type") != "function":
        raise HarmonyInputError(f"{where}.type: must be 'function', got {tool.get('type')!r}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise HarmonyInputError(f"{where}.function: must be an object {{name, description, parameters}}, "
                                f"got {_type_name(function)}")
    # strict is accepted for OpenAI clients that send it, but nothing holds the model to the schema
    _reject_unknown(f"{where}.function", function, ("name", "description", "parameters", "strict"))
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise HarmonyInputError(f"{where}.function.name: must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise HarmonyInputError(f"{where}.function.description: must be a string, "
                                f"got {_type_name(description)}")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise HarmonyInputError(f"{where}.function.parameters: must be a JSON Schema object, "
                                f"got {_type_name(parameters)}")
    if function.get("strict") is not None and not isinstance(function["strict"], bool):
        raise HarmonyInputError(f"{where}.function.strict: must be true or false, "
                                f"got {_type_name(function['strict'])}")
    return {"name": name, "description": description or "", "parameters": parameters}


def get_harmony() -> Harmony:
    """The shared Harmony encoding (loading it parses the 200k-token vocab once)."""
    if not _singleton:
        _singleton.append(Harmony())
    return _singleton[0]
