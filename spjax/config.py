"""Typed, frozen configuration for every part of spjax.

Configs are small Python dataclasses: hashable (so a ModelConfig can be a static jit argument),
validated on construction, and overridable from the command line with dotted `key=value` pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from spjax.config_checks import ConfigError  # noqa: F401 (spjax.config.ConfigError is its public name)
from spjax.config_checks import check as _check, check_model, iso_date as _iso_date, one_of as _one_of, template_kwargs
from spjax.config_checks import typed_and_finite as _finite

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")  # dynamic: within max_position_embeddings
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
# spjax.model.attention_impl: auto picks cuDNN (GPU) or splash (TPU) where they apply, and the Triton decode
# kernel (spjax.decode_attention) for the GPU sampler's steps; the rest force a path
ATTENTION = ("auto", "xla", "cudnn", "xla_fused", "splash", "triton")
PAIR_SOURCES = ("auto", "sampled", "data", "judged")  # spjax.pairs.SOURCES, plus auto
JUDGE_KINDS = ("reward_model", "verifier", "similarity", "python")  # spjax.judges.KINDS
JUDGE_PAIRS = ("best_worst", "all")  # how a prompt's K judged samples become pairs
# Held-out metrics that can pick the best round (run.keep_best), and which way is better.
METRIC_GOALS = {"nll": "min", "f1": "max", "rouge_l": "max", "held_lp_real": "max", "judge_score": "max"}
REFERENCES = ("opponent", "initial")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections model.Block names (the default)
SHARED_EXPERT_TARGETS = ("shared_gate", "shared_up", "shared_down")  # Qwen2-MoE's shared expert: named, never default
EXPERT_TARGETS = ("experts_gate", "experts_up", "experts_down")  # a mixture's experts, each its own adapter: named
BASE_QUANTS = ("none", "int8", "int4")  # storage of a LoRA run's frozen base projections


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the frozen base: W x + (alpha / rank) B A x. rank 0 trains every param."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS  # among LORA_TARGETS + SHARED_EXPERT_TARGETS + EXPERT_TARGETS
    init_path: str = ""  # a PEFT adapter directory (adapter_config.json) as the starting adapter
    # A mixture's experts' adapters (EXPERT_TARGETS), one per expert, at their own rank (scale alpha / expert_rank,
    # as PEFT's rank_pattern gives it): with 128 experts they outnumber the others; 0: rank
    expert_rank: int = 0

    def rank_of(self, target: str) -> int:
        """The rank of target's adapters."""
        return (self.expert_rank or self.rank) if target in EXPERT_TARGETS else self.rank

    def scale_of(self, target: str) -> float:
        """alpha / rank of target's adapters."""
        return self.alpha / self.rank_of(target)

    def __post_init__(self):
        _finite(self, "lora")
        _check(self.rank >= 0, "lora.rank", f"must be >= 0, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha} (the adapter's scale is alpha / rank: "
               "0 would train nothing)")
        object.__setattr__(self, "targets", tuple(self.targets))
        known = LORA_TARGETS + SHARED_EXPERT_TARGETS + EXPERT_TARGETS
        bad = [t for t in self.targets if t not in known]
        _check(not bad, "lora.targets", f"{bad} not in {known}")
        _check(not self.rank or self.targets, "lora.targets", "empty: name at least one projection")
        _check(not self.init_path or self.rank, "lora.init_path", "needs lora.rank > 0")
        _check(self.rank or (self.alpha, self.targets, self.expert_rank) == (16.0, LORA_TARGETS, 0), "lora.rank",
               "0 (full fine-tuning), but lora.alpha, lora.targets or lora.expert_rank is set: set lora.rank > 0 "
               "to train adapters")  # (not ignored)
        _check(self.expert_rank >= 0, "lora.expert_rank", f"must be >= 0, got {self.expert_rank}")
        _check(not self.expert_rank or set(self.targets) & set(EXPERT_TARGETS), "lora.expert_rank",
               f"{self.expert_rank}, but lora.targets names none of {', '.join(EXPERT_TARGETS)}: it would be ignored")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama 2/3, Mistral, Ministral 3, Qwen2, Qwen3, Phi-3/4, Gemma 2/3, OLMo 2/3,
    SmolLM2/3, Granite 3; Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: its MLPs mixtures of experts)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads (resolved at construction, kept by replace())
    rope_theta: float = 10000.0
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0  # linear, llama3, yarn and longrope scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position: int = 8192  # llama3, yarn, longrope: the context length of pretraining
    rope_beta_fast: float = 32.0  # yarn only: dims turning more often than this over that context are kept,
    rope_beta_slow: float = 1.0  # yarn only: less often than this, interpolated (a ramp between)
    rope_attention_factor: float = 0.0  # yarn, longrope: cos/sin scale; 0: derived from rope_factor (spjax.rope)
    rope_truncate: bool = True  # yarn only: the ramp's ends rounded to whole dims (transformers' default)
    rope_short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors within the original context
    rope_long_factor: tuple[float, ...] = ()  # longrope: for sequences past it (spjax.rope)
    partial_rotary_factor: float = 1.0  # the fraction of each head's dims rotated (Phi-4-mini: 0.75)
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    qk_norm: bool = False  # Qwen3 RMS-normalizes each head's q and k (over head_dim) before RoPE
    qk_norm_full: bool = False  # OLMo 2, OLMoE: the q/k norms over all heads at once, not per head
    sliding_window: Optional[int] = None  # Mistral; None means full causal attention
    layer_types: tuple[str, ...] = ()  # per layer, LAYER_TYPES (Gemma, Qwen2): () = every layer as sliding_window
    # Gemma 3, OLMo 3: the windowed layers rotate by unscaled rope of this theta; 0: by the others' rope
    rope_local_theta: float = 0.0
    nope_layers: tuple[int, ...] = ()  # SmolLM3: the layers that rotate neither q nor k (no position encoding)
    # Ministral 3 (Llama 4's llama_4_scaling_beta): q times 1 + beta * log(1 + floor(position /
    # rope_original_max_position)), after its rotation; 0: none
    query_scale_beta: float = 0.0
    # Granite (its muP scalars): embeddings times embedding_multiplier, attention scores times
    # attention_multiplier (0: 1/sqrt(query_scale or head_dim)), each block's attention and MLP outputs times
    # residual_multiplier before the residual add, logits divided by logits_scaling
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 0.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Gemma 2/3 only (config_checks.check_family; their other parts follow from `architecture`, see `gemma`)
    query_scale: float = 0.0  # attention scores times query_scale ** -0.5 (query_pre_attn_scalar); 0: head_dim
    attn_softcap: float = 0.0  # Gemma 2: scores -> cap * tanh(scores / cap); 0: none
    final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap); 0: none
    max_position_embeddings: int = 4096
    architecture: str = "llama"  # decides the HF class on export
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    # fp32 master params with bf16 compute is the accelerator training default; CPU tests use fp32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing per layer: none | full | dots (save matmuls)
    attention: str = "auto"  # one of ATTENTION: the attention path (model.attention_impl); not exported
    lora: LoraConfig = LoraConfig()  # rank > 0: train adapters only (spjax.lora); export merges them
    base_quant: str = "none"  # one of BASE_QUANTS: int8/int4 store the frozen base projections quantized
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; spjax.moe): every layer's MLP is num_experts SwiGLU
    # experts of width intermediate_size, experts_per_token of them per token by the router's softmax
    num_experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 0
    norm_topk: bool = True  # the chosen experts' weights renormalized to sum to 1 (Qwen2/3-MoE: norm_topk_prob)
    shared_expert_size: int = 0  # Qwen2-MoE: the width of a SwiGLU expert every token takes, gated by sigmoid(x w)

    def __post_init__(self):
        _finite(self, "model")
        if self.head_dim == 0:
            _check(self.hidden_size % self.num_heads == 0, "model.num_heads",
                   f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("rope_short_factor", "rope_long_factor", "eos_token_ids", "layer_types", "nope_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_model(self)  # shapes, names, rope, Gemma's parts, a quantized base: spjax.config_checks

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates (transformers' int(head_dim * partial))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def post_norms(self) -> bool:
        """OLMo 2/3's decoder: no norm before attention or the MLP, one after each (before the residual add),
        its scale multiplied in fp32 before the cast."""
        return self.architecture in ("olmo2", "olmo3")

    @property
    def gemma(self) -> bool:
        """Gemma 2/3's decoder: a GeGLU MLP (tanh GELU), RMSNorms scaling by 1 + weight, norms after attention
        and the MLP as well (before each residual add), embeddings times sqrt(hidden_size)."""
        return self.architecture in ("gemma2", "gemma3")

    @property
    def moe(self) -> bool:
        """Each layer's MLP a mixture of experts (spjax.moe)."""
        return self.num_experts > 0

    @property
    def windowed(self) -> tuple[bool, ...]:
        """Per layer: whether its attention is windowed (sliding_window set, and layer_types says so)."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types) or (True,) * self.num_layers

    @property
    def roped(self) -> tuple[bool, ...]:
        """Per layer: whether it rotates q and k (all but SmolLM3's nope_layers)."""
        return tuple(i not in self.nope_layers for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes. -1 on one axis means 'all remaining devices'."""

    data: int = -1  # pure data parallelism (params replicated)
    fsdp: int = 1  # data parallelism with params, grads and optimizer state sharded
    tensor: int = 1  # tensor (model) parallelism over heads, mlp and vocab

    def __post_init__(self):
        _finite(self, "mesh")
        for name in ("data", "fsdp", "tensor"):
            _check(getattr(self, name) == -1 or getattr(self, name) >= 1, f"mesh.{name}",
                   f"must be >= 1 or -1 (the remaining devices), got {getattr(self, name)}")
        _check([self.data, self.fsdp, self.tensor].count(-1) <= 1, "mesh", "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The self-play objective (DESIGN.md §1)."""

    name: str = "chi2"  # a row of spjax.objectives.TABLE
    beta: float = 0.1  # implicit reward scale: r = beta * (lp_theta - lp_ref); INPO's eta
    c: float = 1.0  # chi2 regularisation: the optimal reward lies in [-1/c, 1/c]
    nll_weight: float = 0.0  # optional NLL on real responses (per token), added to the pair loss
    # INPO's KL weight towards pi_0: its reference is pi_0^(tau/eta) pi_t^(1 - tau/eta), eta = beta.
    tau: float = 0.03

    def __post_init__(self):
        _finite(self, "objective")
        from spjax.objectives import TABLE  # the table is the one list of names (rows a config file adds too)
        _check(self.name in TABLE, "objective.name", f"{self.name!r} not one of {', '.join(TABLE)}")
        _check(self.beta > 0, "objective.beta", f"must be > 0, got {self.beta}")
        _check(self.c > 0, "objective.c", f"must be > 0, got {self.c}")
        _check(self.nll_weight >= 0, "objective.nll_weight", f"must be >= 0, got {self.nll_weight}")
        _check(not self.nll_weight or self.name != "sft", "objective.nll_weight",
               "sft's loss is the NLL alone; nll_weight adds an NLL term to a pair objective")
        _check(0 <= self.tau <= self.beta or self.name != "inpo", "objective.tau",
               f"INPO needs 0 <= tau <= eta (= objective.beta = {self.beta}), got {self.tau}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule."""

    name: str = "adamw"  # adamw | rmsprop
    lr: float = 5e-7  # peak learning rate; SPIN's 7B value, small models want more
    warmup_frac: float = 0.1  # linear warmup as a fraction of all steps of a round
    schedule: str = "linear"  # linear | cosine | constant decay after warmup
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    nonfinite: str = "skip"  # skip (count and drop the update) | raise

    def __post_init__(self):
        _finite(self, "optim")
        _one_of(self.name, "optim.name", ("adamw", "rmsprop"))
        _one_of(self.schedule, "optim.schedule", ("linear", "cosine", "constant"))
        _check(self.nonfinite in ("skip", "raise"), "optim.nonfinite", "must be skip or raise")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
        _check(0 <= self.warmup_frac <= 1, "optim.warmup_frac", f"must be in [0, 1], got {self.warmup_frac}")
        for name in ("b1", "b2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 disables), got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Opponent sampling (SPIN defaults)."""

    temperature: float = 1.0  # 0 (or under 1e-5) means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64  # prompts decoded together (global)
    num_samples: int = 1  # K samples per prompt (judged pairs need K >= 2); one shared prefill
    # On an fsdp mesh: decode from the training layout (each step moves activations between devices)
    # or from a copy of the weights gathered once per batch (spjax.sampler.gather_weights)
    weights: str = "sharded"  # sharded | gathered

    def __post_init__(self):
        _finite(self, "sampling")
        _one_of(self.weights, "sampling.weights", ("sharded", "gathered"))
        _check(self.num_samples >= 1, "sampling.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.temperature >= 0, "sampling.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1")
        _check(self.top_k >= 0, "sampling.top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        _check(self.batch_size >= 1, "sampling.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """The preference oracle of judged self-play (spjax.judges): it ranks each prompt's K samples."""

    # '' (none) | reward_model:PATH | verifier:number | verifier:exact | verifier:regex:PATTERN |
    # similarity (token F1) | similarity:rouge_l | python:module:function
    name: str = ""
    pairs: str = "best_worst"  # best_worst: one pair per prompt (iterative DPO, SPPO, INPO) | all
    batch_size: int = 32  # reward model: sequences per forward pass

    def __post_init__(self):
        _finite(self, "judge")
        kind = self.name.split(":", 1)[0]
        _check(not self.name or kind in JUDGE_KINDS, "judge.name",
               f"{self.name!r}: the kind {kind!r} is not one of {', '.join(JUDGE_KINDS)}")
        _one_of(self.pairs, "judge.pairs", JUDGE_PAIRS)
        _check(self.batch_size >= 1, "judge.batch_size", "must be >= 1")
        _check(self.name or self.pairs == "best_worst", "judge.pairs", f"{self.pairs!r} without a judge (judge.name)")
        if self.name:
            from spjax.judges import check_name  # the judge table is the one list of what each kind takes
            check_name(self.name)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the SFT (or preference) data comes from and how it is cut to shape."""

    path: str = ""  # a .jsonl/.json/.parquet file, a TFDS name ('chatterbot'), or a prepared TFDS dir
    format: str = "auto"  # auto | prompt_response | messages | spin | preference
    eval_path: str = ""  # held-out data; empty: split off eval_frac of `path`
    eval_frac: float = 0.05
    max_prompt_len: int = 512
    max_len: int = 1024  # prompt + response
    overlong: str = "truncate"  # truncate | drop
    # refuse | drop: records the template or tokenizer cannot encode as written (a special token's text in a
    # turn, the EOS text in a response, a chat the template refuses): each named and the run stopped, or dropped
    # and counted in the split's report
    unencodable: str = "refuse"
    buckets: tuple[int, ...] = ()  # static padded lengths; () means powers of two up to max_len
    pack: str = "auto"  # pairs and scored sequences packed into rows (on | off); auto: on unless cuDNN (GPU)
    max_examples: int = 0  # 0: all
    seed: int = 0
    tfds_dir: str = ""  # where TFDS prepares/finds datasets; empty: <workdir>/tfds
    system_prompt: str = ""  # a system turn for prompts without one (replaces a template's default)
    template_date: str = ""  # YYYY-MM-DD a chat template prints as today's; empty: the run's first start
    # NAME=VALUE variables for the chat template (VALUE as JSON), e.g. ("enable_thinking=false",): Qwen3's
    # prompts then end in an empty think block and responses are the answer alone (spjax.data.templates)
    template_args: tuple[str, ...] = ()

    def __post_init__(self):
        _finite(self, "data")
        from spjax.data.records import FORMATS  # the record parsers' one list of formats
        _one_of(self.format, "data.format", FORMATS)
        _check(0 <= self.eval_frac < 1, "data.eval_frac", f"must be in [0, 1), got {self.eval_frac}")
        _check(self.max_examples >= 0, "data.max_examples", f"must be >= 0 (0: all), got {self.max_examples}")
        _check(self.max_prompt_len >= 1, "data.max_prompt_len", f"must be >= 1, got {self.max_prompt_len}")
        _check(self.max_prompt_len < self.max_len, "data.max_prompt_len",
               f"{self.max_prompt_len} must be < data.max_len={self.max_len}")
        _check(not self.template_date or _iso_date(self.template_date), "data.template_date",
               f"{self.template_date!r} is not a date as YYYY-MM-DD")
        template_kwargs(self.template_args)  # (its checks)
        _check(self.overlong in ("truncate", "drop"), "data.overlong", "must be truncate or drop")
        _check(self.unencodable in ("refuse", "drop"), "data.unencodable", "must be refuse or drop")
        _one_of(self.pack, "data.pack", ("auto", "on", "off"))

    def template_kwargs(self) -> dict:
        """template_args as the chat template's variables: {NAME: VALUE read as JSON, else as text}."""
        return template_kwargs(self.template_args)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Rounds, batches and bookkeeping of a self-play run."""

    rounds: int = 3  # self-play iterations T
    epochs: int = 1  # passes over the round's pairs
    batch_size: int = 64  # pairs per optimizer step (global, all hosts)
    mix_previous: bool = False  # SPIN: train on D_{t-1} ∪ D_t (previous pairs re-scored under θ_t)
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps between mid-round checkpoints
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    log_every: int = 10  # optimizer steps between metric lines
    eval_examples: int = 64  # held-out prompts for evaluation (0: all)
    eval_show: int = 3  # samples printed side by side with the reference
    eval_max_new_tokens: int = 64
    score_batch_size: int = 32  # sequences per reference-scoring batch
    export: bool = True  # write a HF directory of the final model to <workdir>/export
    # Where each pair's second response comes from (spjax.pairs): 'sampled' = the opponent's own
    # sample (SPIN), 'data' = the record's rejected one, 'judged' = the best and worst of the
    # opponent's K samples by judge.name; 'auto' = data when the records carry one, else judged
    # when a judge is set, else sampled.
    pairs: str = "auto"
    # The reference of the implicit reward for 'data' pairs: the round's opponent pi_t, or the
    # initial model pi_0 (scored once, in round 0). Sampled pairs always use pi_t.
    reference: str = "opponent"
    # Round health: export the round that is best by this held-out metric (METRIC_GOALS), not the
    # last; stop after `stop_when_worse` rounds in a row without a better one (0: never stop early).
    keep_best: str = ""
    stop_when_worse: int = 0

    def __post_init__(self):
        _finite(self, "run")
        _check(self.keep_best in ("",) + tuple(METRIC_GOALS), "run.keep_best",
               f"{self.keep_best!r} not one of {', '.join(METRIC_GOALS)} (or empty)")
        _check(self.stop_when_worse >= 0, "run.stop_when_worse", "must be >= 0")
        _check(not self.stop_when_worse or self.keep_best, "run.stop_when_worse",
               "needs run.keep_best (the metric that must improve)")
        _check(self.rounds >= 1, "run.rounds", "must be >= 1")
        # the data order's numpy SeedSequence takes no negative seed, jax.random.key none past int64
        _check(0 <= self.seed < 2**32, "run.seed", f"must be in [0, 2**32), got {self.seed}")
        _check(self.epochs >= 1, "run.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "run.batch_size", "must be >= 1")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "eval_max_new_tokens", "score_batch_size"):
            _check(getattr(self, name) >= 1, f"run.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_examples", "eval_show"):
            _check(getattr(self, name) >= 0, f"run.{name}", f"must be >= 0, got {getattr(self, name)}")
        _one_of(self.pairs, "run.pairs", PAIR_SOURCES)
        _one_of(self.reference, "run.reference", REFERENCES)
        _check(self.reference == "opponent" or self.pairs in ("data", "auto"), "run.reference",  # auto: pairs.resolve
               "'initial' needs data pairs (sampled pairs change every round; pi_0 is gone after round 0)")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. `model_path` empty means a random model of shape `model`."""

    model_path: str = ""  # HF directory or .gguf file
    tokenizer_path: str = ""  # default: model_path; 'bytes' is spjax's built-in byte-level ChatML tokenizer
    model: Optional[ModelConfig] = None  # architecture for random init (tests, benchmarks)
    param_dtype: str = "float32"  # applied to the loaded model
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"  # model.attention, also for a loaded model_path (checked there)
    lora: LoraConfig = LoraConfig()  # model.lora, also for a loaded model_path
    base_quant: str = "none"  # model.base_quant, also for a loaded model_path (checked there)
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    judge: JudgeConfig = JudgeConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self):
        _finite(self, "")
        _check(bool(self.model_path) or self.model is not None, "model_path",
               "set a HF directory or .gguf file (or `model` for a random init)")
        _one_of(self.param_dtype, "param_dtype", DTYPES)
        _one_of(self.compute_dtype, "compute_dtype", DTYPES)
        _one_of(self.remat, "remat", REMAT)
        _one_of(self.attention, "attention", ATTENTION)
        # Each sub-config validates itself; here only what spans two of them.
        _check(self.run.reference == "opponent" or self.objective.name != "inpo", "run.reference",
               "'initial' with objective.name=inpo: INPO's reference mixes pi_0 and pi_t itself (objective.tau)")
        _check(self.run.batch_size % self.optim.grad_accum == 0, "run.batch_size",
               f"{self.run.batch_size} is not divisible by optim.grad_accum={self.optim.grad_accum}")
        for k, v in (self.model_overrides().items() if self.model is not None else ()):  # they replace model's
            _check(getattr(self.model, k) in (v, ModelConfig.__dataclass_fields__[k].default), f"model.{k}",
                   f"set {k} (top level): it applies to a loaded model and a random one alike")

    def model_overrides(self) -> dict:
        return dict(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype, remat=self.remat,
                    attention=self.attention, lora=self.lora, base_quant=self.base_quant)


def load_config(path: str, overrides=()) -> Config:
    """Load `get_config()` from a Python file (`file.py` or `file.py:arg`) and apply `key=value`s."""
    from spjax.overrides import load  # the command line's parsing lives there
    return load(path, overrides)
