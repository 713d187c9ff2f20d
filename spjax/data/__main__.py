"""`python -m spjax.data validate PATH [--tokenizer PATH]`: check data files before spending accelerator time.

Prints a summary (records, format, length percentiles, what the length policy would truncate or
drop), or every problem as `file:line: field: what is wrong` and exits 1. PATH is a file, or a
directory whose data files are checked one by one, picked as a run picks them (train*, test*, ...).
Token counts are the run's when the options are its data settings (--system-prompt is data.system_prompt),
or with --config CFG: its data.path (and eval_path), format, lengths, system prompt, date, template
variables and tokenizer.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from spjax.config import DataConfig, template_kwargs
from spjax.data.records import FORMATS, SUFFIXES, DataError, parse_file
from spjax.data.lengths import LengthReport, apply_length_policy, check_lengths
from spjax.data.templates import with_template_args
from spjax.data.tokens import count_turns_cut, stop_ids, tokenize_all

PERCENTILES = (50, 90, 99)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _table(rows: dict, unit: str) -> list:
    head = f"  {unit:<10}" + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + f"{'max':>8}"
    lines = [head]
    for name, values in rows.items():
        if values:
            v = np.asarray(values)
            lines.append(f"  {name:<10}" + "".join(f"{int(np.percentile(v, q)):>8}" for q in PERCENTILES)
                         + f"{int(v.max()):>8}")
    return lines


def validate(path: str, fmt: str = "auto", tokenizer=None, max_prompt_len: int = 512, max_len: int = 1024,
             out=None, system_prompt: str = "", today: Optional[str] = None, stops: Sequence[int] = ()) -> int:
    """Check a file, or each data file of a directory; print summaries or every problem (to `out`,
    default stdout). Returns the exit status. system_prompt: data.system_prompt, which the run puts
    before prompts without a system turn (so it counts in their tokens). today: data.template_date.
    stops: the run's stop ids (tokens.stop_ids), where responses end."""
    out = out or sys.stdout
    if not os.path.exists(path):
        print(f"{path}: file not found", file=out)  # not a problem at a line: there is no line 1
        return 1
    if not os.path.isdir(path):
        return _validate_file(path, fmt, tokenizer, max_prompt_len, max_len, out, system_prompt, today, stops)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        print(f"{path}: a prepared TFDS dataset (a run checks it as it reads it); validate checks data files "
              f"({', '.join(SUFFIXES)}) or a directory of them", file=out)
        return 2
    from spjax.data.tfds_builders import ignored_note, scan_dir  # imports tensorflow_datasets: only when needed

    train, test, ignored = scan_dir(path)
    if ignored:
        print(ignored_note(path, ignored), file=out)
    if not train:
        print(f"{path}: no train* data files ({', '.join(SUFFIXES)})", file=out)
        return 1
    held = ", ".join(map(os.path.basename, test)) or "none (a run holds out data.eval_frac of train)"
    print(f"{path}: train {', '.join(map(os.path.basename, train))}; held out {held}", file=out)
    return max(_validate_file(f, fmt, tokenizer, max_prompt_len, max_len, out, system_prompt, today, stops)
               for f in train + test)


def _validate_file(path, fmt, tokenizer, max_prompt_len, max_len, out, system_prompt="", today=None,
                   stops=()) -> int:
    examples, problems, used = parse_file(path, fmt)
    tokenized = []
    if tokenizer is not None:
        from spjax.data.pipeline import with_system_prompt  # the run's own step, so the counts are the run's

        run_examples = with_system_prompt(examples, system_prompt) if system_prompt else examples
        for result in tokenize_all(tokenizer, run_examples, today, stops=stops, desc=f"{path}: tokenize"):
            if isinstance(result, DataError):
                problems.extend(result.problems)
            else:
                tokenized.append(result[1:])
    if problems:
        problems.sort(key=lambda p: (p.file, p.line))
        for p in problems:
            print(p, file=out)
        print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in {path}", file=out)
        return 1

    n = len(examples)
    systems = sum(ex.prompt_messages[0]["role"] == "system" for ex in examples)
    print(f"{path}: {n} records, format {used}", file=out)
    print(f"  system prompts {systems}{f' (+{n - systems} from --system-prompt)' if system_prompt else ''}, "
          f"multi-turn prompts {sum(sum(m['role'] == 'user' for m in ex.prompt_messages) > 1 for ex in examples)}, "
          f"with rejected {sum(ex.rejected is not None for ex in examples)}, "
          f"with generated {sum(ex.generated is not None for ex in examples)}", file=out)
    if tokenizer is None:
        chars = {"prompt": [sum(len(m["content"]) for m in ex.prompt_messages) for ex in examples],
                 "response": [len(ex.response) for ex in examples]}
        for line in _table(chars, "chars"):
            print(line, file=out)
        print("  (pass --tokenizer to count tokens and see what max_prompt_len/max_len would cut)", file=out)
        return 0
    second = "rejected" if any(ex.rejected is not None for ex in examples) else "generated"
    tokens = {"prompt": [len(p) for p, _, _ in tokenized], "response": [len(r) for _, r, _ in tokenized],
              second: [len(g) for _, _, g in tokenized if g is not None],
              "total": [len(p) + max(len(r), 0 if g is None else len(g)) for p, r, g in tokenized]}
    for line in _table(tokens, "tokens"):
        print(line, file=out)
    bos = getattr(tokenizer, "bos_token_id", None)
    # The run's way for long prompts under overlong=truncate: their oldest whole turns go first.
    long = [k for k, (p, _, _) in enumerate(tokenized) if len(p) > max_prompt_len]
    fitted = dict(zip(long, tokenize_all(tokenizer, [run_examples[k] for k in long], today,
                                         max_prompt_len=max_prompt_len, stops=stops, desc=f"{path}: fit turns")))
    for result in fitted.values():
        if isinstance(result, DataError):  # a template that refuses the shorter chat: said as the run says it
            print(*result.problems, sep="\n", file=out)
            return 1
    for overlong in ("truncate", "drop"):
        report = LengthReport()
        for k, (ex, (p, r, g)) in enumerate(zip(run_examples, tokenized)):
            if overlong == "truncate" and k in fitted:
                turns, p, r, g = fitted[k]
                count_turns_cut(report, ex, turns)
            apply_length_policy(p, r, g, max_prompt_len=max_prompt_len, max_len=max_len, overlong=overlong,
                                bos_id=bos, report=report, source=f"{ex.file}:{ex.line}")
        print(f"  overlong={overlong} (max_prompt_len={max_prompt_len}, max_len={max_len}): {report}", file=out)
    return 0


def main(argv=None) -> int:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="spjax data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a .jsonl/.json/.parquet data file, or a directory of them")
    v.add_argument("path", nargs="?", help="a data file or directory (default: the --config's data.path)")
    v.add_argument("--config", metavar="CFG", help="a run's config (file.py[:arg]): its data.path, format, lengths, "
                   "system prompt, template date and tokenizer, unless given here")
    v.add_argument("--tokenizer", help="a tokenizer directory, .gguf file or 'bytes' (adds token counts)")
    v.add_argument("--format", choices=FORMATS)
    v.add_argument("--max-prompt-len", type=int)
    v.add_argument("--max-len", type=int)
    v.add_argument("--system-prompt", metavar="TEXT",
                   help="the run's data.system_prompt: a system turn for prompts without one, counted in "
                        "their tokens as the run counts it (set it when the run's config does)")
    v.add_argument("--template-date", default=None, metavar="YYYY-MM-DD",
                   help="the run's data.template_date: the date a chat template prints as today's (default: today)")
    v.add_argument("--template-arg", action="append", default=None, metavar="NAME=VALUE",
                   help="the run's data.template_args: a variable for the chat template, VALUE as JSON (Qwen3: "
                        "enable_thinking=false); repeat for more")
    args = parser.parse_args(argv)
    data, paths = defaults, [args.path]
    if args.config:  # the run's settings, so the counts are the run's (the flags given win)
        from spjax.config import ConfigError, load_config
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            parser.error(f"--config: {e}")
        data = cfg.data
        args.tokenizer = args.tokenizer or cfg.tokenizer_path or cfg.model_path or None
        paths = [args.path] if args.path else [p for p in (data.path, data.eval_path) if p]
        if len(paths) == 2 and os.path.isdir(paths[0]) and _inside(paths[1], paths[0]):
            paths = paths[:1]  # the directory's check reads it (a held-out file among its data files)
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            print(f"spjax data: {missing[0]!r} ({args.config}): not a file or directory here (a TFDS name: a run "
                  "checks its records as it prepares them)", file=sys.stderr)
            return 2
    if not paths[0]:
        parser.error("give a PATH, or a --config whose data.path is set")
    for field in ("format", "max_prompt_len", "max_len", "system_prompt"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(data, field))
    args.template_date = args.template_date or data.template_date or None
    args.template_arg = data.template_args if args.template_arg is None else tuple(args.template_arg)
    try:
        variables = template_kwargs(args.template_arg, "--template-arg")
        if args.max_len < 2:  # (check_lengths would name data.max_prompt_len, the flag left at its default)
            raise ValueError(f"--max-len: must be >= 2, got {args.max_len}")
        check_lengths(args.max_prompt_len, args.max_len, "truncate")
        if args.template_date:
            DataConfig(template_date=args.template_date)  # its check: a date as YYYY-MM-DD
    except ValueError as e:  # (ConfigError is one)
        parser.error(str(e).replace("data.template_date", "--template-date")
                     .replace("data.max_prompt_len", "--max-prompt-len").replace("max_len=", "--max-len="))
    tokenizer, stops = None, ()
    if args.tokenizer:
        from spjax.hf import CheckpointError, load_model_config, load_tokenizer

        try:
            tokenizer = with_template_args(load_tokenizer(args.tokenizer), variables)
            if args.tokenizer.endswith(".gguf") or os.path.isfile(os.path.join(args.tokenizer, "config.json")):
                stops = stop_ids(load_model_config(args.tokenizer), tokenizer)  # a model's: its EOS ids too
        except (CheckpointError, OSError, ValueError) as e:  # missing or unreadable: the reason, not a traceback
            why = " ".join(str(e).split())
            print(f"spjax data: --tokenizer: {why if args.tokenizer in why else args.tokenizer + ': ' + why}",
                  file=sys.stderr)
            return 2
    try:
        return max(validate(p, args.format, tokenizer, args.max_prompt_len, args.max_len,
                            system_prompt=args.system_prompt, today=args.template_date, stops=stops) for p in paths)
    except KeyboardInterrupt:  # Ctrl-C on a large file: a line, not a traceback through the tokenizer threads
        print("\nspjax data: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
