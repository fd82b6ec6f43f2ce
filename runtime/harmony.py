"""Harmony chat format (openai-harmony): prompts in, channels out, and the tokenizer vocab offline.

openai-harmony downloads the o200k_base vocabulary on first use unless TIKTOKEN_ENCODINGS_BASE names
a folder holding it, so machines without the internet would fail. ensure_vocab() points it at a
local copy instead: the folder already named there, our cache folder, or a copy unpacked from the
bpe-openai package, each checked by sha256. Only when none exists is harmony left to download.

The system message carries no date (harmony's SystemContent.new() adds none, and we never set one):
the same request must render to the same tokens, and so give the same output, on any day.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from runtime.cache import cache_dir

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant")
CHANNELS = ("analysis", "commentary", "final")
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

    def render_prompt(self, messages: list[dict], reasoning_effort: str | None = None) -> list[int]:
        """Token ids of a chat (OpenAI-style message dicts) followed by `<|start|>assistant`."""
        oh = self._oh
        effort = _check_effort(reasoning_effort)
        system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
        rendered = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        for m in _check_messages(messages):
            role, content = m["role"], m["content"]
            if role in ("system", "developer"):  # the user's "system prompt" is Harmony's developer message
                dev = oh.DeveloperContent.new().with_instructions(content)
                rendered.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
            elif role == "user":
                rendered.append(oh.Message.from_role_and_content(oh.Role.USER, content))
            else:
                message = oh.Message.from_role_and_content(oh.Role.ASSISTANT, content)
                rendered.append(message.with_channel(m.get("channel", "final")))
        conversation = oh.Conversation.from_messages(rendered)
        return list(self.encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT))

    def parse_completion(self, token_ids: list[int]) -> dict:
        """Generated assistant tokens -> {"messages": [{channel, recipient, content}],
        "channels": {channel: text}}.

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
        out = {"messages": messages, "channels": _by_channel(messages)}
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


def _message_dict(channel, recipient, content: str) -> dict:
    return {"channel": channel, "recipient": recipient, "content": content}


def _by_channel(messages: list[dict]) -> dict[str, str]:
    channels: dict[str, str] = {}
    for m in messages:
        if m["channel"] is not None:
            channels[m["channel"]] = channels.get(m["channel"], "") + m["content"]
    return channels


# ---- input checks: errors name the message index and field, for API users ----

def _check_effort(effort) -> str:
    if effort is None:
        return "medium"  # harmony's own default
    if effort not in REASONING_EFFORTS:
        raise HarmonyInputError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                                f"got {effort!r}")
    return effort


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise HarmonyInputError("field 'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HarmonyInputError(f"messages[{i}] must be an object with 'role' and 'content'")
        unknown = sorted(set(m) - {"role", "content", "channel"})
        if unknown:
            raise HarmonyInputError(f"messages[{i}]: unknown field(s) {', '.join(map(repr, unknown))}")
        if m.get("role") not in ROLES:
            raise HarmonyInputError(
                f"messages[{i}].role: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise HarmonyInputError(f"messages[{i}].content: must be a string, "
                                    f"got {type(m.get('content')).__name__}")
        if m["role"] in ("system", "developer") and i != 0:
            raise HarmonyInputError(f"messages[{i}].role: a {m['role']} message must be the first message")
        if "channel" in m and (m["role"] != "assistant" or m["channel"] not in CHANNELS):
            raise HarmonyInputError(
                f"messages[{i}].channel: only assistant messages take a channel, "
                f"one of {', '.join(CHANNELS)}")
    return messages


def get_harmony() -> Harmony:
    """The shared Harmony encoding (loading it parses the 200k-token vocab once)."""
    if not _singleton:
        _singleton.append(Harmony())
    return _singleton[0]
