"""Checkpoint directories as they come from the hub: what loads (with transformers' logits), and what is
refused in one line naming the file (a truncated download, a tokenizer spjax cannot build here)."""
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import hf, preflight
hf_tokenizer = types.SimpleNamespace(importlib=__import__("importlib.util").util and __import__("importlib"))
from spjax.byte_tokenizer import CHATML, byte_tokenizer
from spjax.config import ConfigError, load_config
from spjax.config_checks import export_arch
from tests import oracle

TINY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def _saved(family, path):
    tm = oracle.torch_model(family)
    tm.save_pretrained(path)
    return tm


def test_weights_saved_from_the_base_model_load_as_transformers_loads_them(tmp_path):
    """A checkpoint saved from LlamaModel/Qwen2Model (names without 'model.', plus lm_head) was refused as
    'not part of spjax's model'; AutoModelForCausalLM loads it exactly, and so does spjax now."""
    from safetensors.numpy import load_file, save_file
    tm = _saved("qwen2", tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    save_file({k.removeprefix("model."): v for k, v in load_file(file).items()}, file)
    cfg, params = spjax.load_pretrained(str(tmp_path / "hf"))
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - oracle.torch_logits(tm, ids)).max() <= 1e-4


def test_a_truncated_safetensors_file_or_pytorch_bin_is_one_line(tmp_path):
    _saved("llama3", tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 3)
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors: not a readable safetensors file .* download it"):
        spjax.load_pretrained(str(tmp_path / "hf"))
    os.rename(file, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match=r"no model.safetensors .*pytorch_model.bin is PyTorch's pickle"):
        spjax.load_pretrained(str(tmp_path / "hf"))


def test_qwen2_window_layers_null_is_one_line():
    hf_cfg = oracle.torch_model("qwen2").config.to_dict()
    hf_cfg.update(use_sliding_window=True, sliding_window=16, max_window_layers=None, layer_types=None)
    with pytest.raises(hf.CheckpointError, match="max_window_layers is None with use_sliding_window true"):
        hf.config_from_hf(hf_cfg)


def _tokenizer_dir(tmp_path, name="tok"):
    d = tmp_path / name
    byte_tokenizer().save_pretrained(d)
    return d


def test_olmo_settings_no_family_computes_are_one_line():
    """OLMo 2 (q/k norms over all heads, norms after attention and the MLP alone): a window, per-head q/k norms,
    or a q norm other than OLMoE's hidden_size wide are refused where they are set."""
    import dataclasses
    cfg = hf.config_from_hf(oracle.torch_model("olmo2").config.to_dict(), "c.json")
    assert cfg.post_norms and cfg.qk_norm_full and export_arch(cfg) == "olmo2"
    with pytest.raises(ConfigError, match="model.sliding_window: 8 with olmo2: transformers' olmo2 attends to every"):
        dataclasses.replace(cfg, sliding_window=8)
    with pytest.raises(ConfigError, match="model.qk_norm_full: False with olmo2: transformers' olmo2 normalizes"):
        dataclasses.replace(cfg, qk_norm_full=False)
    with pytest.raises(ConfigError, match="model.qk_norm_full: True with qwen3: only olmo2, olmo3 and olmoe compute it"):
        dataclasses.replace(cfg, architecture="qwen3")


def test_olmo3_and_smollm3_configs_as_released_read_as_transformers_reads_them():
    """OLMo 3's and SmolLM3's released config.json files (written by transformers 4.x: rope_theta and rope_scaling
    at the top) give the ModelConfig of the dict transformers 5 makes of them, whose logits test_model checks:
    OLMo 3's YaRN on its full layers alone, three of four layers windowed; SmolLM3's every fourth layer NoPE.
    What the families cannot compute, or read differently by version, is one line."""
    import dataclasses
    import transformers
    olmo = dict(oracle.TINY, architectures=["Olmo3ForCausalLM"], model_type="olmo3", num_hidden_layers=8,
                rope_theta=500000, sliding_window=16, pad_token_id=1, eos_token_id=2, bos_token_id=None, layer_types=[
                    "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(8)],
                rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64,
                                  attention_factor=1.2079441541679836, beta_fast=32, beta_slow=1))
    cfg = hf.config_from_hf(olmo, "c.json")
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_local_theta, cfg.windowed) == (
        "yarn", 8.0, 500000.0, (True, True, True, False) * 2)
    as_5x = transformers.Olmo3Config(**{k: v for k, v in olmo.items() if k != "architectures"}).to_dict()
    assert as_5x["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
    assert hf.config_from_hf(dict(as_5x, architectures=["Olmo3ForCausalLM"]), "c.json") == cfg
    plain = hf.config_from_hf({k: v for k, v in olmo.items() if k != "rope_scaling"}, "c.json")
    assert plain.rope_local_theta == 0 and plain.rope_type == "default"  # (one rope for all: computed once)
    with pytest.raises(hf.CheckpointError, match="c.json: rope_theta missing: transformers 4.x reads OLMo 3's as 10000"):
        hf.config_from_hf({k: v for k, v in olmo.items() if k != "rope_theta"}, "c.json")
    with pytest.raises(ConfigError, match="model.rope_local_theta: 0 with olmo3's yarn rope: transformers' OLMo 3 "
                                          "rotates its windowed layers by unscaled rope"):
        dataclasses.replace(cfg, rope_local_theta=0.0)
    with pytest.raises(ConfigError, match=r"model.sliding_window: 16 with olmo2: .* \(OLMo 3's windowed layers: "
                                          "architecture olmo3\\)"):
        dataclasses.replace(cfg, architecture="olmo2", rope_local_theta=0.0, rope_type="default", layer_types=())

    smol = dict(oracle.TINY, architectures=["SmolLM3ForCausalLM"], model_type="smollm3", num_hidden_layers=8,
                rope_theta=5000000.0, use_sliding_window=False, sliding_window=None, no_rope_layer_interval=4,
                no_rope_layers=[int((i + 1) % 4 != 0) for i in range(8)])
    cfg = hf.config_from_hf(smol, "c.json")
    assert (cfg.nope_layers, cfg.roped[:4], any(cfg.windowed), cfg.tie_embeddings) == (
        (3, 7), (True, True, True, False), False, True)
    assert hf.config_from_hf({k: v for k, v in smol.items() if k != "no_rope_layers"}, "c.json") == cfg
    assert export_arch(cfg) == "smollm3" and export_arch(dataclasses.replace(cfg, nope_layers=())) == "llama"
    with pytest.raises(hf.CheckpointError, match="c.json: layer_types names sliding_attention layers, but "
                                                 "use_sliding_window is False"):
        hf.config_from_hf(dict(smol, layer_types=["sliding_attention"] * 8, sliding_window=16), "c.json")
    with pytest.raises(ConfigError, match=r"model.nope_layers: \[9\]: layer indices in \[0, 8\)"):
        dataclasses.replace(cfg, nope_layers=(9,))
    with pytest.raises(ConfigError, match="model.nope_layers: is SmolLM3's .architecture smollm3., not llama's"):
        dataclasses.replace(cfg, architecture="llama")
    with pytest.raises(ConfigError, match="model.qk_norm: True with smollm3: transformers' SmolLM3 does not compute it, "
                                          "so the model could not be exported"):
        dataclasses.replace(cfg, qk_norm=True)


def test_ministral3_settings_no_family_computes_are_one_line():
    import dataclasses
    cfg = oracle.spjax_model("ministral3")[0]
    assert export_arch(cfg) == "ministral3" and export_arch(dataclasses.replace(cfg, query_scale_beta=0.0)) == "llama"
    with pytest.raises(ConfigError, match="model.query_scale_beta: is Ministral 3's .architecture ministral3., not llama's"):
        dataclasses.replace(cfg, architecture="llama")
    with pytest.raises(ConfigError, match="model.qkv_bias: True with ministral3: transformers' Ministral 3 does not"):
        dataclasses.replace(cfg, qkv_bias=True)
    with pytest.raises(ConfigError, match="model.query_scale_beta: must be >= 0"):
        dataclasses.replace(cfg, query_scale_beta=-0.1)


def test_granite_settings_no_family_computes_are_one_line():
    """Granite's multipliers (muP) only on a granite; a granite with what transformers' Granite lacks is refused;
    its export writes the attention multiplier spjax computes (1/sqrt(head_dim) where the config leaves it 0)."""
    import dataclasses
    cfg = oracle.spjax_model("granite")[0]
    assert (cfg.embedding_multiplier, cfg.attention_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (
        3.0, 0.0625, 0.5, 4.0) and export_arch(cfg) == "granite"
    with pytest.raises(ConfigError, match="model.embedding_multiplier: is Granite's .architecture granite., not llama's"):
        dataclasses.replace(cfg, architecture="llama")
    with pytest.raises(ConfigError, match="model.logits_scaling: must be > 0, got -1.0"):
        dataclasses.replace(cfg, logits_scaling=-1.0)
    with pytest.raises(ConfigError, match="model.sliding_window: 8 with granite: transformers' Granite does not compute"):
        dataclasses.replace(cfg, sliding_window=8)
    assert hf.config_to_hf(dataclasses.replace(cfg, attention_multiplier=0.0))["attention_multiplier"] == 0.25


def test_an_fp8_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    """FP8 checkpoints (Ministral 3's instruct releases, Qwen3's -FP8 ones, DeepSeek's): float8 weights times
    their weight_scale_inv, per 32x32 block here and per tensor for one, give transformers' logits when it
    dequantizes the same files (FineGrainedFP8Config(dequantize=True)); the export is unquantized. Another
    quantization method, or a float8 tensor without its scale, is one line."""
    import torch
    import transformers
    from spjax.checkpoint_files import fp8_dequantize
    _saved("llama3", tmp_path / "hf")
    oracle.fp8_quantize(tmp_path / "hf" / "model.safetensors", (32, 32), per_tensor=("model.layers.0.self_attn.q_proj.weight",))
    conf = json.load(open(tmp_path / "hf" / "config.json"))
    quant = {"quant_method": "fp8", "weight_block_size": [32, 32], "activation_scheme": "dynamic"}
    json.dump(dict(conf, quantization_config=quant), open(tmp_path / "hf" / "config.json", "w"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    cfg, params = spjax.load_pretrained(str(tmp_path / "hf"))
    ids = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    want = oracle.torch_logits(theirs, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - want).max() <= 1e-4
    assert np.abs(want - oracle.torch_logits(oracle.torch_model("llama3"), ids)).max() > 1e-3  # (FP8 changed them)
    out = spjax.save_pretrained(cfg, params, tmp_path / "export")
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert np.abs(oracle.torch_logits(back, ids) - want).max() <= 1e-4
    # a grid of partial blocks (DeepSeek's ceil(rows / 128) scales): each scale on its block's part
    w, s = np.arange(35, dtype=np.float32).reshape(5, 7), np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)
    assert np.array_equal(fp8_dequantize(w, s, (2, 3), "t"), w * s[np.arange(5)[:, None] // 2, np.arange(7) // 3])
    with pytest.raises(hf.CheckpointError, match=r"quantization_config 'gptq': a quantized checkpoint, whose weights "
                                                 r"spjax does not read \(it reads FP8 ones\)"):
        hf.config_from_hf(dict(conf, quantization_config={"quant_method": "gptq", "bits": 4}), "config.json")
    from safetensors.torch import load_file, save_file
    file = tmp_path / "hf" / "model.safetensors"
    save_file({n: v for n, v in load_file(file).items() if n != "model.layers.1.mlp.up_proj.weight_scale_inv"}, file)
    with pytest.raises(hf.CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is float8_e4m3fn "
                                                 r"without a weight_scale_inv beside it"):
        spjax.load_pretrained(str(tmp_path / "hf"))


def test_tokenizer_directories_spjax_cannot_build_are_one_line(tmp_path, monkeypatch):
    """transformers' tracebacks (a SentencePiece-only directory without sentencepiece said "`tiktoken` is required",
    a directory without tokenizer files "Couldn't instantiate the backend tokenizer") are one line naming it."""
    d = _tokenizer_dir(tmp_path)
    os.rename(d / "tokenizer.json", d / "tokenizer.model")
    real = hf_tokenizer.importlib.util.find_spec
    monkeypatch.setattr(hf_tokenizer.importlib.util, "find_spec",
                        lambda n, *a: None if n == "sentencepiece" else real(n, *a))
    with pytest.raises(hf.CheckpointError, match=r"tok: holds a SentencePiece tokenizer.model and no tokenizer.json"):
        hf.load_tokenizer(str(d))
    empty = tmp_path / "weights_only"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(hf.CheckpointError, match=r"weights_only: no tokenizer files .* set tokenizer_path"):
        hf.load_tokenizer(str(empty))
    d = _tokenizer_dir(tmp_path, "cut_short")  # an interrupted download
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500])
    with pytest.raises(hf.CheckpointError, match=r"cut_short: transformers could not load its tokenizer: \w+"):
        hf.load_tokenizer(str(d))


@pytest.mark.parametrize("form", ["string", "named"])
def test_a_chat_template_only_in_chat_template_json_is_used(tmp_path, form):
    """A processor's chat_template.json is not read by AutoTokenizer: the run trained in plain-text format,
    silently, with the model's template on disk beside it."""
    d = _tokenizer_dir(tmp_path)
    for name in os.listdir(d):
        if name == "chat_template.jinja":
            os.remove(d / name)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    template = CHATML if form == "string" else [{"name": "default", "template": CHATML}]
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok = hf.load_tokenizer(str(d))
    want = CHATML if form == "string" else {"default": CHATML}
    assert tok.chat_template == want
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_tokenizer_that_fails_every_example_is_said_once():
    """No EOS (a tokenizer.json alone), or named templates none of which is 'default': every example failed
    alike, one error line per example; now one line about the tokenizer before the data is read."""
    cfg = load_config(TINY_CONFIG, [])
    with pytest.raises(ConfigError, match="the tokenizer names no EOS token"):
        preflight.check_tokenizer(cfg, types.SimpleNamespace(eos_token=None, chat_template=None))
    with pytest.raises(ConfigError, match=r"chat templates \['rag', 'tool_use'\] and none named 'default'"):
        named = {"rag": "", "tool_use": ""}
        preflight.check_tokenizer(cfg, types.SimpleNamespace(eos_token="</s>", chat_template=named))
    preflight.check_tokenizer(cfg, byte_tokenizer())


def test_weights_are_checked_before_the_data_is_tokenized(tmp_path, capsys):
    """A tensor or shard missing, or a shard cut short, was said when the weights loaded: after the data was
    tokenized (minutes at scale). Their files and names are now checked first; the data is not touched."""
    import transformers
    from safetensors.numpy import load_file, save_file
    from spjax import train
    config = transformers.LlamaConfig(**{**oracle.TINY, "vocab_size": 320})  # the byte tokenizer's ids fit
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    cfg = hf.load_model_config(str(tmp_path / "hf"))
    hf.check_weights(str(tmp_path / "hf"), cfg)
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if ".2." not in k and "layers.1.mlp" not in k}, file)
    with pytest.raises(hf.CheckpointError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' missing from the "
                                                 r"checkpoint \(and 2 more\)"):
        hf.check_weights(str(tmp_path / "hf"), cfg)
    save_file(tensors, file)
    args = ["--config", TINY_CONFIG, "--workdir", str(tmp_path / "w"), f"model_path={tmp_path / 'hf'}",
            "tokenizer_path=bytes", f"data.tfds_dir={tmp_path / 'tfds'}"]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    assert train.main(args) == 2
    out = capsys.readouterr()
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("spjax: ") and "model.safetensors: not a readable safetensors file" in last, last
    assert not os.path.exists(tmp_path / "tfds") and "data train" not in out.out
