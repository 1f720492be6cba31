"""A tiny FoT model for tests: 2 layers, memory layer 1, dictionary lookup documents."""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.max_position_embeddings = 64
    c.model.mem_layers = [1]
    c.data.seq_len = 64
    c.data.doc_length = 128
    c.data.query_length = 64
    c.data.batch_size = 8
    c.data.num_train_docs = 256
    c.data.num_eval_docs = 32
    c.crossbatch.range = 1
    c.crossbatch.k_packing = 2
    c.train.steps = 20
    c.train.log_every = 5
    c.train.eval_batches = 2
    return c
