"""The paper's 37M dictionary lookup model: 512 wide, 8 heads x 64, MLP 2048, local context 256,
lr 2e-2, 32K tokens per step; crossbatch r switched from 1 (the own previous context only) to 127
once training accuracy reaches 98%. Query/key normalisation with a learnable temperature and no
positional encoding in the memory layer (the paper's small models). Sized for an accelerator."""
from fot_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "dictionary_lookup_37m"
    m = c.model
    m.vocab_size = 64
    m.hidden_size = 512
    m.intermediate_size = 2048
    m.num_layers = 8
    m.num_heads = 8
    m.num_kv_heads = 8
    m.max_position_embeddings = 256
    m.last_context_length = 256       # inference: the query window stays local
    m.mem_layers = [5]
    m.mem_positionals = "none"
    m.qk_norm = "all"
    m.remat = "dots_no_batch"
    c.data.seq_len = 256
    c.data.doc_length = 512
    c.data.query_length = 256
    c.data.batch_size = 128           # 128 rows x 256 tokens = 32K tokens per step
    c.data.num_train_docs = 200000
    c.crossbatch.range = 1
    c.stages = [
        dict(name="r1", until_accuracy=0.98),                    # the own previous context only
        dict(name="r127", crossbatch=dict(range=127)),
    ]
    c.crossbatch.k_packing = 2
    c.crossbatch.stepping = True
    c.crossbatch.implementation = "blockwise"
    c.crossbatch.eval_ranges = [0, 1]
    t = c.train
    t.steps = 20000
    t.learning_rate = 2e-2
    t.warmup_steps = 1000
    t.schedule = "inverse_sqrt"
    t.log_every = 100
    t.eval_every = 1000
    return c
