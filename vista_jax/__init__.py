"""vista_jax: VISTA (VIrtual Sequential Target Attention) in JAX/Flax NNX."""

import flax

# Parameters carry *logical* axis names; `vista_jax.sharding` maps them to the mesh at one
# boundary. Eager sharding would read the logical names as mesh axes, so it stays off.
flax.config.update("flax_always_shard_variable", False)
