"""ModelConfig: presets, both config.json dialects, errors that name the field, and parameter counts."""

import dataclasses
import json
import math

import pytest

from runtime.checkpoint import tensor_specs
from runtime.config import ConfigError, ModelConfig, from_json_dict, load_config_json, preset, preset_names

PRESETS = ["tiny", "gpt-oss-20b", "gpt-oss-120b"]


def test_presets_load_with_the_spec_shapes():
    assert set(PRESETS) <= set(preset_names())
    big = {"gpt-oss-20b": (24, 32), "gpt-oss-120b": (36, 128)}
    for name, (layers, experts) in big.items():
        cfg = preset(name)
        assert (cfg.num_hidden_layers, cfg.num_experts) == (layers, experts)
        # docs/gpt-oss-spec.md §1.1: everything else is shared by both sizes
        assert ((cfg.experts_per_token, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size)
                == (4, 201088, 2880, 2880))
        assert ((cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.sliding_window)
                == (64, 64, 8, 128))
        assert ((cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
                == (150000, 32, 1, 32))
        assert (cfg.initial_context_length, cfg.swiglu_limit, cfg.rms_norm_eps) == (4096, 7.0, 1e-5)
        assert (cfg.qkv_width, cfg.max_position_embeddings) == (5120, 131072)  # docs/gpt-oss-spec.md §1.2
    tiny = preset("tiny")
    assert (tiny.num_hidden_layers, tiny.num_experts, tiny.hidden_size, tiny.sliding_window) == (4, 8, 128, 8)
    assert tiny.vocab_size == 201088


def test_unknown_preset_raises():
    with pytest.raises(ConfigError, match="no-such-model"):
        preset("no-such-model")


@pytest.mark.parametrize("name", PRESETS)
def test_both_dialects_round_trip(name):
    cfg = preset(name)
    hf, original = cfg.to_hf_json(), cfg.to_original_json()
    # The original dialect is exactly REF-T's 16 ModelConfig fields (docs/gpt-oss-spec.md §1.1).
    assert len(original) == 16 and "num_local_experts" not in original and "rms_norm_eps" not in original
    assert hf["num_local_experts"] == cfg.num_experts and "num_experts" not in hf
    # Through real JSON text, as a checkpoint would hold them.
    assert from_json_dict(json.loads(json.dumps(hf))) == cfg
    assert from_json_dict(json.loads(json.dumps(original))) == cfg


def test_hf_dialect_values_come_from_rope_scaling():
    # If the reader took the top-level HF keys instead of rope_scaling, these would not change.
    hf = preset("gpt-oss-20b").to_hf_json()
    hf["rope_scaling"].update(factor=16.0, beta_fast=24.0, beta_slow=2.0,
                              original_max_position_embeddings=2048)
    del hf["initial_context_length"]
    cfg = from_json_dict(hf)
    assert ((cfg.rope_scaling_factor, cfg.rope_ntk_beta, cfg.rope_ntk_alpha, cfg.initial_context_length)
            == (16, 24, 2, 2048))


def test_transformers_5_rope_parameters_dialect():
    # transformers 5.x saves rope_scaling + rope_theta as one rope_parameters dict
    # (docs/gpt-oss-spec.md §1.1).
    cfg = preset("gpt-oss-120b")
    hf = cfg.to_hf_json()
    hf["rope_parameters"] = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"))
    assert from_json_dict(hf) == cfg


def test_load_config_json_reads_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset("tiny").to_hf_json()))
    assert load_config_json(path) == preset("tiny")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config_json(path)


def test_integral_floats_are_accepted_as_integers():
    original = preset("tiny").to_original_json()
    cfg = from_json_dict(dict(original, num_hidden_layers=4.0, rope_theta=150000))
    assert cfg.num_hidden_layers == 4 and isinstance(cfg.num_hidden_layers, int)
    assert isinstance(cfg.rope_theta, float)


@pytest.mark.parametrize("dialect", ["original", "hf"])
@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "sliding_window", "vocab_size"])
def test_missing_field_is_named(dialect, field):
    cfg = preset("tiny")
    raw = cfg.to_original_json() if dialect == "original" else cfg.to_hf_json()
    del raw[field]
    with pytest.raises(ConfigError, match=field):
        from_json_dict(raw)


def test_missing_renamed_hf_field_is_reported():
    raw = preset("tiny").to_hf_json()
    del raw["num_local_experts"]
    with pytest.raises(ConfigError, match="experts"):
        from_json_dict(raw)


@pytest.mark.parametrize("value", ["2880", None, [2880], {"v": 2880}, True])
def test_non_numeric_field_is_named(value):
    raw = dict(preset("tiny").to_original_json(), hidden_size=value)
    with pytest.raises(ConfigError, match="hidden_size"):
        from_json_dict(raw)


@pytest.mark.parametrize("value", [4.5, 0.5])
def test_non_integer_layer_count_is_named(value):
    raw = dict(preset("tiny").to_hf_json(), num_hidden_layers=value)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        from_json_dict(raw)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_layer_count_is_a_config_error(value):
    # json.loads accepts Infinity and NaN, so a config.json can carry them.
    raw = dict(preset("tiny").to_original_json(), num_hidden_layers=value)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        from_json_dict(raw)


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 0), ("hidden_size", -128), ("swiglu_limit", 0.0),
    ("hidden_size", 100),            # not a multiple of the 32-value MXFP4 block
    ("num_key_value_heads", 3),      # 16 query heads are not a multiple of 3
    ("experts_per_token", 9),        # more than the 8 experts
    ("head_dim", 31),                # RoPE pairs need an even head_dim
])
def test_impossible_values_are_named(field, value):
    raw = dict(preset("tiny").to_original_json(), **{field: value})
    with pytest.raises(ConfigError, match=field):
        from_json_dict(raw)


def test_not_an_object_raises():
    with pytest.raises(ConfigError):
        from_json_dict([1, 2, 3])


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters from the tensor shapes alone: each MXFP4 byte holds 2 weights, scale bytes are not
    weights."""
    total = 0
    for name, spec in tensor_specs(cfg).items():
        if name.endswith(".scales") and spec.kind == "uint8":
            continue
        total += math.prod(spec.shape) * (2 if spec.kind == "uint8" else 1)
    return total


@pytest.mark.parametrize("name, expected", [("gpt-oss-20b", 20_914_757_184),
                                            ("gpt-oss-120b", 116_829_156_672)])
def test_parameter_counts_match_spec(name, expected):
    assert parameter_count(preset(name)) == expected  # docs/gpt-oss-spec.md §7.1


def test_tensor_count_and_mxfp4_shapes_of_20b():
    cfg = preset("gpt-oss-20b")
    specs = tensor_specs(cfg)
    # docs/gpt-oss-spec.md §2.1: 15 per block (459 in HF, whose qkv is 3 tensors)
    assert len(specs) == 24 * 15 + 3
    assert specs["block.5.mlp.mlp1_weight.blocks"].shape == (32, 5760, 90, 16)
    assert specs["block.5.mlp.mlp2_weight.scales"].shape == (32, 2880, 90)
    assert specs["block.5.attn.qkv.weight"].shape == (5120, 2880)
    assert specs["block.5.attn.out.weight"].shape == (2880, 4096)


# --------------------------------------------------------------------------- EngineConfig
def test_engine_yaml_mirrors_the_engine_config_key_for_key():
    """configs/engine.yaml holds every EngineConfig field but `model` (each entry point's defaults
    list picks that preset), in order and with the dataclass's defaults, the parallel node too."""
    from omegaconf import OmegaConf

    from runtime.config import CONFIG_DIR
    from runtime.engine_config import EngineConfig

    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "engine.yaml"))
    defaults = dataclasses.asdict(EngineConfig())
    model = defaults.pop("model")
    assert list(yaml) == list(defaults) and list(yaml["parallel"]) == list(defaults["parallel"])
    assert yaml == defaults
    for entry in ("batch", "generate", "bench", "ray_batch"):
        chosen = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{entry}.yaml"))["defaults"]
        assert {"model": model} in chosen, entry


def test_engine_config_from_a_hydra_config():
    from hydra import compose, initialize_config_dir

    from launch.common import engine_config
    from runtime.config import CONFIG_DIR
    from runtime.engine_config import EngineConfig, ParallelConfig

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        overrides = ["input=in.jsonl", "output=out.jsonl", "model=gpt-oss-20b", "checkpoint=dummy",
                     "max_batch_size=4", "parallel.tp=2", "kv_cache_tokens=4096"]
        cfg = compose("batch", overrides)
    got = engine_config(cfg)
    assert got == EngineConfig(checkpoint="dummy", model=preset("gpt-oss-20b"), max_batch_size=4,
                               kv_cache_tokens=4096, parallel=ParallelConfig(tp=2))
    # Keys that are not engine settings are left out; missing ones take the defaults.
    assert EngineConfig.from_mapping({"input": "x", "seed": 3}) == EngineConfig(seed=3)


@pytest.mark.parametrize("settings, message", [
    (dict(max_batch_size=8, max_batch_tokens=4),
     r"max_batch_tokens \(4\) must be at least max_batch_size \(8\)"),
    (dict(kv_cache_tokens=0), "kv_cache_tokens must be positive, got 0"),
    (dict(gpu_memory_fraction=0), r"gpu_memory_fraction must be in \(0, 1\], got 0"),
    (dict(gpu_memory_fraction=1.5), r"gpu_memory_fraction must be in \(0, 1\], got 1.5"),
    (dict(dtype="float16"), "dtype='float16' is not supported; use one of auto, float32, bfloat16"),
    (dict(max_batch_size=0), "max_batch_size must be at least 1, got 0"),
    (dict(max_batch_tokens=0, max_batch_size=0), "max_batch_size must be at least 1, got 0"),
    (dict(max_batch_tokens=-5), "max_batch_tokens must be at least 1, got -5"),
    (dict(default_max_tokens=0), "default_max_tokens must be at least 1, got 0"),
    (dict(max_model_len=0), "max_model_len must be at least 1, got 0"),
    (dict(max_batch_size=2.5), "max_batch_size must be an integer, got 2.5"),
    (dict(schedule_conservativeness=-0.5),
     "schedule_conservativeness must be a number of at least 0, got -0.5"),
    (dict(schedule_conservativeness="high"),
     "schedule_conservativeness must be a number of at least 0, got 'high'"),
])
def test_engine_config_checks_name_the_setting(settings, message):
    from runtime.engine_config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)
    EngineConfig(max_batch_size=1, max_batch_tokens=1, default_max_tokens=1, max_model_len=1,
                 kv_cache_tokens=1, gpu_memory_fraction=1, dtype="bfloat16",
                 schedule_conservativeness=0)  # each bound itself is allowed


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=0", "parallel.tp must be at least 1, got 0"),
    ("parallel.ep=0", "parallel.ep must be at least 1, got 0"),
    ("parallel.dp=0", "parallel.dp must be at least 1, got 0"),
    ("parallel.expert_tp=-1", "parallel.expert_tp must be at least 1, got -1"),
    ("parallel.tp=1.5", "parallel.tp must be an integer, got 1.5"),
    ("parallel.timeout_s=0", "parallel.timeout_s must be a positive number of seconds, got 0"),
    ("parallel.attention_dp=yes please", "parallel.attention_dp must be true or false, got 'yes please'"),
])
def test_parallel_settings_below_their_minimum_name_the_override(override, message):
    """Checked where the settings are read, so tp=0 is this error rather than a division by zero when
    the ranks are laid out (launch/common.py), and clean_exit reports it in one line."""
    from hydra import compose, initialize_config_dir

    from launch.common import engine_config
    from runtime.config import CONFIG_DIR
    from runtime.engine_config import ParallelConfig

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("batch", ["input=in.jsonl", "output=out.jsonl", override])
    with pytest.raises(ValueError, match=message):
        engine_config(cfg)
    ParallelConfig(tp=1, ep=1, dp=1, expert_tp=1, timeout_s=0.5)  # each minimum itself is allowed


def test_a_preset_without_a_checkpoint_is_refused():
    """Without a checkpoint only the embedded tiny model can run; a bigger preset must not silently
    become it."""
    from hydra import compose, initialize_config_dir

    from launch.common import engine_config
    from runtime.config import CONFIG_DIR
    from runtime.engine_config import EngineConfig

    message = ("model=gpt-oss-20b was given without a checkpoint: pass checkpoint=DIR for its weights, "
               "or checkpoint=dummy for random weights of its shape")
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="gpt-oss-20b")
    with pytest.raises(ValueError, match="model=<a custom ModelConfig> was given without a checkpoint"):
        EngineConfig(model=dataclasses.replace(preset("tiny"), num_hidden_layers=2))
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        default = compose("batch", ["input=in.jsonl", "output=out.jsonl"])
        big = compose("batch", ["input=in.jsonl", "output=out.jsonl", "model=gpt-oss-20b"])
    with pytest.raises(ValueError, match=message):  # hydra's model node, named as the user typed it
        engine_config(big)
    assert engine_config(default) == EngineConfig(model=preset("tiny"))  # the default still runs


def test_llm_takes_an_engine_config_or_its_keywords(tiny_checkpoints):
    from runtime.engine import LLM
    from runtime.engine_config import EngineConfig

    settings = dict(dtype="float32", device="cpu", max_batch_size=2, max_batch_tokens=16, kv_cache_tokens=64)
    by_keywords = LLM(tiny_checkpoints["original"], **settings)
    by_config = LLM(config=EngineConfig(checkpoint=tiny_checkpoints["original"], **settings))
    assert by_keywords.engine_config == by_config.engine_config
    assert (by_config.max_batch_size, by_config.max_batch_tokens, by_config.kv_cache_tokens) == (2, 16, 64)
    with pytest.raises(TypeError, match="not both"):
        LLM(config=EngineConfig(), max_batch_size=2)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        LLM(tiny_checkpoints["original"], kv_cache_tokens=-1)
