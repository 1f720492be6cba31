"""The memory headline in one run: the default dictionary lookup model (0.69M parameters, local
context 256, memory layer 2) trained to read hundreds of thousands of tokens of dictionary from
memory (`fot-jax eval --task memory_scaling`).

Stages, in one `fot-jax train`:
  docs_64 .. docs_256   the lookup circuit forms on short, dense documents (r = 1: the own
                        previous context only), as in `dictionary_lookup.py`;
  docs_512_r1           the task itself until training accuracy holds 98%;
  r7                    crossbatch range 7: the memory layer learns to tell its own document's
                        definitions from other documents' (the paper's negatives);
  r7_near_miss, r31_near_miss
                        half of each document's keys are near misses of its other keys (one or
                        two symbols changed), with crossbatch range 7 then 31. In a memory of a
                        million tokens, the 32 entries a query retrieves are mostly such keys and
                        share its softmax; these hard negatives teach the keys apart. The q/k
                        temperatures learn 300x / 1000x faster than the other parameters, so the
                        softmax becomes sharp (Adam moves every parameter by about the learning
                        rate a step, and a temperature of 10 needs to reach 30 or more).
A model that only trained with r <= 1 (the default config) reads 16K tokens of memory, not 256K.

Reading: `memory.logn_base = 8192`, the most keys a memory-layer query sees in training
((31 + 1) x 256 at r = 31): past that, the memory layer's logits are scaled by ln n / ln 8192
(n: memory entries and local keys in view), so the softmax stays as sharp with millions of
entries as it was with thousands (records back to back, 4M tokens: 87.5% -> 94.4%, 16M: 69.7% ->
90.8%; whole records in each window, the evaluation's default layout: 98.1% and 94.3% at 4M, 16M).
"""
import os

from fot_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load_config(os.path.join(HERE, "dictionary_lookup.py"))
    c.name = "dictionary_lookup_memory"
    hard = dict(near_miss=0.5)
    c.stages = [
        dict(name="docs_64", until_step=600, data=dict(doc_length=64, batch_size=128)),
        dict(name="docs_128", until_step=800, data=dict(doc_length=128, batch_size=64)),
        dict(name="docs_256", until_step=1000, data=dict(doc_length=256, batch_size=32)),
        dict(name="docs_512_r1", until_step=1100, until_accuracy=0.98),
        dict(name="r7", until_step=1200, crossbatch=dict(range=7), train=dict(temperature_lr_scale=300.0)),
        dict(name="r7_near_miss", until_step=1700, data=hard, crossbatch=dict(range=7),
             train=dict(temperature_lr_scale=1000.0)),
        dict(name="r31_near_miss", data=hard, crossbatch=dict(range=31),
             train=dict(temperature_lr_scale=1000.0)),
    ]
    c.crossbatch.eval_ranges = [0, 1, 31]
    c.memory.logn_base = (31 + 1) * c.data.seq_len      # inference: log-n scaling past 8,192 keys
    t = c.train
    t.steps = 1900
    t.stop_at_accuracy = 0.0          # the stages decide when training ends
    t.checkpoint_every = 200
    return c
