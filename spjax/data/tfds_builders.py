"""TFDS builders for SFT data, written as array_record and read back through `data_source`.

tensorflow-datasets works without TensorFlow only this way: `tfds.load` and `as_dataset` would
import it. Both builders write the same canonical features, so everything downstream reads one
schema:

  prompt_messages  Sequence({role, content})   the chat before the response
  response         Text                        the real (SFT) or chosen (preference) response
  rejected         Text                        "" when absent
  generated        Text                        "" when absent
  file, line       Text, int64                 where the record came from, for error messages

Records are validated while the splits are generated, before anything is written: a bad file
raises a DataError listing every problem and leaves no prepared dataset behind.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import logging
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
import yaml

from spjax.data import formats, records
from spjax.data.records import SUFFIXES, DataError, Example, Problem, parse_file

log = logging.getLogger(__name__)
VERSION = "1.0.0"
# File-name prefixes in a data directory: train files, and held-out ones ("val" covers valid*/validation*).
TRAIN_SPLIT_NAMES = ("train",)
TEST_SPLIT_NAMES = ("test", "eval", "val", "dev", "heldout")


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "prompt_messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
        "response": tfds.features.Text(),
        "rejected": tfds.features.Text(),
        "generated": tfds.features.Text(),
        "file": tfds.features.Text(),
        "line": np.int64,
    })


def encode(ex: Example) -> dict:
    return {"prompt_messages": list(ex.prompt_messages), "response": ex.response, "rejected": ex.rejected or "",
            "generated": ex.generated or "", "file": ex.file, "line": ex.line}


def decode(rec: dict) -> Example:
    """An Example from a record read back through `data_source` (strings come back as bytes)."""
    def s(v):
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    pm = rec["prompt_messages"]
    prompt = [{"role": s(r), "content": s(c)} for r, c in zip(pm["role"], pm["content"])]
    return Example(prompt, s(rec["response"]), s(rec["rejected"]) or None, s(rec["generated"]) or None,
                   s(rec["file"]), int(rec["line"]))


def _prompt_key(ex: Example) -> str:
    return "\x00".join(m["content"].strip().lower() for m in ex.prompt_messages if m["role"] == "user")


def _hash01(*parts) -> float:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_heldout(examples: Sequence[Example], frac: float, seed: int) -> tuple[list, list]:
    """(train, held-out): about `frac` of the examples, at least one, whole prompt groups at a time
    (repeated prompts never straddle the split), chosen by a hash of (seed, prompt); order kept."""
    if frac <= 0 or len(examples) < 2:
        return list(examples), []
    groups = sorted({_prompt_key(ex) for ex in examples}, key=lambda k: _hash01(seed, k))
    sizes = {}
    for ex in examples:
        sizes[_prompt_key(ex)] = sizes.get(_prompt_key(ex), 0) + 1
    want, held, count = max(1, round(frac * len(examples))), set(), 0
    for key in groups[:-1]:  # never hold out everything
        if count >= want:
            break
        held.add(key)
        count += sizes[key]
    return ([ex for ex in examples if _prompt_key(ex) not in held],
            [ex for ex in examples if _prompt_key(ex) in held])


def _parsers_digest() -> str:
    """The code that turns files into records (records.py, formats.py and this module): part of a
    prepared dataset's name, so a tfds_dir prepared by other spjax code is prepared anew, not read as it was."""
    h = hashlib.sha256()
    for path in (records.__file__, formats.__file__, __file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def _fingerprint(files: Sequence[str], *settings) -> str:
    h = hashlib.sha256(repr((*settings, _parsers_digest())).encode())
    for f in files:
        h.update(os.path.abspath(f).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def scan_dir(directory) -> tuple[list, list, list]:
    """(train, held-out, ignored) data files of a directory, by name: train*; test*/eval*/val*/dev*/heldout*;
    any other name is ignored (a stray export must not silently become training data)."""
    found = sorted(f for f in glob.glob(os.path.join(str(directory), "*"))
                   if f.lower().endswith(SUFFIXES) and os.path.isfile(f))
    names = {f: os.path.basename(f).lower() for f in found}
    train = [f for f in found if names[f].startswith(TRAIN_SPLIT_NAMES)]
    test = [f for f in found if names[f].startswith(TEST_SPLIT_NAMES)]
    return train, test, [f for f in found if f not in train and f not in test]


def ignored_note(directory, ignored) -> str:
    """The one line that says which files of a data directory are not read, and why."""
    names = ", ".join(os.path.basename(f) for f in ignored)
    return (f"{directory}: ignoring {len(ignored)} data file(s) named neither train* nor "
            f"{'*/'.join(TEST_SPLIT_NAMES)}*: {names}")


class FilesConfig(tfds.core.BuilderConfig):
    """Which local files make the splits. No files: scan manual_dir (train*, test*/eval*/val*/... files)."""

    def __init__(self, *, train_files=(), test_files=(), data_format="auto", eval_frac=0.0, seed=0, **kwargs):
        super().__init__(version=VERSION, **kwargs)
        self.train_files, self.test_files = tuple(train_files), tuple(test_files)
        self.data_format, self.eval_frac, self.seed = data_format, float(eval_frac), int(seed)


def files_config(train_files, test_files=(), data_format="auto", eval_frac=0.0, seed=0) -> FilesConfig:
    """A config named by the files' content and the settings, so a changed file is prepared anew."""
    # Which files are held out is part of the name (moving a file between splits prepares anew); the
    # count is added only where there are held-out files, so names prepared without any stay valid.
    where = (len(train_files),) if test_files else ()
    name = _fingerprint(list(train_files) + list(test_files), data_format, eval_frac, seed, *where)
    return FilesConfig(name=f"{data_format}-{name}", train_files=train_files, test_files=test_files,
                       data_format=data_format, eval_frac=eval_frac, seed=seed)


def builtin_config(name: str) -> tfds.core.BuilderConfig:
    """A built-in dataset's config, named by the code that makes it (and chatterbot's corpus files), so
    a tfds_dir prepared by another spjax version or corpus version is prepared anew, not read as it was."""
    files = sorted(glob.glob(os.path.join(chatterbot_dir(), "*.yml"))) if name == "chatterbot" else []
    return tfds.core.BuilderConfig(name=_fingerprint(files, name), version=VERSION)


class SpjaxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of spjax builders: the canonical features, kept in generation order, no code directory."""

    VERSION = tfds.core.Version(VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums or metadata files live beside these builders. Saying so also keeps tfds
        # 4.9.10 from importing `importlib_resources`, which it needs there but does not declare.
        return None

    HOMEPAGE = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features(), disable_shuffling=True,
                                     description=self.__doc__, homepage=self.HOMEPAGE)

    def _generate_examples(self, examples):
        for i, ex in enumerate(examples):
            yield i, encode(ex)


class SpjaxFiles(SpjaxBuilder):
    """SFT or preference records from local JSONL, JSON or Parquet files."""

    BUILDER_CONFIGS = [FilesConfig(name="manual_dir")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the data files (.jsonl, .json or .parquet) in manual_dir: train* files make the train split, "
        f"files starting with {', '.join(TEST_SPLIT_NAMES)} the test split; other names are ignored.")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        train_files, test_files = cfg.train_files, cfg.test_files
        if not train_files:
            train_files, test_files, ignored = scan_dir(dl_manager.manual_dir)
            if ignored:
                log.warning("%s", ignored_note(dl_manager.manual_dir, ignored))
        if not train_files:
            raise DataError([Problem(str(dl_manager.manual_dir), 1, "file", "no train* data files found")])
        train, problems = self._read(train_files)
        test, more = self._read(test_files)
        if problems or more:
            raise DataError(problems + more)
        if not test_files:
            train, test = split_heldout(train, cfg.eval_frac, cfg.seed)
        out = {"train": self._generate_examples(train)}
        if test:
            out["test"] = self._generate_examples(test)
        return out

    def _read(self, files):
        examples, problems = [], []
        for f in files:
            exs, found, _ = parse_file(str(f), self.builder_config.data_format)
            examples.extend(exs)
            problems.extend(found)
        return examples, problems


# ----------------------------------------------------------------------------- chatterbot corpus


def chatterbot_dir() -> str:
    try:
        dist = importlib.metadata.distribution("chatterbot-corpus")
    except importlib.metadata.PackageNotFoundError:
        from spjax.config import ConfigError
        raise ConfigError("data.path: 'chatterbot' reads the chatterbot-corpus package, which is not installed "
                          "(pip install --no-deps -r requirements-assets.txt)") from None
    return str(dist.locate_file("chatterbot_corpus/data/english"))


def chatterbot_examples(directory: str) -> list:
    """Every consecutive (statement, reply) pair of the English corpus, the way chatterbot trains."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)  # nodes keep line numbers; values stay strings
        convs = next((v for k, v in root.value if k.value == "conversations"), None)
        if not isinstance(convs, yaml.SequenceNode):
            raise DataError([Problem(path, 1, "conversations", "missing or not a list")])
        for conv in convs.value:
            turns = conv.value if isinstance(conv, yaml.SequenceNode) else []
            for a, b in zip(turns, turns[1:]):
                if not all(isinstance(t, yaml.ScalarNode) and t.value.strip() for t in (a, b)):
                    raise DataError([Problem(path, conv.start_mark.line + 1, "conversations",
                                             "expected a list of non-empty strings")])
                out.append(Example([{"role": "user", "content": a.value}], b.value,
                                   file=os.path.basename(path), line=b.start_mark.line + 1))
    return out


class Chatterbot(SpjaxBuilder):
    """The English chatterbot-corpus (BSD) as single-turn SFT pairs, from the installed package.

    Held out ("test"): about 5% of the distinct prompts, chosen by a fixed hash, so a repeated
    question is never on both sides.
    """

    HELDOUT_FRAC = 0.05
    HOMEPAGE = "https://pypi.org/project/chatterbot-corpus/"

    def _split_generators(self, dl_manager):
        train, test = split_heldout(chatterbot_examples(chatterbot_dir()), self.HELDOUT_FRAC, seed=0)
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}


# ----------------------------------------------------------------------------- synthetic


def synthetic_examples(n: int, seed: int = 0) -> list:
    """n short instruction/answer pairs with a learnable rule (echo a word, count up), for tiny runs."""
    rng = np.random.RandomState(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for i in range(n):
        word = "".join(rng.choice(letters, rng.randint(3, 7)))
        if i % 2:
            k = int(rng.randint(2, 6))
            prompt, answer = f"Count to {k}.", " ".join(str(j) for j in range(1, k + 1))
        else:
            prompt, answer = f"Say {word} twice.", f"{word} {word}"
        out.append(Example([{"role": "user", "content": prompt}], answer, file="synthetic", line=i + 1))
    return out


class Synthetic(SpjaxBuilder):
    """Generated pairs (288: 256 train, 32 held out) for the tiny config and tests: no files needed."""

    def _split_generators(self, dl_manager):
        ex = synthetic_examples(288)
        return {"train": self._generate_examples(ex[:256]), "test": self._generate_examples(ex[256:])}


# ----------------------------------------------------------------------------- arithmetic


_NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Ravi", "Zoe", "Ben")
_THINGS = ("apples", "books", "coins", "shells", "pencils", "stamps", "cards", "marbles")
_ADD = ("{n} has {a} {x}. {n} gets {b} more {x}. How many {x} does {n} have now?",
        "There are {a} {x} in a box and {b} {x} on the table. How many {x} are there in all?",
        "{n} buys {a} {x} on Monday and {b} {x} on Tuesday. How many {x} did {n} buy?")
_SUB = ("{n} has {a} {x} and gives away {b}. How many {x} are left?",
        "A jar holds {a} {x}. {n} takes out {b}. How many {x} are still in the jar?",
        "{n} had {a} {x} and lost {b} of them. How many {x} does {n} have now?")


def arithmetic_examples(n: int, seed: int, lo: int = 2, hi: int = 20) -> list:
    """n one-step add/subtract word problems (operands lo..hi, answers >= 0) with their number as
    the response: a verifiable task (judge verifier:number) that needs no files."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.randint(lo, hi + 1, 2))
        add = bool(rng.randint(2))
        if not add and b > a:
            a, b = b, a
        template = (_ADD if add else _SUB)[rng.randint(3)]
        question = template.format(n=_NAMES[rng.randint(len(_NAMES))], x=_THINGS[rng.randint(len(_THINGS))], a=a, b=b)
        out.append(Example([{"role": "user", "content": question}], str(a + b if add else a - b),
                           file="arithmetic", line=i + 1))
    return out


class Arithmetic(SpjaxBuilder):
    """Generated arithmetic word problems: 64 held out and 512 train, distinct questions drawn
    from one fixed seed (the splits never change and never share a question)."""

    def _split_generators(self, dl_manager):
        seen, unique = set(), []
        for ex in arithmetic_examples(1024, seed=1):
            if ex.prompt_messages[0]["content"] not in seen:
                seen.add(ex.prompt_messages[0]["content"])
                unique.append(ex)
        return {"test": self._generate_examples(unique[:64]), "train": self._generate_examples(unique[64:576])}
