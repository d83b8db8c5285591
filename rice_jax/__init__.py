"""rice_jax: RICE (Region-based Cluster Discrimination) pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"
