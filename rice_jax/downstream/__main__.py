from rice_jax import cli
from rice_jax.downstream.table import main

cli.run(main)
