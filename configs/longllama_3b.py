"""OpenLLaMA-3B shape with LongLLaMA's FoT settings: memory layers 6, 12, 18; window 2048; k=4
packing, r=3, stepping: an 8K-token training context per stream. For TPU pods (bfloat16 compute,
fsdp over all chips); `fot-jax plan` checks its memory before a pod is paid for."""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "longllama_3b"
    m = c.model
    m.vocab_size = 32000
    m.hidden_size = 3200
    m.intermediate_size = 8640
    m.num_layers = 26
    m.num_heads = 32
    m.num_kv_heads = 32
    m.max_position_embeddings = 2048
    m.rope_theta = 10000.0
    m.rms_norm_eps = 1e-6
    m.mem_layers = [6, 12, 18]
    m.mem_positionals = "as_first"
    m.dtype = "bfloat16"
    m.remat = "full"                    # with 8 microbatches: 11.5 GiB a chip on fsdp=32 (`fot-jax plan`)
    m.last_context_length = 1024
    c.crossbatch.range = 3
    c.crossbatch.k_packing = 4
    c.crossbatch.stepping = True
    c.crossbatch.doc_mask = True
    c.crossbatch.eval_ranges = [0, 3]
    c.data.task = "dictionary_lookup"   # synthetic; point data.task / data.source at a real corpus
    c.data.seq_len = 2048
    c.data.doc_length = 8192
    c.data.query_length = 256
    c.data.batch_size = 256
    t = c.train
    t.steps = 10000
    t.learning_rate = 1.5e-5
    t.warmup_steps = 100
    t.schedule = "constant"
    t.microbatches = 8                  # 32 rows (8 streams) a microbatch: 1 row a chip on 32 chips
    t.weight_decay = 0.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
