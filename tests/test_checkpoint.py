"""Checkpoints: the two public layouts, their mapping onto one naming, and clear errors."""

import json

import pytest
import torch
from safetensors import safe_open

from runtime.checkpoint import CheckpointError, CheckpointReader, tensor_specs, write_checkpoint
from runtime.config import ConfigError, from_json_dict, preset


def names_in(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: (f.name, tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()})
    return out


def test_layouts_hold_the_public_tensor_names(tiny_checkpoints):
    from pathlib import Path

    cfg = preset("tiny")
    E, I, d = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    original = names_in(Path(tiny_checkpoints["original"]))
    assert original["block.0.mlp.mlp1_weight.blocks"][1:] == ((E, 2 * I, d // 32, 16), "U8")
    assert original["block.3.attn.qkv.weight"][1:] == ((cfg.qkv_width, d), "BF16")
    assert {"embedding.weight", "unembedding.weight", "norm.scale", "block.1.attn.sinks"} <= set(original)
    hf_folder = Path(tiny_checkpoints["hf"])
    hf = names_in(hf_folder)
    assert hf["model.layers.0.mlp.experts.gate_up_proj_blocks"][1:] == ((E, 2 * I, d // 32, 16), "U8")
    assert hf["model.layers.0.mlp.experts.down_proj_scales"][1:] == ((E, d, I // 32), "U8")
    assert hf["model.layers.2.self_attn.k_proj.weight"][1] == (cfg.kv_width, d)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(hf)
    assert len(original) == len(hf) - 4 * cfg.num_hidden_layers  # q/k/v split: 4 more tensors per layer
    index = json.loads((hf_folder / "model.safetensors.index.json").read_text())
    assert len({f for f, _, _ in hf.values()}) > 1 and set(index["weight_map"]) == set(hf)
    assert all(hf[k][0] == f for k, f in index["weight_map"].items())


def test_both_layouts_read_the_same_tensors(tiny_checkpoints):
    a, b = CheckpointReader(tiny_checkpoints["original"]), CheckpointReader(tiny_checkpoints["hf"])
    assert (a.layout, b.layout) == ("original", "hf") and a.config == b.config == preset("tiny")
    for name in tensor_specs(a.config):
        assert torch.equal(a.read(name), b.read(name)), name


def test_sliced_reads_equal_slices_of_the_full_read(tiny_checkpoints):
    cfg = preset("tiny")
    lo, hi = cfg.q_width - 40, cfg.q_width + cfg.kv_width + 3  # spans q | k | v in the HF layout
    for path in tiny_checkpoints.values():
        r = CheckpointReader(path)
        full = r.read("block.1.attn.qkv.weight")
        assert torch.equal(r.read("block.1.attn.qkv.weight", {0: [(lo, hi)]}), full[lo:hi])
        several = r.read("block.1.attn.qkv.weight", {0: [(0, 8), (lo, hi)], 1: [(4, 20)]})
        assert torch.equal(several, torch.cat([full[0:8], full[lo:hi]])[:, 4:20])
        blocks = r.read("block.0.mlp.mlp1_weight.blocks")
        assert torch.equal(r.read("block.0.mlp.mlp1_weight.blocks", {0: [(2, 5)], 2: [(1, 3)]}), blocks[2:5, :, 1:3])


def test_missing_folder_and_config(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path / "empty")
    copy = tmp_path / "noconfig"
    copy.mkdir()
    (copy / "model.safetensors").symlink_to(f"{tiny_checkpoints['original']}/model.safetensors")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        CheckpointReader(copy)


def test_wrong_dtype_for_mxfp4_blocks_is_named(tmp_path, tiny_checkpoints):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["original"]
    tensors = load_file(f"{src}/model.safetensors")
    tensors["block.0.mlp.mlp2_weight.blocks"] = tensors["block.0.mlp.mlp2_weight.blocks"].to(torch.bfloat16)
    (tmp_path / "c").mkdir()
    save_file(tensors, tmp_path / "c" / "model.safetensors")
    (tmp_path / "c" / "config.json").write_text(open(f"{src}/config.json").read())
    with pytest.raises(CheckpointError, match=r"block\.0\.mlp\.mlp2_weight\.blocks.*BF16"):
        CheckpointReader(tmp_path / "c").validate()


def test_write_refuses_to_overwrite(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="not empty"):
        write_checkpoint(preset("tiny"), tiny_checkpoints["original"])


def test_config_dialects_and_errors():
    for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        cfg = preset(name)
        assert (cfg.num_hidden_layers, cfg.num_experts) == (layers, experts)
        assert from_json_dict(cfg.to_hf_json()) == cfg == from_json_dict(cfg.to_original_json())
        assert cfg.max_position_embeddings == 131072
    raw = preset("tiny").to_original_json()
    with pytest.raises(ConfigError, match="sliding_window"):
        from_json_dict({k: v for k, v in raw.items() if k != "sliding_window"})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        from_json_dict({**raw, "num_hidden_layers": 2.5})
    with pytest.raises(ConfigError, match="head_dim"):
        from_json_dict({**raw, "head_dim": "64"})
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt-oss-7b")


@pytest.mark.parametrize("name, total", [("gpt-oss-20b", 20_914_757_184), ("gpt-oss-120b", 116_829_156_672)])
def test_parameter_counts_match_the_model_card(name, total):
    params = 0
    for spec in tensor_specs(preset(name)).values():
        n = 1
        for s in spec.shape:
            n *= s
        # MXFP4: two values per block byte; scale bytes are not parameters.
        params += {"mxfp4_blocks": 2 * n, "mxfp4_scales": 0}.get(spec.init, n)
    assert params == total
