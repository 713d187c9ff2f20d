"""`python -m spjax.data validate`: a summary for a good file, every problem (and exit 1) for a bad one."""
import os
import subprocess
import sys

import pytest

from spjax.data.__main__ import main
from tests.test_data_helpers import chat, llama_tokenizer, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    llama_tokenizer().save_pretrained(str(path))
    return str(path)


def _good(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London, a city in England."},
        {"prompt": "Hi?", "system": "Be brief.", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": chat(("user", "Tell me a joke."), ("assistant", "Why did the computer go to the doctor?"),
                        ("user", "Why?")), "chosen": "It had a virus.", "rejected": "No idea."},
    ])


def test_summary_with_tokenizer(tmp_path, tokenizer_dir, capsys):
    path = _good(tmp_path)
    assert main(["validate", path, "--tokenizer", tokenizer_dir, "--max-prompt-len", "24", "--max-len", "32"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 3 records, format preference" in out
    assert "system prompts 1, multi-turn prompts 1, with rejected 3, with generated 0" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("tokens"))
    assert header.split() == ["tokens", "p50", "p90", "p99", "max"]
    assert {line.split()[0] for line in lines[lines.index(header) + 1:lines.index(header) + 5]} == {
        "prompt", "response", "rejected", "total"}
    truncate = next(line for line in lines if "overlong=truncate" in line)
    drop = next(line for line in lines if "overlong=drop" in line)
    assert "(max_prompt_len=24, max_len=32): 3 examples" in truncate
    # The numbers are the length policy's own counts on these token lengths.
    from spjax.data import load_file, tokenize_examples
    for overlong, line in (("truncate", truncate), ("drop", drop)):
        _, report = tokenize_examples(llama_tokenizer(), load_file(path), max_prompt_len=24, max_len=32,
                                      overlong=overlong)
        assert line.endswith(str(report)) and (report.kept < 3 or report.prompts_truncated > 0)
        assert report.prompts_by_turns == (overlong == "truncate")  # the multi-turn prompt lost its first turns


def test_summary_without_tokenizer(tmp_path, capsys):
    assert main(["validate", _good(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chars" in out and "pass --tokenizer" in out


def test_every_problem_is_listed(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": chat(("user", "q"), ("assistant", "r"))},
        "{not json",
        {"messages": chat(("user", "q"), ("robot", "r"))},
        {"messages": chat(("system", "s"), ("user", "q"))},
        {"messages": chat(("user", "q"), ("assistant", "stop</s>"))},
    ])
    assert main(["validate", path, "--tokenizer", tokenizer_dir]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:2: record: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{path}:3: messages[1].role: unknown role 'robot' (expected one of system, user, assistant)",
        f"{path}:4: messages: no assistant turn (the last assistant turn is the response)",
        f"{path}:5: response: contains the end-of-turn token text '</s>'",
        f"4 problems in {path}",
    ]


def test_module_entry_point(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": ""}])
    out = subprocess.run([sys.executable, "-m", "spjax.data", "validate", path], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert out.stdout.splitlines()[0] == f"{path}:1: response: empty"


def test_lone_surrogate_with_tokenizer(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"prompt": "bad \\ud83c here", "response": "x"}'])
    assert main(["validate", path, "--tokenizer", "bytes"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:1: prompt: lone surrogate '\\ud83c' at character 5 (half of a UTF-16 pair)", f"1 problem in {path}"]


def test_tokenizer_that_cannot_load_is_one_line(tmp_path, capsys):
    path = _good(tmp_path)
    missing = str(tmp_path / "no_such_tokenizer")
    assert main(["validate", path, "--tokenizer", missing]) == 2
    assert capsys.readouterr().err.splitlines() == [f"spjax data: --tokenizer: {missing}: file not found"]
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{oops")
    assert main(["validate", path, "--tokenizer", str(broken)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"spjax data: --tokenizer: {broken}: ")


def test_directory_is_checked_file_by_file(tmp_path, capsys):
    os.replace(_good(tmp_path), tmp_path / "train.jsonl")
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": "q", "response": ""}])
    write_jsonl(tmp_path / "notes.jsonl", [{"prompt": "q", "response": ""}])  # not read by a run: not checked
    assert main(["validate", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        f"{tmp_path}: ignoring 1 data file(s) named neither train* nor test*/eval*/val*/dev*/heldout*: notes.jsonl",
        f"{tmp_path}: train train.jsonl; held out val.jsonl"]
    assert f"{tmp_path / 'train.jsonl'}: 3 records, format preference" in lines
    assert lines[-2:] == [f"{tmp_path / 'val.jsonl'}:1: response: empty", f"1 problem in {tmp_path / 'val.jsonl'}"]
    (tmp_path / "train.jsonl").unlink()
    assert main(["validate", str(tmp_path)]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"{tmp_path}: no train* data files (.jsonl, .json, .parquet)"  # no line: not a line's problem


def test_missing_file_is_not_a_problem_at_line_1(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    assert main(["validate", missing]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{missing}: file not found"]  # before: "nope.jsonl:1: file: ..."


def test_missing_field_names_unknown_keys_and_null(tmp_path, capsys):
    """A typo'd key and a null both said "response: missing" before."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "q", "response": "r"},
        {"prompt": "q", "respons": "r"},
        {"prompt": "q", "response": None},
        {"prompt": "q", "answer": "r", "id": 7},
        {"prompt": "q"},
    ])
    chat_path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"rol": "user", "content": "q"}, {"role": "assistant", "text": "r"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": None, "content": None}]},
    ])
    assert main(["validate", path]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:2: response: missing (unknown key 'respons')",
        f"{path}:3: response: missing (null)",
        f"{path}:4: response: missing (unknown keys 'answer', 'id')",
        f"{path}:5: response: missing",
        f"4 problems in {path}"]
    assert main(["validate", chat_path]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{chat_path}:1: messages[0].role: missing (unknown key 'rol')",
        f"{chat_path}:1: messages[1].content: missing (unknown key 'text')",
        f"{chat_path}:2: messages[1].role: missing (null)",
        f"{chat_path}:2: messages[1].content: missing (null)",
        f"4 problems in {chat_path}"]


def test_system_prompt_counts_tokens_as_the_run_does(tmp_path, capsys):
    """--system-prompt is data.system_prompt: the run's token counts (before: no way to match them)."""
    from spjax.data import load_file, tokenize_examples
    from spjax.data.__main__ import _table
    from spjax.data.pipeline import with_system_prompt
    from spjax.hf import load_tokenizer

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2 + 2?", "response": "4."},
                                              {"prompt": "Hi?", "system": "Be brief.", "response": "Hello!"},
                                              {"prompt": "Name a colour.", "response": "Blue."}])
    system = "You are a careful assistant who answers in one short sentence."
    assert main(["validate", path, "--tokenizer", "bytes", "--system-prompt", system]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  system prompts 1 (+2 from --system-prompt), multi-turn prompts 0, with rejected 0, " \
           "with generated 0" in out
    tok = load_tokenizer("bytes")
    run, _ = tokenize_examples(tok, with_system_prompt(load_file(path), system), max_prompt_len=512, max_len=1024)
    plain, _ = tokenize_examples(tok, load_file(path), max_prompt_len=512, max_len=1024)
    want, without = (_table({"prompt": [len(e.prompt_ids) for e in x]}, "tokens")[1] for x in (run, plain))
    assert want in out and want != without
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "--system-prompt TEXT" in capsys.readouterr().out


def test_template_date_counts_tokens_as_the_run_does(tmp_path, capsys):
    """--template-date is data.template_date: a template that prints today's date counts the run's tokens."""
    from spjax.data import load_file, tokenize_examples
    from spjax.data.__main__ import _table, validate
    from spjax.hf import load_tokenizer

    tok = load_tokenizer("bytes")
    tok.chat_template = ("<|im_start|>system\nToday: {{ strftime_now('%d %B %Y') }}<|im_end|>\n{% for m in messages %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2 + 2?", "response": "4."}])
    rows = {}
    for today in ("2024-05-26", "2024-09-26"):  # May and September: 4 characters apart
        assert validate(path, tokenizer=tok, today=today) == 0
        out = capsys.readouterr().out.splitlines()
        run, _ = tokenize_examples(tok, load_file(path), max_prompt_len=512, max_len=1024, today=today)
        rows[today] = _table({"prompt": [len(e.prompt_ids) for e in run]}, "tokens")[1]
        assert rows[today] in out
    assert rows["2024-05-26"] != rows["2024-09-26"]
    with pytest.raises(SystemExit):
        main(["validate", path, "--max-len", "0"])  # named its flag, not data.max_prompt_len
    assert "--max-len: must be >= 2, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate", path, "--template-date", "2024-02-30"])
    assert "--template-date: '2024-02-30' is not a date as YYYY-MM-DD" in capsys.readouterr().err


def test_template_args_count_tokens_as_the_run_does(tmp_path, capsys):
    """--template-arg is data.template_args: Qwen3's enable_thinking=false moves the empty think block from the
    responses into the prompts (19 bytes)."""
    from spjax.hf import load_tokenizer
    from tests.test_data_tokens import THINKING
    tok = load_tokenizer("bytes")
    tok.chat_template = THINKING
    tok.save_pretrained(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2 + 2?", "response": "4."}])
    rows = []
    for extra in ([], ["--template-arg", "enable_thinking=false"]):
        assert main(["validate", path, "--tokenizer", str(tmp_path / "tok"), *extra]) == 0
        out = capsys.readouterr().out.splitlines()
        rows.append([int(line.split()[-1]) for line in out if line.split()[:1] in (["prompt"], ["response"])])
    assert rows[1] == [rows[0][0] + 19, rows[0][1] - 19]
    with pytest.raises(SystemExit):
        main(["validate", path, "--template-arg", "enable_thinking"])
    assert "--template-arg: 'enable_thinking' is not NAME=VALUE" in capsys.readouterr().err


def test_ctrl_c_is_a_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a large file is tokenized printed a KeyboardInterrupt traceback through the threads."""
    from spjax.data import __main__ as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "validate", interrupted)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q?", "response": "a."}])
    assert cli.main(["validate", path, "--tokenizer", "bytes"]) == 130
    assert capsys.readouterr().err.strip() == "spjax data: interrupted"


def test_config_gives_the_runs_settings(tmp_path, capsys):
    """--config CFG: its data.path, lengths, system prompt and tokenizer (before: the defaults 512/1024, no
    system prompt, no tokenizer, whatever the run used), the flags given still winning."""
    path = _good(tmp_path)
    system = "You are a careful assistant."
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from spjax.config import load_config\n"
                   f"def get_config():\n    return load_config({os.path.join(ROOT, 'configs', 'tiny.py')!r}, "
                   f"['data.path={path}', 'data.max_prompt_len=24', 'data.max_len=32', "
                   f"'data.system_prompt={system}'])\n")
    assert main(["validate", "--config", str(cfg)]) == 0
    got = capsys.readouterr().out
    assert main(["validate", path, "--tokenizer", "bytes", "--max-prompt-len", "24", "--max-len", "32",
                 "--system-prompt", system]) == 0
    assert got == capsys.readouterr().out and "(max_prompt_len=24, max_len=32)" in got
    assert main(["validate", "--config", str(cfg), "--max-len", "64"]) == 0
    assert "(max_prompt_len=24, max_len=64)" in capsys.readouterr().out
    assert main(["validate", "--config", os.path.join(ROOT, "configs", "tiny.py")]) == 2  # data.path=synthetic
    assert capsys.readouterr().err.startswith("spjax data: 'synthetic' (")


def test_config_with_its_held_out_file_inside_its_data_directory_checks_it_once(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        write_jsonl(data / name, [{"prompt": "What is 2 + 2?", "response": "4."}])
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from spjax.config import load_config\n"
                   f"def get_config():\n    return load_config({os.path.join(ROOT, 'configs', 'tiny.py')!r}, "
                   f"['data.path={data}', 'data.eval_path={data / 'test.jsonl'}'])\n")
    assert main(["validate", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{data / 'test.jsonl'}: 1 records") == 1 and f"{data / 'train.jsonl'}: 1 records" in out
