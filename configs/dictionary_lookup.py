"""The CPU default: the paper's dictionary lookup task with a small FoT model.

Documents of 512 tokens (first half definitions, second half queries), local context 256, k=2
packing (row 2s = definitions, row 2s+1 = queries of the same document), crossbatch range 1 with
stepping: the query row's memory layer sees its own definitions only through crossbatch attention.
"""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "dictionary_lookup"
    m = c.model
    m.vocab_size = 64
    m.hidden_size = 128
    m.intermediate_size = 256
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 4
    m.max_position_embeddings = 256
    m.last_context_length = 256       # inference: the query window stays local
    m.mem_layers = [2]
    m.mem_positionals = "none"
    m.qk_norm = "memory"
    m.qk_temperature_init = 10.0
    c.data.seq_len = 256
    c.data.doc_length = 512
    c.data.query_length = 256
    c.data.batch_size = 32            # 16 documents per step
    c.data.num_train_docs = 40000
    c.data.num_eval_docs = 512
    # Document-length stages: the lookup circuit forms fast on short dense documents with many
    # loss tokens a step (64 docs of 64 tokens), then carries over to longer ones (a stage's
    # seq_len and query_length keep their share of the document: 64 -> T=32, 32 query tokens).
    c.stages = [
        dict(name="docs_64", until_step=600, data=dict(doc_length=64, batch_size=128)),
        dict(name="docs_128", until_step=800, data=dict(doc_length=128, batch_size=64)),
        dict(name="docs_256", until_step=1000, data=dict(doc_length=256, batch_size=32)),
        dict(name="docs_512"),
    ]
    c.crossbatch.range = 1
    c.crossbatch.k_packing = 2
    c.crossbatch.stepping = True
    c.crossbatch.eval_ranges = [0, 1]
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
