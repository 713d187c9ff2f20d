"""Multimodal Gemma 3 (Gemma3ForConditionalGeneration: gemma-3-4b/12b/27b) and Mistral Small 3.x
(Mistral3ForConditionalGeneration): the language model loaded, trained and written back into the whole
multimodal checkpoint, against transformers' PyTorch classes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import hf
from spjax.config import LoraConfig
from tests import oracle

WRAPPED = "Gemma3ForConditionalGeneration"
TEXT = dict(oracle.TINY, **oracle.FAMILIES["gemma3"][1], vocab_size=320)  # (the byte tokenizer's ids fit)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
IMAGE_TOKEN = 302
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny multimodal Gemma 3 as the hub holds one: bf16, index-sharded, with processor settings."""
    import torch
    import transformers
    config = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                       boi_token_index=300, eoi_token_index=301, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # (norms start at 0 in Gemma: random ones make them count)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("gemma3mm")
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    with open(path / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 32, "width": 32}}, f)
    assert len(set(json.load(open(path / "model.safetensors.index.json"))["weight_map"].values())) > 2
    return str(path)


def _module(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_module", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch(path):
    import torch
    import transformers
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, ids, **kw):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


IDS = np.random.RandomState(0).randint(3, 299, (2, 20))  # longer than the 8-token window of the first layer


# gemma-3-4b-it's text_config gives only its sizes, rope scaling and window; Mistral-Small-3.1-24B's all of them
FOUR_B = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, model_type="gemma3_text",
              rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
SMALL_3_1 = dict(head_dim=128, hidden_act="silu", hidden_size=5120, intermediate_size=32768, max_position_embeddings=131072,
                 model_type="mistral", num_attention_heads=32, num_hidden_layers=40, num_key_value_heads=8,
                 rms_norm_eps=1e-05, rope_theta=1e9, sliding_window=None, vocab_size=131072)


@pytest.mark.parametrize("wrapped_class, config_class, text_class, texts, eos", [
    (WRAPPED, "Gemma3Config", "Gemma3ForCausalLM", ({}, FOUR_B), [1, 106]),
    ("Mistral3ForConditionalGeneration", "Mistral3Config", "MistralForCausalLM", ({}, SMALL_3_1), None),
    ("Mistral3ForConditionalGeneration", "Mistral3Config", "Ministral3ForCausalLM", (
        {"model_type": "ministral3"}, dict(model_type="ministral3", hidden_size=3072, intermediate_size=9216,
                                           num_hidden_layers=26, tie_word_embeddings=True)), None)])
def test_text_config_is_read_as_transformers_reads_it(wrapped_class, config_class, text_class, texts, eos):
    """The keys a text_config omits are its config class's defaults (and the top level's eos ids, Gemma's
    end of turn among them, are the text model's)."""
    import transformers
    for text in texts:
        wrapped = {"architectures": [wrapped_class], "text_config": text, "eos_token_id": eos}
        full = getattr(transformers, config_class)(**wrapped).text_config.to_dict()
        want = hf.config_from_hf(dict(full, architectures=[text_class], eos_token_id=eos or full["eos_token_id"]))
        assert hf.config_from_hf(wrapped) == want
    if wrapped_class == WRAPPED:
        assert want.vocab_size == 262208 and want.rope_factor == 8.0 and want.eos_token_ids == (1, 106)
        assert want == _module("configs/single_gpu_gemma3_4b.py").GEMMA3_4B  # (the shapes compile_check counts)
    elif text_class == "Ministral3ForCausalLM":  # (its rope when the file gives none: YaRN and the query scale)
        assert (want.rope_type, want.rope_factor, want.query_scale_beta) == ("yarn", 16.0, 0.1)
    else:
        assert want.rope_theta == 1e9 and want.sliding_window is None and want.num_layers == 40
        assert want == _module("configs/single_gpu_mistral_small_24b.py").MISTRAL_SMALL_24B


def test_unsupported_multimodal_configs_are_one_line():
    with pytest.raises(hf.CheckpointError, match=r"config.json: text_config missing: Gemma3ForConditionalGeneration"):
        hf.config_from_hf({"architectures": [WRAPPED], "model_type": "gemma3"})
    with pytest.raises(hf.CheckpointError, match=r"architecture \['LlavaForConditionalGeneration'\] is not supported "
                                                 r"\(supported: LlamaForCausalLM, .*, Gemma3ForConditionalGeneration, "
                                                 r"Mistral3ForConditionalGeneration\)"):
        hf.config_from_hf({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": {}})
    with pytest.raises(hf.CheckpointError, match=r"text_config.model_type 'qwen3_moe' is not supported in "
                                                 r"Mistral3ForConditionalGeneration \(supported: gemma3_text, mistral, ministral3\)"):
        hf.config_from_hf({"architectures": ["Mistral3ForConditionalGeneration"], "text_config": {"model_type": "qwen3_moe"}})


def test_language_model_loads_and_exports_as_the_whole_multimodal_model(source, tmp_path):
    import torch
    import transformers
    from safetensors import safe_open
    ref = _torch(source)
    cfg, params = hf.load_pretrained(source)
    assert cfg.architecture == "gemma3" and cfg.windowed == (True, False)
    got = np.asarray(spjax.forward(cfg, params, jnp.asarray(IDS, jnp.int32)))
    assert np.abs(got - _logits(ref, IDS)).max() <= 2e-5
    # trained: every text tensor moved; the export holds these, the source's vision tower and its processor file
    trained = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    out = hf.save_pretrained(cfg, trained, tmp_path / "export", source=source)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [WRAPPED] and config["vision_config"] == json.load(
        open(os.path.join(source, "config.json")))["vision_config"]
    assert os.path.exists(os.path.join(out, "preprocessor_config.json"))
    export = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # (as lm-eval loads it)
    assert type(export).__name__ == WRAPPED
    want = np.asarray(spjax.forward(cfg, trained, jnp.asarray(IDS, jnp.int32)))
    assert np.abs(_logits(export, IDS) - want).max() <= 2e-5
    # the vision tower and projector: byte for byte the source's (bf16, as stored)
    names = lambda d: json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    carried = {n: f for n, f in names(out).items() if not n.startswith("language_model.")}
    assert carried and set(carried) == {n for n in names(source) if not n.startswith("language_model.")}
    for name, fname in carried.items():
        with safe_open(os.path.join(out, fname), "pt") as a, \
                safe_open(os.path.join(source, names(source)[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == y.dtype == torch.bfloat16 and torch.equal(x, y), name
    # an image still goes through: the export answers an image prompt as the source's vision tower sees it
    image = torch.randn(1, 3, 32, 32)
    ids = np.array([[2, 300] + [IMAGE_TOKEN] * 4 + [301, 40, 41]])
    kw = dict(pixel_values=image, token_type_ids=torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)))
    with_image = _logits(export, ids, **kw)
    source_as_trained = _torch(source)
    source_as_trained.model.language_model.load_state_dict(export.model.language_model.state_dict())
    assert np.abs(with_image - _logits(source_as_trained, ids, **kw)).max() <= 1e-5


def test_a_lora_run_exports_an_adapter_of_the_language_model_alone(source, tmp_path, capsys):
    """A LoRA self-play run from the multimodal checkpoint: its merged export and its PEFT adapter on the source
    are the same model, PEFT adapts no vision module, and spjax reads the adapter back."""
    import peft
    from spjax import train
    work = tmp_path / "run"
    args = ["--config", os.path.join(ROOT, "configs", "tiny.py"),
            "--workdir", str(work), f"model_path={source}", "tokenizer_path=bytes", "lora.rank=4",
            "run.rounds=1", "run.eval_examples=0", f"data.tfds_dir={tmp_path / 'tfds'}"]
    assert train.main(args) == 0
    assert (f"model: the language model of {WRAPPED}; its 34 other tensors (vision tower, projector) stay on disk, "
            f"and exports copy them from {source}") in capsys.readouterr().out
    export = os.path.join(work, "export")
    assert json.load(open(os.path.join(export, "config.json")))["architectures"] == [WRAPPED]
    merged = _logits(_torch(export), IDS)
    assert np.abs(merged - _logits(_torch(source), IDS)).max() > 1e-3  # (the run moved it)
    adapted = peft.PeftModel.from_pretrained(_torch(source), os.path.join(export, "adapter")).eval()
    lora_modules = [n for n, m in adapted.named_modules() if hasattr(m, "lora_A")]
    assert lora_modules and all(".language_model." in n for n in lora_modules), lora_modules[:3]
    assert np.abs(_logits(adapted, IDS) - merged).max() <= 1e-4
    cfg, params = hf.load_pretrained(source, lora=LoraConfig(rank=4, init_path=os.path.join(export, "adapter")))
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(IDS, jnp.int32))) - merged).max() <= 1e-4


def test_mistral_small_with_its_own_head_loads_and_exports(tmp_path):
    """Mistral Small's files hold a head of its own: untied, even where the top level says tie_word_embeddings
    true (transformers 5 unties a head present and unequal); a Mistral3 saved tied holds none."""
    import torch
    import transformers
    text = dict(oracle.TINY, model_type="mistral", vocab_size=320, sliding_window=None, head_dim=16)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, head_dim=16)
    for untied in (True, False):
        config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=302,
                                             spatial_merge_size=2, tie_word_embeddings=not untied)
        torch.manual_seed(0)
        model = transformers.Mistral3ForConditionalGeneration(config).eval()
        path = tmp_path / f"untied{untied}"
        model.save_pretrained(path)
        if untied:  # as transformers 5 saves Mistral Small again (its own file sets no top-level key: false)
            conf = json.load(open(path / "config.json"))
            json.dump(dict(conf, tie_word_embeddings=True), open(path / "config.json", "w"))
        cfg, params = hf.load_pretrained(str(path))
        assert cfg.architecture == "mistral" and cfg.tie_embeddings == (not untied)
        want = _logits(model, IDS)
        assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(IDS, jnp.int32))) - want).max() <= 1e-4
        out = hf.save_pretrained(cfg, params, tmp_path / f"export{untied}", source=str(path))
        export = transformers.Mistral3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        assert np.abs(_logits(export, IDS) - want).max() <= 1e-5
        theirs = model.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in export.state_dict().items())  # (vision tower included)
    # what is wrong with a file is said under the name the file holds
    from safetensors.numpy import load_file, save_file
    file = path / "model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if k != "language_model.model.layers.1.mlp.up_proj.weight"}, file)
    with pytest.raises(hf.CheckpointError, match=r"tensor 'language_model.model.layers.1.mlp.up_proj.weight' missing"):
        hf.load_pretrained(str(path))
    save_file(dict(tensors, **{"language_model.model.layers.0.mlp.up_proj.bias": np.zeros(128, np.float32)}), file)
    with pytest.raises(hf.CheckpointError, match=r"tensor\(s\) language_model.model.layers.0.mlp.up_proj.bias are not "):
        hf.load_pretrained(str(path))


def test_ministral3_loads_and_exports_as_the_whole_multimodal_model(tmp_path):
    """Ministral 3 (3B/8B/14B) comes as Mistral3ForConditionalGeneration around a ministral3 text model: Mistral
    whose rotated queries grow by position (Llama 4's llama_4_scaling_beta, past each original context). Read
    with transformers' logits past two such contexts, and written back as the whole model."""
    import torch
    import transformers
    _, extra = oracle.FAMILIES["ministral3"]
    text = dict(oracle.TINY, **extra, model_type="ministral3", vocab_size=320)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, head_dim=16)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=302,
                                         spatial_merge_size=2)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "src")
    cfg, params = hf.load_pretrained(str(tmp_path / "src"))
    assert (cfg.architecture, cfg.query_scale_beta, cfg.rope_original_max_position) == ("ministral3", 1.0, 32)
    ids = np.random.RandomState(1).randint(3, 299, (2, 80))  # positions 64..79: a query scale of 1 + log 3
    want = _logits(model, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids, jnp.int32))) - want).max() <= 1e-4
    out = hf.save_pretrained(cfg, params, tmp_path / "export", source=str(tmp_path / "src"))
    export = transformers.Mistral3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert export.config.text_config.rope_parameters["llama_4_scaling_beta"] == 1.0
    assert np.abs(_logits(export, ids) - want).max() <= 1e-5
    with pytest.raises(hf.CheckpointError, match="llama_4_scaling_beta without original_max_position_embeddings"):
        rope = {k: v for k, v in extra["rope_parameters"].items() if k != "original_max_position_embeddings"}
        hf.config_from_hf(dict(text, architectures=["Ministral3ForCausalLM"], rope_parameters=rope), "c.json")


def test_ministral3_fp8_release_loads_and_exports_unquantized(tmp_path):
    """Ministral 3's instruct releases hold the language model's projections in FP8 (the vision tower as it is):
    read dequantized, with the logits of transformers dequantizing the same files, and exported unquantized (no
    quantization_config) as the whole model. A source whose vision tower is FP8 too cannot be copied as it is:
    one line."""
    import torch
    import transformers
    _, extra = oracle.FAMILIES["ministral3"]
    text = dict(oracle.TINY, **extra, model_type="ministral3", vocab_size=320)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, head_dim=16)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=302, spatial_merge_size=2)).eval()
    for name, only in (("fp8", lambda n: "language_model" in n), ("all_fp8", lambda n: True)):
        src = tmp_path / name
        model.save_pretrained(src)
        oracle.fp8_quantize(src / "model.safetensors", (16, 16), only=only)
        conf = json.load(open(src / "config.json"))
        json.dump(dict(conf, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16],
                                                  "activation_scheme": "dynamic"}), open(src / "config.json", "w"))
    theirs = transformers.Mistral3ForConditionalGeneration.from_pretrained(
        tmp_path / "fp8", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    cfg, params = hf.load_pretrained(str(tmp_path / "fp8"))
    ids = np.random.RandomState(1).randint(3, 299, (2, 80))
    want = _logits(theirs, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids, jnp.int32))) - want).max() <= 1e-4
    out = hf.save_pretrained(cfg, params, tmp_path / "export", source=str(tmp_path / "fp8"))
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    export = transformers.Mistral3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert np.abs(_logits(export, ids) - want).max() <= 1e-5
    assert torch.equal(export.state_dict()["model.vision_tower.transformer.layers.0.attention.q_proj.weight"],
                       model.state_dict()["model.vision_tower.transformer.layers.0.attention.q_proj.weight"])
    with pytest.raises(hf.CheckpointError, match=r"all_fp8: vision_tower\S* and \d+ more tensors outside the language "
                                                 "model are FP8"):
        hf.save_pretrained(cfg, params, tmp_path / "export2", source=str(tmp_path / "all_fp8"))
