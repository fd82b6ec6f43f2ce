"""What every entry point shares: ranks and the engine from a hydra config, and clean failures."""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from launch.results_store import check_paths
from parallel import groups, heartbeat
from runtime.config import ConfigError
from runtime.engine import LLM, resolve_device
from runtime.engine_config import EngineConfig


def engine_config(cfg: DictConfig) -> EngineConfig:
    """The engine settings of a hydra config (its other keys, such as input and output, left out)."""
    return EngineConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def init_parallel(cfg: DictConfig) -> groups.Parallel:
    """This rank's place in the layout (torchrun's environment, or a single process)."""
    settings = engine_config(cfg)
    p = settings.parallel
    # dp left out: every rank the launcher started serves, as world / (tp x ep) replicas.
    dp = p.dp if p.dp is not None else max(1, int(os.environ.get("WORLD_SIZE", 1)) // (p.tp * p.ep))
    layout = groups.Layout(tp=p.tp, ep=p.ep, dp=dp, expert_tp=p.expert_tp, attention_dp=p.attention_dp)
    device = resolve_device(settings.device)
    parallel = groups.init(layout, device_type=device.type, timeout_s=p.timeout_s)
    if parallel.world_size == 1:
        parallel.device = device  # one process may name its GPU (cuda:N); ranks use cuda:LOCAL_RANK
    return parallel


def build_llm(cfg: DictConfig, parallel: groups.Parallel | None = None) -> LLM:
    settings = engine_config(cfg)
    llm = LLM(config=settings, parallel=parallel or init_parallel(cfg))
    parallel = llm.parallel
    if llm.kv_cache_tokens is not None and parallel.rank == 0:
        sliding = llm.model.sliding_pool
        print(f"KV cache: {llm.kv_cache_tokens:,} positions for the full-attention layers "
              f"({llm.pool.nbytes() / 2**20:,.0f} MiB per rank)"
              + (f", {sliding.num_pages:,} pages for the sliding-window layers "
                 f"({sliding.nbytes() / 2**20:,.0f} MiB)"
                 if sliding is not None else ""), file=sys.stderr, flush=True)
    if llm.graph_sizes and parallel.rank == 0:
        mixed = llm.mixed_graph_buckets
        print(f"CUDA graphs: {len(llm.graph_sizes)} decode batch sizes up to {llm.graph_sizes[-1]}"
              + (f", {len(mixed)} mixed-step token counts up to {mixed[-1]}" if mixed else "")
              + f" captured in {llm.capture_seconds:.1f} s", file=sys.stderr, flush=True)
    if parallel.world_size > 1:
        mem = llm.load_memory
        print(f"rank {parallel.rank}: loaded in {llm.load_seconds:.1f} s, peak host memory "
              f"{mem['peak_host_GiB']:.2f} GiB, peak device memory {mem['peak_device_GiB']:.2f} GiB",
              file=sys.stderr, flush=True)
    return llm


def check_job_args(cfg: DictConfig, *required: str) -> None:
    """The job's own arguments, before anything is loaded: each of `required` given, and where an
    input and an output are among them, their paths (launch/results_store.py `check_paths`)."""
    for name in required:
        if OmegaConf.is_missing(cfg, name) or cfg.get(name) in (None, ""):
            raise ValueError(f"{name}= is required ({REQUIRED_HELP[name]})")
    if "input" in required and "output" in required:
        check_paths(cfg.input, cfg.output)
    engine_config(cfg)  # the engine's settings, checked on construction


REQUIRED_HELP = {"input": "the JSONL file of requests, one per line",
                 "output": "the results file to write, e.g. output=results.jsonl"}


@contextmanager
def clean_exit():
    """Start-up problems (bad arguments, a missing file, an output that is not the job's own, a bad
    checkpoint, config or layout) end the job with one clear line and exit status 2."""
    try:
        yield
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{rank_prefix()}error: {e}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def interrupted_quietly(what_is_kept: str):
    """Ctrl-C that reaches Python (while loading, or a second one while a job stops) ends the job with
    one line and exit status 130, as a shell reports it, instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n{rank_prefix()}interrupted: {what_is_kept}", file=sys.stderr)
        sys.exit(130)


def rank_prefix() -> str:
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""


@contextmanager
def fail_fast():
    """In a multi-rank job, any failure (a collective timing out because a peer died or hung, an
    error) ends this rank at once with its rank named, rather than waiting in the next collective;
    torchrun then stops the other ranks and reports which one failed first."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:
        if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
            raise
        traceback.print_exc()
        silent = heartbeat.silent_ranks()
        blame = f"; rank(s) {', '.join(map(str, silent))} stopped responding" if silent else ""
        print(f"{rank_prefix()}failed: {type(e).__name__}: {e}{blame}", file=sys.stderr, flush=True)
        os._exit(1)
