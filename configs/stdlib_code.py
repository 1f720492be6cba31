"""Real text, no download: FoT training on the running Python's standard library as long code
documents (each package's files concatenated in a seeded random order, the paper's recipe for its
code data), tokenised with the OpenLLaMA v2 SentencePiece model (built in). About 5% of the
packages are held out (validation): `fot-jax eval --task perplexity` measures perplexity on them
against memory size.

    fot-jax train --config configs/stdlib_code.py --workdir runs/stdlib

A small model (4 layers x 256, memory layer 2, window 256) with k = 4 packing and crossbatch range
r = 3 (stepping): each stream's 4 consecutive chunks share a step, and the memory layer of the last
chunk sees its 3 predecessors: a 1K-token training context through memory.
"""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "stdlib_code"
    m = c.model
    m.vocab_size = 32000
    m.hidden_size = 256
    m.intermediate_size = 688
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 4
    m.max_position_embeddings = 256
    m.last_context_length = 128
    m.mem_layers = [2]
    m.mem_positionals = "as_first"
    m.tie_embeddings = True
    d = c.data
    d.task = "stdlib"
    d.tokenizer = "open_llama_v2"
    d.file_patterns = ["*.py"]
    d.concat_by_directory = True
    d.min_tokens = 1024
    d.held_out_percent = 5
    d.seq_len = 256
    d.batch_size = 16                # 4 streams x k = 4
    c.crossbatch.range = 3
    c.crossbatch.k_packing = 4
    c.crossbatch.stepping = True
    c.crossbatch.doc_mask = True
    c.crossbatch.eval_ranges = [0, 3]
    t = c.train
    t.steps = 600
    t.learning_rate = 1e-3
    t.warmup_steps = 50
    t.schedule = "cosine"
    t.log_every = 20
    t.eval_every = 200
    t.eval_batches = 4
    t.checkpoint_every = 200
    return c
