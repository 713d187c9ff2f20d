"""Per-round metrics of one or several runs, side by side: a markdown table and a PNG.

  spjax report runs/chi2 runs/spin [--out report]     (also: python -m spjax.report ...)

Reads each workdir's metrics.jsonl (the 'round' rows) and rounds/init_eval.json (the starting
model), so it works on finished, running and killed runs alike. Every run also writes
WORKDIR/report.png (and report.md) when it ends.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# (metric, panel title): what the table and the picture show, in this order.
PANELS = [("judge_score", "held-out judge score, greedy ↑"), ("win_rate", "win rate over the previous model"),
          ("judge_best", "judge: best of K samples ↑"), ("nll", "held-out NLL ↓"), ("f1", "held-out token F1 ↑"), ("rouge_l", "held-out ROUGE-L ↑"),
          ("margin", "train reward margin r − r′"), ("eval_accuracy", "held-out P(r > r′) (→ 0.5)"),
          ("frac_at_bound", "rewards at ±1/c"), ("gen_len", "greedy answer length (tokens)"),
          ("len_drift", "answer length vs the initial model's − 1"),
          ("held_lp_real", "held-out log p(real response)"), ("train_s", "train seconds / round"),
          ("sample_s", "sample seconds / round"), ("score_s", "score seconds / round")]


def load_run(workdir: str) -> dict:
    """{row name ('initial', 'round 0', ...): metrics} of a run, the last logged row of each round."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no metrics.jsonl (not a spjax workdir?)")
    rows = {}
    init = os.path.join(workdir, "rounds", "init_eval.json")
    if os.path.exists(init):
        with open(init, encoding="utf-8") as f:
            rows["initial"] = json.load(f)
    rounds = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed run
                continue
            if row.get("kind") == "round" and "step" in row:  # (a row some other writer added: skipped)
                rounds[int(row["step"])] = row
    rows.update({f"round {t}": rounds[t] for t in sorted(rounds)})
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def table(runs: dict) -> str:
    """Markdown: one row per (run, round), one column per metric in PANELS that some row has (a run without
    a judge has no judge columns)."""
    cols = [m for m, _ in PANELS if any(m in r for rows in runs.values() for r in rows.values())] or \
        [m for m, _ in PANELS]
    out = ["| run | round | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, rows in runs.items():
        for row_name, row in rows.items():
            out.append(f"| {name} | {row_name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(out)


def plot(runs: dict, path: str):
    """A grid of per-round curves, one line per run (x = round; the initial model at x = -1)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(m, t) for m, t in PANELS if any(m in r for rows in runs.values() for r in rows.values())]
    if not panels:  # rows, but none with a metric the picture shows
        return False
    ncol = 3
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.9 * nrow), squeeze=False)
    color = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # a run's colour in every panel
    for ax, (metric, title) in zip(axes.flat, panels):
        for name, rows in runs.items():
            pts = [(-1 if k == "initial" else int(k.split()[1]), r[metric]) for k, r in rows.items()
                   if isinstance(r.get(metric), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=color[name])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (−1: initial)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[name], marker="o", label=name) for name in runs]
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / nrow))  # room above the panels for the legend
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 4), fontsize=8)  # every run, once
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)  # all or nothing
    return True


def write(workdirs: list, out: str) -> tuple:
    """Write out.md and out.png for these runs; returns their paths (the PNG's None while no run has
    a row yet: one starting up, or killed before its initial evaluation)."""
    workdirs = list(dict.fromkeys(os.path.normpath(w) for w in workdirs))  # `R R/`: one run, shown once
    names = [os.path.basename(w) or w for w in workdirs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(w) for w in workdirs]
    runs = {n: load_run(w) for n, w in zip(names, workdirs)}
    md, png = out + ".md", out + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # --out runs/compare: runs/ may be new
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write(table(runs) + "\n")
    os.replace(md + ".tmp", md)
    if not any(runs.values()):
        return md, None
    return md, (png if plot(runs, png) else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spjax report", description="Per-round metrics of runs: markdown + PNG.")
    ap.add_argument("workdirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    ap.add_argument("--out", default="report", help="output path without extension (default: ./report)")
    args = ap.parse_args(argv)
    try:
        md, png = write(args.workdirs, args.out)
    except ImportError as e:  # an environment of the user's own without matplotlib: the table is written
        with open(args.out + ".md", encoding="utf-8") as f:
            print(f.read(), end="")
        print(f"spjax report: wrote {args.out}.md; no PNG: {e} (pip install matplotlib)", file=sys.stderr)
        return 1
    except OSError as e:  # a workdir without metrics.jsonl; --out where no file can be written
        print(f"spjax report: {e}", file=sys.stderr)
        return 2
    with open(md, encoding="utf-8") as f:
        print(f.read(), end="")
    print(f"wrote {md} and {png}" if png else f"wrote {md}; no run has a row yet (its initial evaluation), so no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
