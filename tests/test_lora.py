"""LoRA / QLoRA policies: adapters-only training, merged and PEFT export/import against peft + torch,
quantized bases."""
import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax import hf, lora, model, quant, sharding, step
from spjax.config import LORA_TARGETS, ConfigError, LoraConfig, MeshConfig, ModelConfig, ObjectiveConfig, OptimConfig
from spjax.tensor_names import CheckpointError, base_config
from tests import oracle

R, ALPHA = 4, 8.0
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  lora=LoraConfig(rank=R, alpha=ALPHA, targets=("q", "v", "o", "down")))
B, L = 8, 16


def _randomize_b(cfg, params, seed=1, std=0.05):
    """Nonzero B matrices (fresh adapters start at B = 0, where the adapter is invisible)."""
    rng = np.random.default_rng(seed)
    layers = {k: (jnp.asarray(rng.normal(0, std, v.shape).astype(np.float32)) if k.endswith("_lora_b") else v)
              for k, v in params["layers"].items()}
    return {**params, "layers": layers}


def _batch(cfg, params):
    rng = np.random.default_rng(0)
    out, pos = {}, np.arange(L)[None]
    for side in ("real", "gen"):
        length = rng.integers(L // 2, L + 1, B)[:, None]
        out[f"{side}_ids_BxL"] = rng.integers(0, cfg.vocab_size, (B, L)).astype(np.int32)
        out[f"{side}_mask_BxL"] = (pos < length).astype(np.int32)
        out[f"{side}_target_BxL"] = ((pos >= 3) & (pos < length)).astype(np.int32)
        lp = step.score(cfg, params, out[f"{side}_ids_BxL"], out[f"{side}_mask_BxL"], out[f"{side}_target_BxL"])
        out[f"ref_{side}_B"] = np.asarray(lp) + rng.normal(0, 3, B).astype(np.float32)
    return step.unpacked_batch(**out)


def test_optimizer_state_covers_only_adapters_and_base_stays_frozen():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    params = sharding.init_params(CFG, jax.random.key(0), mesh)
    train, frozen = lora.split(CFG, params)
    assert set(train["layers"]) == {f"{t}_lora_{m}" for t in CFG.lora.targets for m in "ab"}
    n_train = lora.count(train)
    assert "trainable params: " + f"{n_train:,}" in lora.describe(CFG, params)
    opt_cfg = OptimConfig(lr=1e-2, warmup_frac=0.0, schedule="constant")
    optimizer = step.make_optimizer(opt_cfg, 100)
    fn = step.make_train_step(CFG, ObjectiveConfig(), opt_cfg, optimizer, mesh, step.pair_batch_shapes(B, L))
    batch = _batch(CFG, params)
    frozen_host = jax.tree.map(np.array, frozen)
    state = step.init_state(CFG, params, optimizer, mesh)
    # AdamW's two moments, each exactly the adapters' size: nothing of the base is in the state.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_train
    assert sorted(x.shape for x in moments) == sorted(2 * [x.shape for x in jax.tree.leaves(train)])
    abstract = step.abstract_state(CFG, optimizer, mesh)
    assert jax.tree.structure(abstract.opt_state) == jax.tree.structure(state.opt_state)
    losses = []
    for _ in range(3):
        state, m = fn(state, batch)
        losses.append(float(m["loss"]))
    new_train, new_frozen = lora.split(CFG, state.params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, new_frozen), frozen_host)
    assert all(np.abs(np.array(v)).max() > 0 for k, v in new_train["layers"].items() if k.endswith("_lora_b"))
    assert losses[-1] < losses[0]


def test_on_the_fly_adapter_equals_merged_weights():
    params = _randomize_b(CFG, model.init_params(CFG, jax.random.key(0)))
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    cfg_m, merged = lora.merge(CFG, params)
    assert cfg_m.lora.rank == 0 and not any(lora.is_adapter(k) for k in merged["layers"])
    np.testing.assert_allclose(model.forward(CFG, params, ids), model.forward(cfg_m, merged, ids), atol=1e-5)
    base = {**params, "layers": {k: v for k, v in params["layers"].items() if not lora.is_adapter(k)}}
    assert np.abs(np.asarray(model.forward(CFG, params, ids) - model.forward(cfg_m, base, ids))).max() > 1e-3
    cfg_s, sampled = lora.for_sampling(CFG, params)  # a float base: merged for the sampler
    assert cfg_s == cfg_m and set(sampled["layers"]) == set(merged["layers"])
    for leaf, w in sampled["layers"].items():  # the adapted projections merged; the rest the policy's own arrays
        if leaf in CFG.lora.targets:
            np.testing.assert_array_equal(np.asarray(w), np.asarray(merged["layers"][leaf]))
        else:  # (before: copies, so a merged copy of the whole model: of a MoE's frozen experts too)
            assert w is params["layers"][leaf], leaf
    assert sampled["embed"] is params["embed"]
    # pi_0: the adapter off is the base alone
    np.testing.assert_allclose(model.forward(CFG, lora.adapter_off(CFG, params), ids),
                               model.forward(cfg_m, base, ids), atol=1e-6)


def test_inpo_initial_policy_is_the_starting_adapter(tmp_path):
    """INPO's pi_0 under LoRA is the policy the run started from: with lora.init_path, base + that adapter
    (round 0: the opponent's own scores; later rounds: the adapter reread), never the base alone."""
    from spjax import artifacts, objectives, pairs as pairs_lib, scoring
    from spjax.config import Config
    from spjax.data.tokens import TokenizedExample
    mesh = sharding.make_mesh(MeshConfig())
    fresh = sharding.init_params(CFG, jax.random.key(0), mesh)
    lora.save_peft(CFG, _randomize_b(CFG, fresh, std=0.5), str(tmp_path / "adapter"))
    model_cfg = dataclasses.replace(CFG, lora=dataclasses.replace(CFG.lora, init_path=str(tmp_path / "adapter")))
    start = hf.with_init_adapter(model_cfg, fresh)  # the run's pi_0, loaded as hf.load_initial does
    later = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding),  # placed as a run's params are
                         _randomize_b(model_cfg, start, seed=2, std=0.5), start)  # a later round's pi_t
    rng = np.random.default_rng(0)
    ex = [TokenizedExample(i, *(rng.integers(3, CFG.vocab_size, n).astype(np.int32) for n in (8, 6, 5)))
          for i in range(4)]
    run_cfg = Config(model=model_cfg, lora=model_cfg.lora, objective=ObjectiveConfig(name="inpo", tau=0.05))
    ctx = types.SimpleNamespace(cfg=run_cfg,
                                model_cfg=model_cfg, mesh=mesh, buckets=(16,), pad_id=0, fault=lambda point: None,
                                objective=objectives.TABLE["inpo"], round_dir=lambda t: str(tmp_path / f"round_{t}"))
    pairs = pairs_lib.RoundPairs(splits={"train": ex}, sampler_lp={})
    score = lambda params, side: scoring.score_examples(ctx, params, ex, side)
    real_start = score(start, "real_ids")
    # round 0: pi_t is pi_0, so INPO's mixture pi_0^a pi_t^(1 - a) is pi_t itself
    np.testing.assert_allclose(scoring.score_phase(ctx, start, 0, pairs)["train"][0], real_start, rtol=1e-6)
    scoring.score_phase(ctx, later, 1, pairs)
    z = artifacts.load_arrays(os.path.join(ctx.round_dir(1), "refs.npz"))
    np.testing.assert_allclose(z["train_real0"], real_start, rtol=1e-5)
    np.testing.assert_allclose(z["train_gen0"], score(start, "generated_ids"), rtol=1e-5)
    assert np.abs(z["train_real0"] - score(lora.adapter_off(model_cfg, start), "real_ids")).max() > 0.1
    assert np.abs(z["train_real0"] - score(later, "real_ids")).max() > 0.1
    # without lora.init_path the run started from fresh adapters (B = 0): pi_0 is the base alone
    for got, want in zip(jax.tree.leaves(lora.initial(CFG, later)), jax.tree.leaves(lora.adapter_off(CFG, later))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def torch_base():
    return oracle.torch_model("qwen2")  # q/k/v biases: the adapter must not disturb them


def _lora_cfg(targets=("q", "k", "v", "o", "gate", "up", "down"), **kw):
    return dict(lora=LoraConfig(rank=R, alpha=ALPHA, targets=targets), **kw)


SHARED_EXPERT = ("q", "k", "v", "o", "shared_gate", "shared_up", "shared_down")


@pytest.mark.parametrize("family, targets", [("qwen2", LORA_TARGETS), ("qwen3", LORA_TARGETS),  # qwen3: its q/k
                                             ("qwen2_moe", SHARED_EXPERT)])  # norms stay; qwen2_moe: its shared expert
def test_merged_export_and_peft_adapter_match_torch(family, targets, tmp_path):
    import peft
    import torch
    import transformers
    torch_base = oracle.torch_model(family)
    cfg, params = hf.from_transformers(torch_base, **_lora_cfg(targets))
    params = _randomize_b(cfg, params)
    torch_base.save_pretrained(tmp_path / "base")  # the run's model_path: the adapter names it as its base
    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"), source=str(tmp_path / "base"))
    # merged weights == W + (alpha / r) B A in HF's [out, in] layout, from the adapter file itself
    from safetensors.numpy import load_file
    merged = load_file(os.path.join(out, "model.safetensors"))
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    state = {k: v.numpy() for k, v in torch_base.state_dict().items()}
    for i in range(cfg.num_layers):
        for proj in ("self_attn.q_proj", "self_attn.o_proj",
                     "mlp.shared_expert.down_proj" if family == "qwen2_moe" else "mlp.down_proj"):
            name = f"model.layers.{i}.{proj}"
            want = state[name + ".weight"] + (ALPHA / R) * (adapter[f"base_model.model.{name}.lora_B.weight"]
                                                            @ adapter[f"base_model.model.{name}.lora_A.weight"])
            np.testing.assert_allclose(merged[name + ".weight"], want, atol=1e-5, rtol=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    ours = np.asarray(model.forward(cfg, params, ids))
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(oracle.torch_logits(hf_merged, ids), ours, atol=1e-4)
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["r"] == R and conf["base_model_name_or_path"] == str(tmp_path / "base")  # was null
    peft_model = peft.PeftModel.from_pretrained(torch_base, os.path.join(out, "adapter")).eval()
    try:
        np.testing.assert_allclose(oracle.torch_logits(peft_model, ids), ours, atol=1e-4)
    finally:
        peft_model.unload()  # the cached base must come back without adapter layers
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(os.path.join(out, "adapter")).eval()  # base from the config
    np.testing.assert_allclose(oracle.torch_logits(auto, ids), ours, atol=1e-4)


@pytest.mark.parametrize("alpha_pattern", [{}, {"q_proj": 3 * ALPHA, "layers.1.mlp.up_proj": ALPHA / 2},
                                           {"q_proj|v_proj": 3 * ALPHA}])  # PEFT: one group, either name
def test_peft_adapter_import_as_starting_policy(torch_base, tmp_path, alpha_pattern):
    """Per-module alphas (PEFT's alpha_pattern, by module name or a layer's) are folded in too."""
    import peft
    import torch
    targets = ("q", "v", "up")
    pc = peft.LoraConfig(r=R, lora_alpha=2 * ALPHA, target_modules=["q_proj", "v_proj", "up_proj"],
                         init_lora_weights=False, alpha_pattern=alpha_pattern)  # random A and B: visible
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(torch_base, pc).eval()
    try:
        peft_model.save_pretrained(str(tmp_path / "adapter"))
        ids = np.random.default_rng(1).integers(0, 256, (2, 9)).astype(np.int32)
        want = oracle.torch_logits(peft_model, ids)
    finally:
        peft_model.unload()
    cfg, params = hf.from_transformers(torch_base, **_lora_cfg(targets))
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_path=str(tmp_path / "adapter")))
    params = lora.load_peft(cfg, params, cfg.lora.init_path)  # alpha differs: folded into B
    np.testing.assert_allclose(np.asarray(model.forward(cfg, params, ids)), want, atol=1e-4)
    with pytest.raises(CheckpointError, match="adapter_config.json: r is 4; spjax needs 8"):
        bad = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=8))
        lora.load_peft(bad, params, cfg.lora.init_path)
    with pytest.raises(CheckpointError, match="target_modules"):
        lora.load_peft(dataclasses.replace(cfg, lora=LoraConfig(rank=R, targets=("q",))), params,
                       cfg.lora.init_path)
    conf = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    json.dump({**conf, "rank_pattern": {"v_proj": 2 * R}}, open(tmp_path / "adapter" / "adapter_config.json", "w"))
    with pytest.raises(CheckpointError, match=f"rank_pattern gives model.layers.0.self_attn.v_proj rank {2 * R}"):
        lora.load_peft(cfg, params, cfg.lora.init_path)
    # Parts of an adapted model beyond the LoRA pairs (a trained lm_head, LoRA biases): before, loaded
    # without them, so the starting policy was another model than the adapter's.
    # Nor a variant whose forward is another (aLoRA acts only after its invocation tokens: loaded as plain
    # LoRA, logits were 0.9 off), nor an adapter on some layers only.
    for extra in ({"modules_to_save": ["lm_head"]}, {"lora_bias": True}, {"alora_invocation_tokens": [5, 6]},
                  {"layers_to_transform": [1]}):
        json.dump({**conf, **extra}, open(tmp_path / "adapter" / "adapter_config.json", "w"))
        with pytest.raises(CheckpointError, match=f"{next(iter(extra))} is "):
            lora.load_peft(cfg, params, cfg.lora.init_path)
    json.dump(conf, open(tmp_path / "adapter" / "adapter_config.json", "w"))
    from safetensors.numpy import load_file, save_file
    weights = str(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file({**load_file(weights), "base_model.model.lm_head.weight": np.zeros((256, 8), np.float32)}, weights)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) base_model.model.lm_head.weight are not LoRA pairs"):
        lora.load_peft(cfg, params, cfg.lora.init_path)


def test_peft_adapter_on_qwen2_moe_shared_expert(tmp_path):
    """PEFT's gate_proj/up_proj/down_proj on a Qwen2-MoE are its shared expert's (transformers 5 holds the
    experts as fused parameters, no modules): read as spjax's shared_* adapters, the same policy. MLP targets
    on the experts, and shared_* on a model without a shared expert, are refused in one line."""
    import peft
    import torch
    torch_base = oracle.torch_model("qwen2_moe")
    pc = peft.LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False,  # random A and B: visible
                         target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(torch_base, pc).eval()
    try:
        assert not any("experts" in n for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
        peft_model.save_pretrained(str(tmp_path / "adapter"))
        ids = np.random.default_rng(2).integers(0, torch_base.config.vocab_size, (2, 9)).astype(np.int32)
        want = oracle.torch_logits(peft_model, ids)
        with peft_model.disable_adapter():
            base = oracle.torch_logits(peft_model, ids)
    finally:
        peft_model.unload()
    cfg, params = hf.from_transformers(torch_base, **_lora_cfg(("q", "v", "shared_gate", "shared_up", "shared_down")))
    params = lora.load_peft(cfg, params, str(tmp_path / "adapter"))
    got = np.asarray(model.forward(cfg, params, ids))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - base).max() > 1e-2  # the shared expert's adapters moved the logits
    with pytest.raises(ConfigError, match="lora.targets: gate, up, down: qwen2_moe's MLPs are mixtures of experts.*"
                                          "shared_gate"):
        hf.from_transformers(torch_base, **_lora_cfg())
    with pytest.raises(ConfigError, match="lora.targets: shared_up with qwen2: only qwen2_moe has a shared expert"):
        hf.from_transformers(oracle.torch_model("qwen2"), **_lora_cfg(("q", "shared_up")))


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_base(torch_base, kind, tol):
    cfg32, p32 = hf.from_transformers(torch_base)
    cfg, params = hf.from_transformers(torch_base, **_lora_cfg(base_quant=kind))
    assert params["layers"]["q"].dtype == quant.storage_dtype(kind)
    # each weight within half a quantization step (its group's scale) of the original
    w = np.asarray(p32["layers"]["down"])  # [N, F, D]
    scale = np.asarray(params["layers"]["down_scale"])  # [N, F / group, D]
    deq = quant.dequantize(np.asarray(params["layers"]["down"]), scale, kind, 1, lead=1)
    step_ = np.repeat(scale, w.shape[1] // scale.shape[1], axis=1)
    assert np.all(np.abs(deq - w) <= step_ / 2 + 1e-7)
    ids = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    err = np.abs(np.asarray(model.forward(cfg, params, ids)) - np.asarray(model.forward(cfg32, p32, ids))).max()
    assert 0 < err < tol
    assert base_config(cfg) == cfg32


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_base_stays_quantized_while_sampling(kind):
    """Unrolled over its layers (GPU always, CPU below 9 layers), the decode loop's dequantized weights are
    loop-invariant: XLA computed all of them before the loop, a full-precision copy of the base live while
    sampling (the 7B int8 config's sample program: 48 GiB, not 22). The quantized base decodes scanned."""
    from spjax import sampler
    from spjax.tensor_names import PROJ_IN_DIMS
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=6, num_heads=4,
                      num_kv_heads=2, lora=LoraConfig(rank=4), base_quant=kind)
    scfg, params = lora.for_sampling(cfg, model.param_shapes(cfg))
    plan = sampler.make_plan(prompt_len=16, max_new_tokens=16, batch_size=2, unroll_layers=True, decode_chunk=8)
    assert not plan.unrolled(scfg)
    temp = sampler.lower(scfg, plan, params).compile().memory_analysis().temp_size_in_bytes
    base_f32 = sum(int(np.prod(model.param_shapes(base_config(cfg))["layers"][k].shape)) * 4 for k in PROJ_IN_DIMS)
    assert temp < base_f32 / 2, (temp, base_f32)  # (before: 1.3x base_f32)


def test_a_quantized_base_is_read_layer_by_layer_and_counted_as_parameters(torch_base):
    """Import quantizes each layer as read (quantizing the stack held ~3 fp32 copies of all layers: 28 GB of
    host memory for a 7B's int8 base), to the same params; the run log counts the model's parameters (int4
    packs two a byte: a 7B was said to have 3.9B; int8 counted its scales)."""
    from spjax.tensor_names import PROJ_IN_DIMS
    cfg32, p32 = hf.from_transformers(torch_base)
    total = lora.count(p32)
    for kind in ("int8", "int4"):
        cfg, params = hf.from_transformers(torch_base, **_lora_cfg(base_quant=kind))
        for leaf, dims in PROJ_IN_DIMS.items():  # the same as quantizing the whole stack at once
            q, scale = quant.quantize(np.asarray(p32["layers"][leaf]), kind, dims, lead=1)
            assert np.array_equal(params["layers"][leaf], q) and np.array_equal(params["layers"][leaf + "_scale"], scale)
        n = lora.count(lora.split(cfg, params)[0])
        assert f"trainable params: {n:,} of {total + n:,} " in lora.describe(cfg, params), kind
        assert lora.model_params(cfg, model.param_shapes(cfg)) == total + n  # (compile_check's count: shapes)


def test_int4_refuses_an_odd_size_at_the_config():
    """int4 packs two values a byte along each projection's input: an odd size failed only when the params
    were made, after the data was read, in a 60-line traceback."""
    for field in ("hidden_size", "intermediate_size"):
        with pytest.raises(ConfigError, match=rf"model.base_quant: int4 packs two values a byte .* but {field} 97 is odd"):
            dataclasses.replace(CFG, base_quant="int4", **{field: 97})
    dataclasses.replace(CFG, base_quant="int8", intermediate_size=97)


def test_bad_lora_config_names_the_field():
    with pytest.raises(ConfigError, match="model.base_quant: int8 needs lora.rank > 0"):
        dataclasses.replace(CFG, lora=LoraConfig(), base_quant="int8")
    with pytest.raises(ConfigError, match="lora.targets"):
        LoraConfig(rank=4, targets=("qkv",))
    with pytest.raises(ConfigError, match="model.base_quant"):
        dataclasses.replace(CFG, base_quant="nf3")


def test_a_checkpoint_lacking_adapters_the_config_has_is_another_model():
    """A checkpoint of lora.targets q,v restored for q,k,v: before, its intact steps failed to restore,
    were renamed *.corrupt-* and the run started over; now that is one line, nothing moved."""
    from spjax import saving
    qv = dataclasses.replace(CFG, lora=LoraConfig(rank=R, alpha=ALPHA, targets=("q", "v")))
    qkv = dataclasses.replace(CFG, lora=LoraConfig(rank=R, alpha=ALPHA, targets=("q", "k", "v")))
    flat = jax.tree_util.tree_flatten_with_path(lora.split(qv, model.param_shapes(qv))[0])[0]
    stored = {"['params']" + jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}
    assert saving._mismatch(model.param_shapes(qv), stored) is None
    assert saving._mismatch(model.param_shapes(qkv), stored) == (
        "no params['layers']['k_lora_a'], which the config's model has")


def test_lora_alpha_must_be_positive():
    with pytest.raises(ConfigError, match=r"lora.alpha: must be > 0, got 0.0 \(the adapter's scale is alpha / rank"):
        LoraConfig(rank=4, alpha=0.0)
