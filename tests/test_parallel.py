"""Tensor and expert parallelism on CPU: gloo ranks under torchrun, through the batch job end to end.

Every layout must give the single-rank answer: the same greedy tokens and the same logprobs up to
float32 summation order (tolerance 1e-4; measured ~3e-6), since only the order of the all-reduced
partial sums differs.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from parallel import groups
from parallel.groups import Group, Layout, LayoutError
from runtime import mxfp4
from runtime.config import preset
from runtime.model import GptOss
from batch_jobs import batch_command, job_env, rank_pid, start_batch, written_lines

REQUESTS = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (5 + 3 * i,),
                                                        generator=torch.Generator().manual_seed(i)).tolist(),
             "max_tokens": 6, "temperature": 0, "logprobs": True} for i in range(5)]
# Longer than the others, so it ends up decoding alone: one token, and an empty slice on some ranks.
REQUESTS.append({"id": "sampled", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.9,
                 "top_p": 0.9, "seed": 11, "logprobs": True})
# Without a seed: its default seed comes from the job's seed and its id, so every layout (and replica)
# samples the same tokens for it.
REQUESTS.append({"id": "unseeded", "prompt": "Twice upon a time", "max_tokens": 8, "temperature": 0.8,
                 "logprobs": True})


def batch_job(nproc, checkpoint, inp, out, *overrides, extra_env=None):
    """Run the batch job on nproc gloo ranks (torchrun) and return its results by id."""
    done = subprocess.run(batch_command(nproc, checkpoint, inp, out, *overrides),
                          env=job_env(**(extra_env or {})), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["id"]: r for r in map(json.loads, Path(out).read_text().splitlines())}


def assert_one_ranks_answer(got: dict, expected: dict) -> None:
    """Every request's greedy (or seeded) tokens exactly, its logprobs within 1e-4 (float32)."""
    for rid, want in expected.items():
        assert got[rid]["token_ids"] == want["token_ids"], rid
        assert max(abs(a - b) for a, b in zip(got[rid]["logprobs"], want["logprobs"])) < 1e-4


def requests_file(folder: Path) -> Path:
    inp = folder / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return inp


@pytest.fixture(scope="module")
def single_rank(tiny_checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    inp = requests_file(folder)
    return inp, batch_job(1, tiny_checkpoints["hf"], inp, folder / "single.jsonl")


@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.tp=2"]),                         # attention TP, each expert split 2 ways (TP experts)
    (2, ["parallel.ep=2"]),                         # whole experts over 2 ranks, all-to-all dispatch
    (2, ["parallel.tp=2", "parallel.expert_tp=1"]),  # attention TP, experts partitioned over the same ranks
    (2, ["parallel.dp=2"]),                         # two replicas sharing the input
    (4, ["parallel.ep=4"]),
    (4, ["parallel.tp=2", "parallel.ep=2"]),
    # attention data parallel: each rank schedules its own requests (2, 2, 2 and 1 of the 7 on four
    # ranks, so some ranks run idle steps while others finish) and serves every rank's tokens' experts
    (2, ["parallel.ep=2", "parallel.attention_dp=true"]),
    (4, ["parallel.ep=4", "parallel.attention_dp=true"]),
    (4, ["parallel.ep=2", "parallel.dp=2", "parallel.attention_dp=true"]),
])
def test_layouts_match_one_rank(tiny_checkpoints, single_rank, tmp_path, nproc, layout):
    inp, expected = single_rank
    got = batch_job(nproc, tiny_checkpoints["hf"], inp, tmp_path / "out.jsonl", *layout)
    assert sorted(got, key=str) == sorted(expected, key=str)
    assert_one_ranks_answer(got, expected)


def test_tensor_parallel_under_preemption_and_chunked_prefill_matches_one_rank(tiny_checkpoints, single_rank,
                                                                               tmp_path):
    """tp=2 with a KV pool too small for the batch and a small token budget: the first rank
    preempts, chunks prompts and sends page tables that change under the other rank's feet; every
    request still gets the single-rank answer."""
    inp, expected = single_rank
    got = batch_job(2, tiny_checkpoints["hf"], inp, tmp_path / "out.jsonl", "parallel.tp=2",
                    "kv_cache_tokens=64", "max_batch_size=4", "max_batch_tokens=8",
                    "schedule_conservativeness=0")
    assert_one_ranks_answer(got, expected)


def test_attention_data_parallel_under_preemption_and_chunked_prefill_matches_one_rank(tiny_checkpoints,
                                                                                       single_rank, tmp_path):
    """attention_dp on two ranks with small KV pools and a small token budget: each rank preempts and
    chunks its own prompts, so one rank's step mixes prompt chunks while the other's decodes or idles;
    the ranks agree on every step and every request gets the single-rank answer."""
    inp, expected = single_rank
    got = batch_job(2, tiny_checkpoints["hf"], inp, tmp_path / "out.jsonl", "parallel.ep=2",
                    "parallel.attention_dp=true", "kv_cache_tokens=48", "max_batch_size=3",
                    "max_batch_tokens=8")
    assert_one_ranks_answer(got, expected)


def test_tensor_parallel_kernel_path_matches_one_rank(two_layer_checkpoint, tmp_path):
    """tp=2 through the Triton kernels (the interpreter): each rank's MoE holds half of every
    expert's intermediate dimension and sums the combined rows across ranks (moe_triton's reduce);
    the output projection adds its bias on the first rank only. Same answer as one reference rank.
    The two-layer cut of the tiny model (one layer of each kind) halves the interpreter's time."""
    inp = requests_file(tmp_path)
    expected = batch_job(1, two_layer_checkpoint, inp, tmp_path / "single.jsonl")
    got = batch_job(2, two_layer_checkpoint, inp, tmp_path / "out.jsonl", "parallel.tp=2",
                    extra_env={"GPT_OSS_TRITON": "1", "TRITON_INTERPRET": "1"})
    assert_one_ranks_answer(got, expected)


def shared_prefix_lines() -> list[dict]:
    """Prompts sharing starts of one 70-token stem (mid-page, whole prompts, duplicates), greedy."""
    stem = torch.randint(0, 199998, (70,), generator=torch.Generator().manual_seed(70)).tolist()
    cuts = [70, 70, 48, 33, 32, 17, 64, 50]
    return [{"id": f"p{i}", "prompt_token_ids": stem[:cut] + [1000 + i] * (i % 3), "max_tokens": 5,
             "temperature": 0, "logprobs": True} for i, cut in enumerate(cuts)]


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"],
                                    ["parallel.ep=2", "parallel.attention_dp=true"]])
def test_prefix_caching_under_tensor_and_expert_parallelism_matches_one_rank(tiny_checkpoints, tmp_path,
                                                                             layout):
    """Shared prefixes with caching on (the default), a small budget so prompts are chunked and
    sharers wait for each other's pages: the other rank reads the shared pages through the page
    tables in the step plans, so its answer is one rank's. Under attention_dp each rank caches its
    own share's prefixes (fewer sharers each: fewer hits, the same answers)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in shared_prefix_lines()))
    small = ["max_batch_size=4", "max_batch_tokens=24"]
    one = batch_job(1, tiny_checkpoints["hf"], inp, tmp_path / "one.jsonl", *small,
                    f"stats={tmp_path / 'one.json'}")
    got = batch_job(2, tiny_checkpoints["hf"], inp, tmp_path / "two.jsonl", *small, *layout,
                    f"stats={tmp_path / 'two.json'}")
    assert_one_ranks_answer(got, one)
    stats = [json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json")]
    assert stats[0]["cached_prompt_tokens"] >= 6 * 16
    if "parallel.attention_dp=true" in layout:
        assert 0 < stats[1]["cached_prompt_tokens"] < stats[0]["cached_prompt_tokens"]
    else:
        assert stats[1]["cached_prompt_tokens"] == stats[0]["cached_prompt_tokens"]


def _long_job(tiny_checkpoints, tmp_path, *overrides):
    inp = tmp_path / "long.jsonl"
    # Two short requests first, so results appear within seconds; then enough work to outlast the test.
    inp.write_text("".join(json.dumps({"id": i, "prompt": "go", "max_tokens": 3 if i < 2 else 500,
                                       "ignore_eos": True}) + "\n" for i in range(64)))
    out = tmp_path / "out.jsonl"
    proc = start_batch(2, tiny_checkpoints["original"], inp, out, "parallel.tp=2", "max_batch_size=2",
                       *overrides)
    deadline = time.time() + 60
    while not written_lines(out):  # wait until work is under way
        assert time.time() < deadline and proc.poll() is None, \
            proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    return proc


def test_ranks_on_a_fresh_machine_share_the_embedded_checkpoint(single_rank, tmp_path):
    """No checkpoint= and an empty cache: every rank finds the embedded tiny checkpoint missing and
    makes it at once. Each writes its own copy aside and renames it into place, so none reads another's
    half-written files (they failed with 'Directory not empty' before)."""
    inp, _ = single_rank
    command = batch_command(2, "x", inp, tmp_path / "out.jsonl", "parallel.ep=2")
    command = [arg for arg in command if not arg.startswith("checkpoint=")]
    done = subprocess.run(command, env=job_env(GPT_OSS_CACHE=str(tmp_path / "cache")), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()] == ["tiny-original-seed0"]


def test_a_killed_rank_ends_the_job_and_is_named(tiny_checkpoints, tmp_path):
    proc = _long_job(tiny_checkpoints, tmp_path)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    start = time.time()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.time() - start < 60
    assert "rank      : 1 (local_rank: 1)" in output and "SIGKILL" in output


def test_a_hung_rank_ends_the_job_within_the_timeout(tiny_checkpoints, tmp_path):
    proc = _long_job(tiny_checkpoints, tmp_path, "parallel.timeout_s=3")
    survivor, hung = rank_pid(proc.pid, 0), rank_pid(proc.pid, 1)
    os.kill(hung, signal.SIGSTOP)
    start = time.time()
    while Path(f"/proc/{survivor}").exists() and time.time() - start < 60:
        time.sleep(0.2)
    waited = time.time() - start
    os.kill(hung, signal.SIGKILL)  # spare torchrun its grace period for a stopped process
    output, _ = proc.communicate(timeout=60)
    assert waited < 30, "rank 0 kept waiting on the stopped rank"
    assert proc.returncode != 0 and "rank 0: failed" in output and "Timed out" in output
    assert "rank(s) 1 stopped responding" in output


HEARTBEAT_AT_EXIT = """
import atexit, os, sys, threading
import torch.distributed as dist
from parallel import heartbeat

def after_stop():  # registered before heartbeat.start's own hook, so it runs after it (atexit is LIFO)
    alive = [t for t in threading.enumerate() if t.name == "gpt-oss-heartbeat"]
    print("heartbeat alive at exit" if alive else "heartbeat joined before exit", flush=True)

atexit.register(after_stop)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
heartbeat.start(0, 1)
assert any(t.name == "gpt-oss-heartbeat" for t in threading.enumerate())
"""


def test_the_heartbeat_thread_is_joined_before_the_interpreter_exits(tmp_path):
    # A daemon thread left inside the store's C++ call at interpreter teardown aborts the rank
    # ("terminate called without an active exception") after its work is done; the job then fails.
    port = 21000 + os.getpid() % 20000
    done = subprocess.run(["python", "-c", HEARTBEAT_AT_EXIT, str(port)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "heartbeat joined before exit"


def _parallel(tp=1, experts_split=1, experts_partition=1):
    def g(size):
        return Group(None, 0, size, tuple(range(size)))
    return groups.Parallel(0, tp * experts_partition, Layout(), torch.device("cpu"), g(tp), g(experts_split),
                           g(experts_partition), g(tp), 0)


def test_layouts_that_do_not_fit_are_named():
    with pytest.raises(LayoutError, match=r"parallel.tp \(2\) x parallel.ep \(2\) x parallel.dp \(1\) = 4"):
        Layout(tp=2, ep=2).validate(world_size=2)
    with pytest.raises(LayoutError, match="expert_tp"):
        Layout(tp=2, ep=1, expert_tp=3).validate(world_size=2)
    with pytest.raises(LayoutError, match=r"attention_dp .* needs parallel.tp=1 \(got 2\)"):
        Layout(tp=2, ep=2, attention_dp=True).validate(world_size=4)
    assert Layout(ep=4, dp=2, attention_dp=True).validate(world_size=8).schedulers == 8
    assert Layout(tp=2, ep=2, dp=2).validate(world_size=8).schedulers == 2
    tiny = preset("tiny")  # 4 KV heads, 8 experts, intermediate 128 (4 MXFP4 blocks)
    with pytest.raises(LayoutError, match="parallel.tp \\(8\\) must divide the 4 KV heads"):
        GptOss(tiny, torch.float32, parallel=_parallel(tp=8))
    with pytest.raises(LayoutError, match="8 experts cannot be partitioned evenly over 3"):
        GptOss(tiny, torch.float32, parallel=_parallel(experts_partition=3))
    with pytest.raises(LayoutError, match="not a multiple of the 32-value MXFP4 block"):
        GptOss(tiny.__class__(**{**tiny.__dict__, "intermediate_size": 96}), torch.float32,
               parallel=_parallel(experts_split=2))


def test_each_rank_reads_only_its_slices(tiny_checkpoints):
    """Rank 1 of tp=2 with whole experts over 2 ranks: half the heads, half the vocabulary, half the
    experts, read straight from the checkpoint (no collective is needed to load)."""
    from runtime.checkpoint import CheckpointReader

    reader = CheckpointReader(tiny_checkpoints["hf"])
    cfg = reader.config
    two = lambda: Group(None, 1, 2, (0, 1))  # noqa: E731
    parallel = groups.Parallel(1, 2, Layout(tp=2, expert_tp=1), torch.device("cpu"), two(),
                               Group(None, 0, 1, (1,)), two(), two(), 0)
    model = GptOss(cfg, torch.float32, parallel=parallel).load(reader)
    full = {name: reader.read(name) for name in ("block.0.attn.qkv.weight", "block.0.attn.sinks",
                                                  "block.0.mlp.mlp1_weight.blocks", "unembedding.weight",
                                                  "block.0.attn.out.weight")}
    q, kv, half_q, half_kv = cfg.q_width, cfg.kv_width, cfg.q_width // 2, cfg.kv_width // 2
    expected_qkv = torch.cat([full["block.0.attn.qkv.weight"][half_q:q],
                              full["block.0.attn.qkv.weight"][q + half_kv:q + kv],
                              full["block.0.attn.qkv.weight"][q + kv + half_kv:]])
    local = model.state_dict()
    assert torch.equal(local["block.0.attn.qkv.weight"], expected_qkv.float())
    assert torch.equal(local["block.0.attn.sinks"],
                       full["block.0.attn.sinks"][cfg.num_attention_heads // 2:].float())
    assert torch.equal(local["block.0.attn.out.weight"], full["block.0.attn.out.weight"][:, half_q:].float())
    assert torch.equal(local["block.0.mlp.mlp1_weight.blocks"],  # kept in kernel order
                       mxfp4.quad_transpose(full["block.0.mlp.mlp1_weight.blocks"][cfg.num_experts // 2:]))
    assert torch.equal(local["unembedding.weight"], full["unembedding.weight"][cfg.vocab_size // 2:].float())
