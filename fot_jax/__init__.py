"""fot_jax: the Focused Transformer (FoT, arXiv 2307.03170) in JAX/Flax."""
__version__ = "0.1.0"
