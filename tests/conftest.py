"""Test harness: 8 emulated CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

from rice_jax import sharding  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 emulated CPU devices, got {len(devs)}"
    return devs


@pytest.fixture(scope="session")
def mesh(devices):
    """A 2x4 ("data", "fsdp") mesh over the 8 emulated devices."""
    return sharding.make_mesh(data=2, fsdp=4)


@pytest.fixture(scope="session")
def mesh_1x8(devices):
    return sharding.make_mesh(data=1, fsdp=8)
