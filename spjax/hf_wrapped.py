"""Multimodal checkpoints whose language model spjax trains: Gemma 3 4B, 12B and 27B.

google/gemma-3-{4b,12b,27b}-it ship as Gemma3ForConditionalGeneration: a Gemma 3 text model beside a
SigLIP vision tower and a projector. Self-play trains the text model, so spjax reads that model's
config (`text_config`, filled with the text config class's defaults for the keys these files leave
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
    text_class: str  # the text model's transformers class (a key of tensor_names.HF_ARCHS)
    text_defaults: dict  # its config class's defaults for the keys real config.json files omit
    files: tuple  # the source's files (processor settings) an export keeps
    unused: tuple = ()  # text config keys the wrapper's class does not compute: read as unset


WRAPPERS = {
    "Gemma3ForConditionalGeneration": Wrapper(
        "Gemma3ForCausalLM",
        # Gemma3TextConfig's defaults (tests compare them with transformers'): gemma-3-4b-it's text_config
        # gives only its sizes, rope scaling and window.
        dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
             num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
             query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6, rope_theta=1e6,
             rope_local_base_freq=10000.0, bos_token_id=2, eos_token_id=1, pad_token_id=0),
        ("preprocessor_config.json", "processor_config.json"),
        # (transformers' Gemma3ForConditionalGeneration never caps its logits; gemma-3's files leave it null)
        ("final_logit_softcapping",)),
}
# (top-level keys that, where a file sets them, are the text model's: transformers reads them there)
_TOP_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
# Where the text model's tensors sit: transformers writes language_model.model.* and
# language_model.lm_head.* (4.50 on, 5.x too); its modules (a state_dict, PEFT) are model.language_model.*.
_SAVED, _MODULE = "language_model.", "model.language_model."


def wrapper(hf: dict):
    """The Wrapper of a config.json dict's architecture, or None."""
    return next((WRAPPERS[a] for a in hf.get("architectures") or [] if a in WRAPPERS), None)


def text_config(hf: dict, where: str) -> dict:
    """A wrapped model's text config as a config.json of its text class; any other config unchanged."""
    w = wrapper(hf)
    if w is None:
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: text_config missing: {hf['architectures'][0]} holds its language "
                              "model's settings there")
    out = {**w.text_defaults, **text, "architectures": [w.text_class], **dict.fromkeys(w.unused)}
    return dict(out, **{k: hf[k] for k in _TOP_KEYS if hf.get(k) is not None})


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
    return TensorSource(lambda name: get(stored.get(name, _SAVED + name)), stored)  # (a missing one: its saved name)


def export_parts(source: str, text_hf: dict, tensors: dict):
    """(config.json dict, the tensors under the source's names, the names of the source's other tensors, to be
    copied from it) of an export whose source directory holds a wrapped model; None for any other source."""
    from spjax.checkpoint_files import read_json, safetensors_getter
    path = os.path.join(source, "config.json") if source and os.path.isdir(source) else ""
    hf = read_json(path) if path and os.path.isfile(path) else {}
    if wrapper(hf) is None:
        return None
    text = {k: v for k, v in text_hf.items() if k not in ("architectures", "torch_dtype")}
    config = dict(hf, text_config=dict(hf.get("text_config") or {}, **text), torch_dtype=text_hf["torch_dtype"])
    config.pop("dtype", None)  # (transformers 5's name for torch_dtype: the export's is the one above)
    config.update({k: text[k] for k in _TOP_KEYS if k in hf and k in text})
    # The text tensors are written under the source's names (either layout); the others are copied from it.
    names = safetensors_getter(source).names
    modules = any(n.startswith(_MODULE) for n in names)
    carried = sorted(n for n in names if text_name(n) is None and not (modules and n == "lm_head.weight"))
    return config, {_wrapped_name(k, modules): v for k, v in tensors.items()}, carried


def _wrapped_name(name: str, modules: bool) -> str:
    if not modules:
        return _SAVED + name
    return module_name(name, True)


def module_name(name: str, wrapped: bool, pattern: bool = False) -> str:
    """A text model's module or tensor name (model.*) where a multimodal model holds it (model.language_model.*;
    pattern: in a regular expression, its dots escaped); unchanged when not wrapped."""
    start = r"model\." if pattern else "model."
    if not wrapped or not name.startswith(start):
        return name
    return (r"model\.language_model\." if pattern else _MODULE) + name[len(start):]


def copy_files(source: str, out_dir: str):
    """The source's processor files (a wrapped model's; none otherwise) into out_dir."""
    from spjax.checkpoint_files import read_json
    w = wrapper(read_json(os.path.join(source, "config.json")))
    for name in w.files if w else ():
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
