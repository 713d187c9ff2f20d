"""Compile once: a run's later rounds lower no program its first round did not (on a 7B model each
costs minutes of compile while the accelerator idles)."""
import logging

from spjax import rounds
from spjax.config import load_config
from tests.test_rounds import TINY


class _Lowered(logging.Handler):
    """The names of the programs JAX lowers (pxla logs each at DEBUG, or WARNING with jax_log_compiles)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.names.append(msg.split()[1])


def test_later_rounds_compile_nothing_new(tmp_path):
    """run.mix_previous doubles round 1's pairs: a new step count, which compiled the whole train step
    again (the schedule's step counts were constants of the program); a LoRA policy's merged weights
    were re-placed through a newly compiled program every sampling batch; packed scoring compiled a
    forward pass for each new row count; the optimizer's init every round. Only the init program of
    a new step count (zeros and a copy) may compile after round 0."""
    cfg = load_config(TINY, ["run.rounds=3", "run.mix_previous=true", "lora.rank=4",
                             f"data.tfds_dir={tmp_path / 'tfds'}"])
    lowered, logger = _Lowered(), logging.getLogger("jax._src.interpreters.pxla")
    level, marks = logger.level, {}

    def echo(line):
        if line.startswith("self-play summary after round"):
            marks[int(line.splitlines()[0].split()[-1])] = len(lowered.names)

    logger.addHandler(lowered)
    logger.setLevel(logging.DEBUG)
    try:
        summary = rounds.run(cfg, str(tmp_path / "run"), echo=echo)
    finally:
        logger.removeHandler(lowered)
        logger.setLevel(level)
    assert set(summary) == {"initial", "round 0", "round 1", "round 2"} and set(marks) == {0, 1, 2}
    assert "jit(train_step)" in lowered.names[:marks[0]]  # (seen: the handler hears the lowering)
    later = lowered.names[marks[0]:marks[2]]
    assert set(later) <= {"jit(init)"} and len(later) <= 1, later
    # then the export, which gathers the params a layer at a time (one slicing program per kind of layer leaf)
    # and copies each param outside the layers before its gather (one copy program per such param at most)
    export = lowered.names[marks[2]:]
    from spjax import hf, model
    shapes = model.param_shapes(hf.initial_config(cfg))
    kinds, tops = len(shapes["layers"]), len(shapes) - 1
    assert set(export) <= {"jit(_layer)", "jit(_copy)"}, export
    assert export.count("jit(_layer)") <= kinds and export.count("jit(_copy)") <= tops, (export, kinds, tops)
