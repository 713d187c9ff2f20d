"""Sampling on device from host lists: `sample` plans the batches, spjax.sampler_program runs them.

The host-side plan (`make_plan` -> `Plan`): check the arguments, fix a batch's row count
(batch_size rounded up to the data-parallel size; dummy rows fill a batch), its prompt bucket
(`default_bucket`: powers of two), the KV cache (P + T rounded up), K samples per prompt and the EOS
list. `sample` places params by spjax.sharding's rules, sorts prompts by length, cuts them into
batches, runs the compiled program once per batch (`run_batch`) and gathers the results back, in the
prompts' order (`SampleResult`). compile_check and the benches lower a Plan without data (`lower`).

The on-device program (prefill, the decode loop) lives in spjax.sampler_program, token choice and
per-example keys in spjax.drawing; their public names (`prefill`, `decode_step`, `round_key`, `example_key`,
`left_pad_positions`) and the internals tests and benchmarks reach for are re-exported here, so
callers only ever import spjax.sampler. Layout: see spjax.sampler_program; randomness: spjax.drawing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spjax import sharding as shd
from spjax.config import ModelConfig
from spjax.drawing import _argmax, _categorical, example_key, round_key, sample_keys  # noqa: F401 (as below)
from spjax.sampler_program import (  # noqa: F401 - the device program, reachable as spjax.sampler.<name>
    GPU_CHUNK, _MAX_SEGMENTS, _WINDOW_ROUND, _Settings, _decode_chunk, _decode_windows, _generate, _segments,
    _unroll_layers, left_pad_positions, prefill, program)
from spjax.sampler_program import decode_step as _jitted_decode_step

_CACHE_ROUND = 16  # cache slots are rounded up to this: nearby max_new_tokens share a shape
_EOS_ROUND = 4  # EOS id lists are padded (with -1) to a multiple of this: fewer distinct shapes


def decode_step(cfg: ModelConfig, params, token_B, position_B, kv_mask_BxS, cache, slot):
    """Write one token per row at cache `slot` (same for all rows); fp32 next-token logits [B, V] and the
    cache. For loops of one's own: a slot outside the kv_mask's S slots is refused (jitted, the slot is
    traced, and the cache write would clamp onto the last slot, overwriting that token without a word)."""
    if not isinstance(slot, jax.core.Tracer) and not 0 <= int(slot) < kv_mask_BxS.shape[1]:
        raise ValueError(f"decode_step: slot {int(slot)} is outside the cache's {kv_mask_BxS.shape[1]} slots: "
                         "prefill a longer cache (cache_len)")
    return _jitted_decode_step(cfg, params, token_B, position_B, kv_mask_BxS, cache, slot)


# ---------------------------------------------------------------------------------------------
# Public API: host lists in, host lists out


@dataclasses.dataclass
class SampleResult:
    """Samples in the order of the prompts: with K samples per prompt, entry i*K + k is prompt i's
    sample k. Each token list ends at (and includes) its EOS, if any."""

    tokens: list  # [n*K] lists of int
    logprobs: list  # [n*K] float32 arrays: log pi(token | prompt, earlier tokens), untempered
    lengths: np.ndarray  # [n*K] int32 number of tokens returned
    finished: np.ndarray  # [n*K] bool: stopped at an EOS id (False: hit max_new_tokens)
    steps: int  # tokens of the longest sample (< max_new_tokens when every row stopped early)
    num_samples: int = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one sampling batch: what `sample` compiles, and what compile_check and
    the benches lower without running it (`abstract_inputs`)."""

    rows: int  # prompts per batch: batch_size rounded up to the data-parallel size
    prompt_len: int  # P, the bucket every prompt of the batch is left-padded to
    settings: _Settings  # max_new_tokens, cache slots, K, greedy/truncate, pad id, mesh
    eos: tuple  # EOS ids padded with -1 to a multiple of _EOS_ROUND

    @property
    def cache_len(self) -> int:
        return self.settings.cache_len

    def windows(self, cfg: ModelConfig) -> tuple:
        """((last_step, W), ...): the decode loop's attention windows (spjax.sampler_program)."""
        return _decode_windows(self.prompt_len, self.settings.max_new_tokens, self.cache_len,
                               _segments(self.settings, cfg))

    def unrolled(self, cfg: ModelConfig) -> bool:
        """Whether the decode step runs its layers unrolled (spjax.sampler_program._unroll_layers)."""
        return _unroll_layers(self.settings, cfg)

    def chunk(self) -> int:
        """Decode steps between two early-exit checks (spjax.sampler_program._decode_chunk)."""
        return _decode_chunk(self.settings)


def cache_len(prompt_len: int, max_new_tokens: int) -> int:
    """KV cache slots for a P-token bucket and T new tokens: P + T rounded up (nearby T share a shape)."""
    return -(-(prompt_len + max_new_tokens) // _CACHE_ROUND) * _CACHE_ROUND


def make_plan(*, prompt_len: int, max_new_tokens: int, batch_size: int, num_samples: int = 1,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_ids: Sequence[int] = (),
              pad_id: int = 0, mesh: Optional[Mesh] = None, decode_segments: int = 0,
              unroll_layers: Optional[bool] = None, decode_chunk: int = 0, gather_weights: bool = False,
              xla_options: Optional[dict] = None, layer_caches: bool = True,
              decode_kernel: bool = True) -> Plan:
    """Check the sampling arguments and fix one batch's static shape (rows, P, cache, EOS list)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if decode_chunk < 0:
        raise ValueError(f"decode_chunk must be >= 0 (0: automatic), got {decode_chunk}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    dp = 1 if mesh is None else shd.data_parallel_size(mesh)
    eos = list(dict.fromkeys(int(e) for e in eos_ids))
    eos += [-1] * (max(_EOS_ROUND, -(-len(eos) // _EOS_ROUND) * _EOS_ROUND) - len(eos))
    greedy = is_greedy(temperature)
    settings = _Settings(max_new_tokens=max_new_tokens, cache_len=cache_len(prompt_len, max_new_tokens),
                         greedy=greedy, truncate=not greedy and (top_k > 0 or top_p < 1.0), pad_id=pad_id,
                         mesh=mesh, segments=decode_segments, unroll_layers=unroll_layers,
                         num_samples=num_samples, chunk=decode_chunk, gather_weights=gather_weights,
                         xla_options=tuple(sorted((xla_options or {}).items())), layer_caches=layer_caches,
                         decode_kernel=decode_kernel)
    return Plan(rows=-(-batch_size // dp) * dp, prompt_len=prompt_len, settings=settings, eos=tuple(eos))


WEIGHTS = ("sharded", "gathered")  # sampling.weights: the decode weights' layout on an fsdp mesh


def gather_weights(mesh: Optional[Mesh], weights: str = "sharded") -> bool:
    """Decode from weights replicated over the fsdp axis (spjax.sharding.decode_shardings)?

    'sharded' decodes from the training layout: XLA then moves arrays between the fsdp devices in
    every decode step, activations (a 7B on 8 devices: ~100 collectives, ~170 MB, a step, each device
    reading an eighth of the weights) or, for small models, the weights. 'gathered' gathers them once
    per batch into a copy each device keeps (compute dtype, tensor splits kept): no decode step moves
    an array over fsdp (tensor's all-reduces remain), but every device reads all the weights each
    step and holds the copy. Which is faster depends on the interconnect's latency against the
    memory bandwidth: bench/fsdp_decode.py measures both. Without an fsdp axis the two are the same.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return mesh is not None and mesh.shape["fsdp"] > 1 and weights == "gathered"


GREEDY_BELOW = 1e-5  # a smaller temperature samples greedily: logits / T would overflow float32 (as vLLM)


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def knobs(temperature: float, top_k: int = 0, top_p: float = 1.0) -> dict:
    """The traced sampling values (greedy runs take temperature 1: it is never applied)."""
    return dict(temperature=np.float32(1.0 if is_greedy(temperature) else temperature), top_k=np.int32(top_k),
                top_p=np.float32(top_p))


def abstract_inputs(plan: Plan, params) -> tuple:
    """ShapeDtypeStructs (with shardings under the plan's mesh) of `run_batch`'s device arguments."""
    mesh, B, P = plan.settings.mesh, plan.rows, plan.prompt_len
    rep = None if mesh is None else shd.replicated(mesh)
    row = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=None if mesh is None else shd.batch_sharding(mesh, len(shape)))
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # the program takes raw key data
    scalar = lambda v: jax.ShapeDtypeStruct((), np.asarray(v).dtype, sharding=rep)
    return (params, row((B, P), jnp.int32), row((B,), jnp.int32), row((B,), jnp.bool_), row((B,), jnp.uint32),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep), {k: scalar(v) for k, v in knobs(1.0).items()},
            jax.ShapeDtypeStruct((len(plan.eos),), jnp.int32, sharding=rep))


def lower(cfg: ModelConfig, plan: Plan, params):
    """The batch program lowered for `plan` (params may be ShapeDtypeStructs): .compile() it to
    read its memory without running it (spjax.compile_check)."""
    return program(plan.settings.xla_options).lower(cfg, plan.settings, *abstract_inputs(plan, params))


def run_batch(cfg: ModelConfig, plan: Plan, params, prompts: list, example_ids: list, key_data, knob_values) -> dict:
    """Sample one batch of at most plan.rows prompts (token lists): {name: numpy array} with
    plan.rows * K rows, row r*K + k being prompt r's sample k (dummy rows fill the batch)."""
    mesh, B, P = plan.settings.mesh, plan.rows, plan.prompt_len
    prompt_BxP = np.full((B, P), plan.settings.pad_id, np.int32)
    prompt_len_B = np.ones(B, np.int32)  # dummy rows: one pad token
    live_B = np.zeros(B, bool)
    ids_B = np.zeros(B, np.uint32)
    for r, (p, i) in enumerate(zip(prompts, example_ids)):
        prompt_BxP[r, P - len(p):] = p
        prompt_len_B[r], live_B[r], ids_B[r] = len(p), True, i
    out = program(plan.settings.xla_options)(
        cfg, plan.settings, params, _to_device(prompt_BxP, mesh), _to_device(prompt_len_B, mesh),
        _to_device(live_B, mesh), _to_device(ids_B, mesh), key_data, knob_values, np.asarray(plan.eos, np.int32))
    return _to_host(out)


def default_bucket(n: int) -> int:
    """Padded prompt length for a longest prompt of n tokens: a power of two >= 16."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def _pick_bucket(n: int, buckets: Optional[Sequence[int]]) -> int:
    if not buckets:
        return default_bucket(n)
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {max(buckets)}")
    return fits[0]


def _to_device(x: np.ndarray, mesh: Optional[Mesh]):
    if mesh is None:
        return x  # the jitted call moves its host arguments in one go
    # Each process supplies only its own shards: works the same on one host and on many.
    sharding = shd.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(out: dict) -> dict:
    """Every output as numpy: local arrays in one transfer, arrays spanning processes gathered."""
    # A list in the dict's order, not a set: every process must issue the same gathers in the same order.
    spread = [k for k, x in out.items() if isinstance(x, jax.Array) and not x.is_fully_addressable]
    host = jax.device_get({k: x for k, x in out.items() if k not in spread})
    host.update({k: shd.to_host(out[k]) for k in spread})
    return {k: np.asarray(v) for k, v in host.items()}


def _same(x):
    return x


def _as_lists(prompt_ids, prompt_lengths, prompt_mask):
    not_ids = lambda x: isinstance(x, (str, Mapping))  # noqa: E731 - text, or a tokenizer's BatchEncoding
    if not_ids(prompt_ids) or (isinstance(prompt_ids, (list, tuple)) and any(map(not_ids, prompt_ids))):
        raise ValueError("prompt_ids: token ids expected (a list of token lists, or an int array [n, L]), got "
                         f"{type(prompt_ids).__name__}: for a chat, spjax.data.tokens.prompt_ids(tokenizer, messages) "
                         "gives the tokens a run samples from (transformers 5's apply_chat_template returns a dict)")
    if prompt_lengths is not None and prompt_mask is not None:
        raise ValueError("give prompt_lengths (rows read from the left) or prompt_mask, not both")
    if prompt_mask is not None:  # any padding side, e.g. spjax.data.prompt_batches' left-padded rows
        arr, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
        return [list(map(int, arr[i][mask[i]])) for i in range(len(arr))]
    if prompt_lengths is not None:
        arr = np.asarray(prompt_ids)
        return [list(map(int, arr[i, :int(n)])) for i, n in enumerate(prompt_lengths)]
    return [list(map(int, p)) for p in prompt_ids]


def sample(cfg: ModelConfig, params, prompt_ids, *, key, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_ids: Optional[Sequence[int]] = None, num_samples: int = 1,
           example_ids: Optional[Sequence[int]] = None, prompt_lengths: Optional[Sequence[int]] = None,
           prompt_mask=None,
           batch_size: Optional[int] = None, buckets: Optional[Sequence[int]] = None,
           mesh: Optional[Mesh] = None, pad_id: Optional[int] = None, decode_segments: int = 0,
           unroll_layers: Optional[bool] = None, decode_chunk: int = 0, weights: str = "sharded",
           xla_options: Optional[dict] = None, layer_caches: bool = True,
           decode_kernel: bool = True) -> SampleResult:
    """Sample `num_samples` (K) continuations of every prompt on device.

    prompt_ids: a list of token lists, or an int array [n, L] with `prompt_lengths` (rows are read
      from the left) or with `prompt_mask` [n, L] (1 on the prompt's tokens, either side padded).
      key: the round key (`round_key(seed, round)`, or an int seed); example i's sample k draws from
      sample_keys(fold_in(key, example_ids[i]))[k] (default ids: 0..n-1), so results do not depend on batch composition, bucket, K's batch neighbours, mesh or host.
      temperature 0 means greedy. top_k 0 and top_p 1 disable truncation. Sampling stops per row at
      any of `eos_ids` (the EOS is returned; default: the model's, cfg.eos_token_ids, as transformers'
      generate() stops; () never stops early) or at max_new_tokens. Prompts are sorted by length and
      decoded `batch_size` prompts at a time (default: all at once), each batch padded with dummy
      rows to batch_size and a multiple of the mesh's data-parallel size, and left-padded to a static
      bucket (`buckets`, default powers of two); each prompt is prefilled once for its K samples.
      With a mesh, params are placed by spjax.sharding's rules and batches split over the data axes.
      Every process of a multi-host run calls this with the same arguments. decode_segments: how many
      attention windows the decode loop is cut into (0: automatic, see _segments; 1: attend over the whole cache).
      unroll_layers: decode over per-layer weight slices (None: automatic; a quantized base never: see
        _unroll_layers).
      decode_chunk: decode steps between two checks for every row done (0: automatic, see
      _decode_chunk); the samples are the same for any value. weights: the decode weights' layout
      on an fsdp mesh (`gather_weights`); the samples are the same for any value. xla_options: XLA
      compiler options for the sampling program alone ({name: value}; `program`). layer_caches: with
      unrolled layers, a KV buffer per layer (False: one stack, which a GPU copies from every step).
      decode_kernel: False keeps the decode steps off the Triton decode-attention kernel
      (spjax.decode_attention), which attention=auto picks on CUDA GPUs (benchmarks compare the two).
    """
    prompts = _as_lists(prompt_ids, prompt_lengths, prompt_mask)
    n, K = len(prompts), num_samples
    eos_ids = cfg.eos_token_ids if eos_ids is None else eos_ids
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {cfg.vocab_size})")
    longest = max(map(len, prompts), default=0) + max_new_tokens - 1  # the last token is sampled, never fed
    if cfg.rope_type == "dynamic" and longest > cfg.max_position_embeddings:  # (spjax.rope)
        raise ValueError(f"prompts + max_new_tokens reach {longest} positions: dynamic rope scaling is computed up "
                         f"to max_position_embeddings={cfg.max_position_embeddings} only")
    ids = list(range(n)) if example_ids is None else [int(i) for i in example_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} example_ids for {n} prompts")
    if any(not 0 <= i < 2 ** 32 for i in ids):
        raise ValueError("example_ids must lie in [0, 2**32)")
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    if not 0 <= pad_id < cfg.vocab_size:  # the model embeds every fed token, pads too: NaN past the table
        raise ValueError(f"pad_id {pad_id} is not a token of the model's vocabulary (size {cfg.vocab_size})")
    gather = gather_weights(mesh, weights)
    plan_for = lambda P: make_plan(prompt_len=P, max_new_tokens=max_new_tokens, batch_size=batch_size or n,
                                   num_samples=K, temperature=temperature, top_k=top_k, top_p=top_p,
                                   eos_ids=eos_ids, pad_id=pad_id, mesh=mesh, decode_segments=decode_segments,
                                   unroll_layers=unroll_layers, decode_chunk=decode_chunk, gather_weights=gather,
                                   xla_options=xla_options, layer_caches=layer_caches,
                                   decode_kernel=decode_kernel)
    rows = plan_for(1).rows
    if mesh is not None:  # re-place only params that are not already where the rules put them
        # Equivalent, not equal: a jit's outputs (a LoRA policy's merged weights) spell P(None, 'fsdp')
        # where the rules spell P(None, 'fsdp', None); `!=` copied the whole model, through a newly
        # compiled program, at every call (every sampling.batch_size prompts).
        want = shd.param_shardings(cfg, mesh)
        placed = lambda x, sh: isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, x.ndim)  # noqa: E731
        if not all(jax.tree.leaves(jax.tree.map(placed, params, want))):
            params = jax.jit(_same, out_shardings=want)(params)  # (one function: its program is cached)
    key_data, knob_values = np.asarray(jax.random.key_data(key)), knobs(temperature, top_k, top_p)
    order = sorted(range(n), key=lambda i: len(prompts[i])) if batch_size else list(range(n))

    tokens, logprobs = [None] * (n * K), [None] * (n * K)
    lengths, finished = np.zeros(n * K, np.int32), np.zeros(n * K, bool)
    steps = 0
    for start in range(0, n, rows):
        chunk = order[start:start + rows]
        plan = plan_for(_pick_bucket(max(len(prompts[i]) for i in chunk), buckets))
        out = run_batch(cfg, plan, params, [prompts[i] for i in chunk], [ids[i] for i in chunk], key_data,
                        knob_values)
        steps = max(steps, int(out["steps"]))
        for r, i in enumerate(chunk):
            for k in range(K):
                src, dst = r * K + k, i * K + k
                m = int(out["lengths_B"][src])
                tokens[dst] = out["tokens_BxT"][src, :m].tolist()
                logprobs[dst] = out["logprobs_BxT"][src, :m].astype(np.float32)
                lengths[dst], finished[dst] = m, bool(out["finished_B"][src])
    return SampleResult(tokens=tokens, logprobs=logprobs, lengths=lengths, finished=finished, steps=steps,
                        num_samples=K)
