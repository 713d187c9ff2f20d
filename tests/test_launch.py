"""The launch scripts: syntax, usage errors, the exact command sequences their --dry-run prints, and real
runs against stub gcloud, srun and python executables (interruptions, clean-up, early checks)."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

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
    # SPJAX_DISTRIBUTED=1: nothing else on a TPU VM tells spjax the slice has several hosts
    assert run == ["SPJAX_DISTRIBUTED=1", ".venv/bin/python", "-m", "spjax.train", "--config", "configs/tiny.py",
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
    train_cmd = next(w for w in gcloud[3] if w.startswith("--command="))
    assert " --resume" in train_cmd and "| tee -a ~/spjax-train.log" in train_cmd  # a resumed run's log grows


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


# -- tpu_pod.sh for real against a stub gcloud, in a copy of the checkout small enough to tar in an instant

GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_CALLS"  # each call, one line; the training ssh leaves a mark, sleeps and fails as told
case "$*" in
  *spjax.train*) touch "$GCLOUD_CALLS.train"; sleep "${GCLOUD_TRAIN_SLEEP:-0}"; exit "${GCLOUD_TRAIN_RC:-0}" ;;
esac
"""


@pytest.fixture
def pod(tmp_path):
    """A checkout with the launch scripts and one config, gcloud stubbed on PATH, and a cwd outside both."""
    repo, stubs, cwd, tmp = (tmp_path / d for d in ("repo", "bin", "cwd", "tmp"))
    shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
    (repo / "configs").mkdir()
    shutil.copy(os.path.join(ROOT, "configs/tiny.py"), repo / "configs")
    shutil.copy(os.path.join(ROOT, "requirements.lock"), repo)
    for d in (stubs, cwd, tmp):
        d.mkdir()
    (stubs / "gcloud").write_text(GCLOUD)
    (stubs / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", TMPDIR=str(tmp),
               GCLOUD_CALLS=str(tmp_path / "calls"))
    return types.SimpleNamespace(repo=repo, cwd=cwd, tmp=tmp, calls=tmp_path / "calls", env=env,
                                 script=str(repo / "launch/tpu_pod.sh"))


POD_ARGS = ["--name", "n", "--zone", "z", "--accelerator-type", "v5p-16", "--config", "configs/tiny.py",
            "--workdir", "gs://b/run"]


def pod_run(pod, *args, **env):
    return subprocess.run(["bash", pod.script, *args], cwd=pod.cwd, capture_output=True, text=True, timeout=30,
                          env=dict(pod.env, **env))


def gcloud_verbs(pod):
    return [line.split()[3] for line in pod.calls.read_text().splitlines()]


def test_tpu_pod_run_deletes_its_slice_and_leaves_nothing_behind(pod):
    res = pod_run(pod, *POD_ARGS)
    assert res.returncode == 0, res.stderr
    assert gcloud_verbs(pod) == ["create", "scp", "ssh", "ssh", "scp", "scp", "delete"]
    assert os.listdir(pod.tmp) == []  # the tarball is gone
    logs = pod.repo / "logs/n"  # in the checkout, not in the cwd
    assert logs.is_dir() and os.listdir(pod.cwd) == []
    assert all(f" {logs}/worker{w}.log " in pod.calls.read_text() for w in (0, 1))
    assert f"logs in {logs}" in res.stderr


def test_tpu_pod_skip_create_never_deletes_the_slice(pod):
    res = pod_run(pod, *POD_ARGS, "--skip-create", GCLOUD_TRAIN_RC="3")  # a failed run deleted it before
    assert res.returncode == 3
    assert gcloud_verbs(pod) == ["scp", "ssh", "ssh", "scp", "scp"]
    assert "keeping n (--skip-create" in res.stderr and "gcloud compute tpus tpu-vm delete n --zone=z" in res.stderr
    assert os.listdir(pod.tmp) == []
    res = bash(*TPU, "--skip-create")
    assert res.returncode == 0 and "delete" not in [c[4] for c in commands(res.stdout) if c[0] == "gcloud"]


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGHUP, True), (signal.SIGTERM, True),
                                        (signal.SIGTERM, False), (signal.SIGINT, False)])
def test_tpu_pod_interrupted_keeps_the_slice_and_says_how_to_go_on(pod, sig, group):
    # The signal goes to the whole process group, as a terminal's Ctrl-C or hang-up does, or to the script
    # alone (a bare `kill PID`), which must not wait out the 30 s training ssh; nor may that ssh outlive it.
    proc = subprocess.Popen(["bash", pod.script, *POD_ARGS, "--", "data.path=a b"], cwd=pod.cwd, text=True,
                            env=dict(pod.env, GCLOUD_TRAIN_SLEEP="30"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        for _ in range(200):  # until the training ssh runs
            if os.path.exists(f"{pod.calls}.train"):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)  # the pipes close only once the stub gcloud's sleep is gone too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err
    assert gcloud_verbs(pod) == ["create", "scp", "ssh", "ssh"]  # no delete
    lines = [line.strip() for line in err.splitlines()]
    again = shlex.split(next(line for line in lines if line.startswith("bash ")))
    assert again == ["bash", pod.script, *POD_ARGS, "--skip-create", "--resume", "--", "data.path=a b"]
    assert "gcloud compute tpus tpu-vm delete n --zone=z --quiet" in lines
    assert os.listdir(pod.tmp) == []


@pytest.mark.parametrize("args, says", [
    (["--config", "configs/nope.py"], "no such file"),
    (["--config", "configs/nope.py:iter2"], "no such file"),
    (["--accelerator-type", "v5p-31"], "TensorCores"),  # v4/v5p sizes count cores, 2 a chip
    (["--accelerator-type", "v4-12"], "whole hosts"),  # 6 chips: no whole hosts of 4
])
def test_tpu_pod_checks_config_and_type_before_creating(args, says):
    res = bash(*TPU, *args)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and says in res.stderr, res.stderr


def test_tpu_pod_config_may_name_a_stage_and_be_absolute():
    res = bash(*TPU, "--config", os.path.join(ROOT, "configs/tiny.py:iter2"))
    assert res.returncode == 0, res.stderr


def test_setup_help_prints_usage():
    res = bash("launch/setup.sh", "--help")
    assert res.returncode == 0, res.stderr
    assert "bash launch/setup.sh --test" in res.stdout and not res.stdout.startswith("#")


@pytest.mark.parametrize("nodes, overrides, runs", [("2", "", False), ("2", "run.rounds=1", False),
                                                    ("2", "run.rounds=1 mesh.fsdp=16", True), ("1", "", True)])
def test_slurm_several_nodes_need_a_mesh_override(tmp_path, nodes, overrides, runs):
    (tmp_path / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (tmp_path / "srun").chmod(0o755)
    env = dict(os.environ, SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_NODELIST="node[1-2]", SPJAX_DIR=ROOT,
               OVERRIDES=overrides, PATH=f"{tmp_path}:{os.environ['PATH']}")
    res = bash("launch/slurm_multinode.sbatch", env=env)
    if runs:
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[-1].endswith("spjax.train --config configs/spin_zephyr7b_8xh100.py "
                                                    f"--workdir runs/spin_zephyr7b_8xh100 {overrides}".strip())
    else:  # before srun, one line
        assert res.returncode == 2 and "srun" not in res.stdout
        assert len(res.stderr.splitlines()) == 1 and "mesh.fsdp=16" in res.stderr, res.stderr


def test_gpu_single_host_stays_one_process_under_srun(tmp_path):
    """Inside an srun step of several tasks, spjax.sharding.init_distributed would start the multi-host runtime."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
    shutil.copy(os.path.join(ROOT, "requirements.lock"), repo)
    (repo / ".venv/bin").mkdir(parents=True)
    probe = ("import jax; jax.distributed.initialize = lambda **kw: None; "  # what init_distributed would call
             "from spjax.sharding import init_distributed; print('distributed:', init_distributed())")
    (repo / ".venv/bin/python").write_text(f"#!/bin/sh\nexec {shlex.join([sys.executable, '-c', probe])}\n")
    (repo / ".venv/bin/python").chmod(0o755)
    srun_step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(["bash", str(repo / "launch/gpu_single_host.sh"), "--skip-setup", "--config",
                          "configs/tiny.py"], capture_output=True, text=True, timeout=60,
                         env=dict(_no_fake_devices(), **srun_step))
    assert res.returncode == 0, res.stderr
    assert "distributed: False" in res.stdout, res.stdout


@pytest.mark.parametrize("env, started", [({"SPJAX_DISTRIBUTED": "1"}, True), ({}, False)])
def test_a_tpu_pods_workers_start_the_multi_host_runtime(env, started):
    """A Cloud TPU VM's workers are known from its metadata server, not from its environment: spjax never
    started JAX's runtime there (a failed worker's peers waited on it; orbax had no barriers)."""
    probe = ("import jax; jax.distributed.initialize = lambda **kw: print('initialize', kw); "
             "from spjax.sharding import init_distributed; print('distributed:', init_distributed())")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=dict(_no_fake_devices(), JAX_PLATFORMS="cpu", **env))
    assert res.returncode == 0, res.stderr
    assert f"distributed: {started}" in res.stdout, res.stdout
    if started:  # every argument left to JAX's cluster detection
        assert "initialize {'coordinator_address': None, 'num_processes': None, 'process_id': None, " \
               "'local_device_ids': None}" in res.stdout, res.stdout


def test_slurm_requeued_job_resumes(tmp_path):
    """A requeued job (preemption, node failure, scontrol requeue) runs the script again with the same
    variables and SLURM_RESTART_COUNT > 0: it must pass --resume, or spjax.train refuses the workdir."""
    (tmp_path / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (tmp_path / "srun").chmod(0o755)
    env = dict(os.environ, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node01", SPJAX_DIR=ROOT,
               PATH=f"{tmp_path}:{os.environ['PATH']}")
    env.pop("RESUME", None)
    first = bash("launch/slurm_multinode.sbatch", env=env)
    again = bash("launch/slurm_multinode.sbatch", env=dict(env, SLURM_RESTART_COUNT="1"))
    assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
    assert "--resume" not in first.stdout.splitlines()[-1].split()
    assert again.stdout.splitlines()[-1].split()[-1] == "--resume"


@pytest.mark.parametrize("group", [False, True])
def test_gpu_single_host_sigterm_reaches_the_trainer_and_keeps_its_stop_line(tmp_path, group):
    """`kill PID` of the script stops the trainer, not only the shell around it. Ctrl-C or a scheduler's
    SIGTERM goes to the whole process group, tee included: the trainer's stop line (written after the
    signal) must still reach the console and the log, with its exit status (tee died with it)."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
    shutil.copy(os.path.join(ROOT, "requirements.lock"), repo)
    (repo / ".venv/bin").mkdir(parents=True)
    trainer = ("import signal, sys, time\n"
               "def stop(*_):\n"
               "    time.sleep(0.5)  # as spjax.train: the line comes after the signal\n"
               "    print('stopped by SIGTERM; Continue with ...', flush=True); sys.exit(143)\n"
               "signal.signal(signal.SIGTERM, stop)\n"
               "print('training', flush=True); time.sleep(30)\n")
    (repo / ".venv/bin/python").write_text(f"#!/bin/sh\nexec {shlex.join([sys.executable, '-c', trainer])}\n")
    (repo / ".venv/bin/python").chmod(0o755)
    log = repo / "logs/tiny.log"
    proc = subprocess.Popen(["bash", str(repo / "launch/gpu_single_host.sh"), "--skip-setup", "--config",
                             "configs/tiny.py"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for _ in range(200):
            if log.exists() and "training" in log.read_text():
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "stopped by SIGTERM" in log.read_text()


def test_tpu_pod_absolute_config_in_the_checkout_reaches_the_workers_relative():
    """The workers have the checkout at ~/spjax: this machine's absolute path to a config in it names no file there."""
    res = bash(*TPU, "--config", os.path.join(ROOT, "configs/tiny.py:iter2"))
    assert res.returncode == 0, res.stderr
    train = [c for c in commands(res.stdout) if c[0] == "gcloud"][3]
    train_cmd = next(w for w in train if w.startswith("--command="))
    run = shlex.split(train_cmd.split("&&", 1)[1].split("2>&1")[0])
    assert run[run.index("--config") + 1] == "configs/tiny.py:iter2", run


def test_slurm_without_the_venv_stops_before_srun(tmp_path):
    """SPJAX_DIR defaults to the submit directory: one without .venv fails on every node after srun starts."""
    (tmp_path / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (tmp_path / "srun").chmod(0o755)
    env = dict(os.environ, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node01", SPJAX_DIR=str(tmp_path),
               PATH=f"{tmp_path}:{os.environ['PATH']}")
    res = bash(os.path.join(ROOT, "launch/slurm_multinode.sbatch"), env=env)
    assert res.returncode == 2 and "srun" not in res.stdout, res.stdout
    assert ".venv" in res.stderr and "SPJAX_DIR" in res.stderr
