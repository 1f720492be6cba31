"""A compact PyTorch LongLLaMA for exported fot_jax models (the `torch` extra): loads an exported
directory, runs the DESIGN long-input semantics with memory (dense or top-k) and generates.
Works with transformers 5 (it needs only torch and safetensors)."""
from fot_jax.torch.longllama import LongLlama, MemoryGenerator, load  # noqa: F401
