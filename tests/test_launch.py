"""The launch scripts: syntax, usage errors, and the exact command sequences their --dry-run prints."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/setup.sh", "launch/tpu_pod.sh", "launch/gpu_single_host.sh", "launch/slurm_multinode.sbatch"]


def bash(*args, env=None):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def commands(stdout):
    """The '+ '-prefixed lines of a dry run, each split into words as a shell would."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    res = bash("-n", script)
    assert res.returncode == 0, res.stderr


TPU = ["launch/tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--accelerator-type", "v5p-32",
       "--config", "configs/tiny.py", "--workdir", "gs://b/run"]


def test_tpu_pod_dry_run_prints_the_whole_gcloud_sequence():
    res = bash(*TPU, "--", "run.rounds=1", "data.path=a b")
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in gcloud)
    verbs = [c[4] for c in gcloud]
    # create; copy the checkout to every worker; install; train; fetch each of the 4 hosts' logs; delete
    assert verbs == ["create", "scp", "ssh", "ssh", "scp", "scp", "scp", "scp", "delete"], verbs
    create, copy, install, train, *fetch, delete = gcloud
    assert create[5] == "n" and "--zone=z" in create and "--accelerator-type=v5p-32" in create
    assert "--version=v2-alpha-tpuv5" in create  # v5p's default software version
    assert "n:~/spjax.tgz" in copy and "--worker=all" in copy
    for c in (install, train):
        assert c[5] == "n" and "--worker=all" in c
    install_cmd = next(w for w in install if w.startswith("--command="))
    assert "bash launch/setup.sh" in install_cmd and f"jax[tpu]=={_locked_jax()}" in install_cmd
    assert "gcsfuse --implicit-dirs b /mnt/gcs/b" in install_cmd  # gs:// workdirs are mounted
    train_cmd = next(w for w in train if w.startswith("--command="))
    run = shlex.split(train_cmd.split("&&", 1)[1].split("2>&1")[0])
    assert run == [".venv/bin/python", "-m", "spjax.train", "--config", "configs/tiny.py",
                   "--workdir", "/mnt/gcs/b/run", "run.rounds=1", "data.path=a b"]
    assert [c[-1] for c in fetch] == [f"--worker={w}" for w in range(4)]  # v5p-32: 16 chips on 4 hosts
    assert all(c[5] == "n:~/spjax-train.log" for c in fetch)
    assert delete[5] == "n" and "--quiet" in delete
    # the checkout goes out as one tarball, made before the copy
    tar = cmds.index(next(c for c in cmds if c[0] == "tar"))
    assert tar < cmds.index(copy)


def test_tpu_pod_keep_project_and_version():
    res = bash(*TPU, "--keep", "--project", "p", "--version", "v2-custom", "--resume")
    assert res.returncode == 0, res.stderr
    gcloud = [c for c in commands(res.stdout) if c[0] == "gcloud"]
    assert "delete" not in [c[4] for c in gcloud] and "keeping n" in res.stderr
    assert all("--project=p" in c for c in gcloud)
    assert "--version=v2-custom" in gcloud[0]
    assert " --resume" in next(w for w in gcloud[3] if w.startswith("--command="))


@pytest.mark.parametrize("args", [["--bogus"], ["--name"], TPU[1:7]])  # unknown flag; no value; missing flags
def test_tpu_pod_bad_flags_print_usage(args):
    res = bash("launch/tpu_pod.sh", *args)
    assert res.returncode != 0
    assert res.stdout == ""
    assert "usage: bash launch/tpu_pod.sh" in res.stderr


def _no_fake_devices():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's fake-device flag would be appended to the printed flags
    return env


def test_gpu_single_host_dry_run_prints_setup_and_train_command():
    res = bash("launch/gpu_single_host.sh", "--dry-run", "--cuda", "--config", "configs/tiny.py",
               "--workdir", "runs/x", "--", "run.rounds=1", env=_no_fake_devices())
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    assert cmds[0] == ["bash", "launch/setup.sh"]
    assert cmds[1] == [".venv/bin/python", "-m", "pip", "install", "-q", f"jax[cuda13]=={_locked_jax()}"]
    train = cmds[-1]
    assert train[0] == "env"
    i = train.index(".venv/bin/python")
    env = dict(w.split("=", 1) for w in train[1:i] if "=" in w)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".95"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
    assert train[i:] == [".venv/bin/python", "-m", "spjax.train", "--config", "configs/tiny.py",
                         "--workdir", "runs/x", "run.rounds=1"]


def test_gpu_xla_flags_are_known_to_this_xla():
    # An unknown flag in XLA_FLAGS aborts the process at start-up; the GPU flags are parsed on CPU too.
    res = bash("launch/gpu_single_host.sh", "--dry-run", "--skip-setup", "--config", "configs/tiny.py",
               env=_no_fake_devices())
    line = res.stdout.splitlines()[-1]
    flags = next(w for w in shlex.split(line[2:]) if w.startswith("XLA_FLAGS=")).split("=", 1)[1]
    sbatch = open(os.path.join(ROOT, "launch/slurm_multinode.sbatch")).read()
    assert set(re.findall(r"--xla_\w+=\w+", sbatch)) == set(flags.split())  # the two scripts agree
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_slurm_log_needs_no_directory_made_inside_the_job():
    """SLURM opens --output before the script runs: logs/ made by the script itself came too late."""
    sbatch = open(os.path.join(ROOT, "launch/slurm_multinode.sbatch")).read()
    out = re.search(r"^#SBATCH --output=(\S+)$", sbatch, re.M).group(1)
    assert "/" not in out, out


def test_gpu_single_host_bad_flag():
    res = bash("launch/gpu_single_host.sh", "--nope")
    assert res.returncode != 0 and "usage: bash launch/gpu_single_host.sh" in res.stderr
    res = bash("launch/gpu_single_host.sh", "--dry-run")
    assert res.returncode != 0 and "missing --config" in res.stderr


def _locked_jax():
    """The jax version in requirements.lock, as the launch scripts pin the accelerator extras to it."""
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        pins = [line.split("==")[1].strip() for line in f if line.startswith("jax==")]
    assert len(pins) == 1 and pins[0].count(".") == 2, pins
    return pins[0]
