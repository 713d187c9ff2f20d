"""A fast tokenizer rebuilt from a GGUF file's own metadata: no torch, no hub.

llama.cpp stores the tokenizer as metadata (`tokenizer.ggml.*`): the vocabulary, BPE merges or
SentencePiece scores, token types, special ids, the name of the pre-tokenizer and the chat
template. This module turns them into a `tokenizers` pipeline wrapped as a transformers fast
tokenizer (so `apply_chat_template`, `save_pretrained` and decoding work as usual).
transformers can read GGUF tokenizers too, but its reader imports torch, which spjax's run time
must not need; its result is the test oracle for this one (tests/test_gguf_tokenizer.py).
"""
from __future__ import annotations

from spjax.hf import CheckpointError

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types

# llama.cpp's splitting regexes, by `tokenizer.ggml.pre` (llama-vocab.cpp); applied in order, each
# to the pieces the previous one left. Unmatched text stays a piece of its own, as in llama.cpp.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)
# llama.cpp's DEFAULT (a file saying "default", or no pre-tokenizer at all): punctuation runs first,
# then GPT-2's words, digit runs, and groups of three digits.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            r"\p{N}+", r"[0-9][0-9][0-9]")
SPLITS = {
    "default": _DEFAULT, "gpt-2": (_GPT2,), "gpt2": (_GPT2,), "phi-2": (_GPT2,),
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,), "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,),
}
# Llama 3's tokenizer takes a whole pre-token that is in the vocabulary before trying merges.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}
_ADD_BOS = {"llama-bpe", "llama3", "llama-v3"}  # llama.cpp adds BOS for these unless the file says otherwise


def _meta(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _spm_merges(tokens, scores):
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a token into two
    tokens, ranked by the merged token's score (higher merges first), then by the pieces' ids."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for tok, score in zip(tokens, scores):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe_pipeline(tokens, merges, pre: str, where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if pre not in SPLITS:
        raise CheckpointError(
            f"{where}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer spjax knows "
            f"({', '.join(sorted(SPLITS))}); point `tokenizer_path` at the model's Hugging Face tokenizer directory")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_pipeline(tokens, scores, unk: str | None, add_prefix_space: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # As transformers' Llama tokenizer: "▁" for spaces, one in front of the text (not after each
    # special token), byte tokens <0xNN> for what the vocabulary lacks.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _post_processor(front, back):
    """Specials around every encoded text: front/back are [(token, id)] (llama.cpp's add_bos/add_eos)."""
    from tokenizers import processors

    f, b = [t for t, _ in front], [t for t, _ in back]
    return processors.TemplateProcessing(single=" ".join(f + ["$A"] + b),
                                         pair=" ".join(f + ["$A"] + b + f + ["$B:1"] + [t + ":1" for t in b]),
                                         special_tokens=front + back)


def tokenizer_from_gguf(path: str):
    """A transformers PreTrainedTokenizerFast for the tokenizer a .gguf file describes."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from spjax import gguf_io
    reader = gguf_io.read(path)
    model = _meta(reader, "tokenizer.ggml.model")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    if tokens is None or model is None:
        raise CheckpointError(f"{path}: no tokenizer in the file (tokenizer.ggml.model/tokens missing); "
                              "set `tokenizer_path` to a Hugging Face tokenizer directory")
    types = _meta(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)

    def special(key):
        i = _meta(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos, unk, pad = special("bos"), special("eos"), special("unknown"), special("padding")
    if model == "gpt2":
        merges = _meta(reader, "tokenizer.ggml.merges")
        if merges is None:
            raise CheckpointError(f"{path}: a gpt2 (BPE) tokenizer without tokenizer.ggml.merges")
        pre = _meta(reader, "tokenizer.ggml.pre", "default")
        backend = _bpe_pipeline(tokens, merges, pre, path)
        add_bos_default = pre in _ADD_BOS
    elif model == "llama":
        scores = _meta(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError(f"{path}: a llama (SentencePiece) tokenizer without tokenizer.ggml.scores")
        backend = _spm_pipeline(tokens, scores, unk, bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r} is not supported (gpt2, llama); "
                              "set `tokenizer_path` to a Hugging Face tokenizer directory")
    # Control tokens (<|im_end|>, <s>) and user-defined ones are matched whole in text, as llama.cpp does.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False))
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    backend.post_processor = _post_processor([(bos, ids[bos])] if add_bos and bos else [],
                                             [(eos, ids[eos])] if add_eos and eos else [])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        chat_template=_meta(reader, "tokenizer.chat_template"), add_bos_token=add_bos, add_eos_token=add_eos)
