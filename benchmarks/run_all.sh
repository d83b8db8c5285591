#!/usr/bin/env bash
# Run every benchmark once (each prints one JSON line and writes benchmarks/results/<name>.json).
# Long: the loss-scaling sweep alone takes ~10 minutes on 2 cores.
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_venv.sh"
set -x
python -m benchmarks.vit_forward
python -m benchmarks.train_step
python -m benchmarks.input_pipeline
python -m benchmarks.clustering
python -m benchmarks.kmeans   # faiss-cpu row needs `pip install faiss-cpu` (optional)
python -m benchmarks.loss_scaling
python -m benchmarks.ablation          # also the synthetic downstream tasks (downstream_synthetic.json)
python -m benchmarks.labelling_rounds
python -m benchmarks.readme_tables
