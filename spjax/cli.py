"""The `spjax` command: one entry point, a subcommand per job (like `trl sft`, `trl dpo`).

  spjax train --config configs/demo.py --workdir runs/demo [--resume] [key=value ...]
  spjax data validate data.jsonl [--tokenizer MODEL]
  spjax report runs/chi2 runs/spin [--out report]
  spjax compile-check --config configs/spin_zephyr7b_v5p.py --topology v5p-32
  spjax export --config configs/demo.py --workdir runs/demo [--out DIR] [--dtype bfloat16]

Each subcommand is also `python -m spjax.<module>` (train, data, report, compile_check).
"""
from __future__ import annotations

import argparse
import os
import sys


def export_main(argv=None) -> int:
    """Write a run's latest checkpoint as a Hugging Face directory (e.g. of a run stopped early)."""
    ap = argparse.ArgumentParser(prog="spjax export", description=export_main.__doc__)
    ap.add_argument("--config", required=True, help="the run's config (file.py[:arg])")
    ap.add_argument("--workdir", required=True, help="the run's directory (with checkpoints/)")
    ap.add_argument("--out", default=None, help="default: WORKDIR/export")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="the weights' dtype in the files (default: the run's model.param_dtype)")
    ap.add_argument("overrides", nargs="*", help="the run's key=value overrides")
    args = ap.parse_intermixed_args(argv)
    from spjax import checkpoint as ckpt_lib, hf, ledger, saving, sharding as shd
    from spjax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
            raise ConfigError(f"--workdir {args.workdir}: no checkpoints/ (not a spjax run?)")
        if os.path.exists(os.path.join(args.workdir, "start.json")):  # the run as it ran: lora.alpha, the model...
            cfg = ledger.check_start(cfg, args.workdir, print, resume=False)
        if cfg.run.keep_best and args.out is None and os.path.isdir(os.path.join(args.workdir, "export")):
            raise ConfigError(f"{args.workdir}/export holds the round run.keep_best={cfg.run.keep_best} kept, not the "
                              "latest checkpoint: pass --out DIR to write that elsewhere")
        mesh = shd.make_mesh(cfg.mesh)
        model_cfg = hf.initial_config(cfg)  # the structure only: the weights come from the checkpoint
        # A LoRA checkpoint holds the adapters: the frozen base is loaded as the run loaded it.
        base = hf.load_initial(cfg, mesh)[1] if model_cfg.lora.rank else None
        checkpointer = ckpt_lib.Checkpointer(os.path.join(args.workdir, "checkpoints"), async_save=False)
        restored = saving.restore_latest(checkpointer, model_cfg, cfg.optim, mesh, base, move_bad=False)
        checkpointer.close()
        if restored is None:
            raise ConfigError(f"--workdir {args.workdir}: no checkpoint restores")
        state, meta = restored
        tok = hf.load_tokenizer(cfg.tokenizer_path or cfg.model_path)
        out = hf.save_pretrained(model_cfg, state.params, args.out or os.path.join(args.workdir, "export"),
                                 tokenizer=tok, replace_any=args.out is None,  # --out: never a workdir
                                 source=cfg.model_path, dtype=args.dtype)
    except (ConfigError, hf.CheckpointError) as e:
        print(f"spjax export: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a full disk or a read-only target: one line; the rest propagate
        from spjax.train import io_failure
        failed = io_failure(e)
        if failed is None:
            raise
        out = args.out or os.path.join(args.workdir, "export")
        kept = " (the earlier export there is intact)" if os.path.exists(os.path.join(out, hf.EXPORT_MARK)) else ""
        print(f"spjax export: I/O error: {failed[0] or out}: {failed[1]}{kept}", file=sys.stderr)
        return 3
    r, phase = int(meta["round"]), meta["phase"]
    which = (f"round {r}'s, at training step {meta['step']}" if phase == "train" else
             "the initial model's" if r == 0 else f"the model after round {r - 1}")
    print(f"exported the latest checkpoint ({which}) to {out}")
    return 0


def _commands():
    from spjax import compile_check, report, train
    from spjax.data import __main__ as data_cli
    return {"train": (train.main, "run or resume self-play fine-tuning from a Python config"),
            "data": (data_cli.main, "check a data file: `spjax data validate FILE [--tokenizer MODEL]`"),
            "report": (report.main, "per-round metrics of runs side by side: markdown table + PNG"),
            "compile-check": (compile_check.main, "compile a config's programs ahead of time; per-device memory"),
            "export": (export_main, "write a run's latest checkpoint as a Hugging Face directory")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in commands.items()]
        print("usage: spjax COMMAND [ARGS...]   (spjax COMMAND --help for each)\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"spjax: unknown command {name!r} (one of: {', '.join(commands)})", file=sys.stderr)
        return 2
    return commands[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
