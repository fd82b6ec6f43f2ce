"""Runs each MoE GEMM of one layer a few times at given batch sizes, for a profiler to catch
(scripts/device_survey.sh's ncu step): `python scripts/moe_gemm_once.py [--model M] [--tokens N ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.checkpoint import random_tensor, tensor_specs  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.moe_triton import grouped_mxfp4, plan  # noqa: E402
from runtime.kernels.router import route  # noqa: E402

NAMES = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias", "mlp2_weight.blocks", "mlp2_weight.scales",
         "mlp2_bias")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg = preset(args.model)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = [random_tensor(specs[f"block.0.mlp.{n}"], gen, "cuda") for n in NAMES]
    for tokens in args.tokens:
        expert_ids, _ = route(torch.randn(tokens, cfg.num_experts, device="cuda"), cfg.experts_per_token)
        h = torch.randn(tokens, cfg.hidden_size, device="cuda").to(torch.bfloat16)
        p = plan(expert_ids, cfg.num_experts)
        for _ in range(args.repeat):
            act = grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w[:3], torch.bfloat16,
                                swiglu_limit=cfg.swiglu_limit)
            grouped_mxfp4(act, None, 1, p, *w[3:], torch.float32)
        torch.cuda.synchronize()
        print(f"{args.model}: {tokens} tokens, {p.num_rows} rows", flush=True)


if __name__ == "__main__":
    main()
