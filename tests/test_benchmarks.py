"""Benchmark scripts run in smoke mode (tiny sizes, nothing written): they must not rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["benchmarks.vit_forward", "benchmarks.loss_scaling", "benchmarks.input_pipeline", "benchmarks.clustering", "benchmarks.train_step", "benchmarks.ablation", "benchmarks.kmeans", "benchmarks.mining", "benchmarks.gpu", "benchmarks.step_profile", "benchmarks.teacher_extraction", "benchmarks.clustering_scale", "benchmarks.reading", "benchmarks.labelling_rounds", "benchmarks.teacher_gap"])
def test_benchmark_smoke(module):
    res = subprocess.run([sys.executable, "-m", module, "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{\"benchmark\"")]
    assert lines and lines[-1]["benchmark"].endswith("_smoke")


def test_readme_tables_replace_marked_sections_only():
    from benchmarks import readme_tables

    text = "intro\n<!-- BEGIN ablation -->\nold\n<!-- END ablation -->\ntail\n"
    out = readme_tables.replace_section(text, "ablation", "| new |")
    assert out == "intro\n<!-- BEGIN ablation -->\n| new |\n<!-- END ablation -->\ntail\n"
    assert readme_tables.replace_section(out, "ablation", "| new |") == out  # idempotent
    with pytest.raises(ValueError, match="markers"):
        readme_tables.replace_section("no markers", "performance", "x")
    # Every generated section lives on exactly one committed page (README.md or docs/*.md).
    for name in readme_tables.SECTIONS:
        text = readme_tables.page_of(name).read_text()
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text


def test_reading_benchmark_labels_are_the_rendered_words(tmp_path):
    """The word targets of benchmarks.reading: each text slot's label is the word its record shows."""
    from benchmarks import reading
    from rice_jax.data import records, synthetic

    d = reading._data(tmp_path, seed=3, n=16, gen={})
    table = reading._word_table(d)
    recs = list(records.RecordSource(d))
    b = next(reading._batches(d, 64, 8, seed=0, train=True))
    words = reading._word_labels(b, table)
    checked = 0
    for i, img in enumerate(b["image_index"]):
        rec = recs[int(img)]
        for n, r in enumerate(b["region_index"][i]):
            if r >= 0 and b["region_valid"][i, n] and rec.kind[r] == records.KIND_TEXT:
                assert synthetic.WORDS[words[i, n]] == rec.text[r].lower()
                checked += 1
            else:
                assert words[i, n] == -1
    assert checked >= 8
