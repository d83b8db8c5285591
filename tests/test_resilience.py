"""Runs that survive a pod: stage lr, damaged shards, damaged checkpoints, partial restore, cloud paths,
Explicit meshes, one-line CLI errors, agreed preemption across processes."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rice_jax import backbones, checkpoint, optim, train
from rice_jax.data import records
from rice_jax.sharding import make_mesh
from tests.fake_gcs import fake_gcs
from tests.helpers import synthetic_dataset
from tests.test_train import ROOT, _env, _overrides, load_config, small_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("resilience_data"), 96, seed=11, num_shards=4, vocab_size=128,
                             clusters=12)


def _final_params(workdir):
    state, _, step = checkpoint.read_raw(workdir)
    return jax.tree.map(np.asarray, state["params"]), step


def _assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- per-stage learning rate
def test_stage_lr_schedule_defaults_to_paper_tenth():
    c = load_config("tiny")
    c.optim.lr, c.optim.warmup_steps = 1.0, 2
    c.stages = ((10, 32), (6, 64))
    sched = optim.make_schedule(train.optim_config(c), c.stages)
    assert optim.stage_lr_multipliers(train.optim_config(c), c.stages) == (1.0, 0.1)
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(1.0)   # stage 0: warm-up to lr
    assert float(sched(9)) < 0.1                                              # cosine towards 0
    assert float(sched(10)) == 0.0 and float(sched(12)) == pytest.approx(0.1)  # stage 1: fresh warm-up to lr/10
    assert max(float(sched(s)) for s in range(10, 16)) == pytest.approx(0.1)
    c.optim.stage_lr_mults = (1.0, 0.5)
    assert float(optim.make_schedule(train.optim_config(c), c.stages)(12)) == pytest.approx(0.5)
    c.optim.stage_lr_mults = (1.0,)
    with pytest.raises(ValueError, match="stage_lr_mults has 1 entries for 2 stages"):
        optim.make_schedule(train.optim_config(c), c.stages)


# ----------------------------------------------------------------------------- damaged shards
def _damage(d: Path, how: str) -> str:
    m = records.read_manifest(d)
    name = m["shards"][2]
    p = d / name
    if how == "truncated":
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif how == "zero_byte":
        p.write_bytes(b"")
    elif how == "missing":
        p.unlink()
    elif how == "wrong_count":
        m["shard_counts"][2] += 3
        records.write_manifest(d, m)
    return name


# (damage, what the start-up size check says (None: it passes), what opening the shard says)
DAMAGE = [("truncated", "bytes, the manifest says", "cannot be opened"), ("zero_byte", "empty", "empty"),
          ("missing", "missing", "missing"), ("wrong_count", None, "records, the manifest says")]


@pytest.mark.parametrize("how,by_size,by_open", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_shard_is_named_reported_and_skippable(data_dir, tmp_path, how, by_size, by_open, capsys):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    before = {r.image_id: r for r in records.RecordSource(d)}
    counts = records.read_manifest(d)["shard_counts"]
    name = _damage(d, how)

    def one_line(e, problem):
        msg = str(e.value)
        assert name in msg and problem in msg and "skip_damaged_shards" in msg and "\n" not in msg, msg

    with pytest.raises(records.DamagedShardError) as e:
        records.RecordSource(d, check="open")
    one_line(e, by_open)
    if by_size is None:
        # Size and name as the manifest says: trusted at start-up, refused when the shard is first read.
        src = records.RecordSource(d)
        with pytest.raises(records.DamagedShardError) as e:
            src[counts[0] + counts[1]]
        one_line(e, by_open)
    else:
        with pytest.raises(records.DamagedShardError) as e:
            records.RecordSource(d)
        one_line(e, by_size)

    assert records.main(["--validate", str(d)]) == 1
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith(name))
    assert by_open in row
    assert f"3/4 shards healthy" in out

    src = records.RecordSource(d, skip_damaged=True, check="open" if by_size is None else "size")
    assert [os.path.basename(s.path) for s in src.skipped] == [name]
    assert len(src) == sum(counts) - counts[2]
    # Kept records keep their dataset index (cluster labels are keyed by it) and their content.
    for i in range(len(src)):
        rec = src[i]
        np.testing.assert_array_equal(rec.boxes, before[rec.image_id].boxes)
    # The manifest is the index authority (sidecars were written against it).
    starts = np.cumsum([0] + records.read_manifest(d)["shard_counts"])
    assert src.dataset_index(counts[0] + counts[1]) == starts[3]   # first record after the gap


def test_validate_reports_healthy_dataset(data_dir, capsys):
    assert records.main(["--validate", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "4/4 shards healthy" in out and out.count(" ok") == 4


def test_training_skips_damaged_shards_loudly(data_dir, tmp_path, capsys):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    name = _damage(d, "truncated")
    c = small_config(d, steps=4, every=100)
    with pytest.raises(records.DamagedShardError, match=name):
        train.train(c, tmp_path / "strict")
    c.data.skip_damaged_shards = True
    summary = train.train(c, tmp_path / "run")
    out = capsys.readouterr().out
    assert "WARNING: skipping 1 damaged shard(s)" in out and name in out
    assert len(re.findall(r"\[train\] first step done \d+\.\d s after start", out)) == 1   # reported once
    assert summary["end_step"] == 4 and [os.path.basename(p) for p in summary["skipped_shards"]] == [name]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = records.read_manifest(d)["shard_counts"]
    assert rows[-1]["skipped_shards"] == 1 and rows[-1]["skipped_shard_records"] == counts[2]


def test_cli_errors_are_one_line_with_exit_code_2(data_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    name = _damage(d, "zero_byte")
    env = _env()
    cases = [
        ([sys.executable, "-m", "rice_jax.train", f"--config={ROOT / 'rice_jax' / 'configs' / 'rice.py'}:tiny",
          f"--workdir={tmp_path / 'w'}", f"--config.data.dir={d}"], name),
        ([sys.executable, "-m", "rice_jax.train", f"--config={ROOT / 'rice_jax' / 'configs' / 'rice.py'}:tiny",
          f"--workdir={tmp_path / 'w'}", f"--config.data.dir={tmp_path / 'nothing'}"], "not a rice_jax region dataset"),
        ([sys.executable, "-m", "rice_jax.data.tokenizer", "--data", str(d)], name),
        ([sys.executable, "-m", "rice_jax.labelling.clustering", "--data", str(d), "--k", "4"], name),
        ([sys.executable, "-m", "rice_jax.evaluate", "--backbone", f"ckpt:{tmp_path / 'none'}", "--data", str(data_dir)],
         "no checkpoint found"),
    ]
    for cmd, needle in cases:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, (cmd, res.stderr[-2000:])
        err = [l for l in res.stderr.splitlines() if l.strip()]
        assert err[-1].startswith("error: ") and needle in err[-1], (cmd, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
    # The missing-tokenizer advice names the command to run.
    m = records.read_manifest(d)
    m["tokenizer"] = None
    records.write_manifest(d, m)
    c = load_config("tiny")
    c.data.dir = str(d)
    with pytest.raises(ValueError, match=f"python -m rice_jax.data.tokenizer --data {d}"):
        train.validate_config(c, 8, m)


# ----------------------------------------------------------------------------- damaged checkpoints
def _truncate_largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    return victim


def test_damaged_newest_checkpoint_falls_back_and_ends_bitwise(data_dir, tmp_path, capsys):
    c = small_config(data_dir, steps=24, every=6)
    c.keep_checkpoints = 3
    train.train(c, tmp_path / "ref")
    run = tmp_path / "run"
    train.train(c, run, stop_after=18)
    assert checkpoint.Checkpointer(run, every=1, keep=3).latest_step() == 18
    _truncate_largest_array_file(run / "checkpoints" / "18")

    c.strict_restore = True
    with pytest.raises(checkpoint.CheckpointDamaged, match="checkpoint step 18"):
        train.train(c, run)
    assert (run / "checkpoints" / "18").exists()    # strict: nothing moved

    c.strict_restore = False
    capsys.readouterr()
    summary = train.train(c, run)
    out = capsys.readouterr().out
    assert "checkpoint step 18" in out and "cannot be read" in out and "resumed from step 12" in out
    assert summary["start_step"] == 12 and summary["end_step"] == 24
    moved = list((run / "damaged_checkpoints").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("18-")   # kept, not deleted
    (a, sa), (b, sb) = _final_params(tmp_path / "ref"), _final_params(run)
    assert sa == sb == 24
    _assert_same_tree(a, b)


def test_resume_reads_with_the_checkpoints_worker_count(data_dir, tmp_path, capsys):
    """Training fed by 2 Grain worker processes, stopped and resumed on a host where data.workers
    resolves differently: the resume reads with the checkpoint's 2 workers (Grain's iterator state is
    per worker) and ends bitwise on the uninterrupted run."""
    c = small_config(data_dir, steps=4, every=2)
    c.data.workers = 2
    train.train(c, tmp_path / "ref")
    run = tmp_path / "run"
    train.train(c, run, stop_after=2)
    c.data.workers = 0
    capsys.readouterr()
    summary = train.train(c, run)
    out = capsys.readouterr().out
    assert "reading with 2 data worker(s) as the checkpoint was written" in out and summary["start_step"] == 2
    (a, sa), (b, sb) = _final_params(tmp_path / "ref"), _final_params(run)
    assert sa == sb == 4
    _assert_same_tree(a, b)


# ----------------------------------------------------------------------------- partial restore (init_from)
def test_init_from_ckpt_reads_only_the_backbone_and_region_parameters(data_dir, tmp_path, monkeypatch):
    from orbax.checkpoint._src.serialization import jax_array_handlers

    c = small_config(data_dir, steps=2, every=100)
    train.train(c, tmp_path / "src")
    saved, _, _ = checkpoint.read_raw(tmp_path / "src")

    read = []
    orig = jax_array_handlers.ArrayHandler.deserialize

    async def spy(self, infos, args=None):
        read.extend(i.name for i in infos)
        return await orig(self, infos, args)

    monkeypatch.setattr(jax_array_handlers.ArrayHandler, "deserialize", spy)
    mesh = make_mesh(4, 2)
    c2 = small_config(data_dir)
    c2.mesh.fsdp = 2
    c2.init_from = f"ckpt:{tmp_path / 'src'}"
    model_cfg = train.build_model_config(c2)
    state, setup = train.init_state(c2, mesh, model_cfg, 12, 128)
    targets = jax.tree.map(lambda x: x.sharding, state["params"]["model"]["backbone"])
    state = train.apply_init_from(c2.init_from, state, model_cfg)

    # The backbone and (tiny uses region_seed "roi") the region parameters; never head, centres or moments.
    assert read and all(n.startswith(("params.model.backbone.", "params.model.region_seed.")) for n in read), \
        sorted(set(read))[:5]
    assert any(n.startswith("params.model.region_seed.") for n in read)
    assert not any("centers" in n or "opt_state" in n for n in read)
    _assert_same_tree(jax.tree.map(np.asarray, state["params"]["model"]["region_seed"]),
                      jax.tree.map(np.asarray, saved["params"]["model"]["region_seed"]))
    got = state["params"]["model"]["backbone"]
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(targets)):
        assert x.sharding == s, path    # restored straight into the target shardings (FSDP here)
    _assert_same_tree(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, saved["params"]["model"]["backbone"]))


# ----------------------------------------------------------------------------- cloud paths
def test_gs_workdir_end_to_end_offline(data_dir, tmp_path, monkeypatch):
    from rice_jax import plot
    from rice_jax.models import hf

    bucket_root = tmp_path / "gcs"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    c = small_config(data_dir, steps=8, every=4)
    with fake_gcs(str(bucket_root)):
        s1 = train.train(c, "gs://bkt/runs/a", stop_after=4)
        s2 = train.train(c, "gs://bkt/runs/a")
        run = bucket_root / "bkt" / "runs" / "a"
        assert s1["end_step"] == 4 and s2["start_step"] == 4 and s2["end_step"] == 8
        assert {"config.json", "summary.json", "metrics.jsonl", "tensorboard", "checkpoints"} <= set(os.listdir(run))
        steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [2, 4, 6, 8]                       # the resumed run continued the remote file
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
        assert {"4", "8"} <= set(os.listdir(run / "checkpoints"))

        # init_from and export through gs:// as well.
        c2 = small_config(data_dir)
        c2.init_from = "ckpt:gs://bkt/runs/a"
        model_cfg = train.build_model_config(c2)
        state, _ = train.init_state(c2, make_mesh(8, 1), model_cfg, 12, 128)
        state = train.apply_init_from(c2.init_from, state, model_cfg)
        vit = backbones.load("ckpt:gs://bkt/runs/a")
        hf.save_hf(vit, "gs://bkt/export/hf")
        assert (bucket_root / "bkt" / "export" / "hf" / "config.json").exists()
        back = hf.load_hf("gs://bkt/export/hf")
        x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(back(x).pooler_output), np.asarray(vit(x).pooler_output), atol=1e-6)
        plot.plot("gs://bkt/runs/a")
        assert (run / "curves.png").stat().st_size > 0
    assert os.listdir(cwd) == []                           # no local "gs:" folder anywhere
    saved, _, _ = checkpoint.read_raw(run)
    _assert_same_tree(jax.tree.map(np.asarray, state["params"]["model"]["backbone"]),
                      jax.tree.map(np.asarray, saved["params"]["model"]["backbone"]))


def test_remote_shards_need_a_mount():
    with fake_gcs("/nonexistent-root-never-created"):
        with pytest.raises(ValueError, match="gcsfuse"):
            records.RecordSource.__init__(object.__new__(records.RecordSource), "gs://bkt/data")


# ----------------------------------------------------------------------------- explicit meshes
def test_train_step_same_on_auto_and_explicit_meshes(data_dir):
    from rice_jax.data import pipeline

    c = small_config(data_dir)
    it = iter(pipeline.make_dataset(data_dir, pipeline.PipelineConfig(image_size=32, num_regions=6, max_labels=4,
                                                                       batch_size=16, seed=0)))
    batch = next(it)
    out = {}
    for axis_type in ("auto", "explicit"):
        c.mesh.axis_type = axis_type
        mesh = make_mesh(4, 2, axis_type=axis_type)
        state, setup = train.init_state(c, mesh, train.build_model_config(c), 12, 128)
        step, bsh = train.make_train_step(c, setup)
        for _ in range(2):
            state, metrics = step(state, train.to_global_batch(batch, bsh))
        out[axis_type] = (float(metrics["loss"]), jax.tree.map(np.asarray, state["params"]))
    assert out["auto"][0] == pytest.approx(out["explicit"][0], rel=1e-5)
    for x, y in zip(jax.tree.leaves(out["auto"][1]), jax.tree.leaves(out["explicit"][1])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- agreed preemption
def _launch_two(workdir, c, port):
    env = dict(_env(4), NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", PORT=str(port))
    return subprocess.Popen(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(workdir), *_overrides(c)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow(seconds=120)
def test_sigterm_to_one_host_stops_both_at_the_same_step(data_dir, tmp_path):
    total = 40
    c = small_config(data_dir, steps=total, every=1000)
    ref = _launch_two(tmp_path / "ref", c, _free_port())
    out, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]

    run = tmp_path / "run"
    proc = _launch_two(run, c, _free_port())
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    # SIGTERM to process 1 only, as a TPU maintenance event hits one host.
    pid = subprocess.run(["pgrep", "-f", "--", f"--workdir {run} .*--process-id 1"], capture_output=True,
                         text=True).stdout.split()
    assert len(pid) == 1, pid
    os.kill(int(pid[0]), signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]             # both processes exit 0
    import re

    said = dict(re.findall(r"process (\d): preemption \(SIGTERM\): checkpoint written at step (\d+)", out))
    assert set(said) == {"0", "1"} and len(set(said.values())) == 1, out[-3000:]   # both, at the same step
    step = checkpoint.Checkpointer(run, every=1, keep=3).latest_step()
    assert step == int(said["0"])
    assert 0 < step < total                              # only the agreed preemption save wrote it
    meta = checkpoint.read_meta(run)
    assert meta["step"] == step
    # Restart: resumes at the agreed step and ends bitwise where the uninterrupted run ends.
    proc = _launch_two(run, c, _free_port())
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from step {step}" in out
    (a, sa), (b, sb) = _final_params(tmp_path / "ref"), _final_params(run)
    assert sa == sb == total
    _assert_same_tree(a, b)


def test_changed_config_is_not_mistaken_for_damage(data_dir, tmp_path):
    c = small_config(data_dir, steps=2, every=100)
    train.train(c, tmp_path)
    c2 = small_config(data_dir, steps=4, every=100)
    c2.loss.pad_classes_to = 1024          # centre matrices of another size
    with pytest.raises(checkpoint.CheckpointIncompatible, match="centers_obj"):
        train.train(c2, tmp_path)
    assert not (tmp_path / "damaged_checkpoints").exists() and (tmp_path / "checkpoints" / "2").exists()
