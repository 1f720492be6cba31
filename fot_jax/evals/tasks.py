"""The evaluations of a trained workdir, as a table: `EVAL_TASKS[name]` reads a model and writes
its tables (Markdown + JSON) and plots into an output folder. `fot-jax eval --task NAME` and
`run_eval` are the two ways in; docs/guides/real_text.md and evaluation.md say what each task measures."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable

from fot_jax import paths
from fot_jax.errors import UsageError


@dataclasses.dataclass
class EvalRequest:
    """What to evaluate and how; the fields are `fot-jax eval`'s flags (see `fot-jax eval -h`)."""

    workdir: str
    task: str = "memory_scaling"
    out: str | None = None                  # default <workdir>/eval
    sizes: str | None = None                # comma-separated: memory sizes or prompt lengths
    num_docs: int = 4
    tokenizer: str | None = None
    # memory_scaling
    baseline: str | None = None
    memory_shards: int = 1
    query_windows: int = 1
    layout: str = "windows"
    generate: bool = False
    # passkey
    label: str | None = None
    export: str | None = None
    # perplexity
    mode: str = "both"
    span_memory: int | None = None
    # distraction
    compare: list | None = None
    # harness
    tasks: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    include: str | None = None
    batch_size: int = 1
    # few_shot
    data: str | None = None
    contexts: str | None = None
    seeds: int = 1
    few_shot_mode: str = "classify"


def _ints(text: str | None, default):
    if not text:
        return list(default)
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--sizes/--contexts want integers separated by commas, got {text!r}") from None


def _tokenizer(req: EvalRequest, cfg):
    """The tokenizer a text evaluation reads with (--tokenizer, else the workdir's), checked against
    the model's vocabulary."""
    from fot_jax.data.text import workdir_tokenizer
    from fot_jax.data.tokenizer import check_vocab
    tok, _ = workdir_tokenizer(req.workdir, cfg, req.tokenizer)
    check_vocab(tok, cfg.model)
    return tok


def memory_scaling(req: EvalRequest, cfg, model, out_dir):
    from fot_jax.checkpoint import load_model
    from fot_jax.data import dictionary
    from fot_jax.evals import memory
    from fot_jax.parallel.mesh import memory_mesh
    if req.query_windows < 1 or req.num_docs < 1:
        raise UsageError("--query-windows and --num-docs must be at least 1")
    baseline = load_model(req.baseline) if req.baseline else None
    sizes = _ints(req.sizes, memory.DEFAULT_SIZES)
    mesh = memory_mesh(req.memory_shards) if req.memory_shards > 1 else None
    rows = memory.memory_scaling(cfg, model, sizes, num_docs=req.num_docs, top_k=cfg.memory.top_k,
                                 baseline=baseline, search=cfg.memory.search, mem_dtype=cfg.model.mem_dtype,
                                 mesh=mesh, query_windows=req.query_windows, generate=req.generate,
                                 layout=req.layout)
    title = (f"Dictionary lookup accuracy vs tokens in memory (top-k {cfg.memory.top_k}, "
             f"{req.layout} layout)")
    print(memory.write_table(rows, os.path.join(out_dir, "memory_scaling"), title))
    memory.plot_scaling(rows, os.path.join(out_dir, "memory_scaling.png"), chance=1 / dictionary.NUM_SYMBOLS)


def passkey(req: EvalRequest, cfg, model, out_dir):
    from fot_jax.evals import memory
    from fot_jax.evals import passkey as passkey_lib
    from fot_jax.infer.runtime import MemorySettings
    tok = _tokenizer(req, cfg)
    lengths = _ints(req.sizes, (2048, 8192))
    settings = MemorySettings.from_config(cfg)
    rows = passkey_lib.passkey(model, tok, settings, lengths, seeds=req.num_docs)
    w = cfg.model.max_position_embeddings
    label = req.label or (f"mem_layers {list(cfg.model.mem_layers)}, W={w}" if cfg.model.mem_layers
                          else f"no memory, W={w}")
    base = os.path.join(out_dir, "passkey_" + "".join(c if c.isalnum() else "_" for c in label))
    print(memory.write_table(rows, base, f"Passkey retrieval, {label}"))
    if req.export:
        torch_rows = passkey_lib.passkey_torch(req.export, tok, settings, lengths, seeds=req.num_docs)
        for r, t in zip(rows, torch_rows):
            # the batched run generates up to the longest answer of its batch: compare each
            # prompt's own answer length, what the export generated
            t["same_answers"] = sum(a["generated"][: len(b["generated"])] == b["generated"]
                                    for a, b in zip(r["samples"], t["samples"]))
        print(memory.write_table(torch_rows, base + "_PyTorch",
                                 f"Passkey retrieval, {label}: the export through AutoModelForCausalLM "
                                 "(same_answers: generated tokens equal to fot_jax's)"))
    results = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "passkey_*.json"))):
        with open(path) as f:
            results[os.path.basename(path)[len("passkey_"):-5]] = json.load(f)
    passkey_lib.plot_passkey(results, os.path.join(out_dir, "passkey.png"))


def perplexity(req: EvalRequest, cfg, model, out_dir):
    import numpy as np

    from fot_jax.data.sources import document_source
    from fot_jax.evals import memory
    from fot_jax.evals import perplexity as perplexity_lib
    src = document_source(cfg, "validation")
    docs = [np.asarray(src[i]["tokens"]) for i in range(len(src))]
    sizes = _ints(req.sizes, perplexity_lib.DEFAULT_MEMORY_SIZES)
    results = {}
    for mode in ([req.mode] if req.mode != "both" else ["single_doc", "multi_doc"]):
        rows = perplexity_lib.perplexity_vs_memory(cfg, model, docs, sizes, per_doc=req.num_docs, mode=mode,
                                                   span_memory=req.span_memory)
        results[mode] = rows
        print(memory.write_table(rows, os.path.join(out_dir, f"perplexity_{mode}"),
                                 f"Perplexity of held-out {cfg.data.task} documents vs memory ({mode})"))
    perplexity_lib.plot_perplexity(results, os.path.join(out_dir, "perplexity.png"))


def distraction(req: EvalRequest, cfg, model, out_dir):
    from fot_jax.checkpoint import load_model
    from fot_jax.evals import memory
    results = {}
    for workdir in [req.workdir] + list(req.compare or []):
        c, mdl = (cfg, model) if workdir == req.workdir else load_model(workdir)
        label = f"trained r={c.crossbatch.range}"
        if workdir != req.workdir:
            label += f" ({os.path.basename(workdir.rstrip('/'))})"
        rows = memory.distraction(c, mdl, num_docs=req.num_docs)
        results[label] = rows
        print(memory.write_table(rows, os.path.join(out_dir, f"distraction_r{c.crossbatch.range}"),
                                 f"Positive attention mass, {label}"))
    memory.plot_distraction(results, os.path.join(out_dir, "distraction.png"))


def harness(req: EvalRequest, cfg, model, out_dir):
    try:
        from fot_jax.evals import harness as harness_lib
    except ImportError as e:
        raise UsageError(f"--task harness needs lm-evaluation-harness ({e}): "
                         "pip install 'fot_jax[eval]'") from None
    if not req.tasks:
        raise UsageError("--task harness: give --tasks NAME[,NAME...] (local tasks: configs/eval/*.yaml)")
    from fot_jax.data.text import workdir_tokenizer
    tok, _ = workdir_tokenizer(req.workdir, cfg, req.tokenizer)
    lm = harness_lib.FotJaxLM(model=model, cfg=cfg, tokenizer=tok, batch_size=req.batch_size)
    lengths = _ints(req.sizes, ()) or None
    print(harness_lib.run(req.workdir, req.tasks.split(","), out_dir, limit=req.limit,
                          num_fewshot=req.num_fewshot, include=req.include, lm=lm, lengths=lengths,
                          tokenizer_dir=os.path.dirname(tok.path)))


def few_shot(req: EvalRequest, cfg, model, out_dir):
    from fot_jax.evals import few_shot as few_shot_lib
    from fot_jax.evals import memory
    from fot_jax.infer.runtime import MemorySettings
    if not req.data:
        raise UsageError("--task few_shot: give --data FILE.jsonl (lines with 'input' and 'label')")
    examples, labels = few_shot_lib.load_examples(req.data)
    sizes = _ints(req.contexts, (1024, 2048, 4096, 8192))
    tok = _tokenizer(req, cfg)
    rows = few_shot_lib.evaluate(model, cfg, tok, MemorySettings.from_config(cfg), examples, labels, sizes,
                                 seeds=req.seeds, num_tests=req.num_docs, mode=req.few_shot_mode,
                                 batch_size=req.batch_size)
    name = os.path.splitext(os.path.basename(req.data))[0]
    base = os.path.join(out_dir, f"few_shot_{name}_{req.few_shot_mode}")
    title = f"Few-shot {name} ({req.few_shot_mode}, {len(labels)} labels) vs context"
    print(memory.write_table(rows, base, title))
    few_shot_lib.plot(rows, base + ".png", title)


def retrieval_heads(req: EvalRequest, cfg, model, out_dir):
    from fot_jax.evals import memory
    from fot_jax.evals import retrieval_heads as heads_lib
    tok = _tokenizer(req, cfg)
    length = _ints(req.sizes, (1024,))[0]
    scores, hits = heads_lib.retrieval_scores(model, tok, length, seeds=req.num_docs)
    rows, layers = heads_lib.strongest(scores)
    print(memory.write_table(rows, os.path.join(out_dir, "retrieval_heads"),
                             f"Retrieval heads: attention on the passkey's tokens, {length}-token prompts"))
    print(f"answered {hits}/{req.num_docs} prompts within the window; the layers of the strongest heads: "
          f"{layers} (--config.model.mem_layers={layers})")


EVAL_TASKS: dict[str, Callable] = {
    "memory_scaling": memory_scaling, "retrieval_heads": retrieval_heads, "distraction": distraction,
    "passkey": passkey, "perplexity": perplexity, "harness": harness, "few_shot": few_shot,
}


def run_eval(req: EvalRequest, overrides=()) -> str:
    """Runs `req.task` on the latest checkpoint of `req.workdir` (with `--config.*` overrides applied
    to its stored config); returns the folder the results went to."""
    if req.task not in EVAL_TASKS:
        raise UsageError(f"unknown eval task {req.task!r}; one of {', '.join(sorted(EVAL_TASKS))}")
    if req.memory_shards > 1:       # on a CPU host: the shards' simulated devices
        from fot_jax.parallel import simulate_host_devices
        simulate_host_devices(req.memory_shards)
    for path in [req.baseline] if req.baseline else []:
        paths.existing_workdir(path, "--baseline")
    for path in req.compare or []:
        paths.existing_workdir(path, "--compare")
    if req.out:
        paths.writable_dir(req.out, "--out")
    from fot_jax.checkpoint import load_model
    cfg, model = load_model(req.workdir, overrides=overrides)
    out_dir = req.out or os.path.join(req.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    EVAL_TASKS[req.task](req, cfg, model, out_dir)
    return out_dir
