"""Test harness: 8 emulated CPU devices, set before jax is imported anywhere, and one persistent
compilation cache for the whole run.

Many tests start the same programs in fresh processes (the tiny train step in every training
subprocess, the benchmarks' smoke runs, multi-process launches): through the cache each program is
compiled once per run instead of once per process. The variables are inherited by every subprocess;
the cache lives in a temporary folder removed at exit, so a run never reads another's executables.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rice_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Programs that take over 0.2 s to compile (XLA:CPU on 2 cores): the train steps, k-means and
    # loss programs; the thousands of tiny eager-op programs would cost more to store than to compile.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
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


def _weight(item) -> float:
    """Seconds a test is expected to take: ``@pytest.mark.slow(seconds=N)`` where it was measured,
    30 for another slow test, 1 for the rest."""
    m = item.get_closest_marker("slow")
    return 1.0 if m is None else float(m.kwargs.get("seconds", 30))


def pytest_collection_modifyitems(config, items):
    """The heaviest modules first, and a module's heaviest tests before its quick ones. Two workers
    share the suite by work stealing: a long test that started last would run alone at the end.
    Modules stay contiguous, so their fixtures are built once."""
    total: dict = {}
    first: dict = {}
    for i, item in enumerate(items):
        name = item.module.__name__
        total[name] = total.get(name, 0.0) + _weight(item)
        first.setdefault(name, i)
    items.sort(key=lambda it: (-total[it.module.__name__], first[it.module.__name__], -_weight(it)))
