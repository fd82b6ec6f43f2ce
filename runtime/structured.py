"""Structured outputs: what a constrained request may generate next.

A request's `response_format` (OpenAI's text | json_object | json_schema) and forced tool calls
(`tools` with `tool_choice`) become one llguidance grammar (Lark syntax, JSON schemas inlined with
`%json`), checked field by field when the request is parsed. Each constrained request then gets a
Constraint, a matcher over the Harmony vocabulary: every step the engine fills the rows' bitmasks on
the host while the GPU runs the forward pass (fill_bitmasks, all rows in parallel, GIL released),
sets the disallowed logits to -inf (apply_bitmask) and hands each sampled token back (consume).

JSON is compact (no whitespace between tokens): with flexible whitespace a model, a random one most
of all, can emit blanks forever and never finish the object. Every grammar names its own end token,
so a constrained completion always ends on a token the engine stops on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json

import llguidance
import torch

from runtime.harmony import FUNCTION_NAME as NAME  # OpenAI's rule, for schema names too
from runtime.harmony import HarmonyInputError, check_tools

VOCAB_SIZE = 201088  # gpt-oss's config.vocab_size (harmony decodes one id more, which the model never emits)
# llguidance's JSON options: no whitespace anywhere, separators as json.dumps(separators=(",", ":")) writes
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
RESPONSE_TYPES = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("auto", "none", "required")
ANY_OBJECT = {"type": "object"}
# The analysis message runs free: FREE matches any text, and a terminal never matches a special token,
# so the message ends exactly at <|end|>.
ANALYSIS = 'analysis: <|channel|> "analysis" <|message|> FREE <|end|> <|start|> "assistant"\nFREE: /(?s:.*)/'


class StructureError(ValueError):
    """A response_format or tool schema that cannot be used; the message names the field, e.g.
    "response_format.json_schema.schema: ..." or "tools[1].function.parameters: ..."."""


# ---- the tokenizer and the executor, shared by every Constraint ----

class _HarmonyVocab:
    """What llguidance.TokenizerWrapper reads: every id's bytes, which ids are special (so grammars
    can name <|end|> and the like, and text never matches one), and how text tokenizes."""

    bos_token_id = None
    # What a stopped (or failed) matcher allows: <|endoftext|>, a token the engine stops on. Every
    # grammar here names its own end, so this never shows up before the grammar has ended.
    eos_token_id = 199999

    def __init__(self, encoding):
        self._encoding = encoding
        decode_bytes = getattr(encoding, "decode_bytes", None) or encoding._inner.decode_bytes
        self.tokens = [decode_bytes([t]) for t in range(VOCAB_SIZE)]
        # reserved ids are special too: no grammar names them, so no mask ever allows them
        self.special_token_ids = [t for t in range(VOCAB_SIZE) if encoding.is_special_token(t)]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # TokenizerWrapper probes with bytes, then passes str
        return self._encoding.encode(text, allowed_special=set(), disallowed_special=())


@functools.cache
def tokenizer() -> llguidance.LLTokenizer:
    """The Harmony vocabulary as an llguidance tokenizer (built once; it takes about a second)."""
    from runtime.harmony import get_harmony

    vocab = _HarmonyVocab(get_harmony().encoding)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=VOCAB_SIZE)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


# ---- request fields -> grammar ----

def _object(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise StructureError(f"{field}: must be an object, got {type(value).__name__}")
    return value


def _known(obj: dict, known: tuple, field: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise StructureError(f"{field}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(known)}")


def _name(value, field: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise StructureError(f"{field}: must be 1 to 64 letters, digits, '_' or '-', got {value!r}")
    return value


def _json_rule(schema, field: str) -> str:
    """`%json {...}` for a schema, compact; StructureError (llguidance's message) if it cannot compile.
    Our options override any "x-guidance" in the schema: whitespace must stay off."""
    schema = {**_object(schema, field), "x-guidance": COMPACT_JSON}
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    if error:
        raise StructureError(f"{field}: {error}")
    return "%json " + json.dumps(schema)


def _response_schema(response_format) -> str | None:
    """The `%json` rule the answer must match, or None for free text."""
    if response_format is None:
        return None
    _object(response_format, "response_format")
    kind = response_format.get("type")
    if kind not in RESPONSE_TYPES:
        raise StructureError(f"response_format.type: must be one of {', '.join(RESPONSE_TYPES)}, "
                             f"got {kind!r}")
    known = ("type", "json_schema") if kind == "json_schema" else ("type",)
    _known(response_format, known, "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_rule(ANY_OBJECT, "response_format")
    spec = _object(response_format.get("json_schema"), "response_format.json_schema")
    _known(spec, ("name", "schema", "strict", "description"), "response_format.json_schema")
    _name(spec.get("name"), "response_format.json_schema.name")
    if not isinstance(spec.get("strict", False), bool):
        raise StructureError(f"response_format.json_schema.strict: must be true or false, "
                             f"got {spec['strict']!r}")
    if "schema" not in spec:
        raise StructureError("response_format.json_schema.schema: missing; give the answer's JSON schema")
    # strict or not, the schema is enforced: a grammar cannot half-follow it
    return _json_rule(spec["schema"], "response_format.json_schema.schema")


def _tool_rules(tools) -> dict[str, str]:
    """{function name: `%json` rule of its arguments}, in the order given; the list checked as the
    prompt's tools are (runtime/harmony.check_tools), the arguments' schemas here."""
    try:
        functions = check_tools(tools)
    except HarmonyInputError as e:
        raise StructureError(str(e)) from None
    rules: dict[str, str] = {}
    for i, function in enumerate(functions):
        parameters = ANY_OBJECT if function["parameters"] is None else function["parameters"]
        if parameters.get("type") != "object":
            raise StructureError(f"tools[{i}].function.parameters: must be an object schema "
                                 f"(\"type\": \"object\"), got type {parameters.get('type')!r}")
        rules[function["name"]] = _json_rule(parameters, f"tools[{i}].function.parameters")
    return rules


def _callable(tool_choice, names: list[str]) -> tuple[list[str], bool]:
    """(the functions the reply may call, whether it must call one) under tool_choice."""
    if tool_choice is None or tool_choice in TOOL_CHOICES:
        choice = tool_choice or "auto"
        if choice == "required" and not names:
            raise StructureError("tool_choice: 'required' needs at least one tool in tools")
        return ([] if choice == "none" else names), choice == "required"
    if not isinstance(tool_choice, dict):
        raise StructureError(f"tool_choice: must be one of {', '.join(TOOL_CHOICES)} or "
                             f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')
    if tool_choice.get("type") != "function":
        raise StructureError(f"tool_choice.type: must be 'function', got {tool_choice.get('type')!r}")
    name = _object(tool_choice.get("function"), "tool_choice.function").get("name")
    if name not in names:
        raise StructureError(f"tool_choice.function.name: no tool named {name!r} in tools "
                             f"(tools: {', '.join(names) or 'none'})")
    return [name], True


def grammar_for(response_format: dict | None, *, chat: bool, tools: list[dict] | None = None,
                tool_choice=None) -> str | None:
    """The llguidance grammar (a string LLMatcher accepts) for a request, or None when nothing is
    constrained.

    A raw prompt's whole completion is the JSON answer, then one of the engine's stop tokens. A chat
    reply may first think freely in one analysis message; then it is the final message holding the
    answer, or (when tools may be called) a Harmony tool call whose arguments match the tool's
    parameters. StructureError names the field that cannot be used.
    """
    answer = _response_schema(response_format)
    rules = _tool_rules(tools) if tools else {}
    if rules and not chat:
        raise StructureError("tools: only chat requests ('messages') can call tools")
    names, must_call = _callable(tool_choice, list(rules))
    if answer is None and not must_call:
        return None  # free text; with tool_choice auto the model may still call a tool, unconstrained
    if not chat:
        # The end is named in the grammar, not left to the tokenizer's EOS, so that each grammar says
        # which tokens end it: here any the engine stops a raw prompt on (requests.EOS_TOKEN_IDS),
        # in a chat only <|return|> after the answer and <|call|> after a call.
        return f"start: answer (<|return|> | <|call|> | <|endoftext|>)\nanswer: {answer}"
    replies = [] if must_call else ["final"]
    lines = [ANALYSIS]
    if not must_call:
        lines.append(f'final: <|channel|> "final" <|message|> answer <|return|>\nanswer: {answer}')
    for i, name in enumerate(names):
        # Harmony's call: <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>
        header = json.dumps(f"commentary to=functions.{name} ")
        lines.append(f'call{i}: <|channel|> {header} <|constrain|> "json" <|message|> args{i} <|call|>\n'
                     f"args{i}: {rules[name]}")
        replies.append(f"call{i}")
    return "\n".join([f"start: analysis? ({' | '.join(replies)})", *lines])


# ---- one request's matcher ----

class Constraint:
    """One constrained request's position in its grammar: which tokens it may generate next.

    Its matcher compiles on a worker thread from the moment the request is admitted (~1 ms a small
    schema, mostly without the GIL), so the compile overlaps the forward of the step that admitted
    it; the first mask waits for it. Every request compiles its own: llguidance's `reset` (and
    `rollback` to the start) left some JSON-schema matchers inside the object they had finished
    (tests/test_structured.py), and copies of one compiled matcher (`deep_copy`) share state behind a
    lock that serialised the step's parallel mask computation (docs/performance.md)."""

    def __init__(self, grammar: str):
        """Starts compiling `grammar` (checked when the request was parsed) over the Harmony vocabulary."""
        self._compiling = _compiler().submit(_compile, grammar)
        self._matcher: llguidance.LLMatcher | None = None

    @property
    def matcher(self) -> llguidance.LLMatcher:
        """The compiled matcher (waits for the compile); StructureError if the grammar did not compile."""
        if self._matcher is None:
            if self._compiling is None:
                raise RuntimeError("the constraint was released")
            matcher = self._compiling.result()
            if matcher.is_error():  # kept out of _matcher: every use raises, not only the first
                raise StructureError(f"grammar: {matcher.get_error()}")
            self._matcher = matcher
        return self._matcher

    def release(self) -> None:
        """The request will not generate again: its matcher's memory goes (a compile not started yet
        is dropped)."""
        if self._compiling is not None:
            self._compiling.cancel()
        self._compiling = self._matcher = None

    def consume(self, token: int) -> None:
        """Advance by a sampled token. A token the mask did not allow puts the matcher in its error
        state (see `error`) rather than raising: the engine decides what becomes of the request."""
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar has ended (its end token was consumed); False in the error state."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """The matcher's error, if it entered one (a token outside the mask), else None."""
        return self.matcher.get_error() or None


def _compile(grammar: str) -> llguidance.LLMatcher:
    # short errors: the verbose ones carry the parser state and the whole grammar, schemas included
    limits = llguidance.LLParserLimits(verbose_errors=False)
    return llguidance.LLMatcher(tokenizer(), grammar, log_level=0, limits=limits)


@functools.cache
def _compiler() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpt-oss-grammar")


# ---- masks ----

def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row: one bit per token id, ceil(vocab_size / 32)."""
    return (vocab_size + 31) // 32


def fill_bitmasks(constraints: list[Constraint], bitmask: torch.Tensor) -> None:
    """Row i of the CPU int32 bitmask [len(constraints), words] gets constraint i's allowed tokens
    (bit t%32 of word t//32), computed in parallel (llguidance.LLExecutor), GIL released."""
    words = bitmask_words(tokenizer().vocab_size)
    if (bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous()
            or tuple(bitmask.shape) != (len(constraints), words)):
        raise ValueError(f"bitmask must be a contiguous CPU int32 tensor of shape "
                         f"({len(constraints)}, {words}), got {bitmask.dtype} {tuple(bitmask.shape)} "
                         f"on {bitmask.device}")
    if constraints:
        rows = [(c.matcher, i) for i, c in enumerate(constraints)]
        _executor().unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, len(constraints))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place on logits [rows, vocab] (any device, fp32): tokens whose bit is 0 get -inf. bitmask
    [rows, words] int32 on the logits' device. Plain torch ops (no torch.compile, must also work on
    CPU); vocab may be smaller than words*32, and also larger (the model's vocab 201088 vs the
    tokenizer's): ids beyond the mask are disallowed.

    `logits` must be the tensor itself or a view of it: logits[index_tensor] is a copy."""
    rows, vocab = logits.shape
    covered = min(vocab, bitmask.shape[1] * 32)
    blocked = (bitmask.unsqueeze(-1) & _bits(bitmask.device)) == 0  # [rows, words, 32]
    logits[:, :covered].masked_fill_(blocked.view(rows, -1)[:, :covered], float("-inf"))
    logits[:, covered:] = float("-inf")


@functools.cache
def _bits(device: torch.device) -> torch.Tensor:
    """1 << i for i in 0..31 as int32 (bit 31 is the sign bit), made once per device: a copy from the
    host on every call would wait for the GPU's queued work."""
    return torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32).to(device)
