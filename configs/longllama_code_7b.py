"""CodeLLaMA-7B shape (vocab 32016, rope_theta 1e6) with FoT memory layers 8, 16, 24 and a
4096-token window, as LongLLaMA-Code 7B."""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "longllama_code_7b"
    m = c.model
    m.vocab_size = 32016
    m.hidden_size = 4096
    m.intermediate_size = 11008
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 32
    m.max_position_embeddings = 4096
    m.rope_theta = 1e6
    m.rms_norm_eps = 1e-5
    m.mem_layers = [8, 16, 24]
    m.mem_positionals = "as_first"
    m.dtype = "bfloat16"
    m.remat = "dots_no_batch"
    m.last_context_length = 1024
    c.crossbatch.range = 3
    c.crossbatch.k_packing = 4
    c.crossbatch.stepping = True
    c.crossbatch.doc_mask = True
    c.crossbatch.eval_ranges = [0, 3]
    c.data.seq_len = 4096
    c.data.doc_length = 16384
    c.data.query_length = 256
    c.data.batch_size = 128
    t = c.train
    t.steps = 10000
    t.learning_rate = 1e-5
    t.warmup_steps = 100
    t.schedule = "constant"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
