"""circuits_jax."""
