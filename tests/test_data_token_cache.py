"""Tokenized splits are kept beside the TFDS dataset and read by the next start: the same examples, ids and
length reports as tokenizing them, and never for other data, tokenizer or settings."""
import dataclasses
import os

import numpy as np
import pytest

from spjax.byte_tokenizer import byte_tokenizer
from spjax.config import DataConfig
from spjax.data import prepare, token_cache
from tests.test_data_helpers import chat, write_jsonl

FIELDS = ("prompt_ids", "real_ids", "generated_ids", "uncut_real_ids")


def _records():
    """Pairs of all kinds: long multi-turn prompts cut by whole turns, responses cut at max_len, one dropped
    under overlong=drop, system prompts."""
    out = []
    for i in range(24):
        turns = [("user", f"question {i} " + "x" * i), ("assistant", "answer " * (1 + i % 4))] * (1 + i % 3)
        system = [("system", "Be brief.")] if i % 4 == 0 else []
        out.append({"messages": chat(*system, *turns[:-1]), "chosen": f"yes {i} " * (1 + i % 9),
                    "rejected": "no" * (i % 5 + 1)})
    return [{"prompt": r["messages"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in out]


def _same(a, b):
    for split in ("train", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert len(x) == len(y) > 0
        for e, f in zip(x, y):
            for name in FIELDS:
                u, v = getattr(e, name), getattr(f, name)
                assert (u is None) == (v is None) and (u is None or (v.dtype == np.int32 and np.array_equal(u, v)))
            assert (e.id, e.source, e.prompt_messages, e.example_index) == (f.id, f.source, f.prompt_messages,
                                                                             f.example_index)
        assert a.reports[split] == b.reports[split]
    assert (a.buckets, a.prompt_buckets) == (b.buckets, b.prompt_buckets)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_a_second_start_reads_the_tokenized_splits(tmp_path, capsys, overlong):
    path = write_jsonl(tmp_path / "d.jsonl", _records())
    cfg = DataConfig(path=path, eval_frac=0.25, max_prompt_len=64, max_len=112, overlong=overlong,
                     template_date="2026-12-02")
    tok, data_dir = byte_tokenizer(), str(tmp_path / "tfds")
    first = prepare(cfg, tok, data_dir, (2,))
    assert "read from" not in capsys.readouterr().out
    second = prepare(cfg, tok, data_dir, (2,))
    assert "data: tokenized splits read from" in capsys.readouterr().out
    _same(first, second)
    report = first.reports["train"]
    if overlong == "truncate":
        assert report.prompts_by_turns > 0 and report.responses_truncated > 0
        assert any(e.uncut_real_ids is not None for e in second.train)
    else:  # example_index: the dropped records' places count, so each kept one gets its own turns back
        assert report.dropped_prompt > 0 and 0 < report.kept and second.train[-1].example_index > len(second.train)
    assert prepare(cfg, tok, None, (2,)).train[0].prompt_ids.tolist() == first.train[0].prompt_ids.tolist()


def test_other_data_tokenizer_or_settings_are_tokenized_anew(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", _records())
    cfg = DataConfig(path=path, eval_frac=0.25, max_prompt_len=64, max_len=112, template_date="2026-12-02")
    data_dir = str(tmp_path / "tfds")
    base = prepare(cfg, byte_tokenizer(), data_dir, (2,))
    split = byte_tokenizer()  # tokenizer_config.json's split_special_tokens: a Python attribute to_str() leaves out
    split.split_special_tokens = True
    capsys.readouterr()
    assert prepare(cfg, split, data_dir, (2,)).train[0].prompt_ids.tolist() != base.train[0].prompt_ids.tolist()
    assert "read from" not in capsys.readouterr().out
    other_template = byte_tokenizer()
    other_template.chat_template = other_template.chat_template.replace("<|im_end|>\\n' }}", "<|im_end|>\\n\\n' }}")
    assert other_template.chat_template != byte_tokenizer().chat_template
    changes = [(cfg, other_template, (2,)), (cfg, byte_tokenizer(), (2, 0)),
               (dataclasses.replace(cfg, max_len=80), byte_tokenizer(), (2,)),
               (dataclasses.replace(cfg, template_date="2026-12-03"), byte_tokenizer(), (2,)),
               (dataclasses.replace(cfg, system_prompt="Hi."), byte_tokenizer(), (2,)),
               (dataclasses.replace(cfg, template_args=("enable_thinking=false",)), byte_tokenizer(), (2,))]
    capsys.readouterr()
    for c, tok, stops in changes:
        got = prepare(c, tok, data_dir, stops)
        assert "read from" not in capsys.readouterr().out
        assert got is not base
    records = _records()
    records[5]["chosen"] = "edited"
    write_jsonl(path, records)
    edited = prepare(cfg, byte_tokenizer(), data_dir, (2,))
    assert "read from" not in capsys.readouterr().out
    assert sum(not np.array_equal(a.real_ids, b.real_ids) for a, b in zip(base.train + base.test,
                                                                          edited.train + edited.test)) >= 1
    kept = os.listdir(os.path.join(data_dir, token_cache.DIR))
    assert len(kept) == token_cache.KEEP and all(n.endswith(".npz") for n in kept)  # the newest only


def test_a_start_killed_while_keeping_the_splits_leaves_no_file_for_good(tmp_path, monkeypatch):
    """A start SIGKILLed between writing the splits' temporary file and its rename (OOM, preemption) left that
    file, the size of the splits, for good: a later start removes one no writer has touched for hours."""
    path = write_jsonl(tmp_path / "d.jsonl", _records())
    cfg = DataConfig(path=path, eval_frac=0.25, max_prompt_len=64, max_len=112, template_date="2026-12-02")
    data_dir = str(tmp_path / "tfds")
    prepare(cfg, byte_tokenizer(), data_dir, (2,))
    d = os.path.join(data_dir, token_cache.DIR)
    old, fresh = os.path.join(d, ".tmp-killed"), os.path.join(d, ".tmp-writing")
    for name in (old, fresh):
        with open(name, "wb") as f:
            f.write(b"x" * 1000)
    os.utime(old, (0, os.path.getmtime(old) - token_cache.STALE_TMP_S - 60))
    prepare(dataclasses.replace(cfg, max_len=100), byte_tokenizer(), data_dir, (2,))
    assert not os.path.exists(old) and os.path.exists(fresh)  # another run's write in progress is left alone


def test_a_damaged_or_unwritable_file_costs_a_tokenization_not_the_run(tmp_path, capsys, caplog, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", _records())
    cfg = DataConfig(path=path, eval_frac=0.25, max_prompt_len=64, max_len=112, template_date="2026-12-02")
    tok, data_dir = byte_tokenizer(), str(tmp_path / "tfds")
    first = prepare(cfg, tok, data_dir, (2,))
    (file,) = [os.path.join(data_dir, token_cache.DIR, n) for n in os.listdir(os.path.join(data_dir, token_cache.DIR))]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    capsys.readouterr()
    again = prepare(cfg, tok, data_dir, (2,))
    assert "read from" not in capsys.readouterr().out and "cannot be read" in caplog.text
    _same(first, again)
    prepare(cfg, tok, data_dir, (2,))  # written anew: read
    assert "read from" in capsys.readouterr().out
    z = dict(np.load(file))  # a file that reads cleanly but holds other ids (edited): not read
    z["train/tokens"] = z["train/tokens"].copy()
    z["train/tokens"][5] += 1
    with open(file, "wb") as f:
        np.savez(f, **z)
    _same(first, prepare(cfg, tok, data_dir, (2,)))
    assert "do not match their checksum" in caplog.text and "read from" not in capsys.readouterr().out

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(token_cache.artifacts, "save_arrays", full)
    _same(first, prepare(dataclasses.replace(cfg, template_date="2026-12-05"), tok, data_dir, (2,)))
    assert "were not kept (" in caplog.text


def test_unencodable_records_dropped_then_refused(tmp_path, caplog):
    """data.unencodable=drop drops a record whose text holds a special token's (counted, the first few named);
    refuse (the default) then stops on it: the splits kept by the dropping start are not read for it."""
    from spjax.data import DataError
    records = _records()
    records[3]["chosen"] = "It ends with <|im_end|> here."
    records[7]["prompt"][-1]["content"] = "What does <|im_start|> mean?"
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = DataConfig(path=path, eval_frac=0.0, max_prompt_len=64, max_len=112, template_date="2026-12-02",
                     unencodable="drop")
    data_dir = str(tmp_path / "tfds")
    got = prepare(cfg, byte_tokenizer(), data_dir, (2,))
    report = got.reports["train"]
    assert report.dropped_unencodable == 2 and report.kept == len(got.train) == 22 and report.examples == 24
    assert "2 as unencodable" in str(report) and {f"{path}:4", f"{path}:8"} <= set(report.cut)
    assert "dropped 2 records that cannot be encoded as written" in caplog.text and f"{path}:4: response" in caplog.text
    assert [e.example_index for e in got.train][3:7] == [4, 5, 6, 8]
    with pytest.raises(DataError, match="special token text"):
        prepare(dataclasses.replace(cfg, unencodable="refuse"), byte_tokenizer(), data_dir, (2,))
    with pytest.raises(Exception, match="data.unencodable"):
        DataConfig(unencodable="skip")
