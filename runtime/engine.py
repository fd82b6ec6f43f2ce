"""The engine: load a model once, then generate for any number of requests (like vLLM's `LLM`).

Generation is continuous batching over a flat token batch: every step carries one decode token for
each running sequence plus prompt chunks of newly admitted ones, up to a token budget, so long
prompts are prefilled in chunks while other sequences keep decoding. Finished requests are handed
to a callback at once, so a caller can write them before the batch ends.

One step is always in flight: the host plans and launches step n+1 while the GPU runs step n, and
only then waits for step n's tokens. Step n+1's decode rows read the tokens step n sampled from a
GPU buffer, so the host never waits for them to plan; a sequence that step n ends with a stop token
has one wasted row in step n+1, whose output is dropped. (vLLM calls this async scheduling.)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from parallel.groups import Parallel, single, use_peer_memory
from parallel.layers import all_reduce, broadcast
from runtime import cuda_graphs, eager_steps, mixed_graphs, openai_batch, ops
from runtime.cache import cache_dir
from runtime.checkpoint import CheckpointReader, write_checkpoint
from runtime.config import preset
from runtime.engine_config import DTYPES, EngineConfig
from runtime.harmony import by_channel
from runtime.kernels.compile_watch import CompileWatch
from runtime.kv_cache import (PAGE_SIZE, full_pages_within, pages_for, resolve_kv_cache_dtype,
                              sliding_pool_pages)
from runtime.lockstep import Agreement, Lockstep
from runtime.model import GptOss
from runtime.options import options
from runtime.requests import Request, RequestError, parse_request, request_id
from runtime.sampling import SamplingParams, SeededNoise, default_seed
from runtime.scheduler import Scheduler, ScheduledStep, Sequence
from runtime.step import SequenceChunk, Step
from runtime.step_plan import PlanChannel, StepPlan
from runtime.transfer import to_device


@dataclasses.dataclass
class Result:
    id: Any
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None
    text: str = ""
    finish_reason: str = "error"  # "stop" | "length" | "error"
    error: str | None = None
    chat: dict | None = None  # Harmony chats: {"messages", "channels", "token_channels", "tool_calls"?}
    # per token, the most likely [token, logprob] pairs (a request's top_logprobs)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    openai: dict | None = None  # an OpenAI Batch line's reply settings (runtime/openai_batch.py)
    # For reports, not in the output record: the prompt's length, and how much of it came from the
    # prefix cache (vLLM's num_cached_tokens)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def to_json(self) -> dict:
        out = {"id": self.id, "token_ids": self.token_ids, "text": self.text,
               "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.top_logprobs is not None:
            out["top_logprobs"] = [[list(pair) for pair in pairs] for pairs in self.top_logprobs]
        if self.chat is not None:  # its per-token channels serve the OpenAI format's logprobs only
            out.update({key: value for key, value in self.chat.items() if key != "token_channels"})
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclasses.dataclass
class _Launched:
    """A step on the GPU whose sampled tokens are on their way to the host."""
    samples: list[tuple[Sequence, int]]  # per sampled row: its sequence and the index of its PENDING token
    host: torch.Tensor  # [rows, 2] fp64: token (exact) and logprob per row, filled by an asynchronous copy
    ready: torch.cuda.Event | None  # the copies are done (None off CUDA: copies there are synchronous)
    top: _TopLogprobs | None = None  # the most likely tokens of the rows that ask for them


@dataclasses.dataclass
class _TopLogprobs:
    """The top_logprobs of a step's rows that ask for them, on their way to the host."""
    rows: list[int]
    counts: list[int]  # how many each row asked for (the tensor holds the largest count)
    host: torch.Tensor  # [len(rows), max(counts), 2] fp64: (token, logprob), most likely first

    def by_row(self) -> dict[int, list[tuple[int, float]]]:
        pairs = self.host.tolist()
        return {row: [(int(t), lp) for t, lp in pairs[i][:k]]
                for i, (row, k) in enumerate(zip(self.rows, self.counts))}


Prompt = Request | dict | str | list[int]  # what LLM.generate takes, as vLLM's does


def _with_params(prompts: Prompt | Iterable[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None):
    """(prompt, the SamplingParams a string or token list takes) for each prompt."""
    if isinstance(prompts, (Request, dict, str)):  # one prompt (a dict or str would iterate its parts)
        prompts = [prompts]
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return ((prompt, sampling_params) for prompt in prompts)
    prompts, sampling_params = list(prompts), list(sampling_params)
    if len(sampling_params) != len(prompts):
        raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                         f"give one SamplingParams for all, or one per prompt")
    return zip(prompts, sampling_params)


def _request_object(index: int, prompt, params: SamplingParams | None):
    """The JSON request a string or token list stands for: its text as `prompt` or its tokens as
    `prompt_token_ids`, its index as `id`, and the params' fields (None: the request defaults).
    Anything else is returned as it is, for make_request to parse or refuse."""
    if not isinstance(prompt, (str, list)):
        return prompt
    field = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
    return {"id": index, field: prompt, **_fields(params)}


def _fields(params: SamplingParams | None) -> dict:
    """A SamplingParams as a JSON request's fields (None: none, so the request defaults apply)."""
    return dataclasses.asdict(params) if params is not None else {}


def memory_report(device: torch.device) -> dict:
    """Peak host memory of this process and peak device memory, in GiB (after loading the model)."""
    import resource

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    dev = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"peak_host_GiB": round(host, 3), "peak_device_GiB": round(dev, 3)}


def default_checkpoint() -> Path:
    """The embedded default: a tiny synthetic checkpoint in the real (original) layout, made once."""
    path = cache_dir("checkpoints") / "tiny-original-seed0"
    if not (path / "config.json").is_file():
        # Written aside and renamed into place: torchrun's ranks all get here on a fresh machine, and
        # none may read a half-written checkpoint.
        aside = path.with_name(f"{path.name}.{os.getpid()}.partial")
        write_checkpoint(preset("tiny"), aside, layout="original", seed=0)
        try:
            aside.rename(path)
        except OSError:  # another rank's copy got there first (or a broken one from a crash is there)
            if not (path / "config.json").is_file():
                shutil.rmtree(path)
                aside.rename(path)
            else:
                shutil.rmtree(aside)
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]  # a name EngineConfig has checked


class LLM:
    """A loaded model plus the generation loop.

    Built from an EngineConfig (runtime/engine_config.py), given as `config` or as its fields in
    keywords: LLM(checkpoint, dtype=..., max_batch_size=...). `parallel`: this rank's place in a
    multi-rank job (parallel/groups.py); None for one process on `device`.
    """

    def __init__(self, checkpoint: str | Path | None = None, *, config: EngineConfig | None = None,
                 parallel: Parallel | None = None, **settings):
        if config is None:
            config = EngineConfig(checkpoint=checkpoint, **settings)
        elif checkpoint is not None or settings:
            raise TypeError("LLM takes an EngineConfig or its settings as arguments, not both")
        self.engine_config = config
        self.parallel = parallel or single(resolve_device(config.device))
        self.device = self.parallel.device
        if options.peer_all_reduce and self.parallel.replica.size > 1:
            use_peer_memory(self.parallel)  # every rank builds its LLM together
        self.dtype = resolve_dtype(config.dtype, self.device)
        start = time.perf_counter()
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        if config.checkpoint == "dummy":
            model = GptOss(config.model_config, self.dtype, parallel=self.parallel, kv_dtype=kv_dtype)
            self.model = model.randomize(config.seed)
        else:
            path = config.checkpoint if config.checkpoint is not None else default_checkpoint()
            reader = CheckpointReader(path)
            model = GptOss(reader.config, self.dtype, parallel=self.parallel, kv_dtype=kv_dtype)
            self.model = model.load(reader)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies and random draws are asynchronous
        self.load_seconds = time.perf_counter() - start
        self.load_memory = memory_report(self.device)
        self.config = self.model.cfg
        max_model_len = min(config.max_model_len or self.config.max_position_embeddings,
                            self.config.max_position_embeddings)
        max_batch_size = config.max_batch_size
        self.default_max_tokens = config.default_max_tokens
        self._harmony = None
        pages, sliding = self._kv_pages(config.kv_cache_tokens, config.gpu_memory_fraction, max_batch_size,
                                        max_model_len)
        self.pool = self.model.make_pool(pages, sliding)
        self.kv_cache_tokens = None if pages is None else pages * PAGE_SIZE  # None: grows on demand
        self.scheduler = Scheduler(self.pool, self.model.new_cache, max_batch_size=max_batch_size,
                                   max_batch_tokens=config.max_batch_tokens, max_model_len=max_model_len,
                                   new_generator=self._new_generator, new_constraint=_new_constraint,
                                   prefix_caching=config.enable_prefix_caching,
                                   conservativeness=config.schedule_conservativeness,
                                   sliding_pool=self.model.sliding_pool, window=self.config.sliding_window)
        # Each step's sampled tokens on the GPU (the next step's decode rows read theirs here), and
        # two pinned host buffers their copies alternate between (one per step in flight or landing).
        self._sampled = torch.zeros(max_batch_size, dtype=torch.int64, device=self.device)
        pinned = self.device.type == "cuda"
        # [rows, 2] (token, logprob): a leading-rows slice stays contiguous, which an asynchronous
        # device-to-host copy needs (into a strided view torch copies synchronously).
        self._host_samples = [torch.zeros((max_batch_size, 2), dtype=torch.float64, pin_memory=pinned)
                              for _ in range(2)]
        self._bitmasks = None  # likewise for the token masks of constrained rows (made at first use)
        self._steps = 0
        self._idle_replays = 0  # graphs replayed with padding only (attention_dp), not decode steps
        # Decode steps replay CUDA graphs where possible, and mixed steps of up to mixed_graph_tokens
        # their pieces between the attentions (vLLM's enforce_eager turns both off too).
        self._graphs = None
        self._mixed_graphs = None
        self._eager_compiles = None  # the eager steps' kernels compiled at start-up (runtime/eager_steps.py)
        # The replica's first rank plans every step and sends the plan to the others (step_plan.py);
        # under attention_dp each rank plans its own, and the ranks agree before each step (lockstep.py).
        self._plans = None
        if self.parallel.shares_plans:
            self._plans = PlanChannel(self.parallel.replica_host, self.model.pool, self.model.sliding_pool,
                                      self.config.sliding_window)
        self._lockstep = Lockstep(self.parallel.replica_host) if self.parallel.steps_together else None
        if config.count_expert_load:  # before the graphs are captured, so that they count too
            self.model.count_expert_load()
        start = time.perf_counter()
        with CompileWatch() as compiles:  # what start-up compiled, by kernel: where a cold start goes
            if not config.enforce_eager and cuda_graphs.supported(self.model) is None:
                self._capture_graphs(config, max_batch_size, max_model_len)
        self.capture_seconds = time.perf_counter() - start  # start-up beside load_seconds, for reports
        self.capture_compiles = compiles.summary()  # Triton's compiles in the captures (and their warm-ups)

    def _capture_graphs(self, config: EngineConfig, max_batch_size: int, max_model_len: int) -> None:
        """Every decode graph, and the mixed steps' pieces up to mixed_graph_tokens, captured now; first,
        the kernels of the eager steps compiled (where the graphs' warm-ups compile ahead too)."""
        if cuda_graphs.compile_ahead_allowed(self.model):
            self._eager_compiles = eager_steps.compile_kernels(self.model, config.max_batch_tokens,
                                                               max_model_len)
        self._graphs = cuda_graphs.DecodeGraphs(self.model, max_batch_size, max_model_len, self._sampled)
        self._graphs.capture_all()
        mixed_tokens = min(config.mixed_graph_tokens, config.max_batch_tokens)
        if mixed_tokens and mixed_graphs.supported(self.model) is None:
            self._mixed_graphs = mixed_graphs.MixedGraphs(self.model, mixed_tokens, self._sampled)
            self._mixed_graphs.capture_all()
        torch.cuda.synchronize(self.device)

    def _kv_pages(self, tokens: int | None, gpu_memory_fraction: float, max_batch_size: int,
                  max_model_len: int) -> tuple[int | None, int | None]:
        """Pages of the full and the sliding layers' KV pools: the full pool from `tokens`, else on
        CUDA the most that gpu_memory_fraction of the GPU holds beside the weights, an allowance for a
        step's activations, the decode graphs' own buffers and the sliding pool that goes with it
        (kv_cache.sliding_pool_pages); else (None, None): both grow."""
        window, step_tokens = self.config.sliding_window, self.engine_config.max_batch_tokens

        def sliding_for(full_pages: int) -> int:
            return sliding_pool_pages(full_pages, window, max_batch_size, step_tokens)

        if tokens is not None:
            return pages_for(tokens), sliding_for(pages_for(tokens))
        if self.device.type != "cuda":
            return None, None
        _, total = torch.cuda.mem_get_info(self.device)
        # Activations of the largest step (fp32 MoE rows, attention and norm temporaries) and the
        # logits of the sampled rows; an estimate with a margin, not a measurement.
        activations = step_tokens * (64 << 10) + max_batch_size * self.config.vocab_size * 8 + (1 << 30)
        if not self.engine_config.enforce_eager:  # made after the KV cache (logits: 0.8 GB at 1,024 rows)
            activations += cuda_graphs.buffer_bytes(max_batch_size, max_model_len, self.config.vocab_size,
                                                    self.config.kv_pools)
        budget = total * gpu_memory_fraction - torch.cuda.memory_allocated(self.device) - activations
        page_bytes = self.model.kv_page_bytes(), self.model.kv_page_bytes(sliding=True)
        fitting = full_pages_within(budget, *page_bytes, sliding_for)
        pages = torch.tensor([fitting], device=self.device)
        if torch.distributed.is_initialized():  # the first rank's page ids index every rank's pool:
            torch.distributed.all_reduce(pages, op=torch.distributed.ReduceOp.MIN)  # the smallest
        if int(pages) < 1:
            raise ValueError(f"no GPU memory left for the KV cache with "
                             f"gpu_memory_fraction={gpu_memory_fraction} "
                             f"(weights {torch.cuda.memory_allocated(self.device) / 2**30:.1f} GiB of "
                             f"{total / 2**30:.1f} GiB); raise it or lower max_batch_tokens")
        return int(pages), sliding_for(int(pages))

    @property
    def max_model_len(self) -> int:
        """The context limit in tokens: the setting, or the model's own where that is lower."""
        return self.scheduler.max_model_len

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def max_batch_tokens(self) -> int:
        return self.scheduler.max_batch_tokens

    @property
    def preemptions(self) -> int:
        """Sequences sent back to wait (their KV recomputed later) over this engine's life, for reports."""
        return self.scheduler.preemptions

    @property
    def preempted_tokens(self) -> int:
        """Positions of computed KV that preemptions threw away (to compute again), for reports."""
        return self.scheduler.preempted_tokens

    @property
    def capture_warm_ups(self) -> dict:
        """The graphs' warm-ups at start-up (runtime/warm_up.py), per kind: wall seconds and the slowest
        size, and the eager steps' kernels compiled ahead (runtime/eager_steps.py); empty when eager."""
        graphs = {"decode": self._graphs, "mixed": self._mixed_graphs}
        reports = {kind: g.warm_up.summary() for kind, g in graphs.items() if g is not None and g.warm_up}
        if self._eager_compiles is not None and self._eager_compiles.ahead is not None:
            reports["eager"] = self._eager_compiles.summary()
        return reports

    @property
    def graph_sizes(self) -> list[int]:
        """The decode batch sizes with a CUDA graph (none when eager)."""
        return [] if self._graphs is None else list(self._graphs.sizes)

    @property
    def mixed_graph_buckets(self) -> list[int]:
        """The token counts of mixed steps with CUDA graphs between the attentions (none when eager)."""
        return [] if self._mixed_graphs is None else list(self._mixed_graphs.buckets)

    @property
    def step_stats(self):
        """Counts over the steps planned so far (runtime/scheduler.py StepStats)."""
        return self.scheduler.stats

    @property
    def graph_replays(self) -> int:
        """Steps replayed from CUDA graphs so far, decode and mixed (0 when eager; a rank's idle steps
        under attention_dp are not counted)."""
        decode = 0 if self._graphs is None else sum(self._graphs.replays.values()) - self._idle_replays
        return decode + self.mixed_graph_replays

    @property
    def mixed_graph_replays(self) -> int:
        """Mixed steps (prompt chunks beside decodes) replayed from their pieces' graphs so far."""
        return 0 if self._mixed_graphs is None else sum(self._mixed_graphs.replays.values())

    @property
    def harmony(self):
        if self._harmony is None:
            from runtime.harmony import get_harmony

            self._harmony = get_harmony()
        return self._harmony

    def make_request(self, obj: dict) -> Request:
        """A checked Request from a JSON object (the batch job's input line); raises RequestError."""
        return parse_request(obj, max_model_len=self.max_model_len, vocab_size=self.config.vocab_size,
                             default_max_tokens=self.default_max_tokens, harmony=self.harmony)

    def generate(self, prompts: Prompt | Iterable[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 on_result: Callable[[Result], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[Result]:
        """Generate for every prompt; results come back in the order given (and to `on_result` as
        they finish). A prompt that cannot run becomes an error result for it alone.

        As vLLM's LLM.generate takes them, a prompt is a Request, a dict (a JSON request object,
        parsed with make_request), a string (raw text, encoded as a request's `prompt` field is) or a
        list of token ids (as `prompt_token_ids`); one prompt may be given alone. A string or token
        list takes its index among the prompts as its id and `sampling_params` as its parameters: one
        SamplingParams for all, or one per prompt (a list as long as the prompts; the entries of
        Requests and dicts are unused); without it, SamplingParams(max_tokens=default_max_tokens).

        `should_stop` is asked before every step; once it says yes, generation ends and only the
        finished results return.

        Every rank of a model replica calls generate. Its first rank (parallel.is_writer) schedules,
        samples and returns the results; the others run the steps it sends them (their prompts are
        not read) and return an empty list.
        """
        if not self.parallel.is_writer:
            self._follow()
            return []
        results: dict[int, Result] = {}

        def finish(index: int, result: Result) -> None:
            results[index] = result
            if on_result is not None:
                on_result(result)

        try:
            for index, (prompt, params) in enumerate(_with_params(prompts, sampling_params)):
                if not isinstance(prompt, Request):
                    obj = _request_object(index, prompt, params)
                    try:
                        prompt = self.make_request(obj)
                    except RequestError as e:
                        reply = openai_batch.reply_settings(obj) if openai_batch.is_openai(obj) else None
                        finish(index, Result(request_id(obj), error=str(e), openai=reply))
                        continue
                self.scheduler.add(index, prompt)
            self._run(finish, should_stop)
        except BaseException:  # a registered page's step may never have run: trust no cached page
            self.reset_prefix_cache()
            raise
        finally:  # stopped early or failed: the next call starts from an empty queue
            self.scheduler.drop_unfinished()
        return [results[i] for i in sorted(results)]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             reasoning_effort: str | None = None, on_result: Callable[[Result], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[Result]:
        """Generate the assistant's reply to each conversation, as vLLM's LLM.chat: `messages` is one
        conversation (OpenAI chat messages) or a list of them; `sampling_params` one for all or one per
        conversation; `tools` (OpenAI function tools), `tool_choice` and `reasoning_effort` apply to all.
        A thin adaptor: each conversation becomes a `messages` request (its index its id) for
        `generate`; its Result's `chat` holds the reply's channels and any `tool_calls`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        extras = {name: value for name, value in (("tools", tools), ("tool_choice", tool_choice),
                                                   ("reasoning_effort", reasoning_effort))
                  if value is not None}
        requests = [{"id": index, "messages": conversation, **_fields(params), **extras}
                    for index, (conversation, params)
                    in enumerate(_with_params(conversations, sampling_params))]
        return self.generate(requests, on_result=on_result, should_stop=should_stop)

    def expert_load(self) -> dict | None:
        """Rows routed to each expert of each layer since the engine started or `reset_expert_load`
        (count_expert_load): `tokens_per_expert` [layers][experts] over every request of the replica
        (summed over the ranks under attention_dp: a collective there), `rows_per_rank` [layers][ranks
        holding different experts], what each rank's experts computed; None when not counted."""
        load = self.model.expert_load()
        if load is None:
            return None
        if self.parallel.steps_together:  # each rank counted its own requests' rows
            all_reduce(load, self.parallel.replica)
        ranks = self.parallel.experts_partition.size
        layers, experts = load.shape
        return {"tokens_per_expert": load.tolist(),
                "rows_per_rank": load.view(layers, ranks, experts // ranks).sum(-1).tolist()}

    def reset_expert_load(self) -> None:
        """Start the expert counts again from zero (between a warm-up and a timed run)."""
        if self.engine_config.count_expert_load:
            self.model.count_expert_load()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (between generate calls, as vLLM's LLM.reset_prefix_cache):
        for timings that repeat a prompt and must start cold."""
        for pool in (self.model.pool, self.model.sliding_pool):
            if pool is not None:
                pool.forget_cached()

    # --------------------------------------------------------------------------- the loop
    def _new_generator(self, req: Request) -> SeededNoise:
        """A request's sampler state on the device, from its seed or else the engine's seed and its id."""
        seed = req.params.seed
        if seed is None:
            seed = default_seed(self.engine_config.seed, req.id)
        return SeededNoise(seed, self.device)

    def _run(self, finish, should_stop) -> None:
        """Continuous batching: the scheduler admits and plans a step (runtime/scheduler.py), which is
        launched; then the tokens of the step before are handed out while this one runs.

        A step with constrained rows samples only once the step before has landed (their masks need
        its tokens): its forward is launched, the step before lands, the next step is planned and the
        masks are computed, all while the forward runs; then it samples, and the next step's forward
        follows at once (planned already, so the GPU does not wait for the host's planning).

        Under attention_dp the ranks agree before each step (runtime/lockstep.py): they stop together,
        go on while any has work, and a rank without rows of its own runs an idle forward."""
        in_flight: _Launched | None = None
        planned: ScheduledStep | None = None  # the next step, planned ahead by a constrained one
        while True:
            busy = bool(self.scheduler.has_unfinished() or in_flight or planned)
            stop = should_stop is not None and should_stop()
            step = planned or self._schedule(finish) if busy and not stop else None
            planned, agreed = None, None
            if self._lockstep is not None:  # attention_dp: every rank takes the same decision
                chunks = step.plan.chunks if step is not None else []
                graphable = self._graphs is not None and self._graphs.fits(chunks)
                agreed = self._lockstep.agree(busy, stop, len(chunks), graphable)
                busy, stop = agreed.busy, agreed.stop
            if stop:
                if in_flight is not None:  # its finished requests are kept
                    self._land(in_flight, finish)
                break
            if not busy:
                break
            launched = None
            if step is not None and step.plan.chunks:
                logits, greedy, send = self._start(step, agreed)
                if in_flight is not None and any(seq.constraint for seq, _ in step.samples):
                    self._land(in_flight, finish)
                    in_flight = None
                    planned = self._schedule(finish)
                launched = self._sample(step, logits, greedy, send)
            elif agreed is not None and agreed.forward:  # other ranks' rows need this rank's experts
                self._idle_forward(agreed)
            if in_flight is not None:
                self._land(in_flight, finish)
            in_flight = launched
        if self._plans is not None:
            self._plans.end()

    def _schedule(self, finish) -> ScheduledStep:
        """The scheduler's next step; the requests it turned away get their error results."""
        step = self.scheduler.schedule()
        for rejected in step.rejected:
            finish(rejected.index, Result(rejected.request.id, error=rejected.error,
                                          openai=rejected.request.openai))
        return step

    def _follow(self) -> None:
        """A replica's other ranks: run each step the first rank plans, until it ends the call. The
        first rank broadcasts the tokens a step samples into the buffer the next step's decode rows
        read (the same device-side order of collectives on every rank), unless this rank's decode
        graph wrote the same ones there (_samples_to_send: `samples` is then 0)."""
        while (step := self._plans.receive()) is not None:
            plan, samples = step
            self._forward(plan)
            if samples:
                tokens = torch.empty(samples, dtype=self._sampled.dtype, device=self.device)
                self._sampled[:samples].copy_(broadcast(tokens, self.parallel.replica))

    def _start(self, step: ScheduledStep,
               agreed: Agreement | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Send the plan to the replica's other ranks and launch the step's forward (_forward); also
        how many sampled tokens _sample must broadcast after it, decided once here with the plan sent
        (a constrained sequence that ends before _sample loses its constraint, which would change
        the answer while the other ranks wait for what the plan said)."""
        send = 0
        if self._plans is not None:
            send = self._samples_to_send(step)
            self._plans.send(step.plan, send)
        return *self._forward(step.plan, agreed), send

    def _samples_to_send(self, step: ScheduledStep) -> int:
        """How many of the step's sampled tokens the first rank broadcasts to the replica's other
        ranks (_follow): none where each rank's decode graph already wrote them into its own buffer
        of sampled tokens. That holds where the step's rows are all greedy and free (the graph's
        argmax is the token) and the logits are the same bits on every rank, which a vocabulary
        split over the whole replica guarantees (each shard comes from one rank and is gathered);
        with experts partitioned they would rest on every rank's all-reduce giving the same bits,
        so the tokens travel there."""
        if (self._graph_samples(step.plan) and self.parallel.tp.size == self.parallel.replica.size
                and all(seq.request.params.greedy and seq.constraint is None for seq, _ in step.samples)):
            return 0
        return len(step.samples)

    def _graph_samples(self, plan: StepPlan) -> bool:
        """Whether a decode graph runs the plan with every row wanted, so that its greedy samples
        stand for the step's (without attention_dp's agreement, which plans alone)."""
        return (self._graphs is not None and self._graphs.fits(plan.chunks)
                and len(plan.logits_rows) == len(plan.chunks))

    def _sample(self, step: ScheduledStep, logits: torch.Tensor, greedy: torch.Tensor | None,
                send: int) -> _Launched:
        """Sample the step's wanted rows on the GPU; the tokens start their way to the host (the
        sequences hold them as PENDING); `send`: broadcast them to the replica's other ranks (_start)."""
        seqs = [seq for seq, _ in step.samples]
        if not seqs:  # prompt chunks that end short of their prompts: nothing to sample
            return _Launched([], self._host_samples[0][:0], None)
        params = [s.request.params for s in seqs]
        allowed = self._allowed(seqs)
        if greedy is not None and all(p.greedy for p in params):
            tokens, pairs = self._sampled[:len(seqs)], greedy  # the graph sampled them (cuda_graphs.py)
            if allowed is not None:  # constrained rows choose again, among their allowed tokens
                ops.masked_greedy_into(logits, *allowed, tokens, pairs)
        else:
            tokens, logprobs = ops.sample(logits, params, [s.generator for s in seqs], allowed)
            self._sampled[:len(seqs)].copy_(tokens)
            pairs = torch.stack([tokens.double(), logprobs.double()], dim=1)
        if send:  # the other ranks' next decode rows read them (see _follow)
            broadcast(tokens, self.parallel.replica)
        host = self._host_samples[self._steps % 2][:len(seqs)]
        self._steps += 1
        host.copy_(pairs, non_blocking=True)
        top = self._top_logprobs(logits, params)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(step.samples, host, ready, top)

    def _allowed(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The constrained rows and their token masks on the device (None when no row is): computed
        on the host by llguidance while the GPU runs the step's forward."""
        rows = [i for i, seq in enumerate(seqs) if seq.constraint is not None and not seq.done]
        if not rows:
            return None
        from runtime import structured

        if self._bitmasks is None:  # two, alternating as the sampled tokens' host buffers do
            words = structured.bitmask_words(self.config.vocab_size)
            self._bitmasks = [torch.zeros((self.max_batch_size, words), dtype=torch.int32,
                                          pin_memory=self.device.type == "cuda") for _ in range(2)]
        bitmask = self._bitmasks[self._steps % 2][:len(rows)]
        structured.fill_bitmasks([seqs[i].constraint for i in rows], bitmask)
        return (to_device(rows, torch.int64, self.device),
                bitmask.to(self.device, non_blocking=True))

    def _top_logprobs(self, logits: torch.Tensor, params: list[SamplingParams]) -> _TopLogprobs | None:
        """The most likely tokens of the rows that ask for top_logprobs, copied to the host with the
        step's samples (only those rows pay)."""
        rows = [i for i, p in enumerate(params) if p.top_logprobs > 0]
        if not rows:
            return None
        counts = [params[i].top_logprobs for i in rows]
        logprobs = torch.log_softmax(logits[to_device(rows, torch.int64, self.device)], dim=-1)
        values, tokens = torch.topk(logprobs, max(counts), dim=-1)
        pairs = torch.stack([tokens.double(), values.double()], dim=-1)
        host = torch.empty(pairs.shape, dtype=pairs.dtype, pin_memory=self.device.type == "cuda")
        host.copy_(pairs, non_blocking=True)
        return _TopLogprobs(rows, counts, host)

    def _land(self, step: _Launched, finish) -> None:
        """Wait for a launched step's tokens and hand them to the scheduler; report the finished."""
        if step.ready is not None:
            step.ready.synchronize()
        top = step.top.by_row() if step.top is not None else None
        for seq in self.scheduler.land(step.samples, step.host.tolist(), top):
            finish(seq.index, self._result(seq))

    def _forward(self, plan: StepPlan,
                 agreed: Agreement | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the plan's wanted rows: a decode-only step replays a CUDA graph where there are
        graphs, a mixed one of up to mixed_graph_tokens its pieces' graphs (runtime/mixed_graphs.py),
        anything else runs the model eagerly (under attention_dp as the ranks `agreed`, a graph
        padded to their largest step). Where a decode graph ran and every row is wanted,
        also its greedy samples ([rows, 2] (token, logprob); the tokens already in `_sampled`)."""
        dev = self.device
        graph = self._graphs is not None and self._graphs.fits(plan.chunks) if agreed is None \
            else agreed.graph_rows is not None
        if graph:
            logits = self._graphs.run(plan.chunks, plan.ids, plan.pending,
                                      None if agreed is None else agreed.graph_rows)
            if len(plan.logits_rows) == len(plan.chunks):
                return logits, self._graphs.greedy_samples(len(plan.chunks))
            return logits[to_device(plan.logits_rows, torch.int64, dev)], None
        if self._mixed_graphs is not None and self._mixed_graphs.fits(plan):
            return self._mixed_graphs.run(plan, to_device(plan.logits_rows, torch.int64, dev)), None
        ids = to_device(plan.ids, torch.int64, dev)
        if plan.pending:  # tokens the step in flight samples: from the GPU buffer, not the host
            ids[to_device(list(plan.pending), torch.int64, dev)] = \
                self._sampled[to_device(list(plan.pending.values()), torch.int64, dev)]
        return self.model(Step(ids, to_device(plan.positions, torch.int64, dev), plan.chunks,
                               to_device(plan.logits_rows, torch.int64, dev))), None

    def _idle_forward(self, agreed: Agreement) -> None:
        """A forward for a rank with no rows of its own while others have some (attention_dp): its
        experts still serve their tokens. A graph of the agreed size with every row padding, or
        eagerly one token at position 0 of a page taken for the step and given back (never cached:
        the next sequence to get the page writes it before reading it)."""
        if agreed.graph_rows is not None:
            self._graphs.run([], [], {}, agreed.graph_rows)
            self._idle_replays += 1
            return
        cache = self.model.new_cache()
        try:
            cache.reserve(0, 1)
            dev = self.device
            self.model(Step(torch.zeros(1, dtype=torch.int64, device=dev),
                            torch.zeros(1, dtype=torch.int64, device=dev), [SequenceChunk(0, 1, cache)],
                            torch.zeros(0, dtype=torch.int64, device=dev)))
        finally:
            cache.release()

    def _result(self, seq: Sequence) -> Result:
        req, params = seq.request, seq.request.params
        # The text leaves out a final stop token (the token ids keep it), and ends before a stop string.
        stopped_by_token = bool(seq.generated) and seq.generated[-1] in req.stop_token_ids
        body = seq.generated[:-1] if stopped_by_token else seq.generated
        result = Result(req.id, list(seq.generated), list(seq.logprobs) if params.wants_logprobs else None,
                        finish_reason=seq.finish_reason, prompt_tokens=len(req.prompt_token_ids),
                        cached_tokens=seq.cached_tokens, openai=req.openai,
                        top_logprobs=list(seq.top_logprobs) if params.top_logprobs else None)
        try:
            result.text = self.harmony.decode(body)
            if req.stop_strings is not None:
                result.text = req.stop_strings.cut(result.text)
            if req.chat:
                result.chat = self.harmony.parse_completion(seq.generated)
                if req.stop_strings is not None:
                    _cut_last_message(result.chat, req.stop_strings)
                calls = self.harmony.tool_calls(result.chat)
                if calls:
                    result.chat["tool_calls"] = calls
        except Exception as e:  # a decoding problem must not lose the generated tokens
            result.error = f"decoding the output failed: {e}"
        return result


def _new_constraint(request: Request):
    """A request's grammar state (runtime/structured.py), made at its first admission."""
    if request.grammar is None:
        return None
    from runtime.structured import Constraint

    return Constraint(request.grammar)


def _cut_last_message(chat: dict, stop_strings) -> None:
    """A chat that a stop string ended: its last message ends before it, and its channels follow."""
    if chat["messages"]:
        last = chat["messages"][-1]
        last["content"] = stop_strings.cut(last["content"])
        chat["channels"] = by_channel(chat["messages"])
