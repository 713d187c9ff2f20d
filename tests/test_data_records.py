"""Record parsing: every input format to the canonical Example, and every bad input named file:line: field."""
import json

import pytest

from spjax.data import DataError, Example, load_file, parse_file, tokenize_examples
from tests.test_data_helpers import chat, llama_tokenizer, write_jsonl, write_parquet


GOOD = json.dumps({"prompt": "q", "response": "r"})


def _one(path, fmt="auto"):
    examples = load_file(path, fmt)
    assert len(examples) == 1
    return examples[0]


def test_prompt_response_with_system(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "response": "Hello.", "system": "Be kind.", "id": 7}])
    ex = _one(path)
    assert ex == Example(chat(("system", "Be kind."), ("user", "Hi?")), "Hello.", None, None, path, 1)


def test_messages_last_assistant_turn_is_the_response(tmp_path):
    msgs = chat(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    ex = _one(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]))
    assert ex.prompt_messages == msgs[:-1] and ex.response == "d"


def test_sharegpt_and_alpaca_layouts(tmp_path):
    """FastChat's ShareGPT ({from, value} turns: OpenHermes, SlimOrca) and Alpaca (instruction, input,
    output) records: 'cannot tell the format' before."""
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                               {"from": "gpt", "value": "d"}], "id": "x1"}
    ex = _one(write_jsonl(tmp_path / "s.jsonl", [share]))
    assert ex.prompt_messages == chat(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"))
    assert ex.response == "d"
    top = {"system": "T", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}
    assert _one(write_parquet(tmp_path / "s.parquet", [top])).prompt_messages == chat(("system", "T"), ("user", "a"))
    roles = {"conversations": chat(("user", "a"), ("assistant", "b"))}  # role/content turns under this key
    assert _one(write_jsonl(tmp_path / "r.jsonl", [roles])).prompt_messages == chat(("user", "a"))
    alpaca = [{"instruction": "Add them.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi.", "input": "",
                                                                              "output": "Hello."}]
    a, b = load_file(write_jsonl(tmp_path / "a.jsonl", alpaca))
    assert (a.prompt_messages, a.response) == (chat(("user", "Add them.\n\n2 and 3")), "5")
    assert (b.prompt_messages, b.response) == (chat(("user", "Hi.")), "Hello.")


def test_sharegpt_and_alpaca_problems_name_their_fields(tmp_path):
    bad = [{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "f()"}]},
           {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": " "}]},
           {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]},
           {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
           {"conversations": "a chat"},
           {"conversations": [{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}]},  # a TypeError before
           {"conversations": [{"from": "human", "text": "a"}, {"from": "gpt", "value": "b"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", bad)
    got = _problems(path)
    for line, what in [(1, "conversations[1].from: unknown speaker 'function_call' (expected one of human, user, "
                           "gpt, assistant, system)"),
                       (2, "conversations[1].value: empty"), (3, "conversations[1].value: missing"),
                       (4, "conversations: no gpt turn"), (5, "conversations: expected a list of {from, value} "
                                                             "turns, got str"),
                       (6, "conversations[0].from: expected a string, got a list"),
                       (7, "conversations[0].value: missing (unknown key 'text')")]:
        assert f"{path}:{line}: {what}" in got, got
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": ""}, {"instruction": 3, "output": "y"},
                                              {"instruction": "x", "input": 4, "output": "y"}])
    got = _problems(path)
    for line, what in [(1, "output: empty"), (2, "instruction: expected a string, got int"),
                       (3, "input: expected a string, got int")]:
        assert f"{path}:{line}: {what}" in got, got


def test_json_array_lines_are_located(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n\n  {"prompt": "c", "response": "d"}\n]\n')
    examples = load_file(str(path))
    assert [(ex.line, ex.response) for ex in examples] == [(2, "b"), (4, "d")]


def test_byte_order_mark_and_broken_array(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert load_file(str(bom))[0].response == "r"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a", "response": "b"}\n  {"prompt": "c", "response": "d"}\n]')
    assert f"{broken}:3: record: invalid JSON: expected ',' or ']' after an array element" in _problems(broken)
    # two arrays appended, or JSON Lines of one-element lists: everything after the first ']' was dropped, silently
    for name, text in [("two.json", '[{"prompt": "a", "response": "b"}]\n\n[{"prompt": "c", "response": "d"}]\n'),
                       ("lists.jsonl", '[{"prompt": "a", "response": "b"}]\n[{"prompt": "c", "response": "d"}]\n')]:
        path = tmp_path / name
        path.write_text(text)
        line = 3 if name == "two.json" else 2
        assert f"{path}:{line}: record: content after the JSON array's closing ']'" in _problems(path)


def test_ultrachat_and_spin_layouts(tmp_path):
    msgs = chat(("user", "q"), ("assistant", "r"))
    ultra = _one(write_parquet(tmp_path / "u.parquet", [{"prompt": "q", "prompt_id": "x", "messages": msgs}]))
    assert ultra.prompt_messages == msgs[:1] and ultra.response == "r" and ultra.generated is None
    generated = chat(("user", "q"), ("assistant", "g"))
    spin = _one(write_parquet(tmp_path / "s.parquet", [{"real": msgs, "generated": generated}]))
    assert (spin.prompt_messages, spin.response, spin.generated) == (msgs[:1], "r", "g")
    assert spin.line == 1  # Parquet rows count from 1


def test_preference_strings_and_chats(tmp_path):
    flat = _one(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}]))
    assert (flat.prompt_messages, flat.response, flat.rejected) == (chat(("user", "q")), "good", "bad")
    nested = _one(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "q",
                                                     "chosen": chat(("user", "q"), ("assistant", "good")),
                                                     "rejected": chat(("user", "q"), ("assistant", "bad"))}]))
    assert nested == Example(chat(("user", "q")), "good", "bad", None, nested.file, 1)


def test_format_is_detected_per_file_and_can_be_forced(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "r"}])
    assert parse_file(path)[2] == "prompt_response"
    _, problems, _ = parse_file(path, "preference")
    assert [str(p) for p in problems] == [f"{path}:1: chosen: missing", f"{path}:1: rejected: missing"]


# ----------------------------------------------------------------------------- bad input


def _problems(path, fmt="auto"):
    with pytest.raises(DataError) as err:
        load_file(str(path), fmt)
    return str(err.value)


@pytest.mark.parametrize("line,field,what", [
    ('{"prompt": "q", "response": }', "record", "invalid JSON"),
    ('{"prompt": "q"}', "response", "missing"),
    ('{"prompt": 5, "response": "r"}', "prompt", "expected a string, got int"),
    ('{"prompt": "q", "response": ["r"]}', "response", "expected a string, got a list"),
    ('{"prompt": "q", "response": "  \\n "}', "response", "empty"),
    ('["q", "r"]', "record", "expected a JSON object, got a list"),
])
def test_bad_jsonl_record_names_file_line_field(tmp_path, line, field, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    assert f"{path}:2: {field}: {what}" in _problems(path)


@pytest.mark.parametrize("msgs,field,what", [
    (chat(("user", "q"), ("bot", "r")), "messages[1].role", "unknown role 'bot'"),
    (chat(("system", "s"), ("user", "q")), "messages", "no assistant turn"),
    (chat(("user", "q"), ("assistant", "r"), ("user", "more?")), "messages[2]",
     "a user turn after the last assistant turn"),
    (chat(("user", "q"), ("system", "s"), ("assistant", "r")), "messages[1].role", "a system turn may only come first"),
    (chat(("user", "q"), ("assistant", "")), "messages[1].content", "empty"),
    ([{"role": "user"}, {"role": "assistant", "content": "r"}], "messages[0].content", "missing"),
    (chat(("system", "s"), ("assistant", "r")), "prompt", "no user turn before the response"),
    ("hello", "messages", "expected a list of {role, content} turns, got str"),
])
def test_bad_chat_names_file_line_field(tmp_path, msgs, field, what):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat(("user", "q"), ("assistant", "r"))},
                                                 {"messages": msgs}])
    assert f"{path}:2: {field}: {what}" in _problems(path)


def test_non_utf8_bytes_name_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "caf\xe9", "response": "r"}'.encode("latin-1") + b"\n")
    assert f"{path}:2: record: not valid UTF-8: byte 0xe9 at column 16" in _problems(path)


def test_non_utf8_in_json_array(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"prompt": "q", "response": "r"},\n{"prompt": "\xff", "response": "r"}\n]')
    assert f"{path}:3: record: not valid UTF-8: byte 0xff at column 13" in _problems(path)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", "[ ]")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert f"{path}:1: record: empty file: no records" in _problems(path)


def test_empty_parquet_and_binary_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), str(empty))
    assert f"{empty}:1: record: empty file" in _problems(empty)
    binary = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"prompt": ["q", "q"], "response": pa.array([b"ok", b"\xfe"], pa.binary())}), str(binary))
    assert f"{binary}:2: response: not valid UTF-8" in _problems(binary)


def test_parquet_non_string_column_names_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"prompt": "q", "response": "r"}, {"prompt": "q", "response": None},
                                                  {"prompt": "q", "response": "r"}])
    assert f"{path}:2: response: missing" in _problems(path)
    path = write_parquet(tmp_path / "n.parquet", [{"prompt": 1, "response": "r"}])
    assert f"{path}:1: prompt: expected a string, got int" in _problems(path)


def test_all_problems_are_collected(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [GOOD, "{", '{"prompt": ""}', GOOD, '{"prompt": "q", "response": 3}'])
    examples, problems, _ = parse_file(path)
    assert len(examples) == 2
    assert [str(p) for p in problems] == [
        f"{path}:2: record: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{path}:3: prompt: empty", f"{path}:3: response: missing",
        f"{path}:5: response: expected a string, got int"]


def test_spin_generated_prompt_must_match_real(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"real": chat(("user", "q"), ("assistant", "r")),
                                               "generated": chat(("user", "other"), ("assistant", "g"))}])
    assert f"{path}:1: generated: its prompt turns differ" in _problems(path)


def test_unknown_fields_or_file_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    assert f"{path}:1: record: cannot tell the format from fields ['answer', 'question']" in _problems(path)
    other = tmp_path / "d.csv"
    other.write_text("prompt,response\nq,r\n")
    assert f"{other}:1: file: unknown file type '.csv'" in _problems(other)
    assert f"{tmp_path / 'nope.jsonl'}:1: file: no such file" in _problems(tmp_path / "nope.jsonl")


def test_tokenizer_without_chat_template_when_one_is_needed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "r"},
                                              {"prompt": "q", "response": "r", "system": "Be brief."}])
    examples = load_file(path) + load_file(write_jsonl(tmp_path / "m.jsonl", [
        {"messages": chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))}]))
    plain = llama_tokenizer(chat_template=False)
    with pytest.raises(DataError) as err:
        tokenize_examples(plain, examples, max_prompt_len=64, max_len=128)
    lines = str(err.value).splitlines()
    what = "prompt: a system prompt or several turns need a chat template, and the tokenizer has none"
    assert lines == [f"{path}:2: {what}", f"{tmp_path / 'm.jsonl'}:1: {what}"]


def test_response_holding_the_eos_text_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "done</s> and more"}])
    with pytest.raises(DataError, match=f"{path}:1: response: contains the end-of-turn token text '</s>'"):
        tokenize_examples(llama_tokenizer(), load_file(path), max_prompt_len=64, max_len=128)


@pytest.mark.parametrize("record,field", [
    ('{"prompt": "bad \\ud83c here", "response": "x"}', "prompt"),
    ('{"prompt": "q", "response": "x \\udfff"}', "response"),
    ('{"prompt": "q", "system": "\\ud800", "response": "x"}', "system"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udc00!"}]}',
     "messages[1].content"),
])
def test_lone_surrogate_is_a_field_problem(tmp_path, record, field):
    # JSON may escape half a UTF-16 pair; Python keeps it, but no UTF-8 encoder or tokenizer can.
    path = write_jsonl(tmp_path / "s.jsonl", [record])
    problems = _problems(path)
    assert problems.startswith(f"{path}:1: {field}: lone surrogate '\\u")
    assert "(half of a UTF-16 pair)" in problems and len(problems.splitlines()) == 1


def test_surrogate_pair_is_fine(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"prompt": "smile \\ud83d\\ude00", "response": "x"}'])
    assert _one(path).prompt_messages[0]["content"] == "smile \U0001F600"


def test_record_in_another_format_than_line_1_says_so(tmp_path):
    msgs = {"messages": chat(("user", "q"), ("assistant", "r"))}
    path = write_jsonl(tmp_path / "mixed.jsonl", ["", json.dumps({"prompt": "q", "response": "r"}), msgs,
                                                  {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}])
    _, problems, used = parse_file(path)
    assert used == "prompt_response"
    assert [str(p) for p in problems] == [
        f"{path}:3: record: format prompt_response (from line 2) expects prompt and response; "
        "this record looks like messages",
        f"{path}:4: record: format prompt_response (from line 2) expects prompt and response; "
        "this record looks like preference",
        f"{path}:5: response: missing"]  # no other format's fields: a prompt_response record missing one
    # A record carrying its file's key fields keeps its own problems, even if it looks like another format.
    ultra = write_jsonl(tmp_path / "ultra.jsonl", [{"prompt": "q", "messages": msgs["messages"]},
                                                   {"messages": chat(("user", "q"), ("bot", "r"))},
                                                   {"messages": chat(("user", "q"), ("assistant", "r"))}])
    examples, problems, used = parse_file(ultra)
    assert used == "spin" and len(examples) == 2
    assert [str(p) for p in problems] == [f"{ultra}:2: messages[1].role: unknown role 'bot' "
                                          "(expected one of system, user, assistant)"]


def test_a_chat_answers_prompt_that_differs_says_where(tmp_path):
    """Before: 'its prompt turns differ from the prompt given elsewhere in the record', not which turn."""
    sys_chat = chat(("system", "Be kind."), ("user", "q"), ("assistant", "good"))
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": sys_chat, "rejected": "bad"},
        {"prompt": "q", "chosen": chat(("user", "Q"), ("assistant", "good")), "rejected": "bad"}])
    got = _problems(path, "preference")
    assert (f"{path}:1: chosen: its prompt turns differ from the prompt given elsewhere in the record: turn 0 is "
            "system: 'Be kind.' here, user: 'q' there") in got, got
    assert f"{path}:2: chosen: its prompt turns differ" in got and "turn 0 is user: 'Q' here, user: 'q' there" in got
