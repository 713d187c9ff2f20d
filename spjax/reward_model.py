"""A reward model judge: a HF Llama-family *ForSequenceClassification checkpoint run on device.

Such a checkpoint is our decoder (model.* tensors, read by spjax.hf's loader and sharded by the same
rules as the policy) plus `score.weight` [1, D] (and `score.bias`, if any) in place of the LM head:
the reward, read where transformers reads it: at the rightmost token that is not the config's
pad_token_id (position 0 if every token is pad; the last token if the config has no pad id). A
reward model whose pad id is EOS thus scores a response ending in EOS at the token before it. A
classifier of several labels is refused: which label is the reward is not in the checkpoint.

What it reads: with tokenizer files holding a chat template, each conversation (the prompt's turns and
the response's text) rendered in that template, as `rm(**tok.apply_chat_template(chat))` scores it
(its own system prompt, markup and closing tokens; the run's template date). Without a template, the
policy's prompt + response ids as they are when its tokenizer has the policy's vocabulary, else that
text decoded and encoded with its tokenizer. Without tokenizer files, the policy's ids. Ids outside
its vocabulary are refused (a gather past the embedding gives NaN, not an error). A sequence longer
than its max_position_embeddings loses its oldest tokens (the response and the read position stay),
with a warning.

Where it waits: a run loads it once, and its params wait in pinned host memory between judge phases
(`on_device` brings them to the devices for a phase, shard by shard, and drops them after), so the
sampler and the train step have that memory back: an 8B reward model in bf16 is 14 GiB of a GPU's 80 that
self-play would otherwise lose for the whole run. Devices without pinned host memory keep them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spjax import hf, model, sharding as shd
from spjax.config import ModelConfig

log = logging.getLogger(__name__)

BUCKET = 64  # sequences are right-padded to a multiple of this: few distinct compiled shapes


@dataclasses.dataclass
class RewardModel:
    cfg: ModelConfig
    params: dict  # the decoder's params (no LM head), in memory `waits` between judge phases (see on_device)
    head_DxC: jax.Array  # score head, transposed: [D, 1]
    bias: float  # score.bias (0 without one)
    mesh: object
    tokenizer: object  # None: the policy's ids are used as they are
    policy_tokenizer: object
    pad_id: Optional[int]  # the config's pad_token_id: the score is read at the last token that is not it
    path: str = ""
    chat: bool = False  # render conversations in the tokenizer's chat template
    today: Optional[str] = None  # the date a template prints as today's (the run's template date)
    waits: str = "device"  # where params are between judge phases: 'pinned_host' or 'device'
    live: Optional[dict] = dataclasses.field(default=None, repr=False)  # params on device, inside on_device

    @contextlib.contextmanager
    def on_device(self):
        """The params on the devices for the block (a judge phase: brought once, not once a batch); then
        dropped from them again when they wait in host memory."""
        if self.waits == "device" or self.live is not None:
            yield self.live if self.live is not None else self.params
            return
        self.live = shd.to_memory(self.params, "device")
        try:
            yield self.live
        finally:
            self.live = None

    def waiting(self) -> str:
        """'' when the params stay on the devices, else the line a run says about where they wait."""
        if self.waits == "device":
            return ""
        from spjax.saving import size_text
        return (f"its params ({size_text(shd.bytes_per_device(self.params))} per device) wait in host memory between "
                "judge phases")

    def describe(self) -> str:
        if self.chat:
            return "conversations rendered in its own chat template"
        return "the policy's token ids" if self.tokenizer is None else "the policy's text in its own tokens"


def classifier_arch(config: dict, where: str) -> str:
    """The CausalLM architecture whose decoder a *ForSequenceClassification config names; CheckpointError else."""
    for a in config.get("architectures") or []:
        if a.endswith("ForSequenceClassification") and a.replace("ForSequenceClassification", "ForCausalLM") \
                in hf.HF_ARCHS:
            return a.replace("ForSequenceClassification", "ForCausalLM")
    known = ", ".join(a.replace("ForCausalLM", "ForSequenceClassification") for a in hf.HF_ARCHS)
    raise hf.CheckpointError(f"{where}: architectures {config.get('architectures')} has no sequence classifier "
                             f"of the Llama family ({known})")


def model_config(path: str, **overrides) -> tuple:
    """(ModelConfig of the reward model's decoder, its config.json dict) in HF directory `path`."""
    where = os.path.join(path, "config.json")
    config = hf.read_json(where)
    config = dict(config, architectures=[classifier_arch(config, where)])
    # Tied embeddings: the params then hold no LM head (score.weight stands in its place); the
    # embedding is only ever read as the input table here.
    return hf.config_from_hf(config, where, **{**overrides, "tie_embeddings": True}), config


def load(path: str, mesh=None, policy_tokenizer=None, today: Optional[str] = None, **overrides) -> RewardModel:
    """The reward model in `path` (a HF directory), its params placed over `mesh`; overrides: ModelConfig
    fields (param_dtype, compute_dtype: the run's compute dtype, not its fp32 masters')."""
    cfg, config = model_config(path, **overrides)
    get = hf.safetensors_getter(path)
    params = hf.params_from_tensors(cfg, hf.TensorSource(get.get, get.names - {"score.weight", "score.bias"}), path,
                                    mesh)
    head = np.asarray(get("score.weight"), np.float32)
    if head.ndim != 2 or head.shape[1] != cfg.hidden_size:
        raise hf.CheckpointError(f"{path}: score.weight has shape {head.shape}, expected [1, {cfg.hidden_size}]")
    if head.shape[0] != 1:
        raise hf.CheckpointError(f"{path}: a classifier of {head.shape[0]} labels (score.weight {head.shape}), not a "
                                 "reward model: which label is the reward is not in the checkpoint (num_labels must be 1)")
    bias = float(np.asarray(get("score.bias"), np.float32).reshape(-1)[0]) if "score.bias" in get.names else 0.0
    head_DxC = jnp.asarray(head.T, cfg.param_dtype)
    if mesh is not None:
        head_DxC = jax.device_put(head_DxC, shd.replicated(mesh))
    waits = shd.host_memory(mesh.devices.flat if mesh is not None else jax.devices()[:1]) or "device"
    if waits != "device":
        params = shd.to_memory(params, waits)
    from spjax.data.templates import has_chat_template
    tok, chat = None, False
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    if has_tokenizer:
        rm_tok = hf.load_tokenizer(path)
        chat = has_chat_template(rm_tok)
        if chat or (policy_tokenizer is not None and rm_tok.get_vocab() != policy_tokenizer.get_vocab()):
            tok = rm_tok
    if policy_tokenizer is not None or tok is not None:
        _check_vocab(path, cfg.vocab_size, policy_tokenizer if tok is None else tok, has_tokenizer)
    pad = config.get("pad_token_id")
    return RewardModel(cfg, params, head_DxC, bias, mesh, tok, policy_tokenizer,
                       int(pad) if pad is not None else None, path, chat, today, waits)


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
    out = np.zeros(len(sequences), np.float32)
    with rm.on_device() as params:
        for start in range(0, len(sequences), B):
            out[start:start + B] = _batch(rm, params, sequences, start, B)
    return out


def _batch(rm: RewardModel, params, sequences: list, start: int, B: int) -> np.ndarray:
    """The rewards of sequences[start:start + B], a batch of B rows (dummy rows past the end)."""
    V = rm.cfg.vocab_size
    part = sequences[start:start + B]
    L = -(-max(len(s) for s in part) // BUCKET) * BUCKET
    ids_BxL = np.zeros((B, L), np.int32)  # any in-vocabulary filler: padded positions are masked out
    length_B = np.ones(B, np.int32)
    for r, s in enumerate(part):
        s = np.asarray(s, np.int64)
        bad = np.flatnonzero((s < 0) | (s >= V))
        if len(bad):  # a JudgeError: spjax.train says it in one line (a policy may sample ids its tokenizer lacks)
            from spjax.judges import JudgeError
            raise JudgeError(f"reward model {rm.path}: sequence {start + r} has token id {s[bad[0]]} at position "
                             f"{bad[0]}, outside its vocabulary [0, {V}): give the reward model its tokenizer "
                             f"files, or score ids of its own vocabulary")
        ids_BxL[r, :len(s)], length_B[r] = s, len(s)
    if rm.mesh is not None:
        ids_BxL, length_B = (shd.put_global(x, shd.batch_sharding(rm.mesh, x.ndim)) for x in (ids_BxL, length_B))
    pad = -1 if rm.pad_id is None else rm.pad_id
    got = shd.to_host(_scores(rm.cfg, params, rm.head_DxC, ids_BxL, length_B, pad))
    return got[:len(part)] + rm.bias


def _tokens(rm: RewardModel, q, k: int) -> list:
    """The ids the reward model reads for query q's response k."""
    if rm.chat and q.messages:
        from spjax.data.templates import chat_ids
        return chat_ids(rm.tokenizer, [*q.messages, {"role": "assistant", "content": q.responses[k]}], rm.today)
    ids = [int(i) for i in q.prompt_ids] + [int(i) for i in q.response_ids[k]]
    if rm.tokenizer is None:
        return ids
    text = rm.policy_tokenizer.decode(ids, skip_special_tokens=False)
    return list(rm.tokenizer.encode(text, add_special_tokens=False))


def judge_queries(rm: RewardModel, queries: list, batch_size: int = 32) -> np.ndarray:
    """[n, K] rewards of every query's K responses (spjax.judges' interface)."""
    K = len(queries[0].responses) if queries else 0
    seqs = [_tokens(rm, q, k) for q in queries for k in range(K)]
    limit = rm.cfg.max_position_embeddings
    long = sum(len(s) > limit for s in seqs)
    if long:  # past its trained positions its scores mean nothing; the oldest prompt tokens matter least
        log.warning("reward model %s: %d of %d sequences are longer than its max_position_embeddings (%d): "
                    "their oldest tokens are left out", rm.path, long, len(seqs), limit)
        seqs = [s[-limit:] for s in seqs]
    return scores(rm, seqs, batch_size).reshape(len(queries), K).astype(np.float64)
