"""The sampler's prompt tokens are exactly the loss's prompt prefix: ChatML (SmolLM2) and Llama-2 style."""
import re

import numpy as np
import pytest

from spjax.config import DataConfig
from spjax.data import (DataError, attach_generated, load_file, pad_token_id, pair_batches, prepare, prompt_batches,
                        prompt_ids, response_ids, tokenize_examples)
from spjax.hf import load_tokenizer
from tests.test_data_helpers import chat, llama_tokenizer, smollm2_gguf, write_jsonl

PROMPTS = [
    chat(("system", "You are terse."), ("user", "What is the capital of France?")),
    chat(("user", "How many legs does a spider have?")),
    chat(("system", "Be kind."), ("user", "Tell me a joke."), ("assistant", "Why did the computer go to the doctor?"),
         ("user", "Why?")),
]
CHOSEN = ["Paris.", "  Eight legs. ", "It had a virus."]
REJECTED = ["London.", "Six.", "No idea."]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_gguf())  # ~10 s: once for the module


@pytest.fixture(params=["chatml", "llama2"])
def tok(request, smollm2):
    return smollm2 if request.param == "chatml" else llama_tokenizer()


def _pairs(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                  for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)])
    examples, report = tokenize_examples(tok, load_file(path), max_prompt_len=128, max_len=192)
    assert report.kept == 3 and report.prompts_truncated == report.responses_truncated == 0
    return examples


def test_sampling_prompt_is_the_loss_prefix(tok, tmp_path):
    examples = _pairs(tok, tmp_path)
    pad = pad_token_id(tok)
    sample = next(prompt_batches(examples, 4, buckets=(64, 128), pad_id=pad, pad_side="left"))
    loss, _ = next(pair_batches(examples, 3, seed=0, buckets=(128, 192), pad_id=pad))
    hf_ids = {i: tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"]
              for i, p in enumerate(PROMPTS)}
    for row, i in enumerate(sample["example_id_B"]):
        if i < 0:
            continue
        sampled = sample["prompt_ids_BxP"][row][sample["prompt_mask_BxP"][row] == 1]
        assert sampled.tolist() == prompt_ids(tok, PROMPTS[i]).tolist() == list(hf_ids[i])
        lrow = loss["example_id_B"].tolist().index(i)
        for side, response in (("real", CHOSEN[i]), ("generated", REJECTED[i])):
            ids = loss[side]["input_ids_BxL"][lrow]
            target = loss[side]["target_mask_BxL"][lrow]
            start, n = int(np.argmax(target)), int(loss[side]["attention_mask_BxL"][lrow].sum())
            assert ids[:start].tolist() == sampled.tolist()  # the identity this module is for
            # BOS as the template writes it, once; EOS once, ending the response where the sampler stops.
            assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
            assert ids[n - 1] == tok.eos_token_id and (ids[start:n] == tok.eos_token_id).sum() == 1
            assert target[start:n].all() and not target[n:].any()
            # Text identity with the template's rendering of the whole chat (up to the turn's trailing newline).
            rendered = tok.apply_chat_template(PROMPTS[i] + chat(("assistant", response)), tokenize=False)
            decoded = tok.decode(ids[:n].tolist(), skip_special_tokens=False)
            assert rendered.startswith(decoded) and rendered[len(decoded):].strip() == ""


def test_system_prompt_is_in_both(tok, tmp_path):
    examples = _pairs(tok, tmp_path)
    text = tok.decode(examples[0].prompt_ids.tolist())
    assert "You are terse." in text and "What is the capital of France?" in text


def test_truncated_prompt_is_still_shared(smollm2, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "response": "ok"}])
    examples, report = tokenize_examples(smollm2, load_file(path), max_prompt_len=32, max_len=48)
    assert report.prompts_truncated == 1
    ex = examples[0]
    assert len(ex.prompt_ids) == 32 and ex.prompt_ids[0] == smollm2.bos_token_id
    batch = next(prompt_batches(examples, 1, buckets=(32,), pad_id=0))
    assert batch["prompt_ids_BxP"][0].tolist() == ex.prompt_ids.tolist()
    loss, _ = next(pair_batches(attach_generated(examples, {0: [5, 6, 2]}, max_len=48)[0], 1, seed=0,
                                buckets=(48,), pad_id=0))
    assert loss["generated"]["input_ids_BxL"][0, :32].tolist() == ex.prompt_ids.tolist()


def test_long_chat_loses_whole_oldest_turns_first(tok, tmp_path):
    """A multi-turn prompt over max_prompt_len drops its oldest turns whole, keeping the system prompt;
    the responses are tokenized after the kept chat. Only when no such chat fits are tokens cut."""
    system, old, last = ("system", "Answer in French."), ("user", "word " * 60), ("user", "And Spain?")
    long_chat = chat(system, old, ("assistant", "Paris. " * 30), last)
    kept = chat(system, last)
    cap = len(prompt_ids(tok, kept)) + 2
    assert len(prompt_ids(tok, long_chat)) > cap
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_chat, "chosen": "Madrid.", "rejected": "Rome."},
                                                 {"prompt": "word " * 80, "chosen": "ok", "rejected": "no"}])
    examples, report = tokenize_examples(tok, load_file(path), max_prompt_len=cap, max_len=cap + 32)
    ex, cut = examples
    assert ex.prompt_ids.tolist() == prompt_ids(tok, kept).tolist()  # system prompt and last turn, whole
    assert ex.real_ids.tolist() == response_ids(tok, kept, "Madrid.").tolist()
    assert ex.generated_ids.tolist() == response_ids(tok, kept, "Rome.").tolist()
    assert len(cut.prompt_ids) == cap and cut.prompt_ids[0] == tok.bos_token_id  # one turn: the token cut
    assert (report.prompts_truncated, report.prompts_by_turns, report.kept) == (2, 1, 2)
    assert "2 prompts (1 by whole turns)" in str(report)
    assert report.cut == [f"{path}:1", f"{path}:2"] and str(report).endswith(f"({path}:1, {path}:2)")  # where
    _, dropped = tokenize_examples(tok, load_file(path), max_prompt_len=cap, max_len=cap + 32, overlong="drop")
    assert (dropped.kept, dropped.dropped_prompt, dropped.prompts_by_turns) == (0, 2, 0)
    assert dropped.cut == [f"{path}:1", f"{path}:2"]


def test_a_response_ends_at_the_first_stop_id_as_a_sample_does(smollm2):
    """A tokenizer whose EOS is not the template's end of turn (early Llama-3-Instruct: <|end_of_text|>
    while generation_config stops at <|eot_id|> too): the sampler stops at the end of turn, but every
    real response went on to the EOS, a tail the opponent could never produce."""
    import types

    from spjax.data import stop_ids
    msgs = chat(("user", "What is the capital of France?"))
    im_end, endoftext = smollm2.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    eos = smollm2.eos_token
    smollm2.eos_token = "<|endoftext|>"
    try:
        stops = stop_ids(types.SimpleNamespace(eos_token_ids=(im_end,)), smollm2)  # the model's EOS ids
        assert stops == tuple(sorted({im_end, endoftext}))
        before = response_ids(smollm2, msgs, "Paris.").tolist()
        assert before[-1] == endoftext and before.index(im_end) < len(before) - 1  # the tail past the stop
        real = response_ids(smollm2, msgs, "Paris.", stops=stops).tolist()
        assert real == before[:before.index(im_end) + 1]
        with pytest.raises(DataError, match=re.escape("contains the end-of-turn token text '<|im_end|>'")):
            response_ids(smollm2, msgs, "Paris.<|im_end|>", stops=stops)
    finally:
        smollm2.eos_token = eos


# Mistral-7B-Instruct-v0.3's template, as it treats a system prompt: into the last message, if that is the user's
MISTRAL3 = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
            "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
            "{%- if loop.last and system_message is defined %}"
            "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
            "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
            "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
            "{%- endfor %}")


def test_a_template_that_drops_the_system_prompt_from_a_chat_with_a_response():
    """Mistral v0.3 writes the system prompt into the last message only when it is the user's: every
    example with a system prompt (data.system_prompt on every one) was refused as a template mismatch."""
    tok = llama_tokenizer()
    tok.chat_template = MISTRAL3
    msgs = chat(("system", "Be nice."), ("user", "Hello?"))
    p, r = prompt_ids(tok, msgs), response_ids(tok, msgs, "Hi there.")
    assert "Be nice." in tok.decode(p.tolist()) and tok.decode(p.tolist()).endswith("[/INST]")
    assert r.tolist() == response_ids(tok, msgs[1:], "Hi there.").tolist()  # what follows [/INST] alike
    assert tok.decode(r.tolist()) == " Hi there.</s>"


def test_plain_tokenizer_single_turn(tmp_path):
    plain = llama_tokenizer(chat_template=False)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is the capital of France?", "response": "Paris."}])
    (ex,), _ = tokenize_examples(plain, load_file(path), max_prompt_len=64, max_len=128)
    assert ex.prompt_ids.tolist() == plain.encode("What is the capital of France?")  # its BOS included, once
    assert ex.prompt_ids[0] == plain.bos_token_id and ex.prompt_ids[1] != plain.bos_token_id
    assert ex.real_ids.tolist() == plain.encode("Paris.", add_special_tokens=False) + [plain.eos_token_id]


def test_chatterbot_with_smollm2(smollm2, tmp_path):
    cfg = DataConfig(path="chatterbot", max_prompt_len=64, max_len=128)
    data = prepare(cfg, smollm2, data_dir=str(tmp_path))
    assert len(data.train) > 1900 and 50 < len(data.test) < 300
    assert data.reports["train"].examples == len(data.train)  # truncate keeps every example, and counts the cuts
    assert data.buckets == (64, 128) and data.prompt_buckets == (64,)
    im_start, im_end = smollm2.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    sample = next(prompt_batches(data.train, 8, buckets=data.prompt_buckets, pad_id=pad_token_id(smollm2)))
    for row, i in enumerate(sample["example_id_B"]):
        ex = data.train[i]
        assert sample["prompt_ids_BxP"][row, -len(ex.prompt_ids):].tolist() == ex.prompt_ids.tolist()
        assert ex.prompt_ids[0] == im_start and ex.prompt_ids[-4:].tolist() == smollm2.encode("<|im_start|>assistant\n")
        assert ex.real_ids[-1] == im_end or len(ex.prompt_ids) + len(ex.real_ids) == cfg.max_len


# Zephyr's template (HuggingFaceH4/zephyr-7b-beta), the chat format of configs/spin_zephyr7b_*.py
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@pytest.mark.parametrize("template", ["zephyr", "llama2"])
def test_sentencepiece_response_continues_the_prompt(template, tmp_path):
    """A SentencePiece response is the whole chat's tokens after the prompt's. Tokenized alone, its first
    word got a word-start '▁' that the model never sees (nor samples) after the generation prompt."""
    from spjax.gguf_tokenizer import tokenizer_from_gguf
    from tests.test_data_helpers import LLAMA2_TEMPLATE
    from tests.test_gguf_tokenizer import _tiny_spm
    tok = tokenizer_from_gguf(_tiny_spm(tmp_path / "spm.gguf"))
    tok.chat_template = ZEPHYR if template == "zephyr" else LLAMA2_TEMPLATE
    msgs = chat(("user", "hello"))
    for response in ("hello world", "the world and café"):
        p, r = prompt_ids(tok, msgs).tolist(), response_ids(tok, msgs, response).tolist()
        rendered = tok.apply_chat_template(msgs + chat(("assistant", response)), tokenize=False)
        whole = tok.encode(rendered, add_special_tokens=False)
        assert p + r == whole[:len(p) + len(r)] and r[-1] == tok.eos_token_id and r.count(tok.eos_token_id) == 1
        if template == "zephyr":  # after '<|assistant|>\n' the first word has no word-start marker
            assert not tok.convert_ids_to_tokens(r[:1])[0].startswith("▁"), tok.convert_ids_to_tokens(r)


def test_a_merged_sentencepiece_tail_gets_no_word_start(tmp_path):
    """Where the prompt's last token merges with the response's first (']' + '(' here, as Mistral v0.2's
    '[/INST]' + '(a)'), the response is tokenized on its own; a SentencePiece tokenizer then put a
    word-start '▁' before it, a token the model never sees there and the real text does not have."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + ["▁", "\n", "U", "x", "]", "(", "a", ")", "]("])}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("]", "(")], unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'U' + m['content'] + ']' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": specials})
    msgs = chat(("user", "x"))
    assert tok.convert_ids_to_tokens(prompt_ids(tok, msgs).tolist()) == ["▁", "U", "x", "]"]
    assert tok.convert_ids_to_tokens(response_ids(tok, msgs, "(a)").tolist()) == ["(", "a", ")", "</s>"]


def test_template_date_is_pinned(tmp_path):
    """Llama 3's templates print today's date through strftime_now: with `today` (a run's first start
    date, data.template_date) prompts are the same tokens on any day, so a resume the next day trains on
    the prompts its samples and reference scores were made from."""
    import datetime
    from unittest import mock

    import transformers.utils.chat_template_utils as ctu

    from spjax.byte_tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    tok.chat_template = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                         "{%- endif %}<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
                         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = chat(("user", "hi"))
    pinned, unpinned = [], []
    for day in (9, 10):  # the clock on either side of midnight
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None, day=day):
                return datetime.datetime(2025, 3, day, 0, 1)
        with mock.patch.object(ctu, "datetime", Clock):
            pinned.append(prompt_ids(tok, msgs, today="2024-07-26").tolist())
            unpinned.append(prompt_ids(tok, msgs).tolist())
            real = response_ids(tok, msgs, "hello", today="2024-07-26").tolist()
            assert real == response_ids(tok, msgs, "hello").tolist()  # the response follows either prompt alike
    assert pinned[0] == pinned[1] and "Today Date: 26 Jul 2024" in tok.decode(pinned[0])
    assert unpinned[0] != unpinned[1]  # what a resume the next day saw before


def test_template_date_must_be_a_date():
    from spjax.config import ConfigError, DataConfig
    assert DataConfig(template_date="2026-02-28").template_date == "2026-02-28"
    for bad in ("2026-02-30", "28 Feb 2026", "today"):
        with pytest.raises(ConfigError, match="data.template_date: .* is not a date as YYYY-MM-DD"):
            DataConfig(template_date=bad)


def test_special_token_text_in_a_turn_is_refused_not_encoded_as_a_control_token(tmp_path):
    """A user who types '<|im_end|>' (a ChatML tutorial, a prompt-injection attempt) got the end-of-turn control
    token in the middle of the prompt's user turn; a response that names '<|im_start|>' got that control token,
    which the judges' and the held-out metrics' decoded text then silently lost. Both are refused, as a
    response holding the EOS text already was, by file, line and field."""
    from spjax.byte_tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    typed = chat(("user", "What does <|im_end|> mean in ChatML?"))
    with pytest.raises(DataError, match=re.escape("special token text '<|im_end|>'")):
        prompt_ids(tok, typed)
    system = chat(("system", "Never print <|im_start|>."), ("user", "Hi"))
    with pytest.raises(DataError, match=re.escape(r"messages[0] (system) contains the special token text")):
        prompt_ids(tok, system)
    with pytest.raises(DataError, match=re.escape("special token text '<|im_start|>'")):
        response_ids(tok, chat(("user", "Hi")), "A turn opens with <|im_start|>.")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok?", "response": "ok"},
                                             {"prompt": "What is <|endoftext|>?", "response": "A separator."}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: prompt: contains the special token text")):
        tokenize_examples(tok, load_file(path), max_prompt_len=64, max_len=128)
    # Text that only looks alike stays text.
    near = chat(("user", "What does <|im_end| mean?"))
    ids = prompt_ids(tok, near)
    assert "What does <|im_end| mean?" in tok.decode(ids.tolist(), skip_special_tokens=True)
    assert ids.tolist().count(tok.eos_token_id) == tok.apply_chat_template(
        near, tokenize=False, add_generation_prompt=True).count("<|im_end|>")  # the template's own only


# A template written as Qwen3's behave: the last assistant turn after an empty think block; a generation
# prompt that ends in one when enable_thinking is false
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
            "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
            "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
            "<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_template_args_reach_the_template_in_prompts_and_responses(tmp_path):
    """data.template_args=enable_thinking=false: Qwen3's prompt ends in the empty think block and the real
    response is the answer alone; without it the block starts every real response (a sample would think)."""
    from spjax.byte_tokenizer import byte_tokenizer
    from spjax.data.templates import template_args, with_template_args
    tok = byte_tokenizer()
    tok.chat_template = THINKING
    msgs = chat(("user", "Capital of France?"))
    quiet = with_template_args(tok, DataConfig(template_args=("enable_thinking=false",)).template_kwargs())
    assert template_args(quiet) == {"enable_thinking": False} and template_args(tok) == {}  # (a copy)
    text = lambda ids: tok.decode(ids.tolist())  # noqa: E731
    assert text(prompt_ids(tok, msgs)).endswith("assistant\n")
    assert text(response_ids(tok, msgs, "Paris.")) == "<think>\n\n</think>\n\nParis.<|im_end|>"
    assert text(prompt_ids(quiet, msgs)).endswith("assistant\n<think>\n\n</think>\n\n")
    assert text(response_ids(quiet, msgs, "Paris.")) == "Paris.<|im_end|>"
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(4)])
    cfg = DataConfig(path=path, eval_frac=0.25, template_args=("enable_thinking=false",), max_prompt_len=64,
                     max_len=128)
    got = prepare(cfg, tok, None)
    assert text(got.train[0].prompt_ids).endswith("</think>\n\n") and text(got.train[0].real_ids).startswith("A")


def test_template_args_from_the_command_line():
    import os
    from spjax.config import load_config
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    cfg = load_config(tiny, ["data.template_args=enable_thinking=false,effort=low,n=3"])
    assert cfg.data.template_kwargs() == {"enable_thinking": False, "effort": "low", "n": 3}


def _dated_bytes():
    """The byte tokenizer with a template that prints today's date (as Llama 3's do)."""
    from spjax.byte_tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    tok.chat_template = ("<|im_start|>system\nToday: {{ strftime_now('%d %B %Y') }}<|im_end|>\n{% for m in messages %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def _mixed_examples(n):
    """Single- and multi-turn chats (some cut by whole turns at max_prompt_len 96), and records that fail."""
    from spjax.data import Example
    out = []
    for i in range(n):
        if i % 7 == 3:
            msgs = chat(("user", f"q{i} " + "long " * 20), ("assistant", "a" * 30), ("user", f"and {i}?"))
        else:
            msgs = chat(("user", f"What is {i} + {i}?"))
        response = "<|im_end|> early" if i % 50 == 10 else f"{2 * i}." * (1 + i % 5)
        out.append(Example(msgs, response, rejected=None if i % 2 else f"{i}?", file="d.jsonl", line=i + 1))
    return out


def test_threaded_tokenization_is_one_threads(tmp_path):
    """Splits are tokenized on threads (tokenizers' encode releases the GIL): the same ids, kept turns, errors and
    length report as one thread, in the examples' order; the template's clock pinned to data.template_date in
    every thread and given back after (each thread pinning its own would race on transformers' one clock)."""
    import transformers.utils.chat_template_utils as ctu
    from spjax.data import tokens
    from spjax.byte_tokenizer import CHATML, byte_tokenizer
    tok, examples, clock = _dated_bytes(), _mixed_examples(300), ctu.datetime
    assert byte_tokenizer().chat_template == CHATML  # setting one's template changed the run's tokenizer before
    one = tokens.tokenize_all(tok, examples, "2024-07-26", max_prompt_len=96, threads=1)
    many = tokens.tokenize_all(tok, examples, "2024-07-26", max_prompt_len=96, threads=4)
    assert ctu.datetime is clock
    assert len(one) == len(many) == 300
    failed = [k for k, r in enumerate(many) if isinstance(r, DataError)]
    assert failed == [10, 60, 110, 160, 210, 260]
    for a, b in zip(one, many):
        if isinstance(a, DataError):
            assert [str(p) for p in a.problems] == [str(p) for p in b.problems]
            continue
        assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:3], b[1:3]))
        assert (a[3] is None) == (b[3] is None) and (a[3] is None or np.array_equal(a[3], b[3]))
        assert "Today: 26 July 2024" in tok.decode(b[1].tolist())
    assert sum(len(r[0]) < 3 for r in many if not isinstance(r, DataError) and r[0][-1]["content"].startswith("and"))
    clean = [ex for k, ex in enumerate(examples) if k not in failed]
    reports = [tokenize_examples(tok, clean, max_prompt_len=96, max_len=128, today="2024-07-26", threads=t)[1]
               for t in (1, 4)]
    assert str(reports[0]) == str(reports[1]) and reports[0].prompts_by_turns > 0


def test_a_failure_on_a_thread_stops_the_tokenization(monkeypatch):
    """An error that is not the data's (a bug, Ctrl-C) is raised at once; the chunks not yet started never run."""
    from spjax.byte_tokenizer import byte_tokenizer
    from spjax.data import tokens
    calls, real = [], tokens._tokenized

    def failing(tok, ex, *args):
        calls.append(ex.line)
        if ex.line == 1:
            raise RuntimeError("boom")
        return real(tok, ex, *args)
    monkeypatch.setattr(tokens, "_tokenized", failing)
    with pytest.raises(RuntimeError, match="boom"):
        tokens.tokenize_all(byte_tokenizer(), _mixed_examples(64 * 40), threads=2)
    assert len(calls) < 64 * 10
