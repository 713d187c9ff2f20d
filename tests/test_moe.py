"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; spjax.moe). Parity with transformers (logits, export, greedy
decoding) is in test_model, test_hf and test_sampler's family lists; here: the grouped dispatch against every
expert on every token, values and gradients, with adapters on the experts too; per-shard dispatch on a mesh
against one device; LoRA on the attention and on the experts through PEFT; what is refused; and a self-play run of
a MoE policy end to end."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax import hf, lora, model, moe, quant, sharding
from spjax.config import ConfigError, LoraConfig, MeshConfig, ModelConfig
from spjax.tensor_names import QUANTIZED
from tests import oracle
from tests.test_rounds import _train, tfds_dir  # noqa: F401 (tfds_dir: a fixture this module uses)

# F = 32 splits over tensor=2; E = 4 experts, k = 2 a token
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  architecture="mixtral", num_experts=4, experts_per_token=2)


def _dense(x_TxD, router_DxE, gate_ExDxF, up_ExDxF, down_ExFxD, k, norm):
    """Every expert on every token, weighted by the router's choice (zero for the experts not chosen)."""
    weight_Txk, expert_Txk = moe.route(x_TxD, router_DxE, k, norm)
    E = gate_ExDxF.shape[0]
    choice_TxE = jnp.sum(jax.nn.one_hot(expert_Txk, E) * weight_Txk[..., None], axis=1)
    h_TxExF = jax.nn.silu(jnp.einsum("TD,EDF->TEF", x_TxD, gate_ExDxF)) * jnp.einsum("TD,EDF->TEF", x_TxD, up_ExDxF)
    return jnp.einsum("TEF,EFD,TE->TD", h_TxExF, down_ExFxD, choice_TxE)


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_dispatch_equals_every_expert_on_every_token(norm):
    """The sort, the grouped matmuls and the unsort give the dense mixture, and so do their gradients
    (the router's through the chosen weights)."""
    keys = jax.random.split(jax.random.key(0), 5)
    T, D, F, E, k = 40, 16, 24, 5, 2
    args = (jax.random.normal(keys[0], (T, D)), jax.random.normal(keys[1], (D, E)),
            *(jax.random.normal(key, shape) * 0.3 for key, shape in zip(keys[2:], ((E, D, F), (E, D, F), (E, F, D)))))

    def grouped(x, r, g, u, d):
        return moe.experts(x, *moe.route(x, r, k, norm), g, u, d)
    assert len(set(np.asarray(moe.route(args[0], args[1], k, norm)[1]).ravel())) == E  # every expert gets tokens
    np.testing.assert_allclose(grouped(*args), _dense(*args, k, norm), atol=2e-5, rtol=0)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    got = jax.grad(loss(grouped), argnums=range(5))(*args)
    want = jax.grad(loss(lambda *a: _dense(*a, k, norm)), argnums=range(5))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_expert_adapters_equal_merged_experts_values_and_gradients():
    """Each expert's low-rank term in the grouped matmuls equals the dense mixture of the merged weights
    W_e + s A_e B_e, and so do the adapters' gradients (through the merge)."""
    keys = jax.random.split(jax.random.key(1), 9)
    T, D, F, E, k, r, scale = 40, 16, 24, 5, 2, 3, 2.0
    x, router = jax.random.normal(keys[0], (T, D)), jax.random.normal(keys[1], (D, E))
    weights = [jax.random.normal(key, shape) * 0.3 for key, shape in zip(keys[2:5], ((E, D, F), (E, D, F), (E, F, D)))]
    adapters = [(jax.random.normal(ka, (E, w.shape[1], r)) * 0.3, jax.random.normal(kb, (E, r, w.shape[2])) * 0.3)
                for w, ka, kb in zip(weights, keys[5:8], jax.random.split(keys[8], 3))]
    adapters[1] = None  # (up not adapted)

    def grouped(adapters):
        return moe.experts(x, *moe.route(x, router, k, True), *weights, adapters, scale)

    def dense(adapters):
        merged = [w if ab is None else w + scale * jnp.einsum("EDr,ErF->EDF", *ab) for w, ab in zip(weights, adapters)]
        return _dense(x, router, *merged, k, True)
    np.testing.assert_allclose(grouped(adapters), dense(adapters), atol=2e-5, rtol=0)
    assert np.abs(np.asarray(grouped(adapters) - grouped([None] * 3))).max() > 0.1
    loss = lambda f: lambda a: jnp.sum(jnp.sin(f(a)))  # noqa: E731
    for g, w in zip(jax.tree.leaves(jax.grad(loss(grouped))(adapters)), jax.tree.leaves(jax.grad(loss(dense))(adapters))):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("targets", [None, ("q", "experts_gate", "experts_down")])
def test_per_shard_dispatch_equals_one_device(devices, targets):
    """Under a run's mesh each data-parallel device routes its own rows (shard_map), the experts split over
    tensor along F: logits and every gradient equal one device's, and the program has the per-shard part
    (with adapters on the experts: theirs split as their expert's weight, down's partial sums over F summed)."""
    cfg = CFG if targets is None else dataclasses.replace(CFG, lora=LoraConfig(rank=4, alpha=8.0, targets=targets))
    params = model.init_params(cfg, jax.random.key(1))
    params["layers"] = {k: (v + 0.05 * jax.random.normal(jax.random.key(5), v.shape) if k.endswith("_lora_b") else v)
                        for k, v in params["layers"].items()}
    ids_BxL = jax.random.randint(jax.random.key(2), (8, 12), 0, cfg.vocab_size)

    def loss(p, ids):
        hidden, _ = model.apply(cfg, p, ids)
        return jnp.mean(jax.nn.log_softmax(model.unembed(cfg, p, hidden))[..., 0]), hidden
    one = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (want, want_h), want_g = one(params, ids_BxL)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    placed = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    rows = jax.device_put(ids_BxL, sharding.batch_sharding(mesh, 2))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert "shard_map" in str(jax.make_jaxpr(loss)(placed, rows))
        (got, got_h), got_g = jax.jit(jax.value_and_grad(loss, has_aux=True))(placed, rows)
    assert "shard_map" not in str(jax.make_jaxpr(loss)(params, ids_BxL))  # (no mesh: the whole batch at once)
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), atol=1e-5, rtol=0)
    assert abs(float(got) - float(want)) <= 1e-6
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_lora_on_the_attention_exports_an_adapter_peft_applies(tmp_path):
    """A MoE policy's adapters sit on q, k, v, o: the merged export and PEFT's adapter on transformers' Mixtral
    give spjax's logits; the experts and router come out as they went in."""
    import peft
    import torch
    import transformers
    from safetensors.numpy import load_file
    base = oracle.torch_model("mixtral")
    base.save_pretrained(tmp_path / "base")
    cfg, params = hf.load_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=4, alpha=8.0,
                                                                             targets=("q", "k", "v", "o")))
    params["layers"] = {k: (v + 0.05 * jax.random.normal(jax.random.key(3), v.shape) if k.endswith("_lora_b") else v)
                        for k, v in params["layers"].items()}
    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"), source=str(tmp_path / "base"))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    ours = np.asarray(model.forward(cfg, params, ids))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(oracle.torch_logits(merged, ids), ours, atol=1e-4)
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        assert sorted(json.load(f)["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    try:
        np.testing.assert_allclose(oracle.torch_logits(adapted, ids), ours, atol=1e-4)
    finally:
        adapted.unload()
    source, written = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    moe_names = [n for n in source if ".block_sparse_moe." in n]
    assert len(moe_names) == cfg.num_layers * (1 + 3 * cfg.num_experts)  # router + each expert's w1, w2, w3
    for name in moe_names:
        np.testing.assert_array_equal(written[name], source[name])


def _with_random_b(params, key=3):
    return {**params, "layers": {k: (v + 0.05 * jax.random.normal(jax.random.key(key), v.shape) if k.endswith("_lora_b")
                                     else v) for k, v in params["layers"].items()}}


@pytest.mark.parametrize("family, targets, expert_rank", [
    ("mixtral", ("q", "experts_gate", "experts_up", "experts_down"), 0),
    ("qwen2_moe", ("experts_up", "experts_down", "shared_up"), 0),
    ("qwen2_moe", ("q", "experts_up", "experts_down", "shared_down"), 2)])  # (a shared down_proj beside experts' ones)
def test_lora_on_the_experts_exports_an_adapter_peft_applies_and_reads_back(family, targets, expert_rank, tmp_path):
    """Each expert its own adapter: the policy computes its merged weights; the merged export and the PEFT adapter
    (target_parameters on transformers 5's fused gate_up_proj/down_proj) on transformers' model give its logits, and
    the adapter reads back as it was; one PEFT trains reads in as PEFT computes it; the sampler keeps the expert
    adapters on the fly (a merged copy would be a second copy of the experts) and the experts as they are. With
    lora.expert_rank the experts' adapters have a rank of their own (PEFT's rank_pattern, scale alpha over it)."""
    import peft
    import torch
    import transformers
    base = oracle.torch_model(family)
    base.save_pretrained(tmp_path / "base")
    cfg, params = hf.load_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=4, alpha=8.0, targets=targets,
                                                                             expert_rank=expert_rank))
    a = np.asarray(params["layers"]["experts_down_lora_a"])  # each expert's A drawn with its own fan-in, as PEFT's
    assert a.shape == (cfg.num_layers, cfg.num_experts, cfg.intermediate_size, expert_rank or 4)
    assert 0.9 / np.sqrt(cfg.intermediate_size) < np.abs(a).max() <= 1 / np.sqrt(cfg.intermediate_size), np.abs(a).max()
    params = _with_random_b(params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    ours = np.asarray(model.forward(cfg, params, ids))
    merged_cfg, merged = lora.merge(cfg, params)
    np.testing.assert_allclose(model.forward(merged_cfg, merged, ids), ours, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(model.forward(cfg, lora.adapter_off(cfg, params), ids)) - ours).max() > 1e-2
    scfg, sparams = lora.for_sampling(cfg, params)
    assert scfg.lora.targets == tuple(t for t in targets if t.startswith("experts_"))
    assert all(sparams["layers"][k] is params["layers"][k] for k in sparams["layers"] if k.startswith("experts_"))
    np.testing.assert_allclose(model.forward(scfg, sparams, ids), ours, atol=1e-5, rtol=0)

    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"), source=str(tmp_path / "base"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(oracle.torch_logits(exported, ids), ours, atol=1e-4)
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    adapted = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    try:
        np.testing.assert_allclose(oracle.torch_logits(adapted, ids), ours, atol=1e-4)
    finally:
        adapted.unload()
    back = lora.load_peft(cfg, lora.adapter_off(cfg, params), os.path.join(out, "adapter"))
    for leaf in params["layers"]:
        np.testing.assert_array_equal(back["layers"][leaf], params["layers"][leaf], err_msg=leaf)
    if expert_rank:  # (the rest is the experts' adapters from PEFT at rank 4: not this config's)
        assert "LoRA r=4 (experts r=2) alpha=8" in lora.describe(cfg, params)
        with pytest.raises(hf.CheckpointError, match=r"rank_pattern gives model.layers.0.mlp.experts.gate_up_proj rank 2; "
                                                     r"spjax's is 4 \(lora.rank; a mixture's experts: lora.expert_rank\)"):
            lora.load_peft(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, expert_rank=0)),
                           params, os.path.join(out, "adapter"))
        return

    # PEFT's own adapter on the experts (rank r on gate_up_proj: gate and up share A), B drawn at random
    trained = peft.get_peft_model(oracle.torch_model(family), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trained.save_pretrained(tmp_path / "peft")
    want = oracle.torch_logits(trained.eval(), ids)
    trained.unload()  # (the session's cached model, as it was)
    experts = ("experts_gate", "experts_up", "experts_down")
    started = hf.load_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=4, alpha=8.0, targets=experts,
                                                                          init_path=str(tmp_path / "peft")))
    np.testing.assert_allclose(np.asarray(model.forward(*started, ids)), want, atol=1e-4)
    # (PEFT writes target_parameters as a set: either order)
    with pytest.raises(hf.CheckpointError, match=r"target_parameters \['mlp.experts.\w+', 'mlp.experts.\w+'\] "
                       r"differ from lora.targets' \['mlp.experts.down_proj'\]"):
        hf.load_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=4, targets=("experts_down",),
                                                                    init_path=str(tmp_path / "peft")))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_transformers_4_expert_adapter_starts_a_run_at_its_policy(family, tmp_path):
    """An adapter PEFT trained on transformers 4.x, where each expert was a Linear of its own (Mixtral's
    experts.{e}.w1/w3/w2, Qwen2-MoE's experts.{e}.gate_proj/...; the latter's target_modules name its shared
    expert's too): read as each expert's pair, the run starts at the model whose weights are W + (alpha/r) B A
    per Linear, put into transformers' model here."""
    import torch
    import transformers
    from safetensors.numpy import save_file
    oracle.torch_model(family).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()  # (a copy)
    cfg = hf.load_model_config(str(tmp_path / "base"))
    moe_block = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    modules = [f"model.layers.{{i}}.{moe_block}.experts.{{e}}.{n}" for n in names]
    if family == "qwen2_moe":  # (gate_proj/up_proj/down_proj adapt the shared expert too)
        modules += [f"model.layers.{{i}}.mlp.shared_expert.{n}" for n in names]
    r, alpha, rng = 2, 6.0, np.random.default_rng(1)
    D, F, Fs = cfg.hidden_size, cfg.intermediate_size, cfg.shared_expert_size
    tensors, delta = {}, {}
    for i in range(cfg.num_layers):
        for m in modules:
            experts = range(cfg.num_experts) if "{e}" in m else [0]
            for e in experts:
                name = m.format(i=i, e=e)
                width = Fs if "shared" in m else F
                out_in = (D, width) if name.endswith(("w2", "down_proj")) else (width, D)
                a, b = rng.normal(0, 0.3, (r, out_in[1])), rng.normal(0, 0.3, (out_in[0], r))
                tensors[f"base_model.model.{name}.lora_A.weight"] = a.astype(np.float32)
                tensors[f"base_model.model.{name}.lora_B.weight"] = b.astype(np.float32)
                delta[name] = (alpha / r) * b @ a
    os.makedirs(tmp_path / "peft4")
    save_file(tensors, str(tmp_path / "peft4" / "adapter_model.safetensors"))
    with open(tmp_path / "peft4" / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(names)}, f)
    targets = ("experts_gate", "experts_up", "experts_down") + (
        ("shared_gate", "shared_up", "shared_down") if family == "qwen2_moe" else ())
    cfg, params = hf.load_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=2, alpha=8.0, targets=targets,
                                                                              init_path=str(tmp_path / "peft4")))
    with torch.no_grad():  # transformers 5's fused experts: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        for name, d in delta.items():
            layer = base.model.layers[int(name.split(".")[2])].mlp
            if ".shared_expert." in name:
                getattr(layer.shared_expert, name.rsplit(".", 1)[-1]).weight.add_(torch.tensor(d))
                continue
            e, n = int(name.split(".")[-2]), name.rsplit(".", 1)[-1]
            rows = {names[0]: slice(0, F), names[1]: slice(F, 2 * F)}.get(n)
            w = layer.experts.down_proj if rows is None else layer.experts.gate_up_proj
            w[e, rows or slice(None)] += torch.tensor(d, dtype=w.dtype)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model.forward(cfg, params, ids)), oracle.torch_logits(base, ids), atol=1e-4)
    with pytest.raises(hf.CheckpointError, match=r"target_modules \[.*\] differ from lora.targets'"):
        hf.load_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=2, targets=("experts_gate", "experts_up"),
                                                                    init_path=str(tmp_path / "peft4")))


def _float_twin(cfg, params):
    """(cfg, params) of the same model with its quantized leaves dequantized: a float base, the adapters as they are."""
    layers = dict(params["layers"])
    for leaf, (lead, n_in) in QUANTIZED.items():
        if leaf in layers:
            layers[leaf] = quant.dequantize(layers[leaf], layers.pop(f"{leaf}_scale"), cfg.base_quant, n_in, 1 + lead)
    return dataclasses.replace(cfg, base_quant="none"), {**params, "layers": layers}


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_base_quantizes_every_expert(kind, tmp_path):
    """QLoRA over a Mixtral: every expert is quantized on its own as read (the router is not), the policy
    computes what a float model of the dequantized weights computes (logits, the adapters' gradients, the
    experts' adapters' too), and the export writes those weights per expert (an adapted one merged)."""
    from safetensors.numpy import load_file
    base = oracle.torch_model("mixtral")
    _, p32 = hf.from_transformers(base)
    cfg, params = hf.from_transformers(base, lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "experts_gate")),
                                       base_quant=kind)
    layers = params["layers"]
    assert layers["experts_down"].dtype == quant.storage_dtype(kind) and layers["router"].dtype == jnp.float32
    for leaf in ("experts_gate", "experts_up", "experts_down"):  # [N, E, *in, *out]: each expert its own scales
        q, scale = quant.quantize(np.asarray(p32["layers"][leaf]), kind, 1, lead=2)
        assert np.array_equal(layers[leaf], q) and np.array_equal(layers[f"{leaf}_scale"], scale)
    assert layers["experts_down_scale"].shape == (2, 4, 128 // quant.group_size(kind, 128), 64)
    assert lora.model_params(cfg, params) == lora.count(p32) + lora.count(lora.split(cfg, params)[0])
    params["layers"] = {k: (v + 0.05 * jax.random.normal(jax.random.key(3), v.shape) if k.endswith("_lora_b") else v)
                        for k, v in layers.items()}
    twin_cfg, twin = _float_twin(cfg, params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)

    def value_and_grad(c, p):  # (of the adapters, what the train step differentiates)
        train, frozen = lora.split(c, p)
        loss = lambda t: jnp.mean(jax.nn.log_softmax(model.forward(c, lora.join(t, frozen), ids))[..., 1])  # noqa: E731
        return jax.value_and_grad(loss)(train)
    (got, got_g), (want, want_g) = value_and_grad(cfg, params), value_and_grad(twin_cfg, twin)
    assert abs(float(got) - float(want)) <= 1e-6
    for leaf, g in got_g["layers"].items():
        np.testing.assert_allclose(g, want_g["layers"][leaf], atol=1e-6, rtol=0, err_msg=leaf)
    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"))
    written = load_file(os.path.join(out, "model.safetensors"))
    np.testing.assert_array_equal(written["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
                                  np.asarray(twin["layers"]["experts_down"][1, 3]).T)
    np.testing.assert_allclose(written["model.layers.1.block_sparse_moe.experts.3.w1.weight"],  # (adapted: merged)
                               np.asarray(lora.merge(twin_cfg, twin)[1]["layers"]["experts_gate"][1, 3]).T, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(written["model.layers.1.block_sparse_moe.gate.weight"],
                                  np.asarray(p32["layers"]["router"][1]).T)


def test_a_quantized_qwen2_moe_exports_the_model_it_computed(tmp_path):
    """Qwen2-MoE's shared expert is quantized with the rest of the base; the merged export, loaded in
    transformers, computes spjax's logits."""
    import torch
    import transformers
    cfg, params = hf.from_transformers(oracle.torch_model("qwen2_moe"), lora=LoraConfig(rank=4, targets=("q", "v")),
                                       base_quant="int8")
    assert params["layers"]["shared_down"].dtype == jnp.int8 and params["layers"]["experts_up"].dtype == jnp.int8
    params["layers"] = {k: (v + 0.05 if k.endswith("_lora_b") else v) for k, v in params["layers"].items()}
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    ours = np.asarray(model.forward(cfg, params, ids))
    np.testing.assert_allclose(ours, model.forward(*_float_twin(cfg, params), ids), atol=1e-5, rtol=0)
    out = hf.save_pretrained(cfg, params, str(tmp_path / "export"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(oracle.torch_logits(merged, ids), ours, atol=1e-4)


def test_a_quantized_mixture_keeps_no_dequantized_expert_for_the_backward_pass():
    """Without remat the backward pass would keep every layer's dequantized experts (a float copy of most of
    the model) as residuals; the mixture remakes them from the stored integers instead."""
    cfg = dataclasses.replace(CFG, num_layers=8, hidden_size=128, intermediate_size=256, num_experts=8,
                              lora=LoraConfig(rank=4, targets=("q", "v")), base_quant="int8")
    shapes = model.param_shapes(cfg)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    train, frozen = lora.split(cfg, shapes)
    grad = jax.jit(jax.grad(lambda t, f, ids: jnp.mean(model.forward(cfg, lora.join(t, f), ids))))
    temp = grad.lower(train, frozen, ids).compile().memory_analysis().temp_size_in_bytes
    experts_f32 = sum(4 * int(np.prod(shapes["layers"][f"experts_{n}"].shape)) for n in ("gate", "up", "down"))
    assert temp < experts_f32 / 4, (temp, experts_f32)  # two layers' worth (before: 1.3x all eight layers')


def test_what_spjax_does_not_do_with_experts_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"lora.targets: gate, up, down: mixtral's MLPs are mixtures of experts: "
                       "adapt each expert with experts_gate, experts_up, experts_down"):
        dataclasses.replace(CFG, lora=LoraConfig(rank=4))
    with pytest.raises(ConfigError, match=r"lora.targets: experts_up with llama: only mixtral, qwen2_moe, qwen3_moe, "
                       "olmoe have experts"):
        ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    lora=LoraConfig(rank=4, targets=("q", "experts_up")))
    with pytest.raises(ConfigError, match=r"lora.expert_rank: 2, but lora.targets names none of experts_gate, "
                       "experts_up, experts_down: it would be ignored"):
        LoraConfig(rank=4, targets=("q", "v"), expert_rank=2)
    with pytest.raises(ConfigError, match=r"lora.rank: 0 \(full fine-tuning\), but lora.alpha, lora.targets or "
                       "lora.expert_rank is set"):
        LoraConfig(expert_rank=2)
    with pytest.raises(ConfigError, match=r"model.experts_per_token: must be in \[1, num_experts 4\], got 5"):
        dataclasses.replace(CFG, experts_per_token=5)
    with pytest.raises(ConfigError, match="model.num_experts: 4 with architecture llama: only mixtral, qwen2_moe, qwen3_moe, olmoe"):
        dataclasses.replace(CFG, architecture="llama")
    with pytest.raises(ConfigError, match="model.shared_expert_size: 8 with architecture mixtral: only qwen2_moe"):
        dataclasses.replace(CFG, shared_expert_size=8)
    with pytest.raises(ConfigError, match="model.shared_expert_size: 0 with architecture qwen2_moe: .* needs a width"):
        dataclasses.replace(CFG, architecture="qwen2_moe", qkv_bias=True)
    with pytest.raises(ConfigError, match="model.qkv_bias: False with qwen2_moe: transformers' qwen2_moe adds q/k/v"):
        dataclasses.replace(CFG, architecture="qwen2_moe", shared_expert_size=8)
    with pytest.raises(ConfigError, match="model.qk_norm: False with qwen3_moe: transformers' qwen3_moe normalizes"):
        dataclasses.replace(CFG, architecture="qwen3_moe")
    with pytest.raises(ConfigError, match="model.qk_norm_full: True with qwen3_moe: only olmo2, olmo3 and olmoe compute it"):
        dataclasses.replace(CFG, architecture="qwen3_moe", qk_norm=True, qk_norm_full=True)
    with pytest.raises(ConfigError, match="model.qk_norm_full: False with olmoe: transformers' olmoe normalizes q and k over all heads"):
        dataclasses.replace(CFG, architecture="olmoe", qk_norm=True)
    with pytest.raises(ConfigError, match="model.head_dim: 32 with olmoe: its q norm is hidden_size 64 wide"):
        dataclasses.replace(CFG, architecture="olmoe", qk_norm=True, qk_norm_full=True, head_dim=32)
    with pytest.raises(hf.CheckpointError, match="c.json: clip_qkv 8.0: clamping q, k and v is not implemented"):
        hf.config_from_hf(dict(oracle.torch_model("olmoe").config.to_dict(), clip_qkv=8.0), "c.json")
    qwen2 = oracle.torch_model("qwen2_moe").config.to_dict()
    with pytest.raises(hf.CheckpointError, match="c.json: qkv_bias is false"):
        hf.config_from_hf(dict(qwen2, qkv_bias=False), "c.json")
    with pytest.raises(hf.CheckpointError, match="c.json: use_sliding_window is true without layer_types"):
        hf.config_from_hf({k: v for k, v in dict(qwen2, use_sliding_window=True).items() if k != "layer_types"}, "c.json")
    with pytest.raises(hf.CheckpointError, match=r"c.json: layers \[1\] have a dense MLP .* spjax's qwen2_moe"):
        hf.config_from_hf(dict(qwen2, mlp_only_layers=[1]), "c.json")
    with pytest.raises(ConfigError, match="model.num_experts: 0 with architecture mixtral"):
        dataclasses.replace(CFG, num_experts=0)
    conf = oracle.torch_model("qwen3_moe").config.to_dict()
    with pytest.raises(hf.CheckpointError, match=r"c.json: layers \[0\] have a dense MLP"):
        hf.config_from_hf(dict(conf, mlp_only_layers=[0]), "c.json")
    with pytest.raises(hf.CheckpointError, match=r"c.json: layers \[0\] have a dense MLP"):
        hf.config_from_hf(dict(conf, decoder_sparse_step=2), "c.json")
    assert hf.config_from_hf(dict(conf, num_experts=8)).num_experts == 8  # (the hub's name; 5.x writes the other)


def test_lora_sampling_merges_the_attention_and_shares_the_experts():
    """A float MoE policy samples with its adapted projections merged (the same logits) and the experts,
    router and everything else it does not adapt as its own arrays."""
    cfg = dataclasses.replace(CFG, lora=LoraConfig(rank=4, targets=("q", "k", "v", "o")))
    params = model.init_params(cfg, jax.random.key(4))
    params["layers"] = {k: (v + 0.05 if k.endswith("_lora_b") else v) for k, v in params["layers"].items()}
    scfg, sparams = lora.for_sampling(cfg, params)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    np.testing.assert_allclose(model.forward(scfg, sparams, ids), model.forward(cfg, params, ids), atol=1e-5, rtol=0)
    assert all(sparams["layers"][k] is params["layers"][k] for k in ("router", "experts_gate", "experts_up",
                                                                      "experts_down", "mlp_norm"))


def test_a_moe_policy_plays_and_exports(tmp_path, tfds_dir):
    """configs/tiny.py with a Mixtral policy, its experts in int4 and adapters on its attention and experts: sampled,
    scored, trained on 8 devices (the dispatch per shard of data x fsdp, the experts split over tensor),
    checkpointed, and exported as a MixtralForCausalLM with its PEFT adapter."""
    work = tmp_path / "run"
    proc = _train(work, "model.architecture=mixtral", "model.num_experts=4", "model.experts_per_token=2",
                  "lora.rank=4", "lora.targets=q,k,v,o,experts_up,experts_down", "base_quant=int4", "run.rounds=1", "mesh.data=2",
                  "mesh.fsdp=2", "mesh.tensor=2", tfds_dir=tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported the final model" in proc.stdout and "on q,k,v,o,experts_up,experts_down; base int4" in proc.stdout
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert any(r["kind"] == "round" for r in rows) and all(np.isfinite(r.get("loss", 0.0)) for r in rows)
    with open(work / "export" / "config.json") as f:
        conf = json.load(f)
    assert conf["architectures"] == ["MixtralForCausalLM"] and conf["num_local_experts"] == 4
    cfg, params = hf.load_pretrained(str(work / "export"))
    assert cfg.moe and cfg.experts_per_token == 2 and params["layers"]["experts_gate"].shape == (2, 4, 64, 128)
    assert os.path.exists(work / "export" / "adapter" / "adapter_model.safetensors")
