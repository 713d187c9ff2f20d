"""Multimodal checkpoints whose language model spjax trains: Gemma 3 4B/12B/27B, Mistral Small 3.1/3.2.

google/gemma-3-{4b,12b,27b}-it ship as Gemma3ForConditionalGeneration (a Gemma 3 text model beside a
SigLIP vision tower and a projector), Mistral-Small-3.1/3.2-24B-Instruct as Mistral3ForConditionalGeneration
(a Mistral text model beside a Pixtral vision tower). Self-play trains the text model, so spjax reads that
model's config (`text_config`, filled with its config class's defaults for the keys these files leave
out) and its tensors, and leaves the rest unread. Its export is the whole multimodal checkpoint again:
the source's config with the text part as trained, the text tensors under the source's names, every
other tensor copied byte for byte from the source, and the source's processor files; it loads wherever
the source did, images included.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

from spjax.tensor_names import CheckpointError, TensorSource


@dataclasses.dataclass(frozen=True)
class Wrapper:
    text_type: str  # the text model's model_type, where text_config names none (a key of TEXT_MODELS)
    unused: tuple = ()  # text config keys the wrapper's class does not compute: read as unset
    files: tuple = ("preprocessor_config.json", "processor_config.json")  # the source's files an export keeps


WRAPPERS = {
    # (transformers' Gemma3ForConditionalGeneration never caps its logits; gemma-3's files leave it null)
    "Gemma3ForConditionalGeneration": Wrapper("gemma3_text", unused=("final_logit_softcapping",)),
    # (tekken.json: the same tokenizer in mistral-common's format, which vLLM's mistral mode reads)
    "Mistral3ForConditionalGeneration": Wrapper("mistral", files=("preprocessor_config.json", "processor_config.json",
                                                                 "tekken.json")),
}
# The text models a wrapper may hold (text_config.model_type): their transformers class and their config
# class's defaults for the keys real config.json files omit (tests compare them with transformers'):
# gemma-3-4b-it's text_config gives only its sizes, rope scaling and window.
TEXT_MODELS = {
    "gemma3_text": ("Gemma3ForCausalLM", dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=131072, query_pre_attn_scalar=256,
        sliding_window=4096, rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=10000.0, bos_token_id=2,
        eos_token_id=1, pad_token_id=0)),
    "mistral": ("MistralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2)),
    "ministral3": ("Ministral3ForCausalLM", dict(  # (Ministral 3 3B/8B/14B; its rope: hf_config's default)
        vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_hidden_layers=34, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-5, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=11)),
}
# (top-level keys that, where a file sets them, are the text model's: transformers reads them there)
_TOP_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
# Where the text model's tensors sit: transformers writes language_model.model.* and
# language_model.lm_head.* (4.50 on, 5.x too); its modules (a state_dict, PEFT) are model.language_model.*.
_SAVED, _MODULE = "language_model.", "model.language_model."


def wrapper(hf: dict):
    """The Wrapper of a config.json dict's architecture, or None."""
    return next((WRAPPERS[a] for a in hf.get("architectures") or [] if a in WRAPPERS), None)


def text_config(hf: dict, where: str, names=None) -> dict:
    """A wrapped model's text config as a config.json of its text class; any other config unchanged.

    names: its checkpoint's tensor names, where known. transformers 5 ties the head to the embedding unless
    the checkpoint holds a head of its own (Gemma 3's hold none, Mistral Small's one), whatever the text
    config's tie_word_embeddings says; so does spjax where it knows the names.
    """
    w = wrapper(hf)
    if w is None:
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: text_config missing: {hf['architectures'][0]} holds its language "
                              "model's settings there")
    kind = text.get("model_type", w.text_type)
    if kind not in TEXT_MODELS:
        raise CheckpointError(f"{where}: text_config.model_type {kind!r} is not supported in "
                              f"{hf['architectures'][0]} (supported: {', '.join(TEXT_MODELS)})")
    text_class, defaults = TEXT_MODELS[kind]
    out = {**defaults, **text, "architectures": [text_class], "model_type": kind, **dict.fromkeys(w.unused)}
    out.update({k: hf[k] for k in _TOP_KEYS if hf.get(k) is not None})
    if names is not None:
        out["tie_word_embeddings"] = not any(text_name(n) == "lm_head.weight" or n == "lm_head.weight" for n in names)
    return out


def text_name(name: str):
    """The text model's name (model.*, lm_head.weight) of a wrapped checkpoint's tensor, or None."""
    if name.startswith(_MODULE):
        return "model." + name[len(_MODULE):]
    if name.startswith(_SAVED):
        return name[len(_SAVED):]
    return None


def text_tensors(get: TensorSource) -> TensorSource:
    """A wrapped checkpoint's text model tensors under its own names, the others (vision tower, projector)
    left out of its names; a checkpoint of a text model unchanged."""
    stored = {text_name(n): n for n in get.names if text_name(n)}
    if not stored:
        return get
    if "lm_head.weight" in get.names:  # (a state_dict's head: not under the language model)
        stored.setdefault("lm_head.weight", "lm_head.weight")
    modules = any(n.startswith(_MODULE) for n in get.names)
    as_stored = lambda name: stored.get(name, _wrapped_name(name, modules))  # noqa: E731 (a missing one: where it would be)
    return TensorSource(lambda name: get(as_stored(name)), stored, as_stored)


def describe(path: str):
    """The line a run says about a multimodal model_path (None for any other model)."""
    from spjax.checkpoint_files import read_json, safetensors_getter
    where = os.path.join(path, "config.json") if path and os.path.isdir(path) else ""
    arch = (read_json(where).get("architectures") or [None])[0] if where and os.path.isfile(where) else None
    if arch not in WRAPPERS:
        return None
    other = [n for n in safetensors_getter(path).names if text_name(n) is None and n != "lm_head.weight"]
    return (f"model: the language model of {arch}; its {len(other)} other tensors (vision tower, projector) stay on "
            f"disk, and exports copy them from {path}")


def export_parts(source: str, text_hf: dict):
    """(config.json dict, the source's name of each text tensor (a function), the names of the source's other
    tensors, to be copied from it) of an export whose source directory holds a wrapped model; None for any
    other source."""
    from spjax.checkpoint_files import read_json, safetensors_getter
    path = os.path.join(source, "config.json") if source and os.path.isdir(source) else ""
    hf = read_json(path) if path and os.path.isfile(path) else {}
    if wrapper(hf) is None:
        return None
    text = {k: v for k, v in text_hf.items() if k not in ("architectures", "torch_dtype")}
    kept = {k: v for k, v in (hf.get("text_config") or {}).items()
            if k not in ("dtype", "torch_dtype", "quantization_config")}
    config = dict(hf, text_config=dict(kept, **text), torch_dtype=text_hf["torch_dtype"])
    config.pop("dtype", None)  # (transformers 5's name for torch_dtype: the export's is the one above)
    config.pop("quantization_config", None)  # (an FP8 source's: the export's weights are written unquantized)
    config.update({k: text[k] for k in _TOP_KEYS if k in hf and k in text})
    # The text tensors are written under the source's names (either layout); the others are copied from it.
    get = safetensors_getter(source)
    names = get.names
    modules = any(n.startswith(_MODULE) for n in names)
    carried = sorted(n for n in names if text_name(n) is None and not (modules and n == "lm_head.weight"))
    quantized = [n for n in carried if n in get.quantized]
    if quantized:  # (copied as they are, without the quantization_config that says how to read them)
        raise CheckpointError(f"{source}: {quantized[0]} and {len(quantized) - 1} more tensors outside the language "
                              "model are FP8: export from the model's bf16 release as source")
    return config, lambda name: _wrapped_name(name, modules), carried


def _wrapped_name(name: str, modules: bool) -> str:
    if not modules:
        return _SAVED + name
    return module_name(name, True)


def module_name(name: str, wrapped: bool) -> str:
    """A text model's module or tensor name (model.*) where a multimodal model holds it (model.language_model.*);
    unchanged when not wrapped."""
    if not wrapped or not name.startswith("model."):
        return name
    return _MODULE + name[len("model."):]


def copy_files(source: str, out_dir: str):
    """The source's processor files (a wrapped model's; none otherwise) into out_dir."""
    from spjax.checkpoint_files import read_json
    w = wrapper(read_json(os.path.join(source, "config.json")))
    for name in w.files if w else ():
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
