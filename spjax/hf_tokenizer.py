"""Tokenizers in and out: a Hugging Face directory, a .gguf file, or spjax's byte tokenizer ('bytes').

What transformers' AutoTokenizer cannot build here (a SentencePiece-only directory without the
sentencepiece package, a directory with no tokenizer files) is one line naming the directory, as is any
error it raises; a chat template that only a processor's chat_template.json holds is adopted.
"""
from __future__ import annotations

import importlib.util
import json
import os

from spjax.checkpoint_files import read_json
from spjax.tensor_names import CheckpointError


def load_tokenizer(path: str):
    """A transformers tokenizer from a HF directory, a .gguf file, or 'bytes' (spjax's byte-level ChatML)."""
    path = os.fspath(path)
    if path == "bytes":
        from spjax.byte_tokenizer import byte_tokenizer
        return byte_tokenizer()
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    if path.endswith(".gguf"):  # built by spjax: transformers' GGUF reader needs torch
        from spjax.gguf_tokenizer import tokenizer_from_gguf
        return tokenizer_from_gguf(path)
    known = _tokenizer_problem(path)  # before transformers tries (and logs its fallbacks)
    if known:
        raise CheckpointError(f"{path}: {known}")
    from transformers import AutoTokenizer  # (here: importing it takes 1.6 s, which the other two never need)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers' own errors name neither the file nor the fix
        raise CheckpointError(f"{path}: transformers could not load its tokenizer: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}") from None
    legacy = os.path.join(path, "chat_template.json")  # a processor's file, which AutoTokenizer does not read
    if not getattr(tok, "chat_template", None) and os.path.isfile(legacy):
        template = read_json(legacy).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...], as tokenizer_config.json's
            template = {t["name"]: t["template"] for t in template}
        if not template:
            raise CheckpointError(f"{legacy}: no chat_template in it")
        tok.chat_template = template
    return tok


def _tokenizer_problem(path: str):
    """Why a directory holds no tokenizer transformers can build here, or None."""
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    if "tokenizer.json" not in files and "tokenizer.model" in files:
        if importlib.util.find_spec("sentencepiece") is None:
            return ("holds a SentencePiece tokenizer.model and no tokenizer.json; reading it needs the sentencepiece "
                    "package (pip install sentencepiece), or add the model's tokenizer.json")
    if os.path.isdir(path) and not files & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        return ("no tokenizer files (tokenizer.json, tokenizer.model, vocab.json): set tokenizer_path to the "
                "model's tokenizer directory")
    return None


def save_tokenizer(tokenizer, out_dir: str):
    """tokenizer.save_pretrained, named for every transformers: 5.x calls a tokenizer built from tokenizer.json
    alone (a GGUF's, spjax's byte tokenizer) "TokenizersBackend", a class 4.x lacks (vLLM, lm-eval stacks on
    4.x refused the export); both load the same tokenizer as "PreTrainedTokenizerFast"."""
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2, ensure_ascii=False)
