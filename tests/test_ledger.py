"""The run's ledger: what a resume must agree with, the stop rule, and an export never lost."""
import json
import os
import types

import pytest

from spjax import ledger
from spjax.config import ConfigError, load_config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def test_resume_refuses_fields_that_shape_the_run_and_says_the_others(tmp_path):
    ledger.write_start(load_config(TINY, ["run.batch_size=8"]), str(tmp_path), resume=True)  # a start that failed
    ledger.write_start(load_config(TINY), str(tmp_path), resume=True)  # ... is no start: rewritten
    (tmp_path / "config.txt").write_text("(the setup finished)")
    first = json.load(open(tmp_path / "start.json"))
    assert first["config"]["run.batch_size"] == "16"
    said = []
    same = ledger.check_start(load_config(TINY), str(tmp_path), said.append)
    assert same.data.template_date == first["date"] and said == []
    ledger.write_start(load_config(TINY, ["run.batch_size=8"]), str(tmp_path), resume=True)  # keeps the first's
    assert json.load(open(tmp_path / "start.json")) == first
    with pytest.raises(ConfigError, match=r"--resume: objective.c: 1.0 -> 2.0; run.batch_size: 16 -> 8: these "
                                          r"shape the run"):
        ledger.check_start(load_config(TINY, ["run.batch_size=8", "objective.c=2"]), str(tmp_path), said.append)
    with pytest.raises(ConfigError, match="data.template_date"):  # the prompts' date is part of the data
        ledger.check_start(load_config(TINY, ["data.template_date=2020-01-01"]), str(tmp_path), said.append)
    ledger.check_start(load_config(TINY, ["run.rounds=5", "optim.lr=1e-5"]), str(tmp_path), said.append)
    assert said == [f"resuming with changed settings: optim.lr: {load_config(TINY).optim.lr!r} -> 1e-05; "
                    "run.rounds: 2 -> 5"]


@pytest.mark.parametrize("name", ["spin_zephyr7b_v5p", "spin_zephyr7b_8xh100", "chi2_zephyr7b_v5p"])
def test_the_shipped_stage_schedules_resume(name, tmp_path):
    """The configs' documented schedule: three runs on one workdir, each resuming with the next stage."""
    path = os.path.join(os.path.dirname(TINY), f"{name}.py")
    ledger.write_start(load_config(path, ["run.rounds=2"]), str(tmp_path), resume=False)
    (tmp_path / "config.txt").write_text("(the setup finished)")
    for stage in ("iter2", "iter3"):
        ledger.check_start(load_config(f"{path}:{stage}"), str(tmp_path), lambda line: None)


def _ctx(tmp_path, rounds=4, stop=1, keep="nll"):
    said = []
    run = types.SimpleNamespace(keep_best=keep, stop_when_worse=stop, rounds=rounds)
    return types.SimpleNamespace(cfg=types.SimpleNamespace(run=run), workdir=str(tmp_path), echo=said.append), said


def test_stop_rule_is_re_derived_from_the_rows(tmp_path):
    ctx, said = _ctx(tmp_path)
    summary = {"initial": {"nll": 2.0}, "round 0": {"nll": 1.5}}
    assert not ledger.stop_here(ctx, summary, 0)
    summary["round 1"] = {"nll": 1.6}
    assert ledger.stop_here(ctx, summary, 1) and said == [
        "stopping after round 1: 1 rounds without a better held-out nll (run.stop_when_worse=1)"]
    assert not ledger.stop_here(_ctx(tmp_path, stop=2)[0], summary, 1)
    assert not ledger.stop_here(_ctx(tmp_path, rounds=2)[0], summary, 1)  # the last round anyway


def _model_dir(path, tag):
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "w") as f:
        f.write(tag)


def test_keep_best_export_is_never_lost(tmp_path):
    """best/ (saved when a round was the best so far) replaces export/; a rerun of a finished run, or more
    rounds of which none is better, keep the export (before: it was deleted, then best/ was missing)."""
    ctx, said = _ctx(tmp_path)
    export, best = tmp_path / "export", tmp_path / "best"
    _model_dir(best, "round 0")
    ledger._keep_best(ctx, 1, 0, 1.5, 2.0)
    assert (export / "model.safetensors").read_text() == "round 0" and not best.exists()
    ledger._keep_best(ctx, 3, 0, 1.5, 2.0)  # resumed after the finish, or rounds 2-3 were no better
    assert (export / "model.safetensors").read_text() == "round 0"
    _model_dir(best, "round 4")  # a later round is better: it replaces the export
    ledger._keep_best(ctx, 4, 4, 1.4, 2.0)
    assert (export / "model.safetensors").read_text() == "round 4" and sorted(os.listdir(tmp_path)) == ["export"]
    assert said[-1].startswith("kept round 4: held-out nll 1.4, the best of rounds 0-4")
    ledger._keep_best(ctx, 4, 4, 1.4, 1.3)  # no round beat the initial model: said, as it is not exported
    assert said[-1].startswith("note: the initial model's held-out nll, 1.3, is better than every round's")
    os.rename(export, tmp_path / "elsewhere")
    with pytest.raises(Exception, match="best: missing, and no .*export holds round 4's model"):
        ledger._keep_best(ctx, 4, 4, 1.4, 2.0)


def test_resume_refuses_data_that_tokenizes_otherwise(tmp_path):
    """A data file edited in place (or another tokenizer at the same path) gave a resume other prompts
    for its samples and scores on disk, without a word."""
    import numpy as np
    ex = lambda i, prompt: types.SimpleNamespace(id=i, prompt_ids=np.asarray(prompt), real_ids=np.asarray([7, 2]),
                                                 generated_ids=None, uncut_real_ids=None)
    first = {"train": [ex(0, [1, 5]), ex(1, [1, 6])], "test": [ex(0, [1, 9])]}
    ledger.check_data(str(tmp_path), first, resume=False)
    (tmp_path / "config.txt").write_text("(the setup finished)")
    ledger.check_data(str(tmp_path), {k: list(v) for k, v in first.items()}, resume=True)
    edited = dict(first, train=[ex(0, [1, 5]), ex(1, [1, 6, 6])])
    with pytest.raises(ConfigError, match=r"--resume: the data .* gives other token ids than the run"):
        ledger.check_data(str(tmp_path), edited, resume=True)
    with pytest.raises(ConfigError, match="other token ids"):  # a held-out example moved to training
        ledger.check_data(str(tmp_path), {"train": first["train"] + first["test"], "test": []}, resume=True)
    assert json.load(open(tmp_path / "data.json"))["train"] == 2


def test_resume_refuses_a_starting_adapter_changed_in_place(tmp_path):
    """INPO rereads lora.init_path's adapter as pi_0 every round: a file rewritten between resumes gave
    rounds two different pi_0s."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights 1")
    cfg = load_config(TINY, ["lora.rank=4", f"lora.init_path={adapter}"])
    run = tmp_path / "run"
    ledger.write_start(cfg, str(run), resume=False)
    (run / "config.txt").write_text("(the setup finished)")
    ledger.check_start(cfg, str(run), lambda line: None)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights 2")
    with pytest.raises(ConfigError, match=r"--resume: lora.init_path \(its files' sha256\): [0-9a-f]+ -> [0-9a-f]+"):
        ledger.check_start(cfg, str(run), lambda line: None)


def test_the_model_at_model_path_may_move_but_not_change(tmp_path):
    """model_path may change on a resume (the files moved); the model there may not: a same-shaped
    Mistral in place of a Llama resumed, then exported a Mistral with a window the run never had."""
    import shutil
    from transformers import LlamaConfig, MistralConfig
    shape = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    LlamaConfig(**shape).save_pretrained(tmp_path / "llama")
    shutil.copytree(tmp_path / "llama", tmp_path / "moved")
    MistralConfig(**shape, sliding_window=16).save_pretrained(tmp_path / "mistral")
    work = tmp_path / "run"
    ledger.write_start(load_config(TINY, [f"model_path={tmp_path / 'llama'}"]), str(work), resume=False)
    (work / "config.txt").write_text("(the setup finished)")
    said = []
    ledger.check_start(load_config(TINY, [f"model_path={tmp_path / 'moved'}"]), str(work), said.append)
    assert len(said) == 1 and said[0].startswith("resuming with changed settings: model_path:")
    with pytest.raises(ConfigError, match=r"--resume: model at model_path.architecture: 'llama' -> 'mistral'"):
        ledger.check_start(load_config(TINY, [f"model_path={tmp_path / 'mistral'}"]), str(work), said.append)
    # spjax export rebuilds the run as it ran: a changed lora.* merged other weights, without a word
    with pytest.raises(ConfigError, match=r"^lora.alpha: 16.0 -> 8.0; lora.rank: 0 -> 4: these shape the model"):
        ledger.check_start(load_config(TINY, [f"model_path={tmp_path / 'moved'}", "lora.alpha=8", "lora.rank=4"]), str(work),
                           said.append, resume=False)
    # ... but not what shaped training only: the run's epochs, data or objective need not be typed again
    said.clear()
    ledger.check_start(load_config(TINY, [f"model_path={tmp_path / 'llama'}", "run.epochs=4", "objective.name=spin"]),
                       str(work), said.append, resume=False)
    assert said == ["exporting with changed settings: objective.name: 'chi2' -> 'spin'; run.epochs: 1 -> 4"], said
    # run.keep_best decides what export/ holds (the best round, nowhere else): an export must name it as the run did
    with pytest.raises(ConfigError, match=r"^run.keep_best: '' -> 'f1': these shape the model"):
        ledger.check_start(load_config(TINY, [f"model_path={tmp_path / 'llama'}", "run.keep_best=f1"]), str(work),
                           said.append, resume=False)


def test_a_rounds_files_of_another_opponent_are_moved_aside_not_reused(tmp_path):
    """A resume that redid round 0 from an earlier checkpoint (an unfinished async save) with another
    optim.lr ended at another model, and round 1 then trained on samples and reference scores the old
    model had made (0.4 nats off). Each round's files now carry their opponent's checksums."""
    import jax.numpy as jnp
    said = []
    ctx = types.SimpleNamespace(round_dir=lambda t: str(tmp_path / "rounds" / f"round_{t:03d}"), echo=said.append)
    old, new = {"w": jnp.arange(6.0)}, {"w": jnp.arange(6.0) * 1.001}
    ledger.check_opponent(ctx, 1, old)  # the first attempt's round 1: its opponent stamped, files made
    (tmp_path / "rounds" / "round_001" / "refs.npz").write_bytes(b"old scores")
    ledger.check_opponent(ctx, 1, old)  # a resume with the same opponent: reused as they are
    assert said == [] and os.listdir(tmp_path / "rounds") == ["round_001"]
    ledger.check_opponent(ctx, 1, new)
    (stale,) = [d for d in os.listdir(tmp_path / "rounds") if d != "round_001"]
    assert stale.startswith("round_001.stale-") and (tmp_path / "rounds" / stale / "refs.npz").exists()
    assert os.listdir(tmp_path / "rounds" / "round_001") == ["opponent.json"]  # the new opponent's, no files
    assert len(said) == 1 and "round 1: its samples and scores on disk are another opponent's" in said[0]


def test_other_weights_at_model_path_are_refused_on_resume(tmp_path):
    """model_path may move, and start.json checks the model's config there, but other weights of the same
    config passed: a resume rereads pi_0 (the initial row, INPO's reference each round) and trained on them."""
    import jax.numpy as jnp
    cfg = load_config(TINY, [f"model_path={tmp_path / 'model'}"])
    weights = {"w": jnp.arange(6, dtype=jnp.float32), "b": jnp.ones(2)}
    ledger.check_initial(cfg, str(tmp_path), weights, resume=False)
    (tmp_path / "config.txt").write_text("(the setup finished)")
    ledger.check_initial(cfg, str(tmp_path), weights, resume=True)  # the same weights, perhaps moved: fine
    other = {**weights, "w": weights["w"].at[3].set(7.0)}
    with pytest.raises(ConfigError, match=r"--resume: the model at model_path=.*model has other weights than the run"):
        ledger.check_initial(cfg, str(tmp_path), other, resume=True)
