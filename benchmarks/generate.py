"""Long-prompt ingest and generation speed, one exported model, every runtime in one run.

A model of 4 layers x 256 (window 512, memory layers 1 and 3, vocabulary 32,000) reads a prompt of
L tokens (LongLLaMA windowing: memory holds all but the last context) and generates N tokens
greedily with dense memory attention (every entry, as the original LongLLaMA code does) and with
top-k 32. Rows:

- `fot_jax`: `MemoryRuntime` (JAX): jitted windows, generation decoded on the device;
- `fot_jax host loop`: the same runtime driven one token per call from Python (sample, extend),
  what generation costs with a host round trip per token;
- `fot_jax, no memory`: the same model with no memory layers (local cache only): the baseline
  that memory's cost is measured against;
- `transformers AutoModel`: the export loaded with `AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)` (the modeling code every export carries), `model.generate()`;
- `fot_jax.torch`: `MemoryGenerator` over that same model (a thin layer: no GenerationMixin);
- `fot_jax.torch, previous`: with `--torch-baseline COMMIT`, the PyTorch runtime as it was at a
  commit of this repository (read with `git show`), the baseline a change is measured against;
- `original LongLLaMA`: with `--longllama DIR`, the original PyTorch code (a directory holding
  `modeling_longllama.py` and `configuration_longllama.py`, never part of this project) on the
  same exported weights.

Printed: ingest tokens/s, generation tokens/s and time to first token, each also as a ratio to
the first row, and the ingest's achieved GFLOP/s against a matmul measured in the same run.

    python benchmarks/generate.py                          # L = 8192, N = 128
    python benchmarks/generate.py --length 2048 --new 32   # quick
    python benchmarks/generate.py --longllama ~/src/long_llama/src --longllama-python ~/ll/bin/python
    python benchmarks/generate.py --workdir runs/smol_fot --longllama ...   # a trained model

The original code was written for transformers 4.x (4.39 works; transformers 5 changed what it
relies on): give an interpreter of an environment with `torch` and `transformers<5`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.checkpoint import save_params
from fot_jax.convert import api
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings, sample
from fot_jax.model import llama


def make_config(args, mem_layers):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 32000, args.width, 4 * args.width
    m.num_layers, m.num_heads, m.num_kv_heads = 4, args.width // 64, args.width // 64
    m.max_position_embeddings, m.last_context_length = args.window, args.window
    m.mem_layers = mem_layers
    c.data.seq_len = args.window
    c.data.doc_length = 2 * args.window
    checks.validate(c)
    return c


def best_of(fn, repeats):
    out, best = None, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def jax_rows(model, args, prompt, capacity):
    """(name, ingest s, generation s, time to first token s, tokens) per JAX runtime row."""
    rows = []
    for search in ("dense", "exact"):
        settings = MemorySettings(top_k=args.top_k, capacity=capacity, search=search, dtype="bfloat16",
                                  last_context_length=args.last)
        rt = MemoryRuntime(model, 1, settings)
        rt.generate([prompt], 2, stop_token=-1)        # compile ingest, extend and decode programs
        t_ingest, _ = best_of(lambda: rt.ingest([prompt]), args.repeats)
        t_first, _ = best_of(lambda: rt.generate([prompt], 1, stop_token=-1), args.repeats)
        t_gen, out = best_of(lambda: rt.generate([prompt], args.new, stop_token=-1), args.repeats)
        rows.append((f"fot_jax ({search})", t_ingest, t_gen - t_ingest, t_first, out[0].tolist(), None))

        def host_loop():
            logits, key, toks = rt.ingest([prompt]), jax.random.key(0), []
            for _ in range(args.new):
                key, sub = jax.random.split(key)
                tok = int(np.asarray(sample(jnp.asarray(logits), sub, 0.0, 1.0))[0])
                toks.append(tok)
                logits = rt.extend([[tok]])
            return toks
        t_host, toks = best_of(host_loop, args.repeats)
        rows.append((f"fot_jax host loop ({search})", t_ingest, t_host - t_ingest, None, toks, None))
    return rows


# Generation speed is timed inside one generate call: from the moment the first token's logits are
# ready to the last step (time stamps of the runtime's ingest/extend calls, or of a streamer's put
# calls under transformers' generate()), never as a difference of two runs that each re-read the
# prompt (the prompt's time and its noise would swamp the generation's).
CLOCK = """
import time
def clock(gen):
    \"\"\"Wrap a MemoryGenerator's ingest and extend to record when each returns.\"\"\"
    stamps = []
    for name in ("ingest", "extend"):
        fn = getattr(gen, name)
        def timed(*a, _fn=fn, **k):
            out = _fn(*a, **k)
            stamps.append(time.perf_counter())
            return out
        setattr(gen, name, timed)
    return stamps
def best(fn, repeats, stamps=None, first=0):
    \"\"\"(best seconds, output, best seconds per step after the first token) over repeats;
    stamps[first] marks the first token's logits.\"\"\"
    out, t, step = None, float("inf"), float("inf")
    for _ in range(repeats):
        if stamps is not None:
            stamps.clear()
        start = time.perf_counter(); out = fn(); t = min(t, time.perf_counter() - start)
        if stamps is not None and len(stamps) > first + 1:
            step = min(step, (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first))
    return t, out, step
"""

TORCH_CHILD = CLOCK + """
import json, resource, sys
import torch
from fot_jax.torch import MemoryGenerator, load
directory, top_k, window, new, repeats, threads, prompt = json.loads(sys.argv[1])
torch.set_num_threads(threads)
gen = MemoryGenerator(load(directory), top_k=top_k, last_context_length=window, mem_dtype="bfloat16")
gen.generate(prompt[:2 * window], 2, eos_token_id=-1)
t_ingest, _, _ = best(lambda: gen.ingest(prompt), repeats)
stamps = clock(gen)
_, out, step = best(lambda: gen.generate(prompt, new, eos_token_id=-1), repeats, stamps)
print(json.dumps([t_ingest, step, list(out), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""

# a streamer's put() runs once with the prompt, then once per generated token
STREAM_CLOCK = """
from transformers.generation.streamers import BaseStreamer
class Clock(BaseStreamer):
    def __init__(self, stamps):
        self.stamps = stamps
    def put(self, value):
        self.stamps.append(time.perf_counter())
    def end(self):
        pass
"""

AUTO_CHILD = CLOCK + STREAM_CLOCK + """
import json, resource, sys
import torch, transformers
directory, top_k, window, new, repeats, threads, prompt = json.loads(sys.argv[1])
torch.set_num_threads(threads)
major = int(transformers.__version__.split(".")[0])
model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, trust_remote_code=True, **{"dtype" if major >= 5 else "torch_dtype": torch.float32}).eval()
kw = dict(mem_top_k=top_k, last_context_length=window, mem_capacity=None)
stamps = []
def gen(ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, streamer=Clock(stamps), **kw)
ids = torch.as_tensor([prompt], dtype=torch.long)
gen(ids[:, :2 * window], 2)
t_first, _, _ = best(lambda: gen(ids, 1), repeats)
_, out, step = best(lambda: gen(ids, new), repeats, stamps, first=1)
print(json.dumps([t_first, step, out[0, len(prompt):].tolist(),
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""

PREVIOUS_CHILD = CLOCK + """
import json, resource, subprocess, sys, types
import torch
directory, top_k, window, new, repeats, threads, prompt, repo, commit = json.loads(sys.argv[1])
source = subprocess.run(["git", "-C", repo, "show", commit + ":fot_jax/torch/longllama.py"], check=True,
                        capture_output=True, text=True).stdout
previous = types.ModuleType("previous_torch_runtime")
exec(compile(source, "previous_torch_runtime.py", "exec"), previous.__dict__)
torch.set_num_threads(threads)
gen = previous.MemoryGenerator(previous.load(directory), top_k=top_k, last_context_length=window,
                               mem_dtype="bfloat16")
gen.generate(prompt[:2 * window], 2, eos_token_id=-1)
t_ingest, _, _ = best(lambda: gen.ingest(prompt), repeats)
stamps = clock(gen)
_, out, step = best(lambda: gen.generate(prompt, new, eos_token_id=-1), repeats, stamps)
print(json.dumps([t_ingest, step, list(out), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""


def auto_row(directory, args, prompt, top_k, name):
    """AutoModelForCausalLM (the export's own modeling code) and generate(), in a process of its own:
    ingest is the time to the first token, generation what follows it."""
    spec = json.dumps([directory, top_k, args.last, args.new, args.repeats, args.threads, prompt.tolist()])
    done = subprocess.run([sys.executable, "-c", AUTO_CHILD, spec], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    t_first, step, out, rss = json.loads(done.stdout.strip().splitlines()[-1])
    return (name, t_first, step * args.new, t_first, out, rss)


def torch_row(directory, args, prompt, top_k, name, commit=None):
    """fot_jax.torch (or, with `commit`, the runtime as it was at that commit) in a process of its
    own (torch and the runtime only), so that its peak resident memory is its own."""
    spec = [directory, top_k, args.last, args.new, args.repeats, args.threads, prompt.tolist()]
    child = TORCH_CHILD
    if commit:
        spec += [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), commit]
        child = PREVIOUS_CHILD
    done = subprocess.run([sys.executable, "-c", child, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    t_ingest, step, out, rss = json.loads(done.stdout.strip().splitlines()[-1])
    return (name, t_ingest, step * args.new, None, out, rss)


ORIGINAL_CHILD = CLOCK + STREAM_CLOCK + """
import importlib, json, os, resource, sys, types
import torch
directory, src, window, new, repeats, threads, prompt = json.loads(sys.argv[1])
package = types.ModuleType("longllama_original")    # its modules import each other relatively
package.__path__ = [src]
sys.modules["longllama_original"] = package
LongLlamaConfig = importlib.import_module("longllama_original.configuration_longllama").LongLlamaConfig
LongLlamaForCausalLM = importlib.import_module("longllama_original.modeling_longllama").LongLlamaForCausalLM
torch.set_num_threads(threads)
cfg = LongLlamaConfig.from_pretrained(directory)
cfg.last_context_length = window
model = LongLlamaForCausalLM.from_pretrained(directory, config=cfg, torch_dtype=torch.float32).eval()
ids = torch.as_tensor([prompt], dtype=torch.long)
stamps = []
def ingest():
    with torch.no_grad():
        return model(input_ids=ids, last_context_length=window)
def gen(n):
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              last_context_length=window, streamer=Clock(stamps))
gen(2)
t_ingest, _, _ = best(ingest, repeats)
t_first, _, _ = best(lambda: gen(1), repeats)
_, out, step = best(lambda: gen(new), repeats, stamps, first=1)
versions = dict(transformers=importlib.import_module("transformers").__version__, torch=torch.__version__)
print(json.dumps([t_ingest, t_first, step, out[0, len(prompt):].tolist(),
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, versions]))
"""


def original_row(directory, src, python, args, prompt):
    """The original LongLLaMA code on the same weights (dense memory, its default), in a process of
    its own started by `python` (an environment with the transformers version that code was written
    for), so that its peak resident memory is its own."""
    src = os.path.abspath(os.path.expanduser(src))
    for needed in ("modeling_longllama", "configuration_longllama", "longllama_utils"):
        if not os.path.isfile(os.path.join(src, needed + ".py")):
            raise SystemExit(f"--longllama {src}: no {needed}.py there (give the directory that holds the "
                             "original LongLLaMA modeling code, its src/)")
    spec = json.dumps([directory, src, args.last, args.new, args.repeats, args.threads, prompt.tolist()])
    done = subprocess.run([python, "-c", ORIGINAL_CHILD, spec], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"original LongLLaMA ({python}) failed:\n{done.stderr[-3000:]}")
    t_ingest, t_first, step, out, rss, versions = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"original LongLLaMA: {src} under transformers {versions['transformers']}, "
          f"torch {versions['torch']}")
    return ("original LongLLaMA (dense)", t_ingest, step * args.new, t_first, out, rss)


def matmul_gflops(width):
    """Float32 GFLOP/s of a [512, width] x [width, 4 width] matmul, the model's MLP shape."""
    a, b = jnp.ones((512, width), jnp.float32), jnp.ones((width, 4 * width), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    reps = 200
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(a, b))
    return 2 * 512 * width * 4 * width * reps / (time.perf_counter() - start) / 1e9


def ingest_flops(m, length, window):
    """Forward FLOPs of LongLLaMA windowing over `length` tokens: weights plus local attention;
    memory attention (queries x stored entries) on the memory layers."""
    d, h = m.hidden_size, m.intermediate_size
    kv = m.num_kv_heads * (d // m.num_heads)
    per_token = m.num_layers * (2 * (2 * d * d + 2 * d * kv) + 2 * 3 * d * h) + 2 * d * m.vocab_size / window
    attn = m.num_layers * 2 * 2 * d * (window / 2)
    mem = len(m.mem_layers) * 2 * 2 * d * (length / 2)
    return length * (per_token + attn + mem)


def mha_copy(src, dst, m):
    """The exported model with each key-value head repeated for its query heads: the same
    function as a multi-head model, which the original LongLLaMA code (multi-head only) can load."""
    from safetensors.numpy import load_file, save_file
    g, hd = m.num_heads // m.num_kv_heads, m.hidden_size // m.num_heads
    os.makedirs(dst)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name.endswith(".safetensors"):
            tensors = load_file(path)
            for key, w in tensors.items():
                if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                    w = np.repeat(w.reshape(m.num_kv_heads, hd, -1), g, axis=0)
                    tensors[key] = np.ascontiguousarray(w.reshape(m.num_heads * hd, -1))
            save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
        elif name == "config.json":
            with open(path) as f:
                hf = json.load(f)
            hf["num_key_value_heads"] = m.num_heads
            with open(os.path.join(dst, name), "w") as f:
                json.dump(hf, f)
        elif os.path.isfile(path):
            with open(path, "rb") as f, open(os.path.join(dst, name), "wb") as out:
                out.write(f.read())
    return dst


def load_workdir(args):
    """(config, model, the same model without memory layers) of a trained or imported workdir."""
    import copy

    from fot_jax.checkpoint import load_model
    cfg, model = load_model(args.workdir)
    plain_cfg = copy.deepcopy(cfg.model)
    plain_cfg.mem_layers = []
    plain = llama.create(plain_cfg, seed=0)
    nnx.update(plain, nnx.state(model, nnx.Param))
    return cfg, model, plain


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--workdir", default=None,
                        help="a trained or imported model (its window and memory layers) instead of "
                             "the random 4-layer model")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--longllama", default=None, help="directory of the original LongLLaMA modeling code")
    parser.add_argument("--longllama-python", default=sys.executable,
                        help="interpreter for the original code (an environment with transformers 4.x, which "
                             "that code was written for)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-baseline", default=None, metavar="COMMIT",
                        help="also run fot_jax.torch as it was at this commit of the repository (git show)")
    args = parser.parse_args()
    if args.workdir:
        c, model, plain = load_workdir(args)
        args.window = c.model.max_position_embeddings
        name = f"{args.workdir} ({c.model.num_layers} x {c.model.hidden_size})"
    else:
        c = make_config(args, [1, 3])
        model = llama.create(c.model, seed=0)
        plain = llama.create(make_config(args, []).model, seed=0)
        name = f"random 4 x {args.width}"
    m = c.model
    args.last = min(m.last_context_length, args.window)
    prompt = np.random.default_rng(0).integers(3, m.vocab_size, args.length).astype(np.int32)
    capacity = -(-args.length // args.window) * args.window
    rows = jax_rows(model, args, prompt, capacity)
    graphdef, params = nnx.split(plain)
    windows = jnp.asarray(prompt[: args.length // args.window * args.window].reshape(-1, args.window))
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits[:, -1])
    jax.block_until_ready(forward(params, windows))
    t_ingest, _ = best_of(lambda: jax.block_until_ready(forward(params, windows)), args.repeats)
    rt = MemoryRuntime(plain, 1, MemorySettings(capacity=capacity, last_context_length=args.last))
    rt.generate([prompt], 2, stop_token=-1)
    t_gen, _ = best_of(lambda: rt.generate([prompt], args.new, stop_token=-1) and None, args.repeats)
    t_tail, _ = best_of(lambda: rt.ingest([prompt]), args.repeats)
    rows.append(("fot_jax, no memory", t_ingest, t_gen - t_tail, None, None, None))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        if not args.no_torch or args.longllama:
            run = args.workdir
            if run is None:
                run = os.path.join(tmp, "run")
                save_params(run, c, nnx.state(model, nnx.Param))
            api.export_model(run, hf_dir, log=lambda *_: None)
        if not args.no_torch:
            rows.append(auto_row(hf_dir, args, prompt, None, "transformers AutoModel (dense)"))
            rows.append(auto_row(hf_dir, args, prompt, args.top_k, "transformers AutoModel (exact)"))
            rows.append(torch_row(hf_dir, args, prompt, None, "fot_jax.torch (dense)"))
            rows.append(torch_row(hf_dir, args, prompt, args.top_k, "fot_jax.torch (exact)"))
            if args.torch_baseline:
                rows.append(torch_row(hf_dir, args, prompt, None, "fot_jax.torch previous (dense)",
                                      args.torch_baseline))
                rows.append(torch_row(hf_dir, args, prompt, args.top_k, "fot_jax.torch previous (exact)",
                                      args.torch_baseline))
        if args.longllama:
            if m.num_kv_heads < m.num_heads:   # the original code is multi-head only
                hf_dir = mha_copy(hf_dir, os.path.join(tmp, "hf_mha"), m)
            rows.append(original_row(hf_dir, args.longllama, args.longllama_python, args, prompt))
    mm = matmul_gflops(m.hidden_size)
    flops = ingest_flops(m, args.length, args.window)
    print(f"model: {name}, window {args.window}, last context {args.last}, memory layers "
          f"{list(m.mem_layers)}, heads {m.num_heads} (key-value {m.num_kv_heads}), vocab {m.vocab_size}; "
          f"prompt {args.length:,} tokens, {args.new} generated (greedy); store bfloat16; "
          f"top-k {args.top_k}; best of {args.repeats}; {args.threads} thread(s); float32 matmul {mm:.0f} "
          "GFLOP/s in this run")
    if args.longllama and m.num_kv_heads < m.num_heads:
        print(f"original LongLLaMA: multi-head only, so it runs the same model with each key-value head "
              f"repeated for its {m.num_heads // m.num_kv_heads} query heads (the same function, "
              f"{m.num_heads // m.num_kv_heads}x the memory)")
    print(f"{'runtime':<34} {'ingest tok/s':>12} {'GFLOP/s':>8} {'gen tok/s':>10} {'TTFT s':>7} "
          f"{'ingest vs 1st':>13} {'gen vs 1st':>10} {'same tokens':>11} {'peak RSS':>9}")
    ref = rows[0]
    by_mode = {r[0].split("(")[-1]: r[4] for r in rows if r[0].startswith("fot_jax (")}
    for name, ti, tg, ttft, toks, rss in rows:
        want = by_mode.get(name.split("(")[-1])          # fot_jax's tokens with the same memory search
        same = "" if toks is None or want is None else (
            "yes" if toks == want else f"{np.mean(np.array(toks) == np.array(want)):.0%}")
        print(
            f"{name:<34} {args.length / ti:>12,.0f} {flops / ti / 1e9:>8.1f} {args.new / tg:>10,.1f} "
            f"{'' if ttft is None else f'{ttft:.2f}':>7} {ref[1] / ti:>12.2f}x {ref[2] / tg:>9.2f}x "
            f"{same:>11} "
            f"{'' if rss is None else f'{rss / 2**30:.2f} GiB':>9}"
        )
    print(
        "same tokens: greedy output equal to fot_jax's with the same memory search; no-memory ingest: "
        "the same windows through the model without memory, full logits; "
        "peak RSS: of a process running only that runtime"
    )


if __name__ == "__main__":
    main()
