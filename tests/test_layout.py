"""The package's shape: its own import graph has no circle, the leaf modules stay leaves, and the
top-level experiment configs load and only set existing fields."""
import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rice_jax"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top of the file or inside functions."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n in modules and n != mod and n != "rice_jax":
                    graph[mod].add(n)
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_leaf_modules_import_nothing_of_ours():
    graph = import_graph()
    for leaf in ("rice_jax.errors", "rice_jax.batch"):
        assert graph[leaf] == set(), (leaf, graph[leaf])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_experiment_configs_load_and_only_set_existing_fields(path):
    from rice_jax.configs import rice

    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    base = rice.get_config(c.variant)
    flat = lambda d, pre="": {k2: v2 for k, v in d.items() for k2, v2 in
                              (flat(v, f"{pre}{k}.").items() if hasattr(v, "items") else [(f"{pre}{k}", v)])}
    assert set(flat(c)) == set(flat(base)), set(flat(c)) ^ set(flat(base))
    assert c.is_locked


def test_config_path_from_the_repository_root_works():
    """``--config configs/tiny.py`` (the path the README teaches) reaches the config checks."""
    res = subprocess.run([sys.executable, "-m", "rice_jax.train", "--config", "configs/tiny.py", "--workdir",
                          "/tmp/rice_jax_unused"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "config.data.dir is empty" in res.stderr.strip().splitlines()[-1], res.stderr


# Floors, bottom up: a module imports only modules on its own floor or below, and the libraries of
# floor 1 import only floor 0 and their own package (data knows nothing of models, nor models of data).
FLOORS = [
    {"rice_jax", "errors", "batch", "storage", "cli", "distributed", "sharding", "data", "models", "downstream",
     "configs", "preflight", "mining", "labelling"},
    {"data.*", "models.*", "losses", "optim", "checkpoint", "mining.proposals", "mining.ocr"},
    {"perf", "backbones", "labelling.features", "labelling.feature_store", "labelling.kmeans", "configs.rice"},
    {"mining.mine", "labelling.clustering", "train", "evaluate", "export", "plot", "downstream.*"},
    {"preflight.*", "quickstart"},
]


def floor_of(module: str) -> tuple[int, str]:
    """``(floor, package)`` of a module named as in :func:`import_graph` (package = its subpackage, or
    the module itself at the top level)."""
    short = module.removeprefix("rice_jax.") if module != "rice_jax" else module
    pkg = short.split(".")[0]
    for i, names in enumerate(FLOORS):
        if short in names or ("." in short and f"{pkg}.*" in names):
            return i, pkg
    raise AssertionError(f"{module} has no floor: add it to tests/test_layout.py FLOORS (and docs/design.md)")


def upward_imports(graph) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        f, pkg = floor_of(mod)
        for dep in deps:
            g, dep_pkg = floor_of(dep)
            if g > f or (f == 1 and g == 1 and dep_pkg != pkg):
                bad.append(f"{mod} (floor {f}) imports {dep} (floor {g})")
    return sorted(bad)


def test_no_upward_import():
    bad = upward_imports(import_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_floor_rule_catches_an_upward_import():
    graph = {"rice_jax.data.pipeline": {"rice_jax.models.vit"}, "rice_jax.models.vit": set(),
             "rice_jax.perf": {"rice_jax.train"}, "rice_jax.train": {"rice_jax.perf"}}
    assert upward_imports(graph) == ["rice_jax.data.pipeline (floor 1) imports rice_jax.models.vit (floor 1)",
                                     "rice_jax.perf (floor 2) imports rice_jax.train (floor 3)"]


def test_one_atomic_write_and_one_l2_normalise():
    """Temp files are renamed into place only by ``storage.atomic_local`` (one temp-name scheme, the
    writer's pid in it) and vectors are made unit length only by ``losses.l2_normalize``."""
    renames = re.compile(r"os\.replace\(|os\.rename\(")
    normalises = re.compile(r"/ *(np|jnp)\.maximum\((np|jnp)\.linalg\.norm|rsqrt\((jnp\.)?maximum\(|def _(unit|normali[sz]e)\(")
    found = []
    for p in sorted([*PKG.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        text, rel = p.read_text(), str(p.relative_to(ROOT))
        found += [f"{rel}: renames a temp file" for _ in renames.findall(text) if rel != "rice_jax/storage.py"]
        found += [f"{rel}: its own L2 normalisation" for _ in normalises.findall(text) if rel != "rice_jax/losses.py"]
    assert not found, found


def test_atomic_local_replaces_whole_or_not_at_all(tmp_path):
    import os

    from rice_jax import storage

    target = tmp_path / "x.npy"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with storage.atomic_local(target) as tmp:
            assert tmp.name == f".x.npy{storage.TEMP_MARK}{os.getpid()}" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    with storage.atomic_local(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
