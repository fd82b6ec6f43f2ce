"""Harmony: the vocab found offline, prompts rendered, completions parsed into channels."""

import hashlib
import os

import pytest

from runtime import harmony
from runtime.harmony import HarmonyInputError, get_harmony


@pytest.fixture
def fresh_vocab_lookup(monkeypatch, tmp_path):
    monkeypatch.setattr(harmony, "_vocab_folder", [])
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("GPT_OSS_CACHE", str(tmp_path))
    return tmp_path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


needs_bpe_openai = pytest.mark.skipif(harmony._bundled_vocab() is None, reason="bpe-openai is not installed")


@needs_bpe_openai
def test_vocab_unpacked_from_bpe_openai_and_checked(fresh_vocab_lookup):
    folder = harmony.ensure_vocab()
    vocab = fresh_vocab_lookup / "tiktoken" / harmony.VOCAB_FILE
    assert folder == str(vocab.parent) and os.environ["TIKTOKEN_ENCODINGS_BASE"] == folder
    assert sha(vocab) == harmony.VOCAB_SHA256


@needs_bpe_openai
def test_corrupt_cached_vocab_is_replaced(fresh_vocab_lookup, monkeypatch):
    vocab = fresh_vocab_lookup / "tiktoken" / harmony.VOCAB_FILE
    vocab.parent.mkdir(parents=True)
    vocab.write_text("not a vocab")
    assert harmony.ensure_vocab() == str(vocab.parent) and sha(vocab) == harmony.VOCAB_SHA256
    monkeypatch.setattr(harmony, "_vocab_folder", [])
    monkeypatch.setattr(harmony, "_bundled_vocab", lambda: None)  # the good cached copy is used as is
    assert harmony.ensure_vocab() == str(vocab.parent)


def test_without_any_local_copy_harmony_is_left_to_download(fresh_vocab_lookup, monkeypatch):
    monkeypatch.setattr(harmony, "_bundled_vocab", lambda: None)
    assert harmony.ensure_vocab() is None and "TIKTOKEN_ENCODINGS_BASE" not in os.environ


def test_render_chat():
    h = get_harmony()
    ids = h.render_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "high")
    text = h.decode(ids)
    assert ids[0] == 200006 and text.endswith("<|start|>assistant")
    assert "Reasoning: high" in text and "# Instructions\n\nBe brief." in text and "<|start|>user<|message|>Hi<|end|>" in text
    assert "Current date" not in text  # outputs must not change from day to day
    assert "Reasoning: medium" in h.decode(h.render_prompt([{"role": "user", "content": "Hi"}]))
    assert set(h.stop_token_ids()) == {200002, 200012}


def test_special_token_text_in_user_text_stays_text():
    assert 200006 not in get_harmony().encode_text("hello <|start|> world")


def test_parse_completion_channels_truncation_and_garbage():
    h = get_harmony()
    reply = "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Hi there<|return|>"
    tokens = h.encoding.encode(reply, allowed_special="all")
    assert h.parse_completion(tokens)["channels"] == {"analysis": "think", "final": "Hi there"}
    cut = h.parse_completion(tokens[:-2])  # cut inside the final message: "Hi" of "Hi there"
    assert cut["channels"] == {"analysis": "think", "final": "Hi"}
    garbage = h.parse_completion([5, 200006, 200008, 200002, 12, 200012, 201000])
    assert set(garbage) >= {"messages", "channels"}
    assert "<|reserved_201000|>" in h.decode([201000])


@pytest.mark.parametrize("messages, effort, words", [
    ([], None, "non-empty list"),
    ("hi", None, "non-empty list"),
    ([{"role": "bot", "content": "x"}], None, "messages[0].role"),
    ([{"role": "user"}], None, "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], None, "messages[1]"),
    ([{"role": "user", "content": "x", "name": "n"}], None, "'name'"),
    ([{"role": "user", "content": "x"}], "extreme", "reasoning_effort"),
])
def test_bad_chats_are_named(messages, effort, words):
    with pytest.raises(HarmonyInputError, match=words.replace("[", "\\[").replace("]", "\\]")):
        get_harmony().render_prompt(messages, effort)
