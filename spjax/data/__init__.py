"""SFT and preference data: local files and TFDS in, static-shape token batches out (host side, numpy).

    prepared = prepare(cfg.data, tokenizer, data_dir)          # validated, tokenized train/test
    for batch in prompt_batches(prepared.train, G, buckets=prepared.prompt_buckets, pad_id=pad):
        real = batch["example_id_B"] >= 0                      # rows past the data are padding
        out = spjax.sample(cfg, params, batch["prompt_ids_BxP"][real], prompt_mask=batch["prompt_mask_BxP"][real],
                           example_ids=batch["example_id_B"][real], key=..., max_new_tokens=...)
                                                               # -> {example id: generated token ids}
    train, _ = attach_generated(prepared.train, generated, max_len=cfg.data.max_len)
    for batch, cursor in pair_batches(train, G, seed=..., buckets=prepared.buckets, pad_id=pad,
                                      cursor=restored_cursor, epochs=E):
        ...step...; save `cursor` with the checkpoint

`python -m spjax.data validate PATH [--tokenizer PATH]` checks a file before any accelerator time.
"""
from spjax.data.batching import (batches_per_epoch, bucket_for, default_buckets, epoch_order, host_rows,
                                 make_buckets, pair_batch, pair_batches, prompt_batches)
from spjax.data.lengths import LengthReport, attach_generated
from spjax.data.records import FORMATS, DataError, Example, Problem, load_file, parse_file
from spjax.data.tokens import (TokenizedExample, has_chat_template, prompt_ids, response_ids, stop_ids,
                               tokenize_example, tokenize_examples)

__all__ = [
    "FORMATS", "DataError", "Example", "LengthReport", "Prepared", "Problem", "TokenizedExample",
    "attach_generated", "batches_per_epoch", "bucket_for", "default_buckets", "epoch_order", "has_chat_template",
    "host_rows", "load_examples", "load_file", "make_buckets", "pad_token_id", "pair_batch",
    "pair_batches", "parse_file", "prepare", "prompt_batches", "prompt_ids", "response_ids", "stop_ids",
    "tokenize_example", "tokenize_examples",
]
_PIPELINE = ("Prepared", "load_examples", "pad_token_id", "prepare")


def __getattr__(name):
    # The TFDS pipeline loads on first use: a model, the sampler or a bench on a machine without
    # tensorflow_datasets (spjax.config reads data.records for its format list) must still import.
    if name in _PIPELINE:
        from spjax.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'spjax.data' has no attribute {name!r}")
