"""A LoRA self-play run end to end (configs/tiny.py, lora.rank=4): its checkpoints hold the adapters
only, a resume from either kind of checkpoint (a round's end, mid-round) joins them with the run's
base and finishes bitwise equal, `spjax export` does the same, and a different base is refused."""
import os
import shutil

import jax
import numpy as np
import pytest

from spjax import checkpoint as ckpt_lib, hf, lora, saving, sharding as shd
from spjax.config import MeshConfig, load_config
from tests.test_rounds import TINY, _export_bytes, _train, tfds_dir  # noqa: F401 (a fixture this module uses)

LORA = "lora.rank=4"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tfds_dir):
    workdir = tmp_path_factory.mktemp("lora_reference")
    proc = _train(workdir, LORA, tfds_dir=tfds_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_checkpoints_hold_the_adapters_only(lora_run):
    cfg = load_config(TINY, [LORA])
    mesh = shd.make_mesh(cfg.mesh)
    model_cfg, base = hf.load_initial(cfg, mesh)  # as the run loaded it
    ck = ckpt_lib.Checkpointer(os.path.join(lora_run, "checkpoints"), async_save=False)
    with pytest.raises(ValueError, match="needs the run's params"):
        saving.restore_latest(ck, model_cfg, cfg.optim, mesh)
    state, meta = saving.restore_latest(ck, model_cfg, cfg.optim, mesh, base)
    ck.close()
    adapters, frozen = lora.split(model_cfg, state.params)
    assert meta[saving.BASE_SUMS] == saving.base_sums(model_cfg, base) and state.opt_state is None
    # Integer checksums: the same on another mesh (a resume on other devices), not for a changed leaf.
    other = shd.make_mesh(MeshConfig(data=2, fsdp=4))
    assert saving.base_sums(model_cfg, jax.device_put(base, shd.param_shardings(model_cfg, other))) == meta[saving.BASE_SUMS]
    nudged = jax.tree.map(lambda x: x, base)
    nudged["final_norm"] = nudged["final_norm"].at[3].add(1e-3)
    assert saving.base_sums(model_cfg, nudged) != meta[saving.BASE_SUMS]
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(lora.split(model_cfg, base)[1])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    on_disk = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in
                  os.walk(os.path.join(lora_run, "checkpoints", str(ck.steps()[-1]))) for f in files)
    assert on_disk < size(adapters) + size(frozen) / 2, (on_disk, size(adapters), size(frozen))


def test_killed_twice_then_resumed_is_bitwise_identical(lora_run, tfds_dir, tmp_path):
    """Killed in round 1's scoring (the round-0-end checkpoint: adapters, no optimizer state), then in
    round 1's training after its step-2 checkpoint (adapters and optimizer state)."""
    work = tmp_path / "run"
    for k, kill_at in enumerate(["score:3", "train:3"]):
        killed = _train(work, *(["--resume"] if k else []), LORA, kill_at=kill_at, tfds_dir=tfds_dir)
        assert killed.returncode == -9, (kill_at, killed.returncode, killed.stderr[-2000:])
    resumed = _train(work, "--resume", LORA, tfds_dir=tfds_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at round 1, phase train, step 2" in resumed.stdout
    assert _export_bytes(work) == _export_bytes(lora_run)


def test_export_joins_the_base_and_refuses_another(lora_run, tmp_path, capsys):
    from spjax import cli
    out = tmp_path / "exported"
    assert cli.main(["export", "--config", TINY, "--workdir", str(lora_run), "--out", str(out), LORA]) == 0
    with open(out / "model.safetensors", "rb") as f:
        assert f.read() == _export_bytes(lora_run)
    # Another seed draws another random base: the adapters were not trained on it. The run's start.json
    # says so first; without it (e.g. another base at the same model_path), the base's checksums do.
    capsys.readouterr()
    assert cli.main(["export", "--config", TINY, "--workdir", str(lora_run), "--out", str(tmp_path / "x"),
                     LORA, "run.seed=7"]) == 2
    assert "spjax export: run.seed: 0 -> 7: these shape the model" in capsys.readouterr().err
    shutil.copytree(lora_run, tmp_path / "run", ignore=shutil.ignore_patterns("start.json", "rounds", "export"))
    assert cli.main(["export", "--config", TINY, "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "x"),
                     LORA, "run.seed=7"]) == 2
    assert "base weights differ" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
