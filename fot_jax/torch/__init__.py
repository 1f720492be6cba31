"""PyTorch for exported fot_jax models (the `torch` extra): the transformers model that every
export carries (`modeling_longllama.LongLlamaForCausalLM`, memory included, `generate()` with
prompts of any length), `load` for an exported directory and `MemoryGenerator` for one document
at a time. Needs torch, transformers and safetensors."""
from fot_jax.torch.configuration_longllama import LongLlamaConfig  # noqa: F401
from fot_jax.torch.longllama import MemoryGenerator, load  # noqa: F401
from fot_jax.torch.modeling_longllama import LongLlamaForCausalLM, LongLlamaModel  # noqa: F401
