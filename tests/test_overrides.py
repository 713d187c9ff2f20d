"""Config files and `key=value` overrides: every bad value is one ConfigError naming its field, before
anything runs (before: a traceback, a crash mid-run, or silently accepted)."""
import dataclasses
import os
import re

import pytest

from spjax.config import ConfigError, load_config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


@pytest.mark.parametrize("item,message", [
    ("run=5", "run: a group of settings; set its keys, e.g. run.rounds=..."),
    ("run.=3", "run: a group of settings"),
    ("model=foo", "model: a group of settings; set its keys, e.g. model.vocab_size=..."),
    ("lora=3", "lora: a group of settings"),
    ("run.checkpoint_every=0", "run.checkpoint_every: must be >= 1, got 0"),  # before: ZeroDivisionError mid-run
    ("run.score_batch_size=0", "run.score_batch_size: must be >= 1"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints: must be >= 1"),  # before: no checkpoint kept, resume restarts
    ("run.eval_examples=-3", "run.eval_examples: must be >= 0"),  # before: silently 29 of 32
    ("run.eval_max_new_tokens=0", "run.eval_max_new_tokens: must be >= 1"),
    ("sampling.batch_size=0", "sampling.batch_size: must be >= 1"),
    ("sampling.top_k=-1", "sampling.top_k: must be >= 0"),
    ("sampling.weights=replicated", "sampling.weights: 'replicated' not in ('sharded', 'gathered')"),
    ("data.max_examples=-5", "data.max_examples: must be >= 0"),  # before: silently all but the last 5
    ("data.format=bogus", "data.format: 'bogus' not in"),
    ("data.eval_frac=1", "data.eval_frac: must be in [0, 1)"),
    ("optim.warmup_frac=2", "optim.warmup_frac: must be in [0, 1]"),
    ("optim.lr=inf", "optim.lr: must be finite, got inf"),
    ("objective.beta=nan", "objective.beta: must be finite, got nan"),
    ("optim.b1=5", "optim.b1: must be in [0, 1)"),
    ("optim.eps=-1", "optim.eps: must be > 0"),
    ("mesh.data=0", "mesh.data: must be >= 1 or -1"),
    ("mesh.fsdp=-1", "mesh: at most one axis may be -1"),  # with mesh.data=-1
    ("model.sliding_window=0", "model.sliding_window: must be >= 1 or None"),  # every key masked before
    ("model.rope_theta=0", "model.rope_theta: must be > 0"),  # these: NaN logits, silently
    ("model.rope_factor=0", "model.rope_factor: must be > 0"),
    ("model.rms_norm_eps=-1", "model.rms_norm_eps: must be >= 0"),
    ("data.template_args=enable_thinking", "data.template_args: 'enable_thinking' is not NAME=VALUE"),
    ("data.template_args=tokenize=true", "data.template_args: tokenize is apply_chat_template's own parameter"),
    ("model.qkv_bias=true model.qk_norm=true", "model.qk_norm: with qkv_bias: no transformers family computes both"),
])
def test_bad_override_is_one_config_error(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, item.split(" "))  # (one override, or several)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return (\n")
    with pytest.raises(ConfigError, match=r"bad.py:2: '\(' was never closed"):
        load_config(str(bad))
    bad.write_text("def get_config():\n    return {}\n")
    with pytest.raises(ConfigError, match=r"bad.py: get_config\(\) returned dict, not a spjax.config.Config"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"tiny.py: get_config\(\) takes no stage argument \(got 'iter2'"):
        load_config(TINY + ":iter2")  # before: a TypeError traceback
    spin = os.path.join(os.path.dirname(TINY), "spin_zephyr7b_v5p.py")
    with pytest.raises(ConfigError, match=r"spin_zephyr7b_v5p.py: get_config\('iter9'\): stage 'iter9'"):
        load_config(spin + ":iter9")


@pytest.mark.parametrize("body,message", [
    ("from spjax.config import RunConfg\ndef get_config():\n    pass\n",
     r"bad.py:1: ImportError: cannot import name 'RunConfg'"),
    ("X = undefined_name\ndef get_config():\n    pass\n", r"bad.py:1: NameError: name 'undefined_name'"),
    ("from spjax.config import Config, RunConfig\ndef get_config():\n    return Config(\n        run=RunConfig(round=2))\n",
     r"bad.py:4: TypeError: .*unexpected keyword argument 'round'"),
    ("import os\ndef get_config():\n    return os.environ['SPJAX_NO_SUCH_VAR']\n", r"bad.py:3: KeyError: 'SPJAX_NO_SUCH_VAR'"),
    ("def get_config(stage):\n    pass\n", r"bad.py: get_config\(\) needs an argument: pass it after a ':'"),
])
def test_a_config_file_that_raises_is_one_line_naming_its_line(tmp_path, body, message):
    """An exception in a config file (a misspelt import or keyword, a missing variable) was a traceback."""
    (tmp_path / "bad.py").write_text(body)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(tmp_path / "bad.py"))
    assert "\n" not in str(e.value)


def test_a_config_that_is_not_a_python_file_is_one_line(tmp_path):
    """A directory or a .md file was AttributeError: 'NoneType' object has no attribute 'loader'."""
    (tmp_path / "notes.md").write_text("hi")
    for path in (tmp_path, tmp_path / "notes.md"):
        with pytest.raises(ConfigError, match="not a Python config file"):
            load_config(str(path))


@pytest.mark.parametrize("value", ["-1", str(2**64)])
def test_run_seed_out_of_range_is_refused_at_load(value):
    """run.seed=-1 sampled and scored round 0, then numpy's SeedSequence raised in training."""
    with pytest.raises(ConfigError, match=r"run.seed: must be in \[0, 2\*\*32\)"):
        load_config(TINY, [f"run.seed={value}"])


def test_a_typo_is_answered_with_the_nearest_key_and_lists_take_python_syntax():
    with pytest.raises(ConfigError, match=r"did you mean run.batch_size\?"):
        load_config(TINY, ["run.batchsize=16"])
    cfg = load_config(TINY, ["data.buckets=[32, 64]", "lora.targets=('q', 'v')", "model.sliding_window=null",
                             "lora.rank=4"])
    assert (cfg.data.buckets, cfg.lora.targets, cfg.model.sliding_window) == ((32, 64), ("q", "v"), None)


@pytest.mark.parametrize("items,message", [
    (["lora.alpha=32"], "lora.rank: 0 (full fine-tuning), but lora.alpha, lora.targets or lora.expert_rank is set"),
    (["lora.targets=q,v"], "lora.rank: 0 (full fine-tuning), but lora.alpha, lora.targets or lora.expert_rank is set"),
    (["judge.pairs=all"], "judge.pairs: 'all' without a judge"),
])
def test_a_setting_that_would_be_ignored_is_refused(items, message):
    """Adapter settings without a rank trained the full model, judge.pairs without a judge sampled pairs."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, items)
    load_config(TINY, items + (["lora.rank=4"] if "lora" in items[0] else ["judge.name=similarity"]))


def test_a_path_given_with_a_tilde_is_the_home_folder_s():
    """`data.path=~/x.jsonl` reaches spjax as typed (no shell expands ~ there): it was 'does not exist'."""
    cfg = load_config(TINY, ["data.path=~/qa.jsonl", "data.tfds_dir=~/tfds", "run.pairs=auto"])
    assert (cfg.data.path, cfg.data.tfds_dir) == (os.path.expanduser("~/qa.jsonl"), os.path.expanduser("~/tfds"))


def test_a_stage_argument_may_be_a_path(tmp_path):
    """`file.py:/data/x.jsonl` was split at the last ':' of the basename only: 'config file not found'."""
    (tmp_path / "staged.py").write_text(
        "import dataclasses\nfrom spjax.config import load_config\n"
        f"def get_config(path):\n    cfg = load_config({TINY!r})\n"
        "    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))\n")
    for arg in ("/data/my:file.jsonl", "rel/dir/x.jsonl"):
        assert load_config(f"{tmp_path}/staged.py:{arg}").data.path == arg


def test_overrides_may_follow_the_flags():
    """`--resume mesh.fsdp=8` was 'unrecognized arguments' (argparse stops a positional list at a flag)."""
    from spjax import train
    args = train.parse(["--config", TINY, "a.b=1", "--resume", "mesh.data=1", "mesh.fsdp=8"])
    assert args.resume and args.overrides == ["a.b=1", "mesh.data=1", "mesh.fsdp=8"]


@pytest.mark.parametrize("items,message", [
    (["run.pairs=data", "run.reference=initial", "objective.name=inpo"],  # before: INPO without its pi_t half
     "run.reference: 'initial' with objective.name=inpo"),
    (["objective.name=sft", "objective.nll_weight=0.5"], "objective.nll_weight: sft's loss is the NLL alone"),
])
def test_combinations_that_would_train_something_else_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, items)


def test_model_fields_are_refused_while_model_path_holds_the_model(tmp_path):
    """`model.*` shapes a random init: with a model at model_path it was ignored without a word."""
    with pytest.raises(ConfigError, match=r"model.num_layers: the model is read from model_path="):
        load_config(TINY, [f"model_path={tmp_path}", "model.num_layers=7"])
    load_config(TINY, ["model.num_layers=3"])  # a random init: its shape
    load_config(TINY, ["model_path=/not/on/this/machine", "model.num_layers=3"])  # compile-check's stand-in


@pytest.mark.parametrize("items,message", [
    (["lora.rank=4", "lora.init_path=/nonexistent/adapter"], "lora.init_path: /nonexistent/adapter does not exist"),
    (["sampling.num_samples=2", "judge.name=reward_model:/nonexistent/rm"], "judge.name: /nonexistent/rm does not"),
    (["sampling.num_samples=2", "judge.name=python:no_such_judge_module:score"],
     "judge.name: python:no_such_judge_module:score: cannot import module 'no_such_judge_module': no "
     "'no_such_judge_module' on the import path"),
])
def test_paths_and_judge_modules_are_checked_before_any_data_or_model_loads(items, message):
    """Before: these failed after data preparation and model loading, one without naming its field."""
    from spjax import preflight
    with pytest.raises(ConfigError, match=message):
        preflight.check_config(load_config(TINY, items), 8)


def test_sequences_past_the_models_positions_are_said():
    import dataclasses
    from spjax import preflight
    cfg = load_config(TINY)
    said = []
    preflight.check_lengths(cfg, dataclasses.replace(cfg.model, max_position_embeddings=64), (96,), said.append)
    assert said == ["note: sequences of up to 96 tokens (data.max_len, data.max_prompt_len + sampling/eval new "
                    "tokens) exceed the model's max_position_embeddings=64: positions past it were never trained"]
    preflight.check_lengths(cfg, cfg.model, (96,), said.append)
    assert len(said) == 1


def test_unreachable_real_lengths_and_held_out_overlap_are_said():
    """A real response longer than sampling.max_new_tokens makes a pair that differs by length alone;
    held-out prompts that are trained on (an eval file repeating train's) inflate held-out metrics."""
    import numpy as np
    from spjax import preflight
    from spjax.data.tokens import TokenizedExample
    cfg = load_config(TINY, ["sampling.max_new_tokens=8"])
    ex = lambda i, prompt, n: TokenizedExample(id=i, prompt_ids=np.asarray(prompt, np.int32),
                                               real_ids=np.arange(n, dtype=np.int32))
    train = [ex(0, [1, 2], 5), ex(1, [3], 12), ex(2, [4, 5], 8), ex(3, [6], 9)]
    held = [ex(0, [3], 4), ex(1, [3, 1], 4), ex(2, [4, 5], 4)]
    said = []
    preflight.check_examples(cfg, "sampled", train, held, said.append)
    assert said == ["note: 2 of 4 real responses are longer than sampling.max_new_tokens=8 (up to 12 tokens), "
                    "which the opponent's samples cannot reach: raise it, or lower data.max_len",
                    "note: 2 of 3 held-out prompts are also training prompts (data.eval_path or a test/eval file "
                    "repeats them): held-out metrics partly measure the training data"]
    said.clear()
    rejected = dataclasses.replace(held[1], generated_ids=np.arange(3, dtype=np.int32))
    preflight.check_examples(cfg, "data", train, [rejected], said.append)  # no samples; no overlap
    assert said == []


@pytest.mark.parametrize("items", [["run.stop_when_worse=1", "run.keep_best=nll"],
                                   ["optim.grad_accum=3", "run.batch_size=12"],
                                   ["lora.init_path=/tmp", "lora.rank=4"],
                                   ["objective.beta=0.01", "objective.name=inpo", "objective.tau=0.005"]])
def test_overrides_are_checked_together_in_any_order(items):
    """Each key=value was applied and checked alone, so a check across two keys saw half of them: one
    order of a valid command line failed, naming a value the same line set."""
    for order in (items, items[::-1]):
        load_config(TINY, order)


@pytest.mark.parametrize("items,message", [
    (["run.rounds=2", "run.rounds=5"], "run.rounds: given twice ('2', then '5'): give it once"),  # 5 won, unsaid
    (["=3"], "=: an empty key"),
    (["run.rounds=2", " run.rounds =3"], "run.rounds: given twice"),
])
def test_a_key_given_twice_or_empty_is_one_line(items, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, items)


def test_list_values_may_have_spaces():
    assert load_config(TINY, ["lora.rank=4", "lora.targets=q, k"]).lora.targets == ("q", "k")


def test_config_file_values_have_their_declared_types(tmp_path):
    """A config file's export="no" is a truthy string: the run exported; rounds="2" was a TypeError."""
    for field, value, message in [("export", '"no"', "run.export: expected bool, got 'no' (str)"),
                                  ("rounds", '"2"', "run.rounds: expected int, got '2' (str)"),
                                  ("rounds", "2.0", "run.rounds: expected int, got 2.0 (float)")]:
        path = tmp_path / "c.py"
        path.write_text(f"import dataclasses, runpy\ndef get_config():\n    cfg = runpy.run_path({TINY!r})"
                        f"['get_config']()\n    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, "
                        f"{field}={value}))\n")
        with pytest.raises(ConfigError, match=re.escape(f"c.py: {message}")):
            load_config(str(path))


def test_model_keys_on_a_config_that_loads_its_model_say_why():
    demo = os.path.join(os.path.dirname(TINY), "demo.py")
    with pytest.raises(ConfigError, match=r"model.vocab_size: the model is read from model_path; `model` shapes"):
        load_config(demo, ["model.vocab_size=10"])  # before: 'model has no sub-keys'


def test_overrides_given_as_one_string_are_named():
    with pytest.raises(ConfigError, match="overrides: a list of key=value strings"):
        load_config("configs/tiny.py", "run.rounds=1")
