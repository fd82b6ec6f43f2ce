"""Checkpoints: the public tensor names of both layouts (docs/gpt-oss-spec.md §2.1, §2.2), one internal view
of them, partial reads, and errors that name what is wrong."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from runtime.checkpoint import CheckpointError, CheckpointReader, tensor_specs, write_checkpoint
from runtime.config import preset

CFG = preset("tiny")
E, I, D, L = CFG.num_experts, CFG.intermediate_size, CFG.hidden_size, CFG.num_hidden_layers


def header(folder):
    """{tensor name: (file name, shape, safetensors dtype)} over every *.safetensors of `folder`."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                sl = h.get_slice(key)
                assert key not in out, f"{key} stored twice"
                out[key] = (f.name, tuple(sl.get_shape()), sl.get_dtype())
    return out


def edited_copy(src, dst, edit_tensors=None, edit_config=None):
    """A copy of checkpoint `src` in `dst`: all tensors in one model.safetensors after `edit_tensors`
    (a function changing the dict in place), config.json after `edit_config`."""
    dst = Path(dst)
    dst.mkdir()
    if edit_tensors is None:
        for f in Path(src).glob("*.safetensors"):
            os.symlink(f, dst / f.name)
    else:
        tensors = {}
        for f in sorted(Path(src).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((Path(src) / "config.json").read_text())
    if edit_config is not None:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------------- layouts
def test_original_layout_names_shapes_dtypes(tiny_checkpoints):
    h = header(tiny_checkpoints["original"])
    assert h["embedding.weight"][1:] == ((CFG.vocab_size, D), "BF16")
    assert h["unembedding.weight"][1:] == ((CFG.vocab_size, D), "BF16")
    assert h["norm.scale"][1:] == ((D,), "BF16")
    assert h["block.0.attn.qkv.weight"][1:] == ((CFG.qkv_width, D), "BF16")
    assert h["block.0.attn.qkv.bias"][1:] == ((CFG.qkv_width,), "BF16")
    assert h["block.1.attn.sinks"][1:] == ((CFG.num_attention_heads,), "BF16")
    assert h["block.2.attn.out.weight"][1:] == ((D, CFG.q_width), "BF16")
    assert h["block.3.mlp.gate.weight"][1:] == ((E, D), "BF16")
    assert h["block.3.mlp.mlp1_weight.blocks"][1:] == ((E, 2 * I, D // 32, 16), "U8")
    assert h["block.3.mlp.mlp1_weight.scales"][1:] == ((E, 2 * I, D // 32), "U8")
    assert h["block.3.mlp.mlp1_bias"][1:] == ((E, 2 * I), "BF16")
    assert h["block.3.mlp.mlp2_weight.blocks"][1:] == ((E, D, I // 32, 16), "U8")
    assert h["block.3.mlp.mlp2_bias"][1:] == ((E, D), "BF16")
    assert set(h) == set(tensor_specs(CFG))  # 15 per block + 3, nothing else
    assert len(h) == 15 * L + 3


def test_hf_layout_names_shapes_dtypes(tiny_checkpoints):
    h = header(tiny_checkpoints["hf"])
    p = "model.layers.1."
    assert h["model.embed_tokens.weight"][1:] == ((CFG.vocab_size, D), "BF16")
    assert h["lm_head.weight"][1:] == ((CFG.vocab_size, D), "BF16")
    assert h["model.norm.weight"][1:] == ((D,), "BF16")
    assert h[p + "input_layernorm.weight"][1:] == ((D,), "BF16")
    assert h[p + "post_attention_layernorm.weight"][1:] == ((D,), "BF16")
    assert h[p + "self_attn.q_proj.weight"][1:] == ((CFG.q_width, D), "BF16")
    assert h[p + "self_attn.k_proj.weight"][1:] == ((CFG.kv_width, D), "BF16")
    assert h[p + "self_attn.v_proj.weight"][1:] == ((CFG.kv_width, D), "BF16")
    assert h[p + "self_attn.q_proj.bias"][1:] == ((CFG.q_width,), "BF16")
    assert h[p + "self_attn.v_proj.bias"][1:] == ((CFG.kv_width,), "BF16")
    assert h[p + "self_attn.o_proj.weight"][1:] == ((D, CFG.q_width), "BF16")
    assert h[p + "self_attn.sinks"][1:] == ((CFG.num_attention_heads,), "BF16")
    assert h[p + "mlp.router.weight"][1:] == ((E, D), "BF16")
    assert h[p + "mlp.router.bias"][1:] == ((E,), "BF16")
    assert h[p + "mlp.experts.gate_up_proj_blocks"][1:] == ((E, 2 * I, D // 32, 16), "U8")
    assert h[p + "mlp.experts.gate_up_proj_scales"][1:] == ((E, 2 * I, D // 32), "U8")
    assert h[p + "mlp.experts.gate_up_proj_bias"][1:] == ((E, 2 * I), "BF16")
    assert h[p + "mlp.experts.down_proj_blocks"][1:] == ((E, D, I // 32, 16), "U8")
    assert h[p + "mlp.experts.down_proj_scales"][1:] == ((E, D, I // 32), "U8")
    assert h[p + "mlp.experts.down_proj_bias"][1:] == ((E, D), "BF16")
    assert not any(k.startswith("block.") or "qkv" in k for k in h)
    assert len(h) == 19 * L + 3  # docs/gpt-oss-spec.md §2.2: 459 = 24 x 19 + 3 for 20b


def test_hf_layout_is_sharded_with_a_complete_index(tiny_checkpoints):
    folder = Path(tiny_checkpoints["hf"])
    h = header(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(h)
    assert index["weight_map"] == {k: f for k, (f, _, _) in h.items()}
    assert set(index["weight_map"].values()) == set(shards)
    payload = sum(t.numel() * t.element_size() for f in shards for t in load_file(str(folder / f)).values())
    assert index["metadata"]["total_size"] == payload


def test_both_layouts_give_identical_internal_tensors(tiny_checkpoints):
    original = CheckpointReader(tiny_checkpoints["original"])
    hf = CheckpointReader(tiny_checkpoints["hf"])
    assert (original.layout, hf.layout) == ("original", "hf")
    assert original.config == hf.config == CFG
    original.validate()
    hf.validate()
    specs = tensor_specs(CFG)
    for name, spec in specs.items():
        a, b = original.read(name), hf.read(name)
        assert tuple(a.shape) == spec.shape, name
        assert a.dtype == (torch.uint8 if spec.kind == "uint8" else torch.bfloat16), name
        assert torch.equal(a, b), name


def test_hf_qkv_is_q_then_k_then_v(tiny_checkpoints):
    folder = Path(tiny_checkpoints["hf"])
    fused = CheckpointReader(folder).read("block.2.attn.qkv.bias")
    where = header(folder)
    parts = []
    for proj in ("q", "k", "v"):
        name = f"model.layers.2.self_attn.{proj}_proj.bias"
        with safe_open(str(folder / where[name][0]), framework="pt") as f:
            parts.append(f.get_tensor(name))
    assert [len(p) for p in parts] == [CFG.q_width, CFG.kv_width, CFG.kv_width]
    assert torch.equal(fused, torch.cat(parts))


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("name, ranges", [
    ("block.1.attn.qkv.weight", [(500, 530)]),             # crosses q | k (q_width 512)
    ("block.1.attn.qkv.weight", [(600, 700)]),             # crosses k | v (at 640)
    ("block.1.attn.qkv.bias", [(0, 3), (505, 645), (760, 768)]),  # several ranges, all three pieces
    ("block.0.mlp.mlp1_weight.blocks", [(2, 5)]),
    ("block.3.mlp.mlp2_bias", [(7, 8)]),
    ("unembedding.weight", [(199990, 201088)]),
])
def test_row_ranges_equal_slices_of_the_full_read(tiny_checkpoints, layout, name, ranges):
    reader = CheckpointReader(tiny_checkpoints[layout])
    full = reader.read(name)
    part = reader.read(name, {0: ranges})
    assert torch.equal(part, torch.cat([full[a:b] for a, b in ranges]))


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_ranges_on_other_dims(tiny_checkpoints, layout):
    reader = CheckpointReader(tiny_checkpoints[layout])
    full = reader.read("block.0.mlp.mlp1_weight.blocks")
    part = reader.read("block.0.mlp.mlp1_weight.blocks", {0: [(1, 3)], 1: [(64, 128)]})
    assert torch.equal(part, full[1:3, 64:128])
    full = reader.read("block.1.attn.qkv.weight")
    part = reader.read("block.1.attn.qkv.weight", {0: [(480, 660)], 1: [(5, 9)]})
    assert torch.equal(part, full[480:660, 5:9])


# -------------------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        CheckpointReader(tmp_path / "nowhere")


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_original_json()))
    with pytest.raises(CheckpointError, match="safetensors"):
        CheckpointReader(tmp_path)


def test_folder_without_config_json(tiny_checkpoints, tmp_path):
    folder = edited_copy(tiny_checkpoints["original"], tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(folder)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_config_json_missing_a_field(tiny_checkpoints, tmp_path, layout):
    folder = edited_copy(tiny_checkpoints[layout], tmp_path / "ckpt", edit_config=lambda c: c.pop("head_dim"))
    with pytest.raises(CheckpointError, match="head_dim"):
        CheckpointReader(folder)


@pytest.mark.parametrize("layout, dropped", [
    ("original", "block.1.attn.sinks"),
    ("hf", "model.layers.2.self_attn.v_proj.bias"),
])
def test_missing_tensor_is_named(tiny_checkpoints, tmp_path, layout, dropped):
    folder = edited_copy(tiny_checkpoints[layout], tmp_path / "ckpt", edit_tensors=lambda t: t.pop(dropped))
    reader = CheckpointReader(folder)
    with pytest.raises(CheckpointError, match=dropped.replace(".", r"\.")):
        reader.validate()


def test_config_with_more_layers_than_the_files(tiny_checkpoints, tmp_path):
    folder = edited_copy(tiny_checkpoints["original"], tmp_path / "ckpt",
                         edit_config=lambda c: c.update(num_hidden_layers=6))
    with pytest.raises(CheckpointError, match=r"block\.4\."):
        CheckpointReader(folder).validate()


@pytest.mark.parametrize("layout, name, make", [
    ("original", "block.0.attn.qkv.bias", lambda t: t[:-1]),                  # rows
    ("original", "block.2.mlp.mlp2_weight.scales", lambda t: t[:, :, :-1]),   # trailing dim
    # [E, 2I, 128] instead of [.., 4, 16]
    ("original", "block.3.mlp.mlp1_weight.blocks", lambda t: t.flatten(-2)),
    ("hf", "model.layers.1.self_attn.k_proj.weight", lambda t: t[:-32]),
    ("hf", "model.layers.0.mlp.experts.down_proj_blocks", lambda t: t[:, :, :2]),
])
def test_misshaped_tensor_is_named(tiny_checkpoints, tmp_path, layout, name, make):
    def edit(tensors):
        tensors[name] = make(tensors[name]).contiguous()

    folder = edited_copy(tiny_checkpoints[layout], tmp_path / "ckpt", edit_tensors=edit)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        CheckpointReader(folder).validate()


@pytest.mark.parametrize("layout, name, dtype", [
    ("original", "block.0.mlp.mlp1_weight.blocks", torch.int8),
    ("original", "block.1.mlp.mlp2_weight.scales", torch.bfloat16),
    ("hf", "model.layers.3.mlp.experts.gate_up_proj_blocks", torch.float16),
])
def test_wrong_dtype_for_mxfp4_is_named(tiny_checkpoints, tmp_path, layout, name, dtype):
    def edit(tensors):
        tensors[name] = tensors[name].to(dtype)

    folder = edited_copy(tiny_checkpoints[layout], tmp_path / "ckpt", edit_tensors=edit)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        CheckpointReader(folder).validate()


def test_unrecognised_tensor_names(tmp_path):
    save_file({"transformer.h.0.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_original_json()))
    with pytest.raises(CheckpointError, match="layout"):
        CheckpointReader(tmp_path)


def test_errors_are_value_errors():
    # Callers that catch ValueError (as for ConfigError) also catch checkpoint problems.
    assert issubclass(CheckpointError, ValueError)


def test_written_checkpoints_follow_the_umask(tmp_path):
    """A checkpoint made for a team is readable as the user's umask allows (the temporary folder's
    0700 and safetensors' 0600 do not leak into it)."""
    old = os.umask(0o027)
    try:
        path = write_checkpoint(preset("tiny"), tmp_path / "ckpt", layout="hf", seed=0, shard_bytes=40 << 20)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o750
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {0o640}
