"""The pod and Slurm launchers run any module that takes --distributed (gcloud / srun replaced by
recorders on PATH: what reaches the hosts is asserted, nothing is launched)."""
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recorder(bin_dir: Path, name: str, log: Path) -> None:
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {log}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def _run(script, tmp_path, env_extra, *args):
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.txt"
    bin_dir.mkdir(exist_ok=True)
    for name in ("gcloud", "srun"):
        _recorder(bin_dir, name, log)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env_extra}
    r = subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return log.read_text()


def test_tpu_pod_runs_training_or_any_module(tmp_path):
    pod = {"TPU_NAME": "v5p-128", "ZONE": "z"}
    argv = _run("tpu_pod.sh", tmp_path, {**pod, "WORKDIR": "gs://b/run", "DATA": "/gcs/b/d"}, "--config.seed=3")
    assert "--worker=all" in argv
    assert "-m rice_jax.train --config configs/l14_224_336.py --workdir gs://b/run --config.data.dir=/gcs/b/d " \
           "--distributed --config.seed=3" in argv
    argv = _run("tpu_pod.sh", tmp_path, {**pod, "MODULE": "rice_jax.labelling.clustering"}, "--data", "/gcs/b/d", "--k", "8")
    assert "-m rice_jax.labelling.clustering --distributed --data /gcs/b/d --k 8" in argv and "--workdir" not in argv


def test_slurm_runs_training_or_any_module(tmp_path):
    argv = _run("gpu_slurm.sh", tmp_path, {}, "/runs/a", "--config.seed=3").split("\n")
    assert argv[argv.index("-m") + 1:argv.index("-m") + 8] == [
        "rice_jax.train", "--config", "configs/gpu_cluster.py", "--workdir", "/runs/a", "--distributed", "--config.seed=3"]
    argv = _run("gpu_slurm.sh", tmp_path, {"MODULE": "rice_jax.labelling.clustering"}, "--data", "/d", "--k", "8").split("\n")
    assert argv[argv.index("-m") + 1:argv.index("-m") + 7] == ["rice_jax.labelling.clustering", "--distributed", "--data", "/d",
                                                               "--k", "8"]
