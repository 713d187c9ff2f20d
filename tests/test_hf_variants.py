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
from spjax.tensor_names import export_arch
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
    with pytest.raises(ConfigError, match="model.qk_norm_full: True with qwen3: only olmo2 and olmoe compute it"):
        dataclasses.replace(cfg, architecture="qwen3")


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
