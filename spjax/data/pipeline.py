"""From a DataConfig to tokenized train and held-out examples, always through TFDS.

`data.path` names one of:
  a file (.jsonl/.json/.parquet)      prepared by the SpjaxFiles builder (held out: eval_path or eval_frac)
  a directory of such files           the same builder in manual_dir style (train*, test*/eval*/val*/...)
  a prepared TFDS directory           one holding dataset_info.json (any schema the record parser reads)
  a TFDS name ('chatterbot', 'name/config:1.0.0')  prepared under data_dir, never downloaded
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from spjax.config import ConfigError, DataConfig
from spjax.data import templates, tfds_builders, token_cache
from spjax.data.batching import make_buckets
from spjax.data.records import FORMATS, SUFFIXES, DataError, Problem, detect_format, parse_record
from spjax.data.lengths import check_lengths
from spjax.data.tokens import tokenize_examples

log = logging.getLogger(__name__)
tfds.disable_progress_bar()  # spjax shows its own progress; TFDS's bars only add noise to the run log
BUILTIN = {"chatterbot": tfds_builders.Chatterbot, "synthetic": tfds_builders.Synthetic,
           "arithmetic": tfds_builders.Arithmetic}
READ_CHUNK = 1024


@dataclasses.dataclass
class Prepared:
    """Tokenized splits and what the length policy did to each."""

    train: list  # [TokenizedExample], ids 0..n-1
    test: list
    reports: dict  # split -> LengthReport
    buckets: tuple  # static lengths for pair batches
    prompt_buckets: tuple  # static lengths for prompt batches (<= max_prompt_len)


def check(cfg: DataConfig):
    """The data settings, and that local paths exist: one ConfigError naming the field (preflight calls
    it before a run writes anything)."""
    _check(cfg)
    _check_paths(cfg)


def _check(cfg: DataConfig):
    if not cfg.path:
        raise ConfigError("data.path: empty (a data file, a directory, or a TFDS dataset name)")
    if cfg.format not in FORMATS:
        raise ConfigError(f"data.format: {cfg.format!r} not in {FORMATS}")
    if not 0 <= cfg.eval_frac < 1:
        raise ConfigError(f"data.eval_frac: must be in [0, 1), got {cfg.eval_frac}")
    try:
        check_lengths(cfg.max_prompt_len, cfg.max_len, cfg.overlong)
        make_buckets(cfg.buckets, cfg.max_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def _looks_local(path: str) -> bool:
    """A path no TFDS name could be: a data file's name, or an absolute or explicitly relative path."""
    return path.lower().endswith(SUFFIXES) or os.path.isabs(path) or path.startswith(("./", "../", "~"))


def _check_paths(cfg: DataConfig):
    """Local paths must exist: said now, naming the field, not as a disk error once preparing starts."""
    for field, path in (("data.path", cfg.path), ("data.eval_path", cfg.eval_path)):
        if path and _looks_local(path) and not os.path.exists(path):
            raise ConfigError(f"{field}: {path!r}: no such file or directory")


def _read_split(source, name: str, fmt: str) -> list:
    """Examples of a data source: our schema directly, any other through the record parser."""
    n, out, problems = len(source), [], []
    for start in range(0, n, READ_CHUNK):
        for k, rec in enumerate(source.__getitems__(list(range(start, min(n, start + READ_CHUNK))))):
            if "prompt_messages" in rec and "response" in rec:
                out.append(tfds_builders.decode(rec))
                continue
            obj = _to_python(rec)
            used = detect_format(obj) if fmt == "auto" else fmt
            if used is None:
                problems.append(Problem(name, start + k + 1, "record", f"cannot tell the format from {sorted(obj)}"))
                continue
            ex, found = parse_record(obj, used, name, start + k + 1)
            problems.extend(found)
            if ex is not None:
                out.append(ex)
    if problems:
        raise DataError(problems)
    return out


def _to_python(v):
    if isinstance(v, bytes):  # undecodable bytes stay bytes: the record parser names them
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    if isinstance(v, dict):
        if v and all(isinstance(x, np.ndarray) for x in v.values()) and len({len(x) for x in v.values()}) == 1:
            keys = list(v)  # a Sequence of dicts comes back as a dict of arrays: turn it into rows
            return [{k: _to_python(v[k][i]) for k in keys} for i in range(len(v[keys[0]]))]
        return {k: _to_python(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return [_to_python(x) for x in v.tolist()] if v.ndim else _to_python(v.item())
    if isinstance(v, (list, tuple)):
        return [_to_python(x) for x in v]
    return v


def _splits(builder, label: str, fmt: str) -> dict:
    try:
        sources = builder.as_data_source()
        return {split: _read_split(src, f"{label}/{split}", fmt) for split, src in sources.items()}
    except (RuntimeError, OSError) as e:  # array_record's: a split's file missing, cut short or damaged
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "" if os.path.abspath(str(builder.data_dir)) == os.path.abspath(label) else f" in {builder.data_dir}"
        raise ConfigError(f"{label}: the prepared TFDS dataset{where} cannot be read ({why}): its files are missing "
                          "or damaged; prepare it again (spjax prepares its own anew once that directory is "
                          "removed)") from None


def _prepared(builder_cls, **kwargs):
    """The builder's dataset, prepared (array_record). Two runs sharing a tfds_dir may prepare the same
    dataset at once: TFDS writes each to a temporary directory, and the rename that comes second fails
    on the first's; that dataset is the same one (named by the files' content), so it is read instead."""
    with _quiet_tfds():
        builder = builder_cls(file_format="array_record", **kwargs)
        fresh = not builder.is_prepared()
    if fresh:
        print(f"data: preparing {builder.name} in {builder.data_dir} (later runs read it from there)", flush=True)
    try:
        with _quiet_tfds():
            builder.download_and_prepare()
    except FileExistsError:
        with _quiet_tfds():
            builder = builder_cls(file_format="array_record", **kwargs)
        if not builder.is_prepared():
            raise
    return builder


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS's notices about a local dataset ('Using custom data configuration', 'Downloading and preparing
    dataset Unknown size ...'): noise beside the run's own line. Errors still propagate. And its litter:
    a builder of a dataset not yet prepared makes an empty temporary directory for metadata it would
    fetch from GCS (never, offline) and leaves it, one /tmp/tmp*tfds a preparation; here it makes it
    in a directory of ours, removed after."""
    absl, saved = logging.getLogger("absl"), tempfile.tempdir
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="spjax-tfds-") as scratch, contextlib.redirect_stdout(io.StringIO()):
            tempfile.tempdir = scratch
            try:
                yield
            finally:
                tempfile.tempdir = saved
    finally:
        absl.setLevel(level)


def _source_splits(path: str, fmt: str, eval_frac: float, seed: int, data_dir: Optional[str],
                   eval_path: str = "", field: str = "data.path") -> dict:
    """{split: [Example]} for one `data.path` (or `data.eval_path`: `field` names it in errors)."""
    if os.path.isfile(path):
        tests = [eval_path] if eval_path else []
        config = tfds_builders.files_config([path], tests, fmt, 0.0 if eval_path else eval_frac, seed)
        return _splits(_prepared(tfds_builders.SpjaxFiles, config=config, data_dir=data_dir), path, fmt)
    if os.path.isdir(path) and _is_prepared(path):
        try:
            builder = tfds.builder_from_directory(path)
        except Exception as e:  # noqa: BLE001 - tfds/protobuf errors of a damaged dataset_info.json: one line
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{field}: {path!r}: a prepared TFDS dataset whose metadata cannot be read ({why})") from None
        return _splits(builder, path, fmt)
    if os.path.isdir(path):
        train_files, test_files, ignored = tfds_builders.scan_dir(path)
        if ignored:
            log.warning("%s", tfds_builders.ignored_note(path, ignored))
        if not train_files:
            raise ConfigError(f"{field}: directory {path!r} has no train* data files ({', '.join(SUFFIXES)})")
        config = tfds_builders.files_config(train_files, test_files, fmt, eval_frac, seed)
        return _splits(_prepared(tfds_builders.SpjaxFiles, config=config, data_dir=data_dir), path, fmt)
    name = path.split("/")[0].split(":")[0]
    if name in BUILTIN:
        return _splits(_prepared(BUILTIN[name], config=tfds_builders.builtin_config(name), data_dir=data_dir),
                       path, fmt)
    try:
        with _quiet_tfds():
            builder = tfds.builder(path, data_dir=data_dir)
    except Exception as e:  # tfds raises DatasetNotFoundError and friends; its first line says which
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{field}: {path!r} is not a file, a directory or a known TFDS dataset ({why})") from None
    if not builder.is_prepared():
        raise ConfigError(f"{field}: TFDS dataset {path!r} is not prepared under {builder.data_dir_root}; "
                          "prepare it there first (spjax never downloads)")
    return _splits(builder, path, fmt)


def load_examples(cfg: DataConfig, data_dir: Optional[str] = None) -> dict:
    """{"train": [Example], "test": [Example]} for `cfg`, validated, through TFDS.

    Held out: `eval_path` if set; else the source's test/validation split; else `eval_frac` of the
    train split (whole prompt groups, by a hash of (seed, prompt)). `max_examples` caps train.
    `data_dir` is where TFDS prepares and finds datasets (None: TFDS's default).
    """
    check(cfg)
    # Two files make one prepared dataset; otherwise eval_path is a source of its own.
    together = os.path.isfile(cfg.path) and os.path.isfile(cfg.eval_path)
    # With eval_path set, eval_frac would only take examples away from training.
    splits = _source_splits(cfg.path, cfg.format, 0.0 if cfg.eval_path else cfg.eval_frac, cfg.seed, data_dir,
                            eval_path=cfg.eval_path if together else "")
    train = splits.get("train")
    if train is None:
        raise ConfigError(f"data.path: {cfg.path!r} has no train split (splits: {sorted(splits)})")
    if cfg.eval_path and not together:
        held = _source_splits(cfg.eval_path, cfg.format, 0.0, cfg.seed, data_dir, field="data.eval_path")
        test = held.get("train", held.get("test"))
        if test is None:
            raise ConfigError(f"data.eval_path: {cfg.eval_path!r} has no train or test split "
                              f"(splits: {sorted(held)})")
    elif "test" in splits or "validation" in splits:
        test = splits.get("test", splits.get("validation"))
    else:
        train, test = tfds_builders.split_heldout(train, cfg.eval_frac, cfg.seed)
    if cfg.max_examples:
        train = train[:cfg.max_examples]
    if cfg.system_prompt:
        train, test = (with_system_prompt(x, cfg.system_prompt) for x in (train, test))
    return {"train": train, "test": test}


def with_system_prompt(examples: list, system: str) -> list:
    """Examples whose prompt gets `system` as its first turn where it has no system turn of its own."""
    return [ex if ex.prompt_messages and ex.prompt_messages[0]["role"] == "system" else
            dataclasses.replace(ex, prompt_messages=[{"role": "system", "content": system}, *ex.prompt_messages])
            for ex in examples]


def prepare(cfg: DataConfig, tokenizer, data_dir: Optional[str] = None, stops: Sequence[int] = ()) -> Prepared:
    """Load `cfg`'s data through TFDS, tokenize both splits with the chat template, apply the length policy.
    stops: the run's stop ids (tokens.stop_ids), where responses end as sampled ones do.
    With data_dir, the tokenized splits are kept there (token_cache) and read by the next start."""
    splits, today = load_examples(cfg, data_dir), cfg.template_date or None
    tokenizer = templates.with_template_args(tokenizer, cfg.template_kwargs())
    name = token_cache.digest(splits, tokenizer, cfg, today, stops) if data_dir else None
    kept = token_cache.load(token_cache.path(data_dir, name), splits) if name else None
    if kept:
        out, reports = kept
    else:
        out, reports = {}, {}
        for split, examples in splits.items():
            out[split], reports[split] = tokenize_examples(tokenizer, examples, max_prompt_len=cfg.max_prompt_len,
                                                           max_len=cfg.max_len, overlong=cfg.overlong, split=split,
                                                           today=today, stops=stops, unencodable=cfg.unencodable)
        if name:
            token_cache.save(token_cache.path(data_dir, name), out, reports)
    if not out["train"]:
        raise DataError([Problem(cfg.path, 1, "record", f"no training example is left ({reports['train']})")])
    return Prepared(out["train"], out["test"], reports, make_buckets(cfg.buckets, cfg.max_len),
                    make_buckets(cfg.buckets, cfg.max_prompt_len))


def pad_token_id(tokenizer, model_cfg=None) -> int:
    """The id to pad with (masked out everywhere): the tokenizer's pad, else EOS, else 0.

    With model_cfg, one the model embeds: an id past the embedding (an added <pad> it was never
    resized for) reads NaN there, which 0 * NaN carries into every real position; then one of the
    model's EOS ids, or 0, pads instead."""
    pad = next((int(v) for v in (getattr(tokenizer, n, None) for n in ("pad_token_id", "eos_token_id"))
                if v is not None), 0)
    if model_cfg is None or 0 <= pad < model_cfg.vocab_size:
        return pad
    return next((i for i in model_cfg.eos_token_ids if 0 <= i < model_cfg.vocab_size), 0)

