"""spjax.compile_check: AOT-compiles the train step and the sampler for a config's mesh and reports
per-device memory, without materialising params."""
import json
import os
import subprocess
import sys

import pytest

from spjax import compile_check as cc, sharding
from spjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def tiny_report(devices):
    return cc.check(load_config(TINY), devices, target=cc.Target("test", "cpu", 8, memory_bytes=1 << 30))


def test_a_lora_float_base_samples_a_merged_copy_beside_the_policy(devices):
    """The run decodes lora.for_sampling's merged copy while the policy stays live: compile_check compiled
    the unmerged sampler and left the policy out, under-reporting the sampler's peak (a 7B: 54 vs 67 GiB)."""
    from spjax import lora, model, sharding as shd
    cfg = load_config(TINY, ["lora.rank=4"])
    mesh = shd.make_mesh(cfg.mesh, devices)
    mcfg = cc.model_config(cfg)
    sample = cc.compile_sampler(cfg, mcfg, mesh)
    abstract = cc._abstract(model.param_shapes(mcfg), shd.param_shardings(mcfg, mesh))
    policy = shd.bytes_per_device(abstract)
    # (held: the adapters and the projections merged copies replace; the rest the sampler reads as it is)
    shared = shd.bytes_per_device(lora.shared_for_sampling(mcfg, abstract))
    assert sample.shape.endswith(" merged, + policy") and sample.held == policy - shared and 0 < shared < policy
    assert sample.peak == sample.argument + sample.output - sample.alias + sample.temp + sample.code + sample.held


def test_a_gpu_target_compiles_the_decode_loop_a_gpu_runs(devices, monkeypatch):
    """The sampler picks its loop by this host's backend: CPU stand-ins for a GPU target compiled the CPU
    loop (layers scanned, one step a check), under-reporting the GPU's (1B: 25.8 vs 29.0 GiB)."""
    from spjax import sampler, sharding as shd
    seen, make_plan = [], sampler.make_plan
    monkeypatch.setattr(sampler, "make_plan", lambda **kw: seen.append(kw) or make_plan(**kw))
    cfg = load_config(TINY)
    cc.compile_sampler(cfg, cc.model_config(cfg), shd.make_mesh(cfg.mesh, devices), "gpu")
    assert seen[-1]["unroll_layers"] is True and seen[-1]["decode_chunk"] == sampler.GPU_CHUNK


def test_an_fsdp_sampler_is_compiled_with_the_run_s_weights_layout(devices):
    """sampling.weights: the gathered copy is the program's own memory, and no decode step moves data."""
    from spjax import sharding as shd
    gathered, sharded = (load_config(TINY, ["mesh.data=1", "mesh.fsdp=8", f"sampling.weights={w}"])
                         for w in ("gathered", "sharded"))
    mesh, mcfg = shd.make_mesh(gathered.mesh, devices), cc.model_config(gathered)
    g, s = cc.compile_sampler(gathered, mcfg, mesh), cc.compile_sampler(sharded, mcfg, mesh)
    assert g.shape.endswith(" gathered") and not s.shape.endswith(" gathered")
    assert g.temp > s.temp and g.loop_collectives == 0 < s.loop_collectives
    assert cc.moving_arrays([("all-reduce", "pred[]"), ("all-reduce", "u32[]{:T(128)}"), ("all-gather", "f32[8,4]")]) \
        == [("all-gather", "f32[8,4]")]  # scalars (TPU layouts too) move no array


def test_a_reward_model_judge_is_counted_where_it_is_on_the_devices(devices, tmp_path, monkeypatch):
    """The run loads its reward model once: compile_check left it out (with the Gemma-2-9B SPPO config's 8B
    judge, 15 GiB per device unreported) and never compiled its scoring program. Its params wait in host
    memory between judge phases, so they count beside its own program, and beside the others only where
    the devices have no pinned host memory."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForSequenceClassification"], vocab_size=259, hidden_size=64, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)))  # the shape is all compile_check reads: no weights
    judged = ["sampling.num_samples=2", "judge.batch_size=5"]
    cfg = load_config(TINY, [f"judge.name=reward_model:{tmp_path}", *judged])
    rm_cfg, why = cc.judge_model_config(cfg)
    assert not why and rm_cfg.tie_embeddings and rm_cfg.num_layers == 3  # as the run loads it: no LM head
    assert rm_cfg.param_dtype == rm_cfg.compute_dtype == cfg.compute_dtype
    r = cc.check(cfg, devices[:2], target=cc.Target("test", "cpu", 2, memory_bytes=1 << 30))
    rm = r.state_bytes["reward model"]
    train, sample, judge = r.programs
    assert rm > 0 and train.held == 0 and sample.held == 0
    # judge.batch_size rows (5, over 2 devices: 6) at the longest a round scores: 48 prompt + 24 new
    # tokens would be 128 once bucketed, but the run cuts sequences to the reward model's 64 positions
    assert judge.shape == "B=6 L=64, + policy" and judge.held == r.state_bytes["params"] and judge.argument >= rm
    assert "judge: reward model llama" in r.format() and "note:" not in r.format()
    assert "in host memory beside the others" in r.format()
    monkeypatch.setattr(sharding, "host_memory", lambda devices: None)  # (a runtime without memory spaces)
    resident = cc.check(cfg, devices[:2], target=cc.Target("test", "cpu", 2, memory_bytes=1 << 30), sample=False)
    assert resident.programs[0].held == rm and "live beside every program" in resident.format()
    # absent from this machine: a declared shape stands in, else the report says what it leaves out
    missing = load_config(TINY, ["judge.name=reward_model:/absent/rm", *judged])
    assert cc.judge_model_config(missing, rm_cfg)[0] == rm_cfg
    none, why = cc.judge_model_config(missing)
    assert none is None and "/absent/rm" in why and "not counted" in why
    assert cc.judge_model_config(load_config(TINY)) == (None, "")


def test_the_judge_length_counts_the_reward_models_chat_markup(devices, tmp_path):
    """A reward model with a chat template reads the conversation rendered by it: its markup comes on top of
    the prompt + new tokens (before: left out, one bucket short where those filled theirs)."""
    from spjax.byte_tokenizer import byte_tokenizer
    from spjax.hf import save_tokenizer
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForSequenceClassification"], vocab_size=259, hidden_size=64, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)))
    # 104 prompt + 24 new tokens fill two buckets of 64 exactly
    cfg = load_config(TINY, [f"judge.name=reward_model:{tmp_path}", "sampling.num_samples=2",
                             "data.max_prompt_len=104", "data.max_len=128", "data.buckets=128"])
    rm_cfg, _ = cc.judge_model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices[:1])
    assert cc.judge_markup(cfg) == 0 and cc.compile_judge(cfg, rm_cfg, mesh, 0).shape.startswith("B=32 L=128,")
    save_tokenizer(byte_tokenizer(), str(tmp_path))  # ChatML: <|im_start|>user ... <|im_end|> around each turn
    assert cc.judge_markup(cfg) > 10 and cc.compile_judge(cfg, rm_cfg, mesh, 0).shape.startswith("B=32 L=192,")


def test_report_has_per_device_memory(tiny_report):
    r = tiny_report
    assert r.n_devices == 8 and r.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    assert [p.name for p in r.programs] == ["train_step", "sample"]
    train, sample = r.programs
    assert train.shape == "B=16 L=96 packed" and sample.shape == "B=32 P=48 T=24"  # CPU packs (data.pack=auto)
    for p in r.programs:
        assert p.argument > 0 and p.output > 0 and p.temp >= 0 and p.code >= 0
        assert p.peak == p.argument + p.output - p.alias + p.temp + p.code
    # the train step donates its state: the new state reuses those buffers
    assert train.alias > 0
    # data parallelism replicates params: each device holds all of them (fp32) and AdamW's two moments
    params = r.model["params"]
    assert r.state_bytes["params"] == 4 * params
    assert r.state_bytes["opt_state"] >= 2 * 4 * params
    assert train.argument >= r.state_bytes["params"] + r.state_bytes["opt_state"]
    assert r.fits is True and r.peak <= 1 << 30
    text = r.format()
    assert "train_step (B=16 L=96 packed)" in text and "sample (B=32 P=48 T=24)" in text and ": fits" in text


def test_fit_verdict_and_json(tiny_report):
    small = cc.Report(**{**tiny_report.__dict__, "memory_bytes": 1024})
    assert small.fits is False and "DOES NOT FIT" in small.format()
    unknown = cc.Report(**{**tiny_report.__dict__, "memory_bytes": None})
    assert unknown.fits is None and "device memory unknown" in unknown.format()
    d = json.loads(json.dumps(tiny_report.as_dict()))
    assert d["programs"][0]["peak"] == tiny_report.programs[0].peak and d["fits"] is True


def test_fsdp_shards_state_per_device(devices, tiny_report):
    # The same model on an fsdp=8 mesh: each device holds an eighth of the big params and moments.
    from spjax import sharding, step
    cfg = load_config(TINY, ["mesh.data=1", "mesh.fsdp=8"])
    model_cfg = cc.model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    state = step.abstract_state(model_cfg, step.make_optimizer(cfg.optim, 10), mesh)
    fsdp = cc.state_bytes(state)
    assert fsdp["params"] < tiny_report.state_bytes["params"] / 4
    assert fsdp["opt_state"] < tiny_report.state_bytes["opt_state"] / 4


@pytest.mark.parametrize("name, platform, devices, memory_gib", [
    ("v5p-32", "tpu", 16, 95), ("v4-8", "tpu", 4, 32), ("v5e-16", "tpu", 16, 16), ("v6e-8", "tpu", 8, 32),
    ("v5:2x2x4", "tpu", 16, 95), ("8xh100", "gpu", 8, 76), ("h200", "gpu", 1, 133.95)])
def test_parse_target(name, platform, devices, memory_gib):
    t = cc.parse_target(name)
    assert (t.platform, t.devices) == (platform, devices)
    assert abs(t.memory_bytes / cc.GiB - memory_gib) < 0.01


def test_a_one_chip_slice_is_its_own_host():
    """v5e-1 on libtpu's default 2x2 hosts: 'Topology layout v5e:1x1 is not divisible by ... 2x2x1', and the
    check fell back to a CPU stand-in."""
    assert cc.parse_target("v5e-1").host_bounds == (1, 1, 1)
    assert cc.parse_target("v5e-4").host_bounds == (2, 2, 1)


def test_a_program_the_compiler_refuses_for_memory_is_a_verdict_not_a_traceback():
    """libtpu checks HBM as it compiles: a program over it raised through compile_check before."""
    class Lowered:
        def __init__(self, error):
            self.error = error

        def compile(self):
            raise self.error
    oom = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                       "temporaries (17.16G) exceeds available HBM (15.75G).")
    program, compiled = cc.compile_lowered("train_step", "B=64 L=1024", Lowered(oom))
    assert compiled is None and program.temp == int(17.16 * cc.GiB) and "exceeds available HBM" in program.refused
    report = cc.Report("v5e-1", "tpu", "", 1, {"data": 1}, dict(architecture="qwen3", params=1, layers=1,
                       param_dtype="float32", compute_dtype="bfloat16", remat="full"), {"params": 0},
                       [program], 16 * cc.GiB)
    assert report.fits is False
    text = report.format()
    assert "train_step: the compiler refused it for want of memory: RESOURCE_EXHAUSTED" in text
    assert text.endswith("need more than 17.16 GiB of 16.0 GiB per device (107%): DOES NOT FIT")
    with pytest.raises(RuntimeError, match="INTERNAL"):  # any other failure is not a verdict
        cc.compile_lowered("train_step", "B=64 L=1024", Lowered(RuntimeError("INTERNAL: a compiler bug")))


def test_parse_target_rejects_unknown():
    for bad in ("v5p-33", "tpu", "9xq100", "0xh100"):  # (0xh100: a ZeroDivisionError before)
        with pytest.raises(ValueError):
            cc.parse_target(bad)


def test_v5p_32_topology():
    t = cc.parse_target("v5p-32")
    assert (t.topology, t.chip_config, t.wrap) == ("v5:2x2x4", "megacore", (False, False, False))
    assert cc.parse_target("v5p-128").wrap == (True, True, True)


def test_cli_for_a_tpu_slice_with_or_without_libtpu(tmp_path):
    # Without libtpu the v5p-8 slice (4 chips) compiles on 4 stand-in CPU devices; with it, for the chips.
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, "-m", "spjax.compile_check", "--config", TINY, "--topology", "v5p-8",
                          "--no-sample", "--json", str(out), "run.batch_size=8"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert report["n_devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["programs"][0]["name"] == "train_step" and report["programs"][0]["temp"] >= 0
    assert report["fits"] is True and report["memory_bytes"] == 95 * cc.GiB
    if report["platform"] == "cpu":
        assert "no TPU topology" in report["stand_in"] and "4 CPU devices instead" in res.stdout
    assert "fits" in res.stdout


def test_cli_config_error_exits_2():
    res = subprocess.run([sys.executable, "-m", "spjax.compile_check", "--config", TINY, "--topology", "v9-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "config error" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--devices", "0"], "--devices 0: must be >= 1"),  # before: 0 read as the default, -2 a ZeroDivisionError
    (["--json", "/nonexistent/dir/report.json"], "--json /nonexistent/dir/report.json: no such directory"),
])
def test_cli_bad_flags_exit_2_before_compiling(args, message, capsys):
    """Before: --json's directory failed after every program compiled, with a traceback and exit 1."""
    from spjax import compile_check
    assert compile_check.main(["--config", TINY, *args]) == 2
    assert message in capsys.readouterr().err
