"""Training configs (ml_collections), importable and loadable by path:
``--config rice_jax/configs/rice.py:VARIANT`` or ``rice_jax.configs.rice.get_config("tiny")``."""
