"""The MoE experts on one GPU: the Triton path (plan + two grouped MXFP4 GEMMs + combine).

    python scripts/bench_moe.py --model gpt-oss-20b [gpt-oss-120b] [--tokens 1 2 4 ...] [--sweep]

Per model and token count: time (CUDA events via triton.testing.do_bench, median, L2 flushed between
runs), the bytes of the experts touched (packed blocks + scales + biases of each distinct expert, read
once), TB/s and TFLOP/s, and their share of the copy bandwidth and bf16 matmul rate measured in the
same run (`ceilings`). Then each GEMM alone: the wgmma GEMM with the tiles it had before the
GEMV existed (`gemm_tiles`) against what `choose_tiles` picks now, and beside them a kernel that only
reads the same experts' packed blocks (`read_only_seconds`): what one launch of that size reaches at
all, timed the same way.

`--sweep` times each GEMM over candidate tiles of both kernels (the wgmma `_moe_gemm_kernel`
and the CUDA-core `_moe_gemv_kernel`, the latter with both decode routes for its best shapes),
checks every candidate's output against an fp32 decode-then-matmul reference, and prints the
fastest of each kernel and overall, with the `Tiles(...)` to put into the table of
runtime/kernels/moe_triton_details/tiles.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.limits import ceilings as measure_ceilings  # noqa: E402
from runtime import mxfp4  # noqa: E402
from runtime.checkpoint import random_tensor, tensor_specs  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.moe import swiglu  # noqa: E402
from runtime.kernels.router import route  # noqa: E402
from runtime.kernels.moe_triton import (Tiles, choose_tiles, gemm_tiles, gemv_tiles_ok, grouped_mxfp4,  # noqa: E402
                                      moe_triton, plan)

REP_MS = 100  # do_bench's measuring time per timing (--rep)
# the route words before the GEMM and the GEMV's tensor-core routes had names of their own
ROUTE_ALIASES = {"mma": ("gemm", "tensor_core_row"), "mma_rows": ("tensor_core_rows",)}
KERNEL_ALIASES = {"mma": "gemm"}  # --tiles' kernel word
DECODE_ALIASES = {"mma": "tensor_core_row", "mma_rows": "tensor_core_rows"}  # --tiles' decode word


def bench(fn) -> float:
    """Median seconds of fn (CUDA events, the L2 cache flushed before each run)."""
    return triton.testing.do_bench(fn, warmup=max(5, REP_MS // 4), rep=REP_MS, return_mode="median") / 1e3


NAMES = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias", "mlp2_weight.blocks", "mlp2_weight.scales",
         "mlp2_bias")


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    measured = measure_ceilings(torch.device("cuda"))
    return measured["copy_bytes_per_s"], measured["matmul_flops"]


@triton.jit
def _read_experts_kernel(words_ptr, experts_ptr, out_ptr, expert_words, BLOCK: tl.constexpr):
    """Program (i, j) reads words j * BLOCK.. of expert experts[i] and stores their sum: a kernel that
    does nothing but read, for the read-only ceiling."""
    expert = tl.load(experts_ptr + tl.program_id(0)).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(words_ptr + expert * expert_words + offs, mask=offs < expert_words, other=0)
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(words, 0))


def read_only_seconds(blocks: torch.Tensor, experts: torch.Tensor, block_words: int = 4096) -> float:
    """Median seconds of one launch that only reads the packed blocks of `experts` (distinct ids) in
    16 KB pieces, every load issued at once: what a kernel reading the bytes a GEMM streams, with
    none of its work, reaches at this size (L2 flushed, as for the GEMMs)."""
    words = blocks.view(torch.int32).reshape(blocks.shape[0], -1)
    grid = (experts.numel(), triton.cdiv(words.shape[1], block_words))
    out = torch.empty(grid, dtype=torch.int32, device=blocks.device)
    return bench(lambda: _read_experts_kernel[grid](words, experts, out, words.shape[1], BLOCK=block_words,
                                                    num_warps=4))


def candidates(rows_per_expert: float) -> list[Tiles]:
    """The wgmma GEMM's tiles."""
    if rows_per_expert <= 16:
        return [Tiles(t, n, k, w, s) for t in (8, 16) for n in (32, 64, 128) for k in (128, 256)
                for w, s in ((4, 4), (2, 4), (4, 6)) if t == 8 or rows_per_expert > 4]
    if rows_per_expert <= 128:
        # 28 shapes, most with block_t 32: at 32 rows per expert (256 tokens of 20b) block_t 64 computes
        # half padding. block_t 16 and 64 (the old Tiles(64, 128, 64, 4, 3) among them) for contrast;
        # a 128 x 256 decoded tile only with 8 warps (4 would hold 128 of its values per thread).
        # On an H100 (2026-11-25) block_t 64 still won (perhaps as a second tile decodes the weights again).
        return ([Tiles(32, n, k, w, s) for n, k in ((64, 128), (64, 256), (128, 64), (128, 128))
                 for w, s in ((4, 3), (4, 4), (8, 3), (2, 4))]
                + [Tiles(32, 64, 64, 4, 3), Tiles(32, 128, 256, 8, 3), Tiles(32, 32, 128, 2, 4),
                   Tiles(32, 32, 256, 4, 3)]
                + [Tiles(16, n, k, w, s) for n, k, w, s in ((64, 128, 4, 4), (128, 128, 4, 4),
                                                            (64, 256, 4, 3), (32, 256, 2, 4))]
                + [Tiles(64, n, k, w, s) for n, k, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                                                            (128, 128, 8, 3))])
    return [Tiles(t, n, k, w, s) for t in (128, 256) for n in (64, 128) for k in (64, 128)
            for w, s in ((4, 3), (8, 3), (8, 4))]


# The GEMV's shapes per rows-per-tile: (block_n, block_k, num_warps, unroll). Each thread holds
# block_n * block_k / (32 * 32 * num_warps) weight rows of one 32-value block per step. The comments
# give registers for mlp1 / mlp2 and compile time (per kernel, 2 CPU cores) from sm_90 SASS with
# ptxas 12.9 and Triton 3.9 (the device's may differ); shapes whose unrolled bodies took ptxas
# minutes (four-row tiles unrolled, 256-wide steps with several row counts) are left out.
GEMV_SHAPES = {
    1: [(32, 512, 4, True),  # 127 / 128 registers, 4 s: the default
        (16, 512, 4, True),  # 56 / 122
        (32, 256, 4, True),  # 57 / 255 + spills, 6 s
        (64, 512, 8, True),  # 137 / 211, 4 s
        (16, 512, 2, True),  # 178 / 182, 5 s
        (16, 1024, 4, True),  # 167 / 167, 3 s
        (32, 512, 4, False),  # 96 / 96, 3 s
        (64, 512, 4, False)],  # 168 / 168, 4 s
    2: [(32, 512, 4, False),  # 127 / 128, 4 s: the default
        (16, 512, 4, True),  # 128 / 155, 8 s
        (32, 512, 8, True),  # 128 / 234, 8 s
        (16, 512, 4, False),  # 80 / 100, 4 s
        (32, 256, 4, False)],  # 72 / 100, 4 s
    4: [(16, 1024, 8, False),  # 128 / 128, 10 s: the default
        (16, 512, 4, False),  # 162 / 163, 9 s
        (32, 512, 8, False),  # 160 / 166, 10 s
        (16, 256, 2, False)],  # 164 / 166, 10 s
}


# (block_n, block_k, num_warps) of the multi-row route
TENSOR_CORE_ROWS_SHAPES = [(32, 128, 2), (64, 128, 4), (128, 128, 8), (32, 256, 2), (64, 256, 4),
                           (32, 512, 2), (64, 512, 4)]


def gemv_candidates(rows: int, num_experts: int) -> list[Tiles]:
    """GEMV tiles for this batch: rows per tile around the batch's rows per expert, and the multi-row
    tensor-core route with 8 and 16 rows a tile."""
    per_expert = rows / max(1, min(rows, num_experts))
    multi_row = [Tiles(t, n, k, w, 1, "gemv", "tensor_core_rows")
                 for t in (8, 16) for n, k, w in TENSOR_CORE_ROWS_SHAPES
                 if t == 8 or per_expert > 2] if per_expert <= 16 else []
    if per_expert > 8:
        return multi_row
    block_ts = (1, 2) if rows * 8 <= num_experts else (2, 1, 4) if per_expert <= 2 else (4, 2)
    tiles = [Tiles(t, n, k, w, 1, "gemv", "fp16", unroll)
             for t in block_ts for n, k, w, unroll in GEMV_SHAPES[t]]
    if 1 in block_ts:  # the tensor-core route: two weight rows a thread, 32 // groups lanes a row pair
        tiles += [Tiles(1, 2 * (32 // g) * w, 32 * g, w, 1, "gemv", "tensor_core_row")
                  for g in (4, 8, 16, 32) for w in (2, 4, 8)]
    return tiles + multi_row


def reference(x, source, source_div, experts_sorted, blocks, scales, bias, limit):
    """fp32 decode-then-matmul per expert touched: the grouped GEMMs' contract, [rows, N (/ 2)]."""
    out = None
    for e in torch.unique(experts_sorted).tolist():
        rows = torch.nonzero(experts_sorted == e).squeeze(1)
        src = source[rows].long() // source_div if source is not None else rows
        y = x[src].float() @ mxfp4.decode(blocks[e], scales[e], torch.float32, kernel_order=True).T \
            + bias[e].float()
        y = swiglu(y, limit) if limit is not None else y
        if out is None:
            out = torch.empty(len(experts_sorted), y.shape[1], device=x.device)
        out[rows] = y
    return out


def time_candidates(fn, check, tiles_list: list[Tiles]) -> list[tuple[float, Tiles]]:
    """(seconds, tiles) of each candidate whose output matches the reference, fastest first."""
    timed = []
    for tiles in tiles_list:
        try:
            err = check(fn(tiles))
            if err is not None:
                print(f"    {tiles}: WRONG ({err})", flush=True)
                continue
            timed.append((bench(lambda: fn(tiles)), tiles))
        except Exception as e:  # a shape the compiler rejects (e.g. out of shared memory)
            print(f"    {tiles}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    timed.sort(key=lambda x: x[0])
    return timed


def router_logits(tokens: int, num_experts: int, skew: float, device="cpu", generator=None) -> torch.Tensor:
    """Random router logits, [tokens, E]; skew > 0 adds a fixed per-expert offset of that standard
    deviation (the same for every token), so that some experts are busier than others, as in a real
    model's layers (the engine's report gives the busiest expert against the mean)."""
    logits = torch.randn(tokens, num_experts, device=device, generator=generator)
    if skew:
        offsets = torch.randn(num_experts, generator=torch.Generator().manual_seed(1)).to(device)
        logits += skew * offsets
    return logits


def busiest_over_mean(expert_ids: torch.Tensor, num_experts: int) -> float:
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float()
    return (counts.max() / counts.mean()).item()


def run(bw: float, mm: float, model: str = "gpt-oss-20b", token_counts=(1, 8, 64, 512, 4096, 16384),
        sweep: bool = False, routes: tuple[str, ...] = ("gemm", "gemv"),
        tiles: list[Tiles] | None = None, skew: float = 0.0) -> list[dict]:
    """routes: which candidates the sweep times: "gemm" (the wgmma GEMM), "gemv" (every GEMV route),
    or one GEMV route by its decode name ("tensor_core_rows", "tensor_core_row", "fp16", "e4m3"); the
    old words "mma" (the GEMM and the one-row route) and "mma_rows" still work (`ROUTE_ALIASES`);
    tiles: the candidates of both kernels instead of `candidates` and `gemv_candidates`."""
    routes = tuple(r for route in routes for r in ROUTE_ALIASES.get(route, (route,)))
    cfg = preset(model)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = [random_tensor(specs[f"block.0.mlp.{n}"], gen, "cuda") for n in NAMES]
    per_gemm = [sum(t[0].numel() * t.element_size() for t in w[:3]),
                sum(t[0].numel() * t.element_size() for t in w[3:])]
    E = cfg.num_experts
    results = []
    for tokens in token_counts:
        expert_ids, weights = route(router_logits(tokens, E, skew, "cuda"), cfg.experts_per_token)
        if skew:
            print(f"  tokens {tokens}: busiest expert / mean {busiest_over_mean(expert_ids, E):.2f}",
                  flush=True)
        h = torch.randn(tokens, cfg.hidden_size, device="cuda").to(torch.bfloat16)
        touched_ids = torch.unique(expert_ids).to(torch.int32)
        experts = touched_ids.numel()
        touched = experts * sum(per_gemm)
        flops = 2 * expert_ids.numel() * cfg.hidden_size * 3 * cfg.intermediate_size
        whole = bench(lambda: moe_triton(h, expert_ids, weights, *w, cfg.swiglu_limit, residual=h))
        p = plan(expert_ids, E)
        act = grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w[:3], torch.bfloat16,
                            swiglu_limit=cfg.swiglu_limit, tiles=gemm_tiles(p.num_rows, E, True))

        def gemm1(tiles=None):
            return grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w[:3], torch.bfloat16,
                                 swiglu_limit=cfg.swiglu_limit, tiles=tiles)

        def gemm2(tiles=None):
            return grouped_mxfp4(act, None, 1, p, *w[3:], torch.float32, tiles=tiles)

        old = (gemm_tiles(p.num_rows, E, True), gemm_tiles(p.num_rows, E, False))
        new = (choose_tiles(p.num_rows, E, True), choose_tiles(p.num_rows, E, False))
        t_old = [bench(lambda: fn(t)) for fn, t in zip((gemm1, gemm2), old)]
        t_new = [bench(lambda: fn(t)) for fn, t in zip((gemm1, gemm2), new)]
        gemms = bench(lambda: (gemm1(), gemm2()))
        row = {"kernel": "moe", "model": model, "tokens": tokens, "experts": experts, "bytes": touched,
               "flops": flops, "seconds": whole, "gemm_seconds": gemms, "tiles": new[0],
               "gemm_old_seconds": t_old, "gemm_new_seconds": t_new, "old_tiles": old, "new_tiles": new}
        for i, name in enumerate(("gemm1", "gemm2")):
            nbytes = experts * per_gemm[i]
            blocks = w[3 * i]
            read = read_only_seconds(blocks, touched_ids)
            print(f"  tokens {tokens} {name} ({nbytes / 1e6:.1f} MB): gemm {old[i]} {t_old[i] * 1e6:.1f} us "
                  f"({100 * nbytes / t_old[i] / bw:.0f}% copy BW); now {new[i]} {t_new[i] * 1e6:.1f} us "
                  f"({100 * nbytes / t_new[i] / bw:.0f}%), {t_old[i] / t_new[i]:.2f}x; "
                  "a read-only kernel over its "
                  f"{experts} experts' blocks {read * 1e6:.1f} us "
                  f"({100 * experts * blocks[0].numel() / read / bw:.0f}% copy BW)", flush=True)
        if sweep:
            order = p.order.long()
            refs = (reference(h, p.order, cfg.experts_per_token, expert_ids.reshape(-1)[order], *w[:3],
                              cfg.swiglu_limit),
                    reference(act, None, 1, expert_ids.reshape(-1)[order], *w[3:], None))
            for i, (name, fn) in enumerate((("gemm1", gemm1), ("gemm2", gemm2))):
                nbytes = experts * per_gemm[i]

                def check(got, ref=refs[i]):
                    rel = ((got.float() - ref).norm() / ref.norm()).item()
                    ok = (torch.isfinite(got).all().item()
                          and rel < (1e-2 if got.dtype == torch.bfloat16 else 1e-3))
                    return None if ok else f"relative error {rel:.2e}"

                per = p.num_rows / max(1, min(p.num_rows, E))
                given_gemm = [t for t in tiles if t.kernel == "gemm"] if tiles else candidates(per)
                gemm = time_candidates(fn, check, given_gemm) if "gemm" in routes else []
                wanted = [t for t in ([t for t in tiles if t.kernel == "gemv"] if tiles
                                      else gemv_candidates(p.num_rows, E))
                          if gemv_tiles_ok(t) and ("gemv" in routes or t.decode in routes)]
                gemv = time_candidates(fn, check, wanted)
                if "gemv" in routes:
                    gemv += time_candidates(fn, check,
                                            [dataclasses.replace(t, decode="e4m3") for _, t in gemv[:3]
                                             if t.decode == "fp16"])
                gemv.sort(key=lambda x: x[0])
                for kind, timed in (("gemm", gemm), ("gemv", gemv)):
                    if timed:
                        shown = timed if tiles else timed[:3]  # every given candidate, else the fastest 3
                        print(f"  tokens {tokens} {name} best {kind}: " + "; ".join(
                            f"{s * 1e6:.1f} us ({100 * nbytes / s / bw:.0f}%) {short(t)}" for s, t in shown),
                              flush=True)
                best = min(gemm[:1] + gemv[:1], key=lambda x: x[0], default=None)
                row[f"{name}_best"] = best
                if best is not None:
                    print(f"  tokens {tokens} {name} FASTEST: {best[1]} {best[0] * 1e6:.1f} us "
                          f"({100 * nbytes / best[0] / bw:.0f}% copy BW); "
                          f"rows {p.num_rows}, {per:.2f} per expert",
                          flush=True)
        results.append(row)
        print(format_row(row, bw, mm), flush=True)
    return results


def format_row(r: dict, bw: float, mm: float) -> str:
    s, g = r["seconds"], r["gemm_seconds"]
    return (f"| {r['model']} | {r['tokens']} | {r['experts']} | {r['bytes'] / 1e6:.1f} | {s * 1e6:.1f} | "
            f"{r['bytes'] / s / 1e12:.2f} | {100 * r['bytes'] / s / bw:.1f}% | {r['flops'] / s / 1e12:.1f} | "
            f"{100 * r['flops'] / s / mm:.1f}% | {g * 1e6:.1f} | {100 * r['bytes'] / g / bw:.1f}% | "
            f"{100 * r['flops'] / g / mm:.1f}% |")


HEADER = ("| model | tokens | experts | MB touched | time µs | TB/s | % copy BW | TFLOP/s | % matmul | "
          "GEMMs alone µs | % copy BW | % matmul |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def compare_table(rows: list[dict], bw: float) -> str:
    """Both GEMMs: the wgmma GEMM's old tiles against choose_tiles now (and the sweep's best)."""
    out = ["| model | tokens | MB touched | GEMMs before µs | % copy BW | GEMMs now µs | % copy BW | "
           "speed-up | best gemm1 | best gemm2 |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        old, new = sum(r["gemm_old_seconds"]), sum(r["gemm_new_seconds"])
        best = [f"{b[1]} {b[0] * 1e6:.1f} us" if b else ""
                for b in (r.get("gemm1_best"), r.get("gemm2_best"))]
        out.append(f"| {r['model']} | {r['tokens']} | {r['bytes'] / 1e6:.1f} | {old * 1e6:.1f} | "
                   f"{100 * r['bytes'] / old / bw:.1f}% | {new * 1e6:.1f} | "
                   f"{100 * r['bytes'] / new / bw:.1f}% | "
                   f"{old / new:.2f}x | {best[0]} | {best[1]} |")
    return "\n".join(out)


def short(t: Tiles) -> str:
    """Tiles as --tiles spells them: T,N,K,WARPS,STAGES[,KERNEL,DECODE][,maxnreg=R][,tail_t=T]."""
    words = [str(v) for v in (t.block_t, t.block_n, t.block_k, t.num_warps, t.num_stages)]
    if t.kernel != "gemm":
        words += [t.kernel, t.decode]
    return ",".join(words + [f"{k}={v}" for k, v in (("maxnreg", t.maxnreg), ("tail_t", t.tail_t)) if v])


def parse_tiles(text: str) -> Tiles:
    """T,N,K,WARPS,STAGES[,KERNEL,DECODE][,maxnreg=R][,tail_t=T] -> Tiles, the old words mma and
    mma_rows read as before."""
    values = [v for v in text.split(",") if "=" not in v]
    settings = dict(v.split("=", 1) for v in text.split(",") if "=" in v)
    if set(settings) - {"maxnreg", "tail_t"}:
        raise SystemExit(f"--tiles {text}: only maxnreg=R and tail_t=T may follow as settings")
    words = values[5:]
    if words:
        words[0] = KERNEL_ALIASES.get(words[0], words[0])
    if len(words) > 1:
        words[1] = DECODE_ALIASES.get(words[1], words[1])
    return Tiles(*(int(v) for v in values[:5]), *words,
                 **{name: int(value) for name, value in settings.items()})


def count_tiles(models, token_counts, skew: float = 0.0) -> None:
    """The GEMMs' programs along rows under the rules' tiles, without tail tiles and with them (the
    tiles' tail_t, else a quarter of a tile from 64 rows), no GPU: random router logits as the timings
    use, the tile arithmetic of common.find_tile."""
    print("| model | tokens | GEMM | tiles (rows, tail) | rows per expert (min-max) | busiest / mean | "
          "row tiles without tails | with: full + tail |\n|---|---:|---|---|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for model in models:
        cfg = preset(model)
        for tokens in token_counts:
            ids, _ = route(router_logits(tokens, cfg.num_experts, skew, generator=gen), cfg.experts_per_token)
            counts = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
            for swiglu_, name in ((True, "mlp1"), (False, "mlp2")):
                t = gemm_tiles(ids.numel(), cfg.num_experts, swiglu_)
                tail_t = t.tail_t or (t.block_t // 4 if t.block_t >= 64 else 0)
                rem = counts % t.block_t
                tails = (rem > 0) & (rem <= tail_t)
                full = (counts - torch.where(rem <= tail_t, rem, 0) + t.block_t - 1) // t.block_t
                print(f"| {model} | {tokens:,} | {name} | {t.block_t}, {tail_t} | {int(counts.min())}-"
                      f"{int(counts.max())} | {busiest_over_mean(ids, cfg.num_experts):.2f} | "
                      f"{int(((counts + t.block_t - 1) // t.block_t).sum())} | "
                      f"{int(full.sum())} + {int(tails.sum())} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["gpt-oss-20b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    ap.add_argument("--sweep", action="store_true",
                    help="time each GEMM over candidate tiles of both kernels")
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of runs per timing (do_bench's rep)")
    ap.add_argument("--routes", nargs="+", default=["gemm", "gemv"],
                    help="the sweep's candidates: gemm (the wgmma GEMM), gemv (all GEMV routes), "
                         "or GEMV decode names (tensor_core_row, tensor_core_rows, fp16, e4m3)")
    ap.add_argument("--tiles", nargs="+", default=None,
                    metavar="T,N,K,WARPS,STAGES[,KERNEL,DECODE][,maxnreg=R][,tail_t=T]",
                    help="the sweep's candidates instead of those by rows per expert, e.g. 128,128,64,8,3 "
                         "(the wgmma GEMM) or 32,64,128,4,1,gemv,tensor_core_rows (a GEMV route)")
    ap.add_argument("--expert-skew", type=float, default=0.0,
                    help="a fixed per-expert offset of this standard deviation on the random router logits "
                         "(0: every expert equally likely; 0.2 gives 20b a busiest expert near 1.9x the "
                         "mean, as the engine reports for its dummy 20b's worst layer)")
    ap.add_argument("--count-tiles", action="store_true",
                    help="only count the GEMMs' row tiles with and without tail tiles (no GPU needed)")
    args = ap.parse_args()
    if args.count_tiles:
        return count_tiles(args.model, args.tokens, args.expert_skew)
    tiles = [parse_tiles(t) for t in args.tiles] if args.tiles else None
    global REP_MS
    REP_MS = args.rep
    bw, mm = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    rows = []
    for model in args.model:
        rows += run(bw, mm, model, args.tokens, args.sweep, tuple(args.routes), tiles, args.expert_skew)
    print(HEADER)
    for r in rows:
        print(format_row(r, bw, mm))
    print()
    print(compare_table(rows, bw))


if __name__ == "__main__":
    main()
