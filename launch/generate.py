"""The main job: answer one Harmony chat prompt and print the reply and the speed.

    python -m launch.generate                       # embedded tiny synthetic model, on CPU
    python -m launch.generate checkpoint=DIR prompt="Why is the sky blue?" device=cuda

With no checkpoint, a tiny random model (real format, real tokenizer) is made once in the cache
folder: its words are noise, but every stage of the real path runs.
"""

from __future__ import annotations

import json
import sys
import time

import hydra
from omegaconf import DictConfig

from launch.common import build_llm, check_job_args, clean_exit, interrupted_quietly
from runtime.harmony import REASONING_EFFORTS
from runtime.requests import parse_sampling_params


def request_of(cfg: DictConfig) -> dict:
    """The one request, as a batch job's input line; its checks that need no model run before loading
    (the rest, such as the context limit, when the engine parses it)."""
    if not isinstance(cfg.prompt, str) or not cfg.prompt:
        raise ValueError(f"prompt= must be a non-empty string, got {cfg.prompt!r}")
    if cfg.reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort= must be one of {', '.join(REASONING_EFFORTS)}, "
                         f"got {cfg.reasoning_effort!r}")
    request = {"id": "generate", "messages": [{"role": "user", "content": cfg.prompt}],
               "reasoning_effort": cfg.reasoning_effort, "max_tokens": cfg.max_tokens,
               "temperature": cfg.temperature, "seed": cfg.seed}
    parse_sampling_params(request, cfg.default_max_tokens)  # RequestError: a ValueError, exit 2
    return request


def run(cfg: DictConfig) -> dict:
    with clean_exit():
        check_job_args(cfg)
        request = request_of(cfg)
        llm = build_llm(cfg)
        request = llm.make_request(request)
    start = time.perf_counter()
    result = llm.generate([request])[0]
    seconds = time.perf_counter() - start
    return {"result": result, "seconds": seconds, "load_seconds": llm.load_seconds,
            "prompt_tokens": len(request.prompt_token_ids), "device": str(llm.device),
            "dtype": str(llm.dtype)}


@hydra.main(version_base=None, config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    with interrupted_quietly("nothing was generated"):
        out = run(cfg)
    result = out["result"]
    print(f"prompt: {cfg.prompt}")
    for channel, text in (result.chat or {}).get("channels", {}).items():
        print(f"[{channel}] {text}")
    print(f"text: {result.text!r}")
    print(json.dumps({"finish_reason": result.finish_reason, "generated_tokens": len(result.token_ids)}))
    tokens_per_s = len(result.token_ids) / max(out["seconds"], 1e-9)
    print(f"{len(result.token_ids)} tokens in {out['seconds']:.2f} s: {tokens_per_s:.1f} tokens/s "
          f"({out['prompt_tokens']} prompt tokens, {out['device']}, {out['dtype'].removeprefix('torch.')}, "
          f"model loaded in {out['load_seconds']:.1f} s)")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
