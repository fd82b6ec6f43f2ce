"""Harmony chat format (openai-harmony): prompts in, channels out, and the tokenizer vocab offline.

openai-harmony downloads the o200k_base vocabulary on first use unless TIKTOKEN_ENCODINGS_BASE names
a folder holding it. Machines without the internet still work: the vocab is taken from that
folder, from our cache folder, or unpacked from the copy inside the bpe-openai package, each checked
by sha256; only when none exists is harmony left to download it.

The system message carries no date: outputs must not change from one day to the next.
"""

from __future__ import annotations

import gzip
import hashlib
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

_vocab_folder: list = []  # memo of ensure_vocab's answer: [folder or None]


class HarmonyInputError(ValueError):
    """A chat that cannot be rendered; the message names the message index and field."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundled_vocab() -> Path | None:
    """bpe-openai's gzipped copy of the vocab, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{VOCAB_FILE}.gz"
    return path if path.is_file() else None


def _unpack(source: Path, folder: Path) -> bool:
    """Gunzip `source` into folder/VOCAB_FILE atomically, keeping it only if the checksum is right."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{VOCAB_FILE}.")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
        if _sha256(Path(tmp)) != VOCAB_SHA256:
            print(f"warning: {source} does not unpack to the expected o200k_base vocab; not using it", file=sys.stderr)
            return False
        os.replace(tmp, folder / VOCAB_FILE)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_vocab() -> str | None:
    """Point openai-harmony at a local o200k_base vocab; returns the folder, or None to let it download."""
    if _vocab_folder:
        return _vocab_folder[0]
    folder = None
    given = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if given and (Path(given) / VOCAB_FILE).is_file():
        folder = given
    else:
        cache = cache_dir("tiktoken")
        cached = cache / VOCAB_FILE
        if cached.is_file() and _sha256(cached) == VOCAB_SHA256:
            folder = str(cache)
        else:
            bundled = _bundled_vocab()
            if bundled is not None and _unpack(bundled, cache):
                folder = str(cache)
    if folder is not None:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    _vocab_folder.append(folder)
    return folder


class Harmony:
    """The gpt-oss Harmony encoding: render chats, encode/decode text, parse completions."""

    def __init__(self):
        import openai_harmony as oh

        ensure_vocab()
        self._oh = oh
        self.encoding = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)

    def stop_token_ids(self) -> list[int]:
        """What ends an assistant turn while sampling: <|return|> and <|call|> (not <|end|>)."""
        return list(self.encoding.stop_tokens_for_assistant_actions())

    def encode_text(self, text: str) -> list[int]:
        # Special-token text inside user text ("<|start|>") stays ordinary text, never a control token.
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, token_ids: list[int]) -> str:
        try:
            return self.encoding.decode(token_ids, errors="replace")
        except Exception:  # an id harmony does not know (reserved range): decode around it
            return "".join(self._decode_one(t) for t in token_ids)

    def _decode_one(self, token: int) -> str:
        try:
            return self.encoding.decode([token], errors="replace")
        except Exception:
            return f"<|reserved_{token}|>"

    def render_prompt(self, messages, reasoning_effort: str | None = None) -> list[int]:
        """Token ids of a chat (OpenAI-style message dicts) followed by `<|start|>assistant`."""
        oh = self._oh
        effort = _check_effort(reasoning_effort)
        system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
        rendered = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        for m in _check_messages(messages):
            role, content = m["role"], m["content"]
            if role in ("system", "developer"):
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
        """Generated assistant tokens -> {"messages": [...], "channels": {channel: text}}.

        Tolerates a reply cut short (the partial last message is kept) and garbage (parsing stops,
        what was parsed is kept, and `parse_error` says why).
        """
        parser = self._oh.StreamableParser(self.encoding, self._oh.Role.ASSISTANT)
        error = None
        for token in token_ids:
            try:
                parser.process(token)
            except Exception as e:  # harmony raises its own error types
                error = f"at token {token}: {e}"
                break
        messages = [_message_dict(m.channel, m.recipient, "".join(c.text for c in m.content if hasattr(c, "text")))
                    for m in parser.messages]
        if error is None and parser.current_content:
            messages.append(_message_dict(parser.current_channel, parser.current_recipient, parser.current_content))
        channels: dict[str, str] = {}
        for m in messages:
            if m["channel"] is not None:
                channels[m["channel"]] = channels.get(m["channel"], "") + m["content"]
        out = {"messages": messages, "channels": channels}
        if error is not None:
            out["parse_error"] = error
        return out


def _message_dict(channel, recipient, content: str) -> dict:
    return {"channel": channel, "recipient": recipient, "content": content}


def _check_effort(effort) -> str:
    if effort is None:
        return "medium"
    if effort not in REASONING_EFFORTS:
        raise HarmonyInputError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
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
            raise HarmonyInputError(f"messages[{i}].role: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise HarmonyInputError(f"messages[{i}].content must be a string")
        if m["role"] in ("system", "developer") and i != 0:
            raise HarmonyInputError(f"messages[{i}]: a {m['role']} message must come first")
        if "channel" in m and (m["role"] != "assistant" or m["channel"] not in CHANNELS):
            raise HarmonyInputError(
                f"messages[{i}].channel: only assistant messages take a channel, one of {', '.join(CHANNELS)}")
    return messages


_singleton: list[Harmony] = []


def get_harmony() -> Harmony:
    """The shared Harmony encoding (loading it parses the 200k-token vocab once)."""
    if not _singleton:
        _singleton.append(Harmony())
    return _singleton[0]
