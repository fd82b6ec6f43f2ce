"""Sampling: greedy, temperature, top-k, top-p, with a generator per request.

Each request draws from its own seeded generator (its seed, or one derived from the engine's seed
and its id), so its tokens do not depend on which other requests share the batch or came before;
the rows of a step are still sampled together, on the GPU, without a host sync. Logprobs are of the
model's own distribution (before temperature, top-k and top-p), as vLLM reports them by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from runtime.kernels.greedy import logprobs_of
from runtime.transfer import to_device


@dataclasses.dataclass(frozen=True)
class Limit:
    """A numeric sampling parameter's accepted range (inclusive), and whether it is an integer."""
    lo: int | float
    hi: int | float
    integer: bool = False


# The one table of ranges: SamplingParams checks them on construction, whether the parameters come
# from Python or from a JSON request (runtime/requests.py checks the JSON types from `integer`).
LIMITS = {
    "max_tokens": Limit(1, 2**31, integer=True),
    "temperature": Limit(0.0, 100.0),
    "top_p": Limit(1e-9, 1.0),
    "top_k": Limit(-1, 2**31, integer=True),
    # taken mod 2**64 (SeededNoise): -1 and 2**64 - 1 are the same seed
    "seed": Limit(-(2**63), 2**64 - 1, integer=True),
    "top_logprobs": Limit(0, 20, integer=True),  # OpenAI's bound
}
MAX_STOP_STRINGS = 4  # OpenAI's bound on `stop`


# Below this temperature a row is sampled greedily (vLLM's _SAMPLING_EPS): dividing logits by a
# temperature like 1e-38 overflows them to inf, and the softmax of inf - inf is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Raises ValueError naming the field when a value is outside its range in LIMITS."""
    max_tokens: int = 256
    temperature: float = 1.0  # below GREEDY_BELOW_TEMPERATURE (0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 means all tokens
    seed: int | None = None
    logprobs: bool = False
    ignore_eos: bool = False
    top_logprobs: int = 0  # also this many most likely tokens at each position (implies logprobs)
    stop: tuple[str, ...] = ()  # strings that end generation; the text ends before the first one found
    # OpenAI's structured outputs: {"type": "json_object"} or {"type": "json_schema", "json_schema":
    # {"name", "schema", "strict"}} (runtime/structured.py); None or {"type": "text"}: free
    response_format: dict | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        stop = tuple(stop) if isinstance(stop, (list, tuple)) else (None,)  # (None,): refused below
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"field 'stop' must be a string or a list of up to {MAX_STOP_STRINGS} "
                             f"non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)  # a list given is kept as a tuple (frozen)
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if not limit.lo <= value <= limit.hi:  # NaN fails this too
                raise ValueError(f"field {name!r} must be in [{limit.lo}, {limit.hi}], got {value!r}")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def greedy(self) -> bool:
        """Rows under these params take the argmax (the first maximal id on ties)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def default_seed(engine_seed: int, request_id) -> int:
    """The 64-bit seed of a request that brings none: a hash of the engine's seed and the request's
    id, never of the order requests arrive in, so a request samples the same tokens alone, in any
    batch, and in a resumed batch job. The id is hashed as JSON text (so 7 and "7" differ; one JSON
    cannot write, by its repr) with sha256: Python's hash() of a str changes from process to process.
    """
    text = json.dumps([engine_seed, request_id], default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


_MIX_STEPS = 2**52  # resolution of the CPU's mixed uniforms: k + 1/2 is exact in fp64 for every k below


class SeededNoise:
    """A request's random source: the Exp(1) draws of its rows' exponential races, a function of
    all 64 bits of its seed (taken mod 2**64) on every device.

    CUDA's generator (Philox) keeps a 64-bit seed, so there one generator draws, as torch does. The
    CPU's (mt19937) keeps only the low 32 bits, so seeds 1 and 1 + 2**32 would draw alike: there a
    second generator, seeded with the high 32 bits, is mixed in when they are not zero.
    """

    def __init__(self, seed: int, device: torch.device | str):
        seed %= 2**64
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._high = None
        if self.device.type == "cpu" and seed >> 32:
            self._high = torch.Generator().manual_seed(seed >> 32)

    def exponential(self, n: int) -> torch.Tensor:
        """n independent Exp(1) draws (fp32) on the device: one row's noise."""
        if self._high is None:
            return torch.empty(n, device=self.device).exponential_(generator=self._generator)
        # frac(a + b) of two independent uniforms is uniform and depends on both. In integers the sum
        # stays exact, and u = (k + 1/2) / 2**52 lies strictly inside (0, 1): -log(u) is finite and > 0.
        k = (torch.randint(_MIX_STEPS, (n,), generator=self._generator)
             + torch.randint(_MIX_STEPS, (n,), generator=self._high)) % _MIX_STEPS
        return (-torch.log((k.double() + 0.5) / _MIX_STEPS)).float()


def sample(logits: torch.Tensor, params: SamplingParams, generator: SeededNoise) -> tuple[int, float]:
    """One token from fp32 logits [vocab] and its logprob under the unmodified distribution."""
    return sample_rows(logits[None], [params], [generator])[0]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[SeededNoise]) -> list[tuple[int, float]]:
    """(token, logprob) for each row of fp32 logits [M, vocab]: `sample_on_device` and one host sync."""
    tokens, logprobs = sample_on_device(logits, params, generators)
    both = torch.stack([tokens.double(), logprobs.double()]).tolist()  # ids are exact in fp64
    return [(int(t), lp) for t, lp in zip(*both)]


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[SeededNoise],
                     allowed: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [M] (int64) and their logprobs [M] (fp32) for the rows of fp32 logits [M, vocab], row i
    under params[i], drawing from generators[i] only; on the logits' device, without a host sync (the
    engine samples one step while planning the next). Batched (a step's rows cost a few launches, not a
    few per row), yet each row's result is a function of that row alone.

    A sampled row draws by the exponential race: the argmax of p / E over independent Exp(1) draws
    E picks token i with probability p_i, and the draws come from the row's own generator.

    `allowed` (row indices, int32 bitmask [rows, words], on the logits' device): those rows choose only
    among their allowed tokens (structured outputs); their logprobs stay the model's own."""
    model_logits = logits
    if allowed is not None:  # a copy: the logprobs below are of the unmasked logits
        from runtime.structured import apply_bitmask

        rows, bitmask = allowed
        logits = logits.clone()
        masked = logits[rows]
        apply_bitmask(masked, bitmask)
        logits[rows] = masked
    # greedy: the first maximal id on ties, as torch and the references do
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        dev, vocab = logits.device, logits.shape[-1]
        rows = to_device(sampled, torch.int64, dev)
        column = lambda values: to_device(values, logits.dtype, dev)[:, None]  # noqa: E731
        scaled = logits[rows] / column([params[i].temperature for i in sampled])
        top_k = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in sampled]
        if min(top_k) < vocab:
            values = torch.topk(scaled, max(k for k in top_k if k < vocab), dim=-1).values
            kth_index = to_device([min(k, values.shape[1]) - 1 for k in top_k], torch.int64, dev)
            kth = values.gather(1, kth_index[:, None])
            kth = torch.where(column(top_k) < vocab, kth, float("-inf"))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        top_p = [params[i].top_p for i in sampled]
        if min(top_p) < 1.0:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= column(top_p)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
        noise = torch.stack([generators[i].exponential(vocab) for i in sampled])
        tokens[rows] = torch.argmax(probs / noise.clamp_min(1e-30), dim=-1)
    return tokens, logprobs_of(model_logits, tokens)
