"""The sampler's prompt tokens are exactly the loss's prompt prefix: ChatML (SmolLM2) and Llama-2 style."""
import numpy as np
import pytest

from spjax.config import DataConfig
from spjax.data import (attach_generated, load_file, pad_token_id, pair_batches, prepare, prompt_batches, prompt_ids,
                        tokenize_examples)
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
