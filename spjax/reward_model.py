"""A reward model judge: a HF Llama-family *ForSequenceClassification checkpoint run on device.

Such a checkpoint is our decoder (model.* tensors, read by spjax.hf's loader and sharded by the same
rules as the policy) plus `score.weight` [num_labels, D] in place of the LM head. Label 0 is the
reward, read where transformers reads it: at the rightmost token that is not the config's
pad_token_id (position 0 if every token is pad; the last token if the config has no pad id). A
reward model whose pad id is EOS thus scores a response ending in EOS at the token before it.

Tokens: when the reward model's tokenizer has the policy's vocabulary (the usual case: a reward
model trained from the same base), the policy's prompt + response ids are scored as they are.
Otherwise the text (chat markup included) is decoded with the policy's tokenizer and encoded with
the reward model's. Ids outside the reward model's vocabulary are refused (a gather past the
embedding gives NaN, not an error): at load when the tokenizer that feeds it (the policy's when it
has no tokenizer files) has more ids than its embedding, and in `scores` for every sequence.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spjax import hf, model, sharding as shd
from spjax.config import ModelConfig

_BUCKET = 64  # sequences are right-padded to a multiple of this: few distinct compiled shapes


@dataclasses.dataclass
class RewardModel:
    cfg: ModelConfig
    params: dict  # the decoder's params (no LM head)
    head_DxC: jax.Array  # score head, transposed: [D, num_labels]
    mesh: object
    tokenizer: object  # None: the policy's ids are used as they are
    policy_tokenizer: object
    pad_id: Optional[int]  # the config's pad_token_id: the score is read at the last token that is not it
    path: str = ""


def _classifier_arch(config: dict, where: str) -> str:
    for a in config.get("architectures") or []:
        if a.endswith("ForSequenceClassification") and a.replace("ForSequenceClassification", "ForCausalLM") \
                in hf.HF_ARCHS:
            return a.replace("ForSequenceClassification", "ForCausalLM")
    known = ", ".join(a.replace("ForCausalLM", "ForSequenceClassification") for a in hf.HF_ARCHS)
    raise hf.CheckpointError(f"{where}: architectures {config.get('architectures')} has no sequence classifier "
                             f"of the Llama family ({known})")


def load(path: str, mesh=None, policy_tokenizer=None, **overrides) -> RewardModel:
    """The reward model in `path` (a HF directory), its params placed over `mesh`."""
    where = os.path.join(path, "config.json")
    config = hf._read_json(where)
    config = dict(config, architectures=[_classifier_arch(config, where)])
    # Tied embeddings: the params then hold no LM head (score.weight stands in its place); the
    # embedding is only ever read as the input table here.
    cfg = hf.config_from_hf(config, where, **{**overrides, "tie_embeddings": True})
    get = hf._safetensors_getter(path)
    params = hf.params_from_tensors(cfg, hf.TensorSource(get.get, get.names - {"score.weight"}), path, mesh)
    head = np.asarray(get("score.weight"), np.float32)
    if head.ndim != 2 or head.shape[1] != cfg.hidden_size:
        raise hf.CheckpointError(f"{path}: score.weight has shape {head.shape}, expected [num_labels, "
                                 f"{cfg.hidden_size}]")
    head_DxC = jnp.asarray(head.T, cfg.param_dtype)
    if mesh is not None:
        head_DxC = jax.device_put(head_DxC, shd.replicated(mesh))
    tok = None
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    if policy_tokenizer is not None and has_tokenizer:
        rm_tok = hf.load_tokenizer(path)
        if rm_tok.get_vocab() != policy_tokenizer.get_vocab():
            tok = rm_tok
    if policy_tokenizer is not None:
        _check_vocab(path, cfg.vocab_size, policy_tokenizer if tok is None else tok, has_tokenizer)
    pad = config.get("pad_token_id")
    return RewardModel(cfg, params, head_DxC, mesh, tok, policy_tokenizer, int(pad) if pad is not None else None,
                       path)


def _check_vocab(path: str, vocab_size: int, feeding_tokenizer, has_tokenizer: bool):
    """Refuse a tokenizer whose ids run past the reward model's embedding table. A larger table is
    fine (checkpoints often pad it); a smaller one means another vocabulary."""
    n = max(feeding_tokenizer.get_vocab().values()) + 1
    if n <= vocab_size:
        return
    if not has_tokenizer:
        raise hf.CheckpointError(f"{path}: the reward model's vocabulary has {vocab_size} ids but the policy's "
                                 f"tokenizer has {n} and the reward model has no tokenizer files to re-encode the "
                                 f"text with: put its tokenizer files (tokenizer_config.json, tokenizer.json) "
                                 f"in {path}")
    raise hf.CheckpointError(f"{path}: its tokenizer has {n} ids but its config.json vocab_size is {vocab_size}")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _scores(cfg: ModelConfig, params, head_DxC, ids_BxL, length_B, pad_id: int):
    """pad_id -1: the config has none (no id equals it), so the last real token is read."""
    pos_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1])[None, :], ids_BxL.shape)
    mask_BxL = pos_BxL < length_B[:, None]
    hidden_BxLxD, _ = model.apply(cfg, params, ids_BxL, kv_mask_BxS=mask_BxL, right_padded=True)
    # transformers: argmax of position * (id != pad), i.e. the rightmost non-pad token, 0 if none
    read_B = jnp.max(jnp.where(mask_BxL & (ids_BxL != pad_id), pos_BxL, 0), axis=1)
    last_BxD = jnp.take_along_axis(hidden_BxLxD, read_B[:, None, None], axis=1)[:, 0]
    return jnp.einsum("BD,DC->BC", last_BxD, head_DxC.astype(last_BxD.dtype),
                      preferred_element_type=jnp.float32)[:, 0]


def scores(rm: RewardModel, sequences: list, batch_size: int = 32) -> np.ndarray:
    """[n] float32 rewards of token sequences (prompt + response ids), batch_size at a time."""
    dp = 1 if rm.mesh is None else shd.data_parallel_size(rm.mesh)
    B = -(-batch_size // dp) * dp
    V = rm.cfg.vocab_size
    out = np.zeros(len(sequences), np.float32)
    for start in range(0, len(sequences), B):
        part = sequences[start:start + B]
        L = -(-max(len(s) for s in part) // _BUCKET) * _BUCKET
        ids_BxL = np.zeros((B, L), np.int32)  # any in-vocabulary filler: padded positions are masked out
        length_B = np.ones(B, np.int32)
        for r, s in enumerate(part):
            s = np.asarray(s, np.int64)
            bad = np.flatnonzero((s < 0) | (s >= V))
            if len(bad):
                raise ValueError(f"reward model {rm.path}: sequence {start + r} has token id {s[bad[0]]} at position "
                                 f"{bad[0]}, outside its vocabulary [0, {V}): give the reward model its tokenizer "
                                 f"files, or score ids of its own vocabulary")
            ids_BxL[r, :len(s)], length_B[r] = s, len(s)
        if rm.mesh is not None:
            ids_BxL, length_B = (shd.put_global(x, shd.batch_sharding(rm.mesh, x.ndim)) for x in (ids_BxL, length_B))
        pad = -1 if rm.pad_id is None else rm.pad_id
        got = shd.to_host(_scores(rm.cfg, rm.params, rm.head_DxC, ids_BxL, length_B, pad))
        out[start:start + len(part)] = got[:len(part)]
    return out


def _tokens(rm: RewardModel, prompt_ids, response_ids) -> list:
    ids = [int(i) for i in prompt_ids] + [int(i) for i in response_ids]
    if rm.tokenizer is None:
        return ids
    text = rm.policy_tokenizer.decode(ids, skip_special_tokens=False)
    return list(rm.tokenizer.encode(text, add_special_tokens=False))


def judge_queries(rm: RewardModel, queries: list, batch_size: int = 32) -> np.ndarray:
    """[n, K] rewards of every query's K responses (spjax.judges' interface)."""
    seqs = [_tokens(rm, q.prompt_ids, r) for q in queries for r in q.response_ids]
    K = len(queries[0].response_ids) if queries else 0
    return scores(rm, seqs, batch_size).reshape(len(queries), K).astype(np.float64)
