"""Every input format through its TFDS builder (array_record, read with data_source) to batches."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from spjax.config import ConfigError, DataConfig
from spjax.data import (DataError, attach_generated, load_examples, load_file, pad_token_id, pair_batches, prepare,
                        prompt_batches)
from spjax.data import tfds_builders
from tests.test_data_helpers import chat, llama_tokenizer, write_jsonl, write_parquet

QA = [("What is the capital of France?", "Paris."), ("How many legs does a spider have?", "Eight."),
      ("Tell me a joke.", "Why did the computer go to the doctor? It had a virus."), ("Hi?", "Hello!")]


def _json_array(path, records):
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return str(path)


FORMATS = {
    "prompt_response.jsonl": (write_jsonl, [{"prompt": q, "response": a} for q, a in QA]),
    "messages.jsonl": (write_jsonl, [{"messages": chat(("system", "Be brief."), ("user", q), ("assistant", a))}
                                     for q, a in QA[:2]]
                       + [{"messages": chat(("user", QA[2][0]), ("assistant", "Why?"), ("user", "Tell me."),
                                            ("assistant", QA[2][1]))}]),
    "messages.json": (_json_array, [{"messages": chat(("user", q), ("assistant", a))} for q, a in QA]),
    "ultrachat.parquet": (write_parquet, [{"prompt": q, "prompt_id": str(i),
                                           "messages": chat(("user", q), ("assistant", a))}
                                          for i, (q, a) in enumerate(QA)]),
    "spin.parquet": (write_parquet, [{"real": chat(("user", q), ("assistant", a)),
                                      "generated": chat(("user", q), ("assistant", "I do not know."))} for q, a in QA]),
    "preference.jsonl": (write_jsonl, [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in QA]),
    "preference_chats.parquet": (write_parquet, [{"chosen": chat(("user", q), ("assistant", a)),
                                                  "rejected": chat(("user", q), ("assistant", "No."))} for q, a in QA]),
}


def _check_pair_batch(batch, examples, global_batch):
    for side, attr in (("real", "real_ids"), ("generated", "generated_ids")):
        arrays = batch[side]
        assert all(a.dtype == np.int32 and a.shape[0] == global_batch for a in arrays.values())
        for row, i in enumerate(batch["example_id_B"]):
            ex = examples[i]
            seq = np.concatenate([ex.prompt_ids, getattr(ex, attr)])
            np.testing.assert_array_equal(arrays["input_ids_BxL"][row, :len(seq)], seq)
            assert arrays["target_mask_BxL"][row].sum() == len(getattr(ex, attr))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_round_trips_through_tfds_to_batches(tmp_path, name):
    writer, records = FORMATS[name]
    path = writer(tmp_path / name, records)
    data_dir = str(tmp_path / "tfds")
    cfg = DataConfig(path=path, eval_frac=0.0, max_prompt_len=64, max_len=128)
    splits = load_examples(cfg, data_dir)
    assert splits["train"] == load_file(path) and splits["test"] == []  # same examples, same file:line
    assert glob.glob(os.path.join(data_dir, "spjax_files", "*", "1.0.0", "spjax_files-train.array_record-*"))

    tok = llama_tokenizer()
    data = prepare(cfg, tok, data_dir)
    n = len(records)
    assert [ex.id for ex in data.train] == list(range(n))
    sample = list(prompt_batches(data.train, 2, buckets=data.prompt_buckets, pad_id=pad_token_id(tok)))
    assert sorted(i for b in sample for i in b["example_id_B"].tolist() if i >= 0) == list(range(n))
    train = data.train
    if train[0].generated_ids is None:  # SFT data: the sampler's answers make the pairs
        train, _ = attach_generated(train, {ex.id: ex.real_ids[::-1] for ex in train}, max_len=cfg.max_len)
    batches = list(pair_batches(train, n, seed=0, buckets=data.buckets, pad_id=pad_token_id(tok), epochs=1))
    assert len(batches) == 1
    _check_pair_batch(batches[0][0], train, n)


def test_changed_file_is_prepared_anew(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    cfg, data_dir = DataConfig(path=path, eval_frac=0.0), str(tmp_path / "tfds")
    assert len(load_examples(cfg, data_dir)["train"]) == 4
    assert len(load_examples(cfg, data_dir)["train"]) == 4  # prepared once, read again
    write_jsonl(path, [{"prompt": q, "response": a} for q, a in QA[:2]])
    assert len(load_examples(cfg, data_dir)["train"]) == 2
    assert len(glob.glob(os.path.join(data_dir, "spjax_files", "*"))) == 2


def test_preparing_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
    """A TFDS builder of a dataset not yet prepared made an empty /tmp/tmp*tfds directory (for GCS metadata it
    never fetches) and left it: one a preparation, ~150 a run of this suite."""
    import tempfile
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    assert len(load_examples(DataConfig(path=path, eval_frac=0.0), str(tmp_path / "tfds"))["train"]) == 4
    load_examples(DataConfig(path="synthetic"), str(tmp_path / "tfds"))
    assert os.listdir(system_tmp) == [] and tempfile.gettempdir() == str(system_tmp)


def test_data_prepared_by_other_parsers_is_prepared_anew(tmp_path, monkeypatch):
    """The parsers' code names a prepared dataset too: after an upgrade that parses files otherwise, a
    shared tfds_dir held the old parse, read as it was."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    cfg, data_dir = DataConfig(path=path, eval_frac=0.0), str(tmp_path / "tfds")
    load_examples(cfg, data_dir)
    load_examples(DataConfig(path="synthetic"), data_dir)  # the built-in datasets too
    monkeypatch.setattr(tfds_builders, "_parsers_digest", lambda: "other code")
    load_examples(cfg, data_dir)
    load_examples(DataConfig(path="synthetic"), data_dir)
    assert len(glob.glob(os.path.join(data_dir, "spjax_files", "*"))) == 2
    assert len(glob.glob(os.path.join(data_dir, "synthetic", "*", "1.0.0"))) == 2


def test_a_dataset_another_run_prepared_first_is_read(tmp_path, monkeypatch):
    """Two runs preparing one tfds_dir at once: TFDS's final rename of the second failed on the first's
    (FileExistsError, the run crashed); the dataset there is the same one, so it is read."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    real = tfds_builders.SpjaxFiles.download_and_prepare

    def raced(self, *args, **kwargs):  # the other run's rename lands first
        real(self, *args, **kwargs)
        raise FileExistsError("Cannot rename .../incomplete.X_1.0.0: destination .../1.0.0 already exists")
    monkeypatch.setattr(tfds_builders.SpjaxFiles, "download_and_prepare", raced)
    got = load_examples(DataConfig(path=path, eval_frac=0.0), str(tmp_path / "tfds"))["train"]
    assert sorted(e.prompt_messages[-1]["content"] for e in got) == sorted(q for q, _ in QA)


def test_heldout_split_by_prompt(tmp_path):
    records = [{"prompt": f"question {i % 10}", "response": f"answer {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = DataConfig(path=path, eval_frac=0.2, seed=3)
    splits = load_examples(cfg, str(tmp_path / "tfds"))
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 40 and len(test) == 8  # whole prompt groups of 4
    prompts = lambda exs: {ex.prompt_messages[0]["content"] for ex in exs}
    assert not prompts(train) & prompts(test)
    assert [ex.line for ex in train] == sorted(ex.line for ex in train)  # file order kept
    other = load_examples(DataConfig(path=path, eval_frac=0.2, seed=4), str(tmp_path / "tfds"))["test"]
    assert prompts(other) != prompts(test)
    capped = load_examples(DataConfig(path=path, eval_frac=0.2, seed=3, max_examples=5), str(tmp_path / "tfds"))
    assert capped["train"] == train[:5] and capped["test"] == test


def test_eval_path_and_directory_of_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": q, "response": a} for q, a in QA[:3]])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": q, "response": a} for q, a in QA[3:]])
    data_dir = str(tmp_path / "tfds")
    splits = load_examples(DataConfig(path=train, eval_path=test), data_dir)
    assert splits["train"] == load_file(train) and splits["test"] == load_file(test)
    by_dir = load_examples(DataConfig(path=str(tmp_path)), data_dir)
    assert by_dir == splits


def test_manual_dir_builder(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_jsonl(manual / "train.jsonl", [{"prompt": q, "response": a} for q, a in QA[:3]])
    write_parquet(manual / "eval.parquet", [{"prompt": q, "response": a} for q, a in QA[3:]])
    builder = tfds_builders.SpjaxFiles(config="manual_dir", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    sources = builder.as_data_source()
    assert {k: len(v) for k, v in sources.items()} == {"train": 3, "test": 1}
    assert tfds_builders.decode(sources["test"][0]).response == QA[3][1]


def test_prepared_tfds_dataset_named_in_config(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in QA])
    data_dir = str(tmp_path / "tfds")
    first = load_examples(DataConfig(path=path, eval_frac=0.0), data_dir)
    (prepared,) = glob.glob(os.path.join(data_dir, "spjax_files", "*", "1.0.0"))
    assert load_examples(DataConfig(path=prepared, eval_frac=0.0), data_dir) == first  # by directory
    name = "spjax_files/" + os.path.basename(os.path.dirname(prepared)) + ":1.0.0"
    assert load_examples(DataConfig(path=name, eval_frac=0.0), data_dir) == first  # by name, under data_dir


def test_a_prepared_dataset_with_missing_or_damaged_files_is_one_line(tmp_path):
    """A split's array_record file deleted or cut short, or a damaged dataset_info.json: array_record's
    RuntimeError (or protobuf's ParseError) traceback before; now one ConfigError naming the dataset."""
    import shutil
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    data_dir = str(tmp_path / "tfds")
    load_examples(DataConfig(path=path, eval_frac=0.0), data_dir)
    (prepared,) = glob.glob(os.path.join(data_dir, "spjax_files", "*", "1.0.0"))
    (train_file,) = glob.glob(os.path.join(prepared, "*-train.array_record*"))
    cut, gone, info = (str(tmp_path / n) for n in ("cut", "gone", "info"))
    for d in (cut, gone, info):
        shutil.copytree(prepared, d)
    with open(os.path.join(cut, os.path.basename(train_file)), "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(gone, os.path.basename(train_file)))
    with open(os.path.join(info, "dataset_info.json"), "w") as f:
        f.write('{"name": "spjax')
    for d, said in ((cut, "cannot be read"), (gone, "No such file"), (info, "metadata cannot be read")):
        with pytest.raises(ConfigError, match=said) as e:
            load_examples(DataConfig(path=d, eval_frac=0.0), data_dir)
        assert "\n" not in str(e.value)
    os.remove(train_file)  # spjax's own prepared copy, damaged: the same line, saying how to prepare it again
    with pytest.raises(ConfigError, match="prepares its own anew once that directory is removed"):
        load_examples(DataConfig(path=path, eval_frac=0.0), data_dir)


class SpjaxTestForeign(tfds_builders.SpjaxBuilder):
    """Someone else's prepared dataset with its own schema: read through the record parser."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text(),
            "score": np.float32}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples([{"prompt": q, "chosen": a, "rejected": "", "score": 1.0}
                                                  if i == 1 else {"prompt": q, "chosen": a, "rejected": "No.",
                                                                  "score": 1.0} for i, (q, a) in enumerate(QA)])}

    def _generate_examples(self, rows):
        for i, row in enumerate(rows):
            yield i, row


def test_foreign_schema_is_validated(tmp_path):
    builder = SpjaxTestForeign(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    with pytest.raises(DataError, match=f"{builder.data_dir}/train:2: rejected: empty"):
        load_examples(DataConfig(path=builder.data_dir), str(tmp_path))


def test_chatterbot_by_name(tmp_path):
    splits = load_examples(DataConfig(path="chatterbot"), str(tmp_path))
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) > 2300 and 0.03 < len(test) / (len(train) + len(test)) < 0.12
    key = lambda ex: ex.prompt_messages[0]["content"].strip().lower()
    assert not {key(ex) for ex in train} & {key(ex) for ex in test}
    first = train[0]
    assert (first.prompt_messages, first.file) == (chat(("user", "What is AI?")), "ai.yml")
    assert first.response.startswith("Artificial Intelligence is the branch of engineering")
    again = load_examples(DataConfig(path="chatterbot"), str(tmp_path))
    assert again == splits


def test_bad_file_is_refused_before_anything_is_written(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "r"}, {"prompt": "q", "response": ""},
                                                {"messages": "oops"}])
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError) as err:
        prepare(DataConfig(path=path), llama_tokenizer(), str(data_dir))
    assert str(err.value).splitlines() == [f"{path}:2: response: empty", f"{path}:3: record: format prompt_response "
                                           "(from line 1) expects prompt and response; this record looks like messages"]
    assert not glob.glob(str(data_dir / "**" / "dataset_info.json"), recursive=True)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path: 'no_such_dataset_xyz' is not a file"):
        load_examples(DataConfig(path="no_such_dataset_xyz"), str(tmp_path))
    with pytest.raises(ConfigError, match="data.path: TFDS dataset 'mnist' is not prepared under"):
        load_examples(DataConfig(path="mnist"), str(tmp_path))
    with pytest.raises(ConfigError, match="data.overlong"):
        load_examples(DataConfig(path="chatterbot", overlong="wrap"), str(tmp_path))
    with pytest.raises(ConfigError, match="data.max_prompt_len"):
        load_examples(DataConfig(path="chatterbot", max_prompt_len=1024, max_len=1024), str(tmp_path))


def test_no_tensorflow_import(tmp_path):
    """tfds must not even try to import TensorFlow on this path (it is not installed, nor needed).

    etils asks importlib.util.find_spec whether TensorFlow is installed: a probe, not an import.
    """
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    code = f"""
import sys
tried = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            f, probe = sys._getframe(1), False
            while f is not None:
                probe |= f.f_code.co_name == "find_spec" and "importlib.util" in f.f_code.co_filename
                f = f.f_back
            if not probe:
                tried.append(name)
        return None
sys.meta_path.insert(0, Watch())
from spjax.config import DataConfig
from spjax.data import load_examples
splits = load_examples(DataConfig(path={path!r}, eval_frac=0.25), {str(tmp_path / "tfds")!r})
print(len(splits["train"]), len(splits["test"]), tried)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "3 1 []"


def test_model_and_sampler_import_without_tensorflow_datasets():
    """Machines that only sample or bench (the lent GPU hosts) may lack tensorflow-datasets: spjax.config
    reads the record formats, and spjax.data loads its TFDS pipeline on first use only. Asking for the
    pipeline then says what is missing."""
    code = """
import sys
sys.modules["tensorflow_datasets"] = None  # as on a machine without it
import spjax.sampler, spjax.train, bench.sampler, bench.train_step
from spjax.config import DataConfig
print(DataConfig().path)
try:
    from spjax.data import prepare
except ImportError as e:
    print("pipeline:", e)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert "pipeline: import of tensorflow_datasets halted" in out.stdout


def test_directory_splits_by_file_name(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": q, "response": a} for q, a in QA]
    names = ["train_a.jsonl", "train_b.jsonl", "val.jsonl", "dev.jsonl", "validation.jsonl", "notes.jsonl"]
    for name, row in zip(names, rows + rows[:2]):
        write_jsonl(data / name, [row])
    train, test, ignored = tfds_builders.scan_dir(data)
    assert [os.path.basename(f) for f in train + test + ignored] == [
        "train_a.jsonl", "train_b.jsonl", "dev.jsonl", "val.jsonl", "validation.jsonl", "notes.jsonl"]
    assert (len(train), len(test)) == (2, 3)
    with caplog.at_level("WARNING"):
        splits = load_examples(DataConfig(path=str(data)), str(tmp_path / "tfds"))
    assert [os.path.basename(ex.file) for ex in splits["train"]] == ["train_a.jsonl", "train_b.jsonl"]
    assert [os.path.basename(ex.file) for ex in splits["test"]] == ["dev.jsonl", "val.jsonl", "validation.jsonl"]
    said = [r.getMessage() for r in caplog.records if "notes.jsonl" in r.getMessage()]
    assert said == [f"{data}: ignoring 1 data file(s) named neither train* nor test*/eval*/val*/dev*/heldout*: "
                    "notes.jsonl"]
    # The same files split differently are a different prepared dataset, never a stale one.
    files = [str(data / "train_a.jsonl"), str(data / "val.jsonl")]
    assert tfds_builders.files_config(files).name != tfds_builders.files_config(files[:1], files[1:]).name
    for name in names[:5]:
        os.remove(data / name)
    with pytest.raises(ConfigError, match=r"data.path: directory .* has no train\* data files"):
        load_examples(DataConfig(path=str(data)), str(tmp_path / "tfds"))


def test_missing_eval_path_is_a_config_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    data_dir = tmp_path / "tfds"
    missing = str(tmp_path / "nonexist.jsonl")
    for path in (train, str(tmp_path)):  # next to a file, and next to a directory
        with pytest.raises(ConfigError) as err:
            load_examples(DataConfig(path=path, eval_path=missing), str(data_dir))
        assert str(err.value) == f"data.eval_path: {missing!r}: no such file or directory"
    assert not data_dir.exists()  # said before anything is prepared
    with pytest.raises(ConfigError) as err:
        load_examples(DataConfig(path=str(tmp_path), eval_path="no_such_set_xyz"), str(data_dir))
    assert str(err.value).startswith("data.eval_path: 'no_such_set_xyz' is not a file, a directory or a known TFDS")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.path: '.*nope.jsonl': no such file or directory"):
        load_examples(DataConfig(path=str(tmp_path / "nope.jsonl")), str(data_dir))


def test_eval_path_next_to_a_directory_keeps_all_train_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train = write_jsonl(data / "train.jsonl", [{"prompt": q, "response": a} for q, a in QA[:3]])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": q, "response": a} for q, a in QA[3:]])
    splits = load_examples(DataConfig(path=str(data), eval_path=held, eval_frac=0.3), str(tmp_path / "tfds"))
    assert splits["train"] == load_file(train) and splits["test"] == load_file(held)
