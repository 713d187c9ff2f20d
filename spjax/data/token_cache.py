"""Tokenized splits kept beside the TFDS dataset: a resume, or another run of the same data, tokenizer and
length settings, reads them instead of tokenizing again (1-4 ms an example: 3-14 minutes at 200k, on every
start and every --resume before).

A file is named by a digest of everything its tokens depend on: the examples' text and where each came
from, the tokenizer (its vocabulary, merges, normalizer, specials, chat template and its variables), the length
settings, the date the template prints, the stop ids, and the code and library versions that tokenize.
Any change is another name, so a file is never read for other data. One that cannot be read (cut short,
damaged) is a miss: the splits are tokenized again and the file written anew. Writing it is best-effort
(a full disk costs the next start its time, not this run); only the newest KEEP files stay.

  <tfds_dir>/spjax_tokenized/<digest>.npz   per split: the ids of every kept example, back to back
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from spjax import artifacts
from spjax.data import templates
from spjax.data.lengths import LengthReport
from spjax.data.tokens import TokenizedExample

log = logging.getLogger(__name__)
DIR, KEEP, FORMAT = "spjax_tokenized", 4, 1


def digest(splits: dict, tokenizer, cfg, today: Optional[str], stops: Sequence[int]) -> Optional[str]:
    """The name of `splits`' ({split: [Example]}) tokens under these settings; None for a tokenizer whose rules
    cannot be read whole (no tokenizers backend): those are never kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import jinja2
    import tokenizers
    import transformers
    h = hashlib.sha256()
    add = lambda *xs: h.update(json.dumps(xs, ensure_ascii=False, default=str).encode() + b"\n")  # noqa: E731
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("tokens.py", "templates.py", "lengths.py", "token_cache.py"):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    add(FORMAT, transformers.__version__, tokenizers.__version__, jinja2.__version__, type(tokenizer).__name__)
    # split_special_tokens: a Python attribute (tokenizer_config.json's) the backend's to_str() leaves out; set,
    # every special token the template writes is encoded as its characters
    add(backend.to_str(), getattr(tokenizer, "chat_template", None), tokenizer.special_tokens_map,
        tokenizer.bos_token_id, tokenizer.eos_token_id, bool(getattr(tokenizer, "split_special_tokens", False)))
    # No pinned date: the template prints the clock's, so the same file is not today's tomorrow.
    add(cfg.max_prompt_len, cfg.max_len, cfg.overlong, cfg.unencodable, today or datetime.date.today().isoformat(),
        list(stops), sorted(templates.template_args(tokenizer).items()))
    for split in sorted(splits):
        add(split, len(splits[split]))
        for ex in splits[split]:
            add(ex.prompt_messages, ex.response, ex.rejected, ex.generated, ex.file, ex.line)
    return h.hexdigest()


def path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, DIR, f"{name}.npz")


def load(file: str, splits: dict) -> Optional[tuple]:
    """({split: [TokenizedExample]}, {split: LengthReport}) from `file`, or None (absent, or not readable)."""
    if not os.path.isfile(file):
        return None
    try:
        z = artifacts.load_arrays(file)
        meta = json.loads(str(z["meta"]))
        if meta.get("sha256") != _sha({k: z[k] for k in z if k != "meta"}):  # (a readable file of other ids)
            raise ValueError("its token ids do not match their checksum")
        out = {s: _examples(z, s, splits[s]) for s in splits}
        reports = {s: LengthReport(**meta["reports"][s]) for s in splits}
        if jax.process_index() == 0:
            print(f"data: tokenized splits read from {file} (kept by an earlier start)", flush=True)
        return out, reports
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: tokenize again, as without it
        why = (str(e).splitlines() or [type(e).__name__])[0]
        log.warning("data: %s cannot be read (%s): tokenizing again", file, why)
        return None


def save(file: str, tokenized: dict, reports: dict):
    """Write `tokenized` ({split: [TokenizedExample]}) to `file` (process 0; atomically), and remove all but the
    newest KEEP files beside it. An OSError (a full disk) is logged, not raised."""
    if jax.process_index() != 0:  # (one writer; a host-local tfds_dir is kept by process 0's host only)
        return
    arrays = {}
    for split, examples in tokenized.items():
        sides = [(ex.prompt_ids, ex.real_ids, ex.generated_ids, ex.uncut_real_ids) for ex in examples]
        lengths = np.asarray([[-1 if a is None else len(a) for a in row] for row in sides], np.int64).reshape(-1, 4)
        flat = [a for row in sides for a in row if a is not None]
        tokens = np.concatenate(flat).astype(np.int32) if flat else np.zeros(0, np.int32)
        arrays[f"{split}/tokens"] = tokens.astype(np.uint16) if tokens.size and tokens.max() < 1 << 16 else tokens
        arrays[f"{split}/lengths"] = lengths
        arrays[f"{split}/example"] = np.asarray([ex.example_index for ex in examples], np.int64)
        arrays[f"{split}/turns"] = np.asarray([len(ex.prompt_messages) for ex in examples], np.int64)
    meta = {"reports": {s: dataclasses.asdict(r) for s, r in reports.items()}, "sha256": _sha(arrays)}
    try:
        artifacts.save_arrays(file, meta=np.asarray(json.dumps(meta)), **arrays)
        _prune(os.path.dirname(file))
    except OSError as e:
        log.warning("data: the tokenized splits were not kept (%s): the next start tokenizes them again", e)


def _sha(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.asarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _examples(z: dict, split: str, examples: list) -> list:
    tokens, lengths = z[f"{split}/tokens"].astype(np.int32), z[f"{split}/lengths"]
    ends = np.cumsum(np.maximum(lengths, 0).reshape(-1)).reshape(lengths.shape)
    out = []
    for i, (row, end, k, turns) in enumerate(zip(lengths, ends, z[f"{split}/example"], z[f"{split}/turns"])):
        sides = [None if n < 0 else tokens[e - n:e] for n, e in zip(row, end)]
        ex = examples[int(k)]
        out.append(TokenizedExample(i, sides[0], sides[1], sides[2], f"{ex.file}:{ex.line}", sides[3],
                                    kept_turns(ex.prompt_messages, int(turns)), int(k)))
    return out


def kept_turns(messages: Sequence[dict], n: int) -> tuple:
    """The n turns of `messages` a prompt cut by whole turns kept: the system prompt, and the newest n - 1."""
    if n >= len(messages):
        return tuple(messages)
    head = 1 if messages[0]["role"] == "system" else 0
    return tuple(messages[:head]) + tuple(messages[len(messages) - (n - head):])


STALE_TMP_S = 6 * 3600  # a writer's .tmp- file untouched this long: its start was killed mid-write (SIGKILL)


def _prune(d: str):
    files, stale = [], []
    for e in os.scandir(d):
        try:
            if e.name.endswith(".npz") and not e.name.startswith("."):
                files.append((e.stat().st_mtime, e.path))
            elif e.name.startswith(".tmp-") and time.time() - e.stat().st_mtime > STALE_TMP_S:
                stale.append(e.path)
        except OSError:  # removed meanwhile by another run's prune
            pass
    for _, p in sorted(files, reverse=True)[KEEP:] + [(0, p) for p in stale]:
        try:
            os.remove(p)
        except OSError:
            pass
