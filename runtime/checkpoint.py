"""Checkpoints: both public GPT-OSS layouts in, one internal naming out, MXFP4 experts kept packed.

Internal names are the OpenAI original ones (`block.3.attn.qkv.weight`, `block.3.mlp.mlp1_weight.blocks`,
...). A Hugging Face checkpoint maps onto them; its separate q/k/v projections become row ranges of
the fused qkv. Every internal tensor is described by a `Source`: a list of (file tensor, row range)
pieces concatenated along dim 0, so a rank can later read just the rows it owns.

Also here: writing a synthetic checkpoint of any preset in either layout, and random ("dummy")
weights drawn directly in memory for benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from runtime import mxfp4
from runtime.config import ConfigError, ModelConfig, load_config_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, tensor or field."""


# --------------------------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: str  # "float" (bf16 on disk) or "uint8" (MXFP4 blocks and scales)
    init_std: float = 0.02  # spread of dummy/synthetic values; for gains, the spread around 1
    init: str = "normal"  # "normal", "gain" (1 + normal), "mxfp4_blocks", "mxfp4_scales"


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the model by internal name, with its shape and storage kind."""
    d, E, I = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    V, H = cfg.vocab_size, cfg.num_attention_heads
    g1, g2 = d // mxfp4.BLOCK, I // mxfp4.BLOCK
    B = mxfp4.BYTES_PER_BLOCK
    specs = {"embedding.weight": TensorSpec((V, d), "float", 1.0)}
    for n in range(cfg.num_hidden_layers):
        p = f"block.{n}."
        specs.update({
            p + "attn.norm.scale": TensorSpec((d,), "float", 0.1, "gain"),
            p + "attn.qkv.weight": TensorSpec((cfg.qkv_width, d), "float", d ** -0.5),
            p + "attn.qkv.bias": TensorSpec((cfg.qkv_width,), "float", 0.02),
            p + "attn.sinks": TensorSpec((H,), "float", 1.0),
            p + "attn.out.weight": TensorSpec((d, cfg.q_width), "float", 0.5 * cfg.q_width ** -0.5),
            p + "attn.out.bias": TensorSpec((d,), "float", 0.02),
            p + "mlp.norm.scale": TensorSpec((d,), "float", 0.1, "gain"),
            p + "mlp.gate.weight": TensorSpec((E, d), "float", d ** -0.5),
            p + "mlp.gate.bias": TensorSpec((E,), "float", 0.1),
            p + "mlp.mlp1_weight.blocks": TensorSpec((E, 2 * I, g1, B), "uint8", d ** -0.5, "mxfp4_blocks"),
            p + "mlp.mlp1_weight.scales": TensorSpec((E, 2 * I, g1), "uint8", d ** -0.5, "mxfp4_scales"),
            p + "mlp.mlp1_bias": TensorSpec((E, 2 * I), "float", 0.02),
            p + "mlp.mlp2_weight.blocks": TensorSpec((E, d, g2, B), "uint8", 0.5 * I ** -0.5, "mxfp4_blocks"),
            p + "mlp.mlp2_weight.scales": TensorSpec((E, d, g2), "uint8", 0.5 * I ** -0.5, "mxfp4_scales"),
            p + "mlp.mlp2_bias": TensorSpec((E, d), "float", 0.02),
        })
    specs["norm.scale"] = TensorSpec((d,), "float", 0.1, "gain")
    specs["unembedding.weight"] = TensorSpec((V, d), "float", d ** -0.5)
    return specs


# ------------------------------------------------------------------------------------ layout mapping
@dataclasses.dataclass(frozen=True)
class Piece:
    name: str  # tensor name in the checkpoint files
    rows: tuple[int, int] | None = None  # row range of that tensor, or all of it


Source = list[Piece]

_HF_SIMPLE = {
    "embedding.weight": "model.embed_tokens.weight",
    "unembedding.weight": "lm_head.weight",
    "norm.scale": "model.norm.weight",
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}


def _hf_sources(internal: str, cfg: ModelConfig) -> Source:
    if internal in _HF_SIMPLE:
        return [Piece(_HF_SIMPLE[internal])]
    _, layer, rest = internal.split(".", 2)
    prefix = f"model.layers.{layer}."
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return [Piece(f"{prefix}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
    return [Piece(prefix + _HF_SIMPLE[rest])]


def sources(layout: str, cfg: ModelConfig) -> dict[str, Source]:
    """Internal name -> where its rows live in a checkpoint of `layout` ("original" or "hf")."""
    if layout == "original":
        return {name: [Piece(name)] for name in tensor_specs(cfg)}
    if layout == "hf":
        return {name: _hf_sources(name, cfg) for name in tensor_specs(cfg)}
    raise CheckpointError(f"unknown checkpoint layout {layout!r}; expected 'original' or 'hf'")


# ------------------------------------------------------------------------------------------- reading
class CheckpointReader:
    """Reads tensors of a checkpoint folder by internal name, checking names, shapes and dtypes."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint folder {self.path} holds no *.safetensors files")
        self._files = {}  # tensor name -> open safetensors handle
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            for key in handle.keys():
                self._files[key] = (f, handle)
        self.layout = self._detect_layout()
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path} is missing; a checkpoint folder needs its config.json")
        try:
            self.config = load_config_json(config_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.sources = sources(self.layout, self.config)
        self.specs = tensor_specs(self.config)

    def _detect_layout(self) -> str:
        if "embedding.weight" in self._files or any(k.startswith("block.") for k in self._files):
            return "original"
        if any(k.startswith("model.") for k in self._files):
            return "hf"
        raise CheckpointError(
            f"{self.path}: tensor names match neither the OpenAI original layout (block.N...) nor the "
            f"Hugging Face layout (model.layers.N...)"
        )

    def _slice(self, piece: Piece):
        if piece.name not in self._files:
            raise CheckpointError(f"{self.path}: tensor {piece.name!r} is missing ({self.layout} layout)")
        file, handle = self._files[piece.name]
        return file, handle.get_slice(piece.name)

    def validate(self) -> None:
        """Check every tensor's presence, shape and dtype before any weight is read."""
        for name, spec in self.specs.items():
            pieces = [self._slice(p) for p in self.sources[name]]
            rows = 0
            for (file, sl), piece in zip(pieces, self.sources[name]):
                shape = tuple(sl.get_shape())
                dtype = sl.get_dtype()
                if spec.kind == "uint8" and dtype != "U8":
                    raise CheckpointError(f"{file}: tensor {piece.name!r} has dtype {dtype}, "
                                          f"expected U8 (MXFP4)")
                if spec.kind == "float" and dtype not in ("BF16", "F16", "F32"):
                    raise CheckpointError(f"{file}: tensor {piece.name!r} has dtype {dtype}, expected BF16")
                if shape[1:] != spec.shape[1:]:
                    raise CheckpointError(
                        f"{file}: tensor {piece.name!r} has shape {list(shape)}, expected [*, "
                        f"{', '.join(map(str, spec.shape[1:]))}] (internal {name} {list(spec.shape)})"
                    )
                rows += shape[0] if shape else 1
            expected_rows = spec.shape[0]
            if rows != expected_rows:
                got = " + ".join(f"{p.name} {list(s.get_shape())}"
                                 for (_, s), p in zip(pieces, self.sources[name]))
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} should have shape {list(spec.shape)}, found {got}"
                )

    def read(self, name: str, slices: dict[int, list[tuple[int, int]]] | None = None) -> torch.Tensor:
        """The tensor `name` (internal naming), or the part `slices` names ({dim: [(start, stop), ...]},
        several ranges allowed on dim 0, one on the others). Only those bytes are read from disk."""
        slices = dict(slices or {})
        rows = slices.pop(0, [(0, self.specs[name].shape[0])])
        if any(len(ranges) != 1 for ranges in slices.values()):
            raise ValueError(f"{name}: only dim 0 may be read as several ranges, got {slices}")
        parts = []
        for lo, hi in rows:
            offset = 0
            for piece in self.sources[name]:
                _, sl = self._slice(piece)
                n = sl.get_shape()[0]
                start, stop = max(lo - offset, 0), min(hi - offset, n)
                if start < stop:
                    index = [slice(start, stop)] + [slice(None)] * (len(sl.get_shape()) - 1)
                    for dim, ((a, b),) in slices.items():
                        index[dim] = slice(a, b)
                    parts.append(sl[tuple(index)])
                offset += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------- random weights
def random_tensor(spec: TensorSpec, generator: torch.Generator, device="cpu",
                  float_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One tensor of random weights with a sensible spread (activations stay O(1) through the layers)."""
    if spec.init == "mxfp4_blocks":  # uniform bytes: every E2M1 code equally likely
        return torch.randint(0, 256, spec.shape, dtype=torch.uint8, generator=generator, device=device)
    if spec.init == "mxfp4_scales":
        return mxfp4.random_scales(spec.shape, spec.init_std, generator, device)
    values = torch.randn(spec.shape, generator=generator, device=device, dtype=torch.float32) * spec.init_std
    if spec.init == "gain":
        values += 1.0
    return values.to(float_dtype)


def random_weights(cfg: ModelConfig, seed: int = 0, device="cpu"):
    """Yield (internal name, tensor) for a whole random model, deterministic in `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, spec in tensor_specs(cfg).items():
        yield name, random_tensor(spec, generator, device)


# ------------------------------------------------------------------------------------------- writing
def _umask() -> int:
    """This process's umask (read without changing it where Linux tells it)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def _permissions_as_umask(folder: Path) -> None:
    """A folder and its files with the permissions a plain mkdir and open give: mkdtemp makes the
    folder 0700 and safetensors its files 0600, which would hide a checkpoint from the user's group."""
    mask = _umask()
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)
    folder.chmod(0o777 & ~mask)


def write_checkpoint(cfg: ModelConfig, out: str | os.PathLike, layout: str = "original", seed: int = 0,
                     shard_bytes: int = 2 << 30) -> Path:
    """Write a random checkpoint of `cfg` in `layout`, atomically (a temp folder renamed into place)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite a checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        layout_sources = sources(layout, cfg)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in random_weights(cfg, seed):
            for piece, part in _split_for_layout(tensor, layout_sources[name], cfg):
                if size and size + part.numel() * part.element_size() > shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][piece] = part.contiguous()
                size += part.numel() * part.element_size()
        _save_shards(shards, tmp, layout, save_file)
        config = cfg.to_original_json() if layout == "original" else cfg.to_hf_json()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _permissions_as_umask(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _split_for_layout(tensor: torch.Tensor, source: Source, cfg: ModelConfig):
    if len(source) == 1:
        yield source[0].name, tensor
        return
    # HF q/k/v: consecutive row ranges of the fused qkv.
    widths = [cfg.q_width, cfg.kv_width, cfg.kv_width]
    for piece, part in zip(source, torch.split(tensor, widths)):
        yield piece.name, part


def _save_shards(shards, folder: Path, layout: str, save_file) -> None:
    def name(i: int) -> str:  # the real repos' naming: model.safetensors, or model-00000-of-00002...
        last = len(shards) - 1
        return "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{last:05d}.safetensors"

    weight_map = {}
    for i, shard in enumerate(shards):
        save_file(shard, str(folder / name(i)), metadata={"format": "pt"})
        weight_map.update({k: name(i) for k in shard})
    if layout == "hf":
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
