"""rice_jax.preflight.plan: the real train step compiled ahead of time — its arithmetic on the CPU devices
here, and end to end for a TPU topology in the planner's own environment (.venv-plan)."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import jax
import pytest

from rice_jax import batch as batch_contract, errors, perf, train
from rice_jax.preflight import plan
from rice_jax.configs.rice import get_config

ROOT = Path(__file__).resolve().parents[1]


def _tiny(batch=16, image=32):
    c = get_config("tiny")
    c.batch_size = batch
    c.stages = ((10, image),)
    return c


def test_plan_arithmetic_on_cpu_devices(monkeypatch):
    c = _tiny()
    r = plan.plan(c, "cpu:8", num_obj_classes=1000, num_ocr_classes=256)
    assert r["devices"] == 8 and r["mesh"] == {"data": 8, "fsdp": 1} and r["fits"] is None
    # The same step compiled directly: identical per-device figures.
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"), devices=jax.devices()[:8],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    _, setup = train.abstract_setup(c, mesh, train.build_model_config(c), 1000, 256)
    step, batch_sh = train.make_train_step(c, setup)
    compiled = step.lower(setup.abstract_state, batch_contract.abstract_batch(c.batch_size, 32, c.data.num_regions, c.data.max_labels, batch_sh)).compile()
    mem = compiled.memory_analysis()
    p = r["per_device"]
    assert p["argument_bytes"] == mem.argument_size_in_bytes and p["temp_bytes"] == mem.temp_size_in_bytes
    assert p["total_bytes"] == (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                + mem.temp_size_in_bytes)
    # The donated state aliases its outputs: the step holds the state once, not twice.
    assert 0 < p["alias_bytes"] <= min(p["argument_bytes"], p["output_bytes"])
    assert r["flops_per_step"] == pytest.approx(8 * r["flops_per_device"]) and r["flops_per_device"] > 0
    # The projection: step time = model FLOPs / (devices x peak x MFU); fit = total <= HBM.
    monkeypatch.setitem(perf.CHIPS, "cpu", {"bf16_flops": 1e12, "hbm_bytes": p["total_bytes"]})
    r2 = plan.plan(c, "cpu:8", num_obj_classes=1000, num_ocr_classes=256, mfu=0.5)
    assert r2["fits"] is True
    assert r2["model_flops_per_step"] == pytest.approx(perf.model_flops(c, 1000, 256, 16, (r2["image_size"],) * 2))
    assert r2["step_time_s"] == pytest.approx(r2["model_flops_per_step"] / (8 * 0.5e12))
    assert r2["images_per_s"] == pytest.approx(16 / r2["step_time_s"])
    monkeypatch.setitem(perf.CHIPS, "cpu", {"bf16_flops": 1e12, "hbm_bytes": p["total_bytes"] - 1})
    assert plan.plan(c, "cpu:8", num_obj_classes=1000, num_ocr_classes=256, search=False)["fits"] is False
    # Centres are sharded along K: 8x the classes cost each device ~1/8 of their bytes, not 8x.
    # (search off: under the HBM just set, this step does not fit, and the fit search would compile 7 more)
    big = plan.plan(c, "cpu:8", num_obj_classes=8000, num_ocr_classes=256, search=False)["per_device"]["argument_bytes"]
    e = train.build_model_config(c).embed_dim or train.build_model_config(c).backbone.hidden_size
    centre_bytes = (8000 - 1000) * e * 4 * 3          # centres + two Adam moments, all devices
    assert big - p["argument_bytes"] == pytest.approx(centre_bytes / 8, rel=0.05)
    assert "DOES NOT FIT" not in plan.format_report(r)


def test_a_step_that_does_not_fit_gets_the_smallest_change_that_does(monkeypatch):
    """The fit search on the CPU devices, with an HBM size just above what two microbatches need: the
    config's own step (one microbatch) does not fit, the search proposes two, and every proposal it
    makes compiled within the HBM, each trading fewer microbatches for more recompute."""
    c = _tiny(batch=16, image=32)
    two = plan.compile_plan(_with(c, "none", 2), "cpu:8", num_obj_classes=1000, num_ocr_classes=256)
    hbm = two["per_device"]["total_bytes"] + 1
    monkeypatch.setitem(perf.CHIPS, "cpu", {"bf16_flops": 1e12, "hbm_bytes": hbm})
    monkeypatch.setattr(plan, "REMAT_BY_MEMORY", ("none", "nothing_saveable"))   # fewer compiles in the suite
    lines = []
    r = plan.plan(c, "cpu:8", num_obj_classes=1000, num_ocr_classes=256, log=lines.append)
    assert r["fits"] is False and r["per_device"]["total_bytes"] > two["per_device"]["total_bytes"]
    first = r["fits_with"][0]
    assert (first["remat_policy"], first["grad_accum_steps"]) == ("none", 2)          # the config's remat, 2 microbatches
    assert first["total_bytes"] == two["per_device"]["total_bytes"]
    assert all(f["total_bytes"] <= hbm for f in r["fits_with"])
    accums = [f["grad_accum_steps"] for f in r["fits_with"]]
    assert accums == sorted(set(accums), reverse=True)                                  # each trade needs fewer
    text = plan.format_report(r)
    assert "DOES NOT FIT" in text and "--config.grad_accum_steps=2 --config.model.remat_policy=none" in text
    assert len(lines) == 2 and all(l.startswith("  tried remat") for l in lines)
    # Nothing fits: said plainly, with what else to change.
    assert "nothing tried fits" in plan.format_report(dict(r, fits_with=[]))


def _with(c, remat_policy, grad_accum_steps):
    c = c.copy_and_resolve_references()
    c.model.remat_policy, c.grad_accum_steps = remat_policy, grad_accum_steps
    return c


def test_plan_rejects_what_it_cannot_plan():
    with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
        plan.plan(_tiny(batch=12), "cpu:8", num_obj_classes=100, num_ocr_classes=64)
    with pytest.raises(ValueError, match="only 8 CPU devices"):
        plan.target_devices("cpu:64")
    for wrong in ("v9:2x2", "v5p", "tpu:4x4"):
        with pytest.raises(errors.InputError, match="use cpu:N, a chip and its grid or count"):
            plan.target_devices(wrong)
    with pytest.raises(errors.InputError, match="the planner compiles for cpu:N or a TPU generation"):
        plan.target_devices("h100:8")


def test_libtpu_stays_out_of_the_main_environment():
    assert importlib.util.find_spec("libtpu") is None, "libtpu belongs in .venv-plan only (rice_jax/preflight/plan.py)"


PLAN_PY = os.environ.get("RICE_JAX_PLAN_PYTHON")


@pytest.mark.slow(seconds=90)
@pytest.mark.skipif(not PLAN_PY, reason="run through launch/test.sh, which makes .venv-plan (jax[tpu])")
def test_plan_compiles_for_tpu_topologies_in_its_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    def run(*args):
        r = subprocess.run([PLAN_PY, "-m", "rice_jax.preflight.plan", "--config", "rice_jax/configs/rice.py:tiny",
                            "--config.batch_size=32", "--num_ocr_classes=512", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1]), r.stdout

    fit, text = run("--topology", "v5e:2x2", "--num_obj_classes", "4096")
    assert fit["devices"] == 4 and "v5" in fit["device_kind"].lower() and fit["fits"] is True
    assert fit["per_device"]["total_bytes"] < fit["hbm_bytes"] and fit["flops_per_device"] > 0
    assert fit["step_time_s"] > 0 and "FITS" in text
    # 200M centres x 64 dims x 4 bytes x (value + 2 Adam moments) = 154 GB over 4 chips of 16 GiB.
    nofit, text = run("--topology", "v5e:2x2", "--num_obj_classes", "200000000", "--nofit_search")
    assert nofit["fits"] is False and "DOES NOT FIT" in text and "fits_with" not in nofit
    # v4 (megacore: one JAX device per chip, two TensorCores each): 2x2x2 = 8 chips.
    v4, text = run("--topology", "v4:2x2x2", "--num_obj_classes", "4096")
    assert v4["devices"] == 8 and "v4" in v4["device_kind"].lower() and "FITS" in text
    # Every current generation gets a verdict: v5p (megacore too) and v6e.
    for topology, chips, kind in (("v5p:2x2x1", 4, "v5"), ("v6e:2x2", 4, "v6")):
        r, text = run("--topology", topology, "--num_obj_classes", "4096")
        assert r["devices"] == chips and kind in r["device_kind"].lower() and r["fits"] is True and "FITS" in text
    # Two slices joined by the data-centre network (--config.mesh.dcn_data): the data axis spans both.
    r, text = run("--topology", "v5p:2x2x1", "--config.mesh.dcn_data=2", "--num_obj_classes", "4096")
    assert r["slices"] == 2 and r["devices"] == 8 and r["mesh"] == {"data": 8, "fsdp": 1} and r["fits"] is True


def test_multi_slice_mesh_keeps_fsdp_inside_a_slice(devices):
    """``dcn_data`` slices: the data axis is one block of rows per slice and each fsdp row lies in one
    slice, so only the data all-reduce crosses the slow network (CPU devices: slices by position)."""
    from rice_jax import sharding

    m = sharding.make_mesh(data=4, fsdp=2, dcn_data=2)
    grid = [[d.id for d in row] for row in m.devices]
    assert dict(m.shape) == {"data": 4, "fsdp": 2} and grid == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all({d // 4 for d in row} == {r // 2} for r, row in enumerate(grid))   # a row in one slice
    with pytest.raises(errors.InputError, match="multiple of the number of slices"):
        sharding.make_mesh(data=-1, fsdp=8, dcn_data=2)
    assert get_config("tiny").mesh.dcn_data == 1
