"""The baseline of the memory-scaling result: a plain transformer (no memory layers) trained on
the dictionary lookup documents of 512 tokens with its full 512-token context, on the same token
budget per step and the same document-length stages as `dictionary_lookup.py` (half the rows, twice as long).
"""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "dictionary_baseline"
    m = c.model
    m.vocab_size = 64
    m.hidden_size = 128
    m.intermediate_size = 256
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 4
    m.max_position_embeddings = 512
    m.last_context_length = 512
    m.mem_layers = []
    # q/k normalisation with a learnable temperature in every layer: content lookups form within
    # the budget (with plain scaled dot products the baseline stayed near chance, 5% at step 1050).
    m.qk_norm = "all"
    m.qk_temperature_init = 10.0
    c.data.seq_len = 512
    c.data.doc_length = 512
    c.data.query_length = 256
    c.data.batch_size = 16
    c.data.num_train_docs = 40000
    c.data.num_eval_docs = 512
    c.stages = [
        dict(name="docs_64", until_step=600, data=dict(doc_length=64, batch_size=64)),
        dict(name="docs_128", until_step=800, data=dict(doc_length=128, batch_size=32)),
        dict(name="docs_256", until_step=1000, data=dict(doc_length=256, batch_size=16)),
        dict(name="docs_512"),
    ]
    c.crossbatch.range = 0
    c.crossbatch.k_packing = 1
    c.crossbatch.eval_ranges = [0]
    t = c.train
    t.steps = 1400
    t.learning_rate = 3e-3
    t.warmup_steps = 100
    t.schedule = "cosine"
    t.b2 = 0.98
    t.log_every = 50
    t.eval_every = 100
    t.eval_batches = 4
    t.stop_at_accuracy = 0.97
    return c
