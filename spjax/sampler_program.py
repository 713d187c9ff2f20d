"""The on-device sampling program: a prefill into a preallocated KV cache, then a while_loop decode.

spjax.sampler plans the batches on the host (buckets, padding, cache length) and calls `_generate`
here once per batch; every name below is also reachable as spjax.sampler.<name>.

Dimensions as in spjax.model, plus P (padded prompt length: a static bucket), T (max new tokens),
S (KV cache slots, P + T rounded up) and E (EOS ids, padded).

Layout: prompts are LEFT-padded into [B, P], so every prompt ends at slot P-1 and generated token j
sits at slot P+j for every row; its position is prompt_len + j. Pad slots are invisible as keys
(kv_mask). Randomness is per example (spjax.drawing): a sample does not depend on the batch, the
bucket or the host it landed in (resumed and multi-host rounds reproduce exactly).

Speed (docs/perf.md): every row's live slots are the same prefix [0, P + j), so the decode loop
runs in a few segments, each a `while_loop` attending over a fixed window of the cache just large
enough for its steps (`_decode_windows`): a step reads the live part of the cache, rounded up, not
all S slots, and only a few loop bodies are compiled. Weights are made once before the loop
(`_step_params`): cast to the compute dtype, sliced per layer where it pays (each layer then
keeps its own KV buffer, read whole: `_segments`), gathered over fsdp with sampling.weights=gathered.
A GPU checks for early exit (every row done) once per chunk of decode steps (`_decode_chunk`), not
after each: XLA:GPU syncs with the host at every check.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spjax import model
from spjax import sharding as shd
from spjax.drawing import choose, sample_keys
from spjax.config import ModelConfig

_WINDOW_ROUND = 16  # decode windows are multiples of this many slots
_STEPS_PER_SEGMENT = 32  # auto segments: one per started run of this many decode steps, at most _MAX_SEGMENTS
_MAX_SEGMENTS = 4  # each segment compiles its own loop body: compile time grows with the count


# ---------------------------------------------------------------------------------------------
# Prefill and one decode step (also the building blocks the cache ≡ forward test checks)


def left_pad_positions(prompt_len_B, P: int):
    """[B, P] positions of a left-padded prompt: 0.. on real tokens, negative on the padding.

    Pads continue the count downwards (not clipped at 0) so slot - position is constant per row;
    model.py's sliding-window mask with a cache derives key positions from exactly that.
    """
    return jnp.arange(P, dtype=jnp.int32)[None, :] - (P - prompt_len_B[:, None]).astype(jnp.int32)


def _constrain(x, mesh: Optional[Mesh], logical):
    if mesh is None:
        return x
    spec = shd.logical_to_spec(PartitionSpec(*logical), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _constrain_cache(cache, mesh):
    # Stacked [N, B, K, S, Dh] or one [B, K, S, Dh] buffer per layer (model.unstack_cache).
    return jax.tree.map(lambda c: _constrain(c, mesh, model.CACHE_LOGICAL_AXES[-c.ndim:]), cache)


def _batch(x, mesh):
    return _constrain(x, mesh, ("batch",) + (None,) * (x.ndim - 1))


def _prefill(cfg, params, prompt_BxP, prompt_len_B, cache_len, mesh=None, layer_caches=False):
    B, P = prompt_BxP.shape
    valid_BxP = jnp.arange(P)[None, :] >= (P - prompt_len_B[:, None])
    # Slots past the prompt are marked valid up front: causality hides them until they are written.
    kv_mask_BxS = jnp.concatenate([valid_BxP, jnp.ones((B, cache_len - P), bool)], axis=1)
    cache = model.init_cache(cfg, B, cache_len)
    cache = _constrain_cache(model.unstack_cache(cache) if layer_caches else cache, mesh)
    # The prompt attends over its own P slots only (the mask's width), not the empty rest.
    hidden_BxPxD, cache = model.apply(cfg, params, prompt_BxP, left_pad_positions(prompt_len_B, P),
                                      valid_BxP, cache, 0)
    logits_BxV = model.unembed(cfg, params, hidden_BxPxD[:, -1:])[:, 0]
    return logits_BxV, _constrain_cache(cache, mesh), _batch(kv_mask_BxS, mesh)


def _decode_step(cfg, params, token_B, position_B, kv_mask_BxW, cache, slot, mesh=None):
    """One token per row at `slot`, attending over the W leading slots (W = kv_mask_BxW's width)."""
    hidden_Bx1xD, cache = model.apply(cfg, params, token_B[:, None], position_B[:, None], kv_mask_BxW,
                                      cache, slot)
    return model.unembed(cfg, params, hidden_Bx1xD)[:, 0], _constrain_cache(cache, mesh)


def _crosses_original(cfg: ModelConfig, P: int, T: int) -> bool:
    """Can a decode step feed a token at LongRoPE's original context (position == original): a prompt
    within it (its last position P - 1 at most) whose response runs past it (fed positions up to P + T - 2)?"""
    return cfg.rope_type == "longrope" and P + T - 2 >= cfg.rope_original_max_position


def _recompute_crossed(cfg, params, prompt_RxP, prompt_len_R, tokens_RxT, kv_mask_RxW, slot, position_R, alive_R,
                       logits_RxV, cache, mesh=None):
    """LongRoPE past the original context. A row whose fed token sits at position `original` (its
    sequence just passed it) has its whole cache recomputed, every key and value of every layer, by a
    prefill over its W live slots with the long divisors, and its next-token logits taken from that
    pass: as transformers' Phi-3 generate drops and recomputes its cache there. Other rows keep theirs.
    Once per live row, under a cond: the steps without a crossing skip it (finished rows never cross)."""
    crossed_R = (position_R == cfg.rope_original_max_position) & alive_R

    def recompute(_):
        R, P = prompt_RxP.shape
        W, S, T = kv_mask_RxW.shape[1], model.cache_slots(cache), tokens_RxT.shape[1]
        # slots [0, P): the left-padded prompt; slot P + t: token t (future ones: causality hides them)
        tokens_RxS = jnp.pad(jnp.concatenate([prompt_RxP, tokens_RxT], axis=1), ((0, 0), (0, max(0, S - P - T))))
        positions_RxS = jnp.concatenate([left_pad_positions(prompt_len_R, P),
                                         prompt_len_R[:, None] + jnp.arange(S - P, dtype=jnp.int32)[None]], axis=1)
        fresh = model.init_cache(cfg, R, S, jax.tree.leaves(cache)[0].dtype)
        fresh = _constrain_cache(model.unstack_cache(fresh) if isinstance(cache["k"], tuple) else fresh, mesh)
        # (a cached call's tokens form one sequence per row, ending past the original context: long divisors)
        hidden_RxWxD, new = model.apply(cfg, params, tokens_RxS[:, :W], positions_RxS[:, :W], kv_mask_RxW, fresh, 0)
        new_RxV = model.unembed(cfg, params, jax.lax.dynamic_slice_in_dim(hidden_RxWxD, slot, 1, axis=1))[:, 0]
        rows = lambda c: crossed_R.reshape((1,) * (c.ndim - 4) + (R, 1, 1, 1))  # noqa: E731 (either layout)
        return (jnp.where(crossed_R[:, None], new_RxV, logits_RxV),
                _constrain_cache(jax.tree.map(lambda n, c: jnp.where(rows(c), n, c), new, cache), mesh))

    return jax.lax.cond(jnp.any(crossed_R), recompute, lambda _: (logits_RxV, cache), None)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(cfg: ModelConfig, params, prompt_BxP, prompt_len_B, cache_len: int):
    """Run a left-padded prompt batch into a fresh cache of `cache_len` slots.

    Returns (fp32 next-token logits [B, V], cache, kv_mask [B, S]).
    """
    return _prefill(cfg, params, prompt_BxP, prompt_len_B, cache_len)


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_step(cfg: ModelConfig, params, token_B, position_B, kv_mask_BxS, cache, slot):
    """Write one token per row at cache `slot` (same for all rows); fp32 next-token logits [B, V]."""
    return _decode_step(cfg, params, token_B, position_B, kv_mask_BxS, cache, slot)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Static (compile-time) sampling settings; temperature, top_k and top_p values are traced."""

    max_new_tokens: int
    cache_len: int
    greedy: bool
    truncate: bool  # top-k or top-p in use (costs a vocab sort per step)
    pad_id: int
    mesh: Optional[Mesh] = None  # only for sharding constraints inside; None: one device
    segments: int = 0  # decode loop segments (attention windows); 0: automatic (_segments)
    unroll_layers: Optional[bool] = None  # decode over per-layer weight slices; None: _unroll_layers decides
    num_samples: int = 1  # K decodes per prompt, sharing the prompt's one prefill
    chunk: int = 0  # decode steps per loop iteration (between two early-exit checks); 0: _decode_chunk decides
    gather_weights: bool = False  # decode from weights replicated over fsdp (spjax.sampler.gather_weights)
    layer_caches: bool = True  # unrolled layers: a KV buffer per layer (model.unstack_cache), not one stack
    decode_kernel: bool = True  # False: decode steps over the XLA einsums even where attention=auto/triton
    xla_options: tuple = ()  # ((name, value), ...): XLA compiler options for this program alone (see `program`)


_CPU_UNROLL_MAX_LAYERS = 8  # XLA:CPU compile time grows with the unrolled layer count


def _unroll_layers(settings: _Settings, cfg: ModelConfig) -> bool:
    """Unroll the decode step's layers over weights sliced once (model.unstack_layers)?

    A GPU matmul cannot read a weight straight out of the scan's layer stack, so a scanned decode
    step copies all weights once more; unrolled, each step reads them once. XLA:CPU copies too,
    but there unrolling multiplies the loop body's compile time by the layer count (SmolLM2's 30:
    ~5 s more per body, for ~13% per step), so CPU unrolls only shallow models, where it also
    removes the inner loop's fixed per-step cost (tiny: 1.4x). TPU fusions read the stack in place.
    Never a quantized base: XLA would hoist every layer's dequantized weight out of the decode loop,
    a full-precision base live while sampling (7B int8: 48 GiB, not 22)."""
    if cfg.base_quant != "none" or settings.unroll_layers is not None:
        return cfg.base_quant == "none" and bool(settings.unroll_layers)
    backend = jax.default_backend()
    return backend == "gpu" or (backend == "cpu" and cfg.num_layers <= _CPU_UNROLL_MAX_LAYERS)


GPU_CHUNK = 8  # decode steps a GPU runs between two early-exit checks (each one a host sync)


def _decode_chunk(settings: _Settings) -> int:
    """Decode steps per iteration of the early-exit loop (the rest run in a fixed-count inner loop).

    XLA:GPU runs a while loop of unknown trip count by copying the condition to the host and
    blocking until the device is idle, every iteration: the next step's kernels are launched only
    after the last one finished, so a small decode step is bound by launch latency. A loop of fixed
    trip count (the inner scan) is enqueued without a sync. On CPU the host is the device, and TPU
    loops run on the chip: both check every step (1), which also ends the loop at the earliest step.
    """
    if settings.chunk:
        return settings.chunk
    return GPU_CHUNK if jax.default_backend() == "gpu" else 1


def _layer_caches(settings: _Settings, cfg: ModelConfig) -> bool:
    """A KV buffer per layer (model.unstack_cache)? With unrolled layers whose weights need no gather
    (no fsdp split, or sampling.weights=gathered), unless settings turn it off: the prefill then runs
    unrolled too and fills the buffers. Over fsdp-sharded weights an unrolled prefill has XLA gather
    every layer's weights up front (an 8-way fsdp tiny model's sampler: 4.2x the temp memory), so
    those keep the stack."""
    mesh = settings.mesh
    whole = mesh is None or settings.gather_weights or dict(mesh.shape).get("fsdp", 1) == 1
    return settings.layer_caches and whole and _unroll_layers(settings, cfg)


def _segments(settings: _Settings, cfg: ModelConfig) -> int:
    """Decode loop segments: as asked, else one (the whole cache) where each layer has its own buffer,
    else _decode_windows' rule. A window of a layer's buffer is a strided slice, which XLA:GPU copies
    before the attention matmuls every step: on an H200 (1B shape, batch 64, 256 + 256 tokens)
    attending over all 512 slots gave 33.7k new tok/s, four windows 29.1k (docs/perf.md)."""
    return settings.segments or (1 if _layer_caches(settings, cfg) else 0)


def _decode_windows(P: int, T: int, S: int, segments: int = 0) -> tuple:
    """((last_step, W), ...): decode steps up to last_step attend over the first W cache slots.

    Step j (1 <= j < T) writes slot P + j - 1 and attends over slots [0, P + j). The T - 1 steps
    are cut into `segments` near-equal runs; each run's window is its last step's need rounded up to
    _WINDOW_ROUND (at most S). Windows that round to the same width merge.
    """
    steps = T - 1
    if steps < 1:
        return ()
    n = segments or min(_MAX_SEGMENTS, -(-steps // _STEPS_PER_SEGMENT))
    n = max(1, min(n, steps))
    out = []
    for i in range(1, n + 1):
        last = -(-steps * i // n)
        W = min(S, -(-(P + last) // _WINDOW_ROUND) * _WINDOW_ROUND)
        last = min(steps, W - P)  # the rounded window may serve a few more steps
        if out and out[-1][1] == W:
            out[-1] = (last, W)
        elif not out or last > out[-1][0]:
            out.append((last, W))
    return tuple(out)


@flax.struct.dataclass
class _State:
    step: jax.Array  # [] index of the next token to sample
    tokens_BxT: jax.Array  # int32 sampled tokens; pad after EOS
    logprobs_BxT: jax.Array  # fp32 untempered log-probs; 0 after EOS
    lengths_B: jax.Array  # int32 tokens sampled so far (incl. EOS)
    done_B: jax.Array  # bool: sampled an EOS (or a dummy row)
    cache: dict  # {'k','v': [N, B, K, S, Dh]}, or N buffers [B, K, S, Dh] each (layer_caches)
    kv_mask_BxS: jax.Array  # bool validity of every cache slot
    keys_B: jax.Array  # per-example PRNG keys


def _step_params(cfg: ModelConfig, settings: _Settings, params):
    """The weights the decode loop reads, made once outside it: in the compute dtype (bf16 steps
    read half of fp32 masters' bytes; `params` come cast), where the layers are unrolled sliced per
    layer (a scan over the stacked layers copies every layer's weights out of the stack on every
    step), and with gather_weights replicated over fsdp (shd.decode_shardings: no decode step moves
    them; unrolled, the slices are gathered, not the stack as well)."""
    unrolled = _unroll_layers(settings, cfg)
    out = model.unstack_layers(cfg, params) if unrolled else params
    if not (settings.gather_weights and settings.mesh is not None):
        return out
    want = shd.decode_shardings(cfg, settings.mesh)
    if unrolled:  # a layer's slice drops the stack's leading (layers) dim
        layer = jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])), want["layers"])
        want = {**want, "layers": (layer,) * cfg.num_layers}
    return jax.lax.with_sharding_constraint(out, want)


def _record(s: _State, step, token_B, logprob_B, alive_B, eos_E, pad_id) -> _State:
    """Store token `step` of the rows still alive; pad and 0 for finished rows."""
    token_B = jnp.where(alive_B, token_B, pad_id)
    hit_B = jnp.any(token_B[:, None] == eos_E[None, :], axis=-1)
    return s.replace(tokens_BxT=s.tokens_BxT.at[:, step].set(token_B),
                     logprobs_BxT=s.logprobs_BxT.at[:, step].set(jnp.where(alive_B, logprob_B, 0.0)),
                     lengths_B=s.lengths_B + alive_B.astype(jnp.int32),
                     done_B=s.done_B | (alive_B & hit_B))


def _repeat_rows(x, K: int, axis: int = 0):
    # Row b's K copies land at rows b*K .. b*K+K-1: a device's prompts and their samples stay on it.
    return x if K == 1 else jnp.repeat(x, K, axis=axis)


def _generate_batch(cfg: ModelConfig, settings: _Settings, params, prompt_BxP, prompt_len_B, live_B,
              example_ids_B, key_data, knobs, eos_E):
    """Sample up to T tokens, K times per prompt: outputs have R = B*K rows, row b*K + k holding
    prompt b's sample k. Params are an argument (not a closed-over constant) so one compiled program
    serves every round's params and XLA never embeds the weights.

    The B prompts are prefilled once; their KV cache, next-token logits and masks are then repeated
    K times and the K decodes run as one batch of R rows (no K-fold prefill).
    Shardings come from the inputs: params as placed (replicated, fsdp or tensor-sharded), every
    [B, ...] array over ('data', 'fsdp'), the cache by CACHE_LOGICAL_AXES (batch and kv heads).
    """
    mesh, T, K = settings.mesh, settings.max_new_tokens, settings.num_samples
    B, P = prompt_BxP.shape
    R = B * K
    # The key enters as raw uint32 data: a host array every process holds whole, which a
    # multi-process jit accepts as a replicated input (a typed key on one device it does not).
    key = jax.random.wrap_key_data(key_data)
    keys_BxK = sample_keys(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids_B), K)
    keys_R = _batch(keys_BxK.reshape(R), mesh)
    params = model.cast_params(cfg, params)
    step_params = _step_params(cfg, settings, params)
    layer_caches = _layer_caches(settings, cfg)

    # Gathered weights serve the prefill too: no collective is left in the program's loops. So do
    # unrolled layers with a buffer each: the prefill fills those buffers (no copy out of a stack).
    prefill_params = step_params if (settings.gather_weights and mesh is not None) or layer_caches else params
    logits_BxV, cache, kv_mask_BxS = _prefill(cfg, prefill_params, prompt_BxP, prompt_len_B, settings.cache_len, mesh,
                                              layer_caches)
    logits_RxV = _batch(_repeat_rows(logits_BxV, K), mesh)
    cache = _constrain_cache(jax.tree.map(lambda c: _repeat_rows(c, K, axis=c.ndim - 4), cache), mesh)
    kv_mask_RxS = _batch(_repeat_rows(kv_mask_BxS, K), mesh)
    prompt_len_R, live_R = (_batch(_repeat_rows(x, K), mesh) for x in (prompt_len_B, live_B))
    token_R, logprob_R = choose(logits_RxV, keys_R, 0, knobs, settings)
    state = _State(step=jnp.int32(1), tokens_BxT=_batch(jnp.full((R, T), settings.pad_id, jnp.int32), mesh),
                   logprobs_BxT=_batch(jnp.zeros((R, T), jnp.float32), mesh),
                   lengths_B=_batch(jnp.zeros((R,), jnp.int32), mesh),
                   done_B=~live_R,  # dummy rows start done, so they never hold the loop open
                   cache=cache, kv_mask_BxS=kv_mask_RxS, keys_B=keys_R)
    state = _record(state, 0, token_R, logprob_R, live_R, eos_E, settings.pad_id)
    crossing = _crosses_original(cfg, P, T)
    prompt_RxP = _batch(_repeat_rows(prompt_BxP, K), mesh) if crossing else None

    # The decode steps' model config: only the Triton kernel (spjax.decode_attention) depends on it, as auto
    # picks the einsums for every other cached one-token step.
    step_cfg = cfg if settings.decode_kernel else dataclasses.replace(cfg, attention="xla")

    def step(s: _State, W) -> _State:
        prev_R = jax.lax.dynamic_index_in_dim(s.tokens_BxT, s.step - 1, axis=1, keepdims=False)
        position_R = prompt_len_R + s.step - 1
        logits_RxV, cache = _decode_step(step_cfg, step_params, prev_R, position_R, s.kv_mask_BxS[:, :W], s.cache,
                                         P + s.step - 1, mesh)
        if crossing:
            logits_RxV, cache = _recompute_crossed(cfg, step_params, prompt_RxP, prompt_len_R, s.tokens_BxT,
                                                   s.kv_mask_BxS[:, :W], P + s.step - 1, position_R, ~s.done_B,
                                                   logits_RxV, cache, mesh)
        token_R, logprob_R = choose(logits_RxV, s.keys_B, s.step, knobs, settings)
        s = _record(s.replace(cache=cache), s.step, token_R, logprob_R, ~s.done_B, eos_E, settings.pad_id)
        return s.replace(step=s.step + 1)

    def run(s: _State, last, W, n) -> _State:
        """Steps up to `last` in runs of n, while a row is alive: the loop checks once per run."""
        def body(s):
            if n == 1:
                return step(s, W)
            return jax.lax.fori_loop(0, n, lambda _, s: step(s, W), s)  # static count: no check inside
        return jax.lax.while_loop(lambda s: (s.step + n - 1 <= last) & ~jnp.all(s.done_B), body, s)

    # Each segment picks up where the last stopped; once every row is done the rest exit at once.
    # A segment runs whole chunks, then its remainder as one shorter run (rows that finish inside a
    # run just record padding until it ends: `steps` counts the longest sample, not the loop's turns).
    first, chunk = 1, _decode_chunk(settings)
    for last, W in _decode_windows(P, T, settings.cache_len, _segments(settings, cfg)):
        n = min(chunk, last - first + 1)
        state = run(state, last, W, n)
        if (last - first + 1) % n:
            state = run(state, last, W, (last - first + 1) % n)
        first = last + 1
    return dict(tokens_BxT=state.tokens_BxT, logprobs_BxT=state.logprobs_BxT, lengths_B=state.lengths_B,
                finished_B=state.done_B & live_R, steps=jnp.max(state.lengths_B))


@functools.cache
def program(xla_options: tuple = ()):
    """The batch program, jitted with these XLA compiler options ((name, value) pairs; () is XLA's
    defaults): options for the sampler alone, where XLA_FLAGS would change every program of the run
    (bench/sampler.py --xla times variants in one process)."""
    return jax.jit(_generate_batch, static_argnames=("cfg", "settings"),
                   compiler_options=dict(xla_options) or None)


_generate = program()
