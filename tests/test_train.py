"""Training: configs, loss falls, exact resume after kill -9, SIGTERM, 8->4 restore, init_from, NaN skip."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rice_jax.configs.rice import get_config
from rice_jax import checkpoint, train
from rice_jax.sharding import make_mesh
from tests.helpers import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def load_config(arg="tiny"):
    return get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("train_data"), 96, seed=5, num_shards=2, vocab_size=128,
                             clusters=12)


def small_config(data_dir, steps=24, every=6, arg="tiny"):
    c = load_config(arg)
    c.data.dir = str(data_dir)
    c.batch_size = 16
    c.stages = ((steps, 32),)
    c.optim.warmup_steps = 4
    c.checkpoint_every = every
    c.log_every = 2
    c.progress_bar = False
    c.peak_flops = 1e11
    return c


def _overrides(c):
    return [f"--config.data.dir={c.data.dir}", f"--config.batch_size={c.batch_size}",
            f"--config.checkpoint_every={c.checkpoint_every}", "--config.log_every=2", "--config.optim.warmup_steps=4",
            "--config.progress_bar=False", "--config.peak_flops=1e11",
            f"--config.stages=(({c.stages[0][0]}, 32),)"]


def _cmd(c, workdir):
    return [sys.executable, "-m", "rice_jax.train", f"--config={ROOT / 'rice_jax' / 'configs' / 'rice.py'}:tiny",
            f"--workdir={workdir}", *_overrides(c)]


def _env(devices=8):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=str(ROOT))


def test_config_variants_and_errors(data_dir):
    for arg in ("tiny", "b16", "l14_336", "l14_560", "tiny,objective=mlcd"):
        c = load_config(arg)
        assert c.stages and c.model.backbone
    assert load_config("b16,objective=mlcd").loss.global_weight == 1.0
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("huge")
    c = load_config()
    with pytest.raises(AttributeError):
        c.optim.learning_rate = 1.0          # unknown key: the dict is locked
    with pytest.raises(TypeError):
        c.batch_size = "many"                # wrong type
    c = small_config(data_dir)
    c.batch_size = 12
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        train.validate_config(c, 8, {"num_clusters": 12})
    c = small_config(data_dir)
    with pytest.raises(ValueError, match="no cluster labels: run `python -m rice_jax.labelling.clustering"):
        train.validate_config(c, 8, {})
    c.loss.num_obj_classes = 5
    with pytest.raises(ValueError, match="< the dataset's 12 clusters"):
        train.validate_config(c, 8, {"num_clusters": 12, "tokenizer": {"vocab_size": 10}})
    c = small_config(data_dir)
    c.loss.margin_type = "sphereface"      # checked by the loss dataclass, named by its field
    with pytest.raises(ValueError, match="loss.margin_type must be one of"):
        train.validate_config(c, 8, {"num_clusters": 12, "tokenizer": {"vocab_size": 10}})
    c = small_config(data_dir)
    c.stages = ((4, 30),)
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        train.validate_config(c, 8, {"num_clusters": 12, "tokenizer": {"vocab_size": 10}})


@pytest.mark.slow
def test_loss_falls_and_metrics_are_written(data_dir, tmp_path):
    c = small_config(data_dir, steps=40, every=40)
    s = train.train(c, tmp_path)
    losses_ = [h["loss"] for h in s["history"]]
    assert np.mean(losses_[-4:]) < np.mean(losses_[:4]) - 0.5, losses_
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "loss_object", "loss_ocr", "object/pos_cos_mean", "grad_norm", "lr", "images_per_s", "mfu",
                "data_wait_fraction", "skipped_records", "skipped_updates_total"):
        assert key in lines[-1], key
    assert any((tmp_path / "tensorboard").iterdir())
    assert lines[-1]["mfu"] > 0


@pytest.mark.slow
def test_mlcd_objective_trains(data_dir, tmp_path):
    c = small_config(data_dir, steps=6, every=6, arg="tiny,objective=mlcd")
    s = train.train(c, tmp_path)
    assert "loss_global" in s["history"][-1] and "loss_object" not in s["history"][-1]


def test_a_run_with_trained_region_parameters_is_read_back_as_its_rice_model(data_dir, tmp_path):
    """region_seed="roi" adds a learned region parameter: the run must train it, record the region
    settings, and give evaluation the RICE model it trained (not the backbone with fresh regions)."""
    from rice_jax import backbones
    from rice_jax.labelling.features import RegionFeatures
    from rice_jax.models.rice import RICEModel, RICEConfig

    c = small_config(data_dir, steps=6, every=6)
    c.model.region_seed, c.model.region_rope = "roi", "box"
    train.train(c, tmp_path)
    params, _ = _final_params(tmp_path)
    model = backbones.load(f"ckpt:{tmp_path}", regions=True)
    assert isinstance(model, RICEModel)
    assert (model.cfg.region_seed, model.cfg.region_rope, model.cfg.region_layers) == ("roi", "box", c.model.region_layers)
    saved = np.asarray(params["model"]["region_seed"]["kernel"])
    np.testing.assert_array_equal(np.asarray(model.region_seed.kernel[...]), saved)
    fresh = RICEModel(RICEConfig(backbone=model.backbone.cfg, region_layers=c.model.region_layers, region_seed="roi"),
                      rngs=nnx.Rngs(c.seed))
    assert np.abs(np.asarray(fresh.region_seed.kernel[...]) - saved).max() > 0   # it trained
    # The features evaluation reads are this model's region tokens.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    boxes = np.asarray([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9]]] * 2, np.float32)
    valid = np.ones((2, 2), bool)
    got = RegionFeatures(model, 32)(x, boxes, valid)["roi"]["region_token"]
    from rice_jax.batch import model_pixels
    want = model.backbone.post_norm(model(model_pixels(jnp.asarray(x)), jnp.asarray(boxes), jnp.asarray(valid)).region_hidden)
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
    # The backbone alone is still what a plain load gives.
    assert not isinstance(backbones.load(f"ckpt:{tmp_path}"), RICEModel)
    # A second labelling round clusters these region tokens: the extractor reads them, not the patches.
    from rice_jax.labelling import clustering
    from rice_jax.data import records
    ext = clustering.make_extractor(f"regions:ckpt:{tmp_path}", 32)
    ids, feats = next(ext(records.RecordSource(data_dir), 64))
    patches = next(clustering.make_extractor(f"ckpt:{tmp_path}", 32)(records.RecordSource(data_dir), 64))[1]
    assert feats.shape == patches.shape and feats.shape[1] == model.backbone.cfg.hidden_size
    assert np.isfinite(feats).all() and np.abs(feats - patches).max() > 1e-2
    # ... and the round-2 run starts from round 1's backbone *and* region parameters (lr ~0: nothing moves).
    c2 = small_config(data_dir, steps=1, every=1)
    c2.model.region_seed, c2.model.region_rope = "roi", "box"
    c2.init_from, c2.optim.lr, c2.optim.weight_decay = f"ckpt:{tmp_path}", 1e-12, 0.0
    train.train(c2, tmp_path / "round2")
    p2, _ = _final_params(tmp_path / "round2")
    np.testing.assert_allclose(np.asarray(p2["model"]["region_seed"]["kernel"]), saved, atol=1e-9)
    np.testing.assert_allclose(np.asarray(p2["model"]["backbone"]["patch_kernel"]),
                               np.asarray(params["model"]["backbone"]["patch_kernel"]), atol=1e-9)


def _final_params(workdir):
    state, meta, step = checkpoint.read_raw(workdir)
    return state["params"], step


@pytest.mark.slow(seconds=45)
def test_kill9_resume_is_bitwise_identical(data_dir, tmp_path):
    c = small_config(data_dir, steps=24, every=4)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(c, ref_dir), env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(c, run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng()
    target = int(rng.integers(5, 18))  # kill somewhere after a checkpoint, mid-run
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if lines and json.loads(lines[-1])["step"] >= target:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and ckpts[-1] < 24
    res = subprocess.run(_cmd(c, run_dir), env=_env(), check=True, capture_output=True, text=True, timeout=600)
    assert "resumed from step" in res.stdout
    (a, sa), (b, sb) = _final_params(ref_dir), _final_params(run_dir)
    assert sa == sb == 24
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigterm_writes_checkpoint_then_restore_on_4_devices(data_dir, tmp_path):
    c = small_config(data_dir, steps=400, every=1000)
    proc = subprocess.Popen(_cmd(c, tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "checkpoint written at step" in out
    step = checkpoint.Checkpointer(tmp_path, every=1, keep=3).latest_step()
    assert 0 < step < 400   # checkpoint_every=1000: only the preemption save can have written it
    # Restore on a 4-device mesh and keep training.
    c4 = small_config(data_dir, steps=step + 4, every=1000)
    res = subprocess.run(_cmd(c4, tmp_path), env=_env(devices=4), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {step}" in res.stdout and "4 devices" in res.stdout
    assert checkpoint.read_raw(tmp_path)[2] == step + 4


def test_init_from_hf_gives_hf_features(data_dir, tmp_path):
    from tests.helpers import hf_forward, save_random_hf_model

    hf = save_random_hf_model(tmp_path / "hf", hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=4, patch_size=8, image_size=64)
    c = small_config(data_dir)
    c.init_from = f"hf:{tmp_path / 'hf'}"
    mesh = make_mesh(8, 1)
    model_cfg = train.build_model_config(c)
    state, setup = train.init_state(c, mesh, model_cfg, 12, 128)
    state = train.apply_init_from(c.init_from, state, model_cfg)
    model = nnx.merge(setup.graphdef, state["params"]["model"])
    x = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
    _, ref_pool = hf_forward(hf, x)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x)).pooler_output), ref_pool, atol=1e-4)


def test_nan_batch_does_not_update(data_dir):
    c = small_config(data_dir)
    mesh = make_mesh(8, 1)
    state, setup = train.init_state(c, mesh, train.build_model_config(c), 12, 128)
    step_fn, batch_sh = train.make_train_step(c, setup)
    b = 16
    # A non-finite loss (poisoned object centres: images are uint8 and cannot hold a NaN).
    state = dict(state, params=dict(state["params"], centers_obj=state["params"]["centers_obj"] * np.nan))
    batch = {"image": np.full((b, 32, 32, 3), 128, np.uint8), "boxes": np.tile([0.1, 0.1, 0.6, 0.6], (b, 6, 1)).astype(np.float32),
             "region_valid": np.ones((b, 6), bool), "region_kind": np.zeros((b, 6), np.int32),
             "labels": np.full((b, 6, 4), -1, np.int32), "image_ok": np.ones(b, bool)}
    batch["labels"][..., 0] = 3
    before = jax.tree.map(np.asarray, state["params"])
    new, metrics = step_fn(state, train.to_global_batch(batch, batch_sh))
    assert not np.isfinite(float(metrics["loss"])) and bool(metrics["update_skipped"])
    assert int(new["skipped_updates"]) == 1 and int(new["step"]) == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(new["params"])):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_uint8_images_give_the_float_paths_loss_and_gradients(data_dir):
    """Images cross to the device as uint8 (1 byte per channel, 4x fewer than float32) and are
    normalised inside the step: loss, per-loss metrics and gradient norm equal the float32 path
    (the same pixels normalised on the host, as the pipeline did before) within fp32 rounding."""
    from rice_jax import batch as batch_contract

    c = small_config(data_dir)
    c.loss.sample_rate = 1.0
    mesh = make_mesh(8, 1)
    state, setup = train.init_state(c, mesh, train.build_model_config(c), 12, 128)
    step_fn, batch_sh = train.make_train_step(c, setup)
    b, n = 16, c.data.num_regions
    local = batch_contract.random_batch(b, 32, n, c.data.max_labels, 12, seed=3)
    assert local["image"].dtype == np.uint8 and local["image"].nbytes == b * 32 * 32 * 3
    host = dict(local, image=((local["image"] / np.float32(255) - batch_contract.CLIP_MEAN)
                              / batch_contract.CLIP_STD).astype(np.float32))
    twin = jax.tree.map(jnp.copy, state)                 # the step donates its state
    _, m8 = step_fn(state, train.to_global_batch(local, batch_sh))
    _, m32 = step_fn(twin, train.to_global_batch(host, batch_sh))
    for k in ("loss", "loss_object", "loss_ocr", "grad_norm"):
        assert float(m8[k]) == pytest.approx(float(m32[k]), rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_gradient_accumulation_matches_the_full_batch(data_dir, axis_type):
    """grad_accum_steps=2 and 4 against one pass over the same 32 images on 8 devices: the same loss
    and gradient norm when every microbatch holds the same number of rows of each kind (the
    update is the mean of microbatch gradients, each a mean over its rows) and no sampling is
    drawn (ρ = 1); a split that cannot spread over the devices is refused with the numbers."""
    results = {}
    for accum in (1, 2, 4):
        c = small_config(data_dir)
        c.loss.sample_rate = 1.0
        c.model.embed_batchnorm = False
        c.grad_accum_steps = accum
        c.batch_size = 32
        mesh = make_mesh(8, 1, axis_type=axis_type)
        state, setup = train.init_state(c, mesh, train.build_model_config(c), 12, 128)
        step_fn, batch_sh = train.make_train_step(c, setup)
        r = np.random.default_rng(0)
        b, n = 32, c.data.num_regions
        lo = r.uniform(0, 0.5, (b, n, 2))
        batch = {"image": r.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
                 "boxes": np.concatenate([lo, lo + 0.4], -1).astype(np.float32),
                 "region_valid": np.ones((b, n), bool),
                 "region_kind": np.tile((np.arange(n) % 3 == 0).astype(np.int32), (b, 1)),
                 "labels": r.integers(0, 12, (b, n, c.data.max_labels)).astype(np.int32), "image_ok": np.ones(b, bool)}
        _, m = step_fn(state, train.to_global_batch(batch, batch_sh))
        results[accum] = {k: float(m[k]) for k in ("loss", "loss_object", "loss_ocr", "grad_norm")}
    for accum in (2, 4):
        for k, v in results[1].items():
            assert results[accum][k] == pytest.approx(v, rel=2e-5), (accum, k, results)
    c = small_config(data_dir)
    c.grad_accum_steps = 3
    with pytest.raises(ValueError, match="grad_accum_steps=3.*multiple of 24"):
        train.check_grad_accum(c, 8)


@pytest.mark.slow(seconds=80)
def test_four_processes_match_one_process(data_dir, tmp_path):
    """4 processes x 2 CPU devices (gloo) reproduce the 1-process 8-device losses."""
    c = small_config(data_dir, steps=6, every=100)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cmd(c, one), env=_env(), check=True, capture_output=True, timeout=600)
    res = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(two), *_overrides(c)],
                         env=dict(_env(2), NUM_PROCESSES="4", DEVICES_PER_PROCESS="2"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 process(es), 8 devices" in res.stdout
    la = [json.loads(l)["loss"] for l in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 3
    # Same examples, same sampling; only the order of float sums over rows differs.
    np.testing.assert_allclose(lb, la, rtol=1e-4)


@pytest.mark.slow(seconds=55)
@pytest.mark.parametrize("variant", ["b16", "l14_336"])
def test_runlocal_variants_train_on_cpu(data_dir, tmp_path, variant):
    """The paper configs' own model width, heads, patch, region layers, loss and two-stage schedule,
    a few real steps on this CPU (``runlocal`` cuts batch, image size, steps and depth only)."""
    c = get_config(f"{variant},runlocal")
    with c.unlocked():
        c.data.dir = str(data_dir)
        c.peak_flops = 1e11
    s = train.train(c, tmp_path)
    assert s["end_step"] == 6 and [h["stage"] for h in s["history"]] == [0, 0, 0, 1, 1, 1]
    lrs = [h["lr"] for h in s["history"]]
    assert max(lrs[3:]) == pytest.approx(0.1 * max(lrs[:3]), rel=1e-6)   # the paper's lr / 10 stage
    assert all(np.isfinite(h["loss"]) for h in s["history"])
    preset = {"b16": "vit_b16_224", "l14_336": "vit_l14_336"}[variant]
    meta = checkpoint.read_meta(tmp_path)
    from rice_jax.models.config import get_preset

    assert meta["backbone"]["hidden_size"] == get_preset(preset).hidden_size
    assert meta["backbone"]["num_layers"] == c.model.region_layers + 2
