"""Which transformers versions load an export and generate with memory: for each version, a fresh
virtual environment with torch, that transformers and safetensors (nothing of fot_jax) loads a
tiny exported model with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`,
offline, and must reproduce fot_jax's logits over 6 windows (<= 1e-4) and its 30 greedy tokens
(`model.generate`), and load the tokenizer with `AutoTokenizer`.

    python benchmarks/transformers_versions.py --versions 4.40.2,4.45.2,4.57.1,5.24.0 [--keep DIR]

Needs the package registry (each environment installs its transformers); prints one row a version.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

CHECK = textwrap.dedent('''
    import json, os, sys, warnings
    warnings.simplefilter("ignore")
    import numpy as np, torch, transformers
    d = sys.argv[1]
    ref = json.load(open(os.path.join(d, "reference.json")))
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), trust_remote_code=True,
                                                              **kw).eval()
    doc = torch.tensor(ref["doc"])[None]
    with torch.no_grad():
        logits = model(doc).logits[0].numpy()
    err = float(np.abs(logits - np.asarray(ref["logits"], np.float32)).max())
    out = model.generate(doc, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    same = out[0, doc.shape[1]:].tolist() == ref["tokens"]
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(d, "hf"))
    chat = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    print(json.dumps({"transformers": transformers.__version__, "max_abs_logit_error": err,
                      "same_greedy_tokens": same, "tokenizer": type(tok).__name__,
                      "chat_template": chat.strip() == "w1 w2"}))
''')


def make_export(directory: str):
    """A tiny GQA model with memory (top-k 5, float32 store), exported, with fot_jax's logits and
    greedy tokens as the reference."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import pathlib

    from test_hf_export import VOCAB, _cfg, _export, _settings

    from fot_jax.infer.runtime import MemoryRuntime
    c = _cfg(heads=4, kv=2, top_k=5, capacity=256)
    model, path = _export(pathlib.Path(directory), c)
    doc = np.random.default_rng(0).integers(3, VOCAB, 106)
    _, (logits,) = MemoryRuntime(model, 1, _settings(c)).ingest([doc], return_logits=True)
    tokens = MemoryRuntime(model, 1, _settings(c)).generate([doc], 30, stop_token=-1)[0]
    with open(os.path.join(directory, "reference.json"), "w") as f:
        json.dump({"doc": doc.tolist(), "logits": np.asarray(logits[:, :VOCAB]).tolist(),
                   "tokens": np.asarray(tokens).tolist()}, f)
    return path


def check(version: str, directory: str, root: str, torch_spec: str) -> dict:
    venv = os.path.join(root, f"venv-{version}")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        install = [py, "-m", "pip", "install", "-q", torch_spec, f"transformers=={version}", "safetensors",
                   "numpy", "jinja2"]
        res = subprocess.run(install, capture_output=True, text=True)
        if res.returncode:
            last = res.stderr.strip().splitlines()[-1:]
            return {"transformers": version, "error": "install failed: " + (last[0] if last else "?")}
    script = os.path.join(root, "check.py")
    with open(script, "w") as f:
        f.write(CHECK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=os.path.join(root, "hf_home"),
               TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=os.path.join(root, "modules"))
    res = subprocess.run([py, script, directory], capture_output=True, text=True, env=env)
    if res.returncode:
        last = [line for line in res.stderr.strip().splitlines() if line.strip()][-1:]
        return {"transformers": version, "error": last[0] if last else f"exit {res.returncode}"}
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", default="4.40.2,4.43.4,4.45.2,4.49.0,4.51.3,4.57.1,5.24.0")
    p.add_argument("--torch", default="torch==2.13.0", help="the torch each environment installs")
    p.add_argument("--keep", default="", help="a directory for the environments (reused between runs)")
    args = p.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="fot_jax_tf_versions_")
    os.makedirs(root, exist_ok=True)
    directory = os.path.join(root, "export")
    if not os.path.exists(os.path.join(directory, "reference.json")):
        os.makedirs(directory, exist_ok=True)
        make_export(directory)
    print("| transformers | loads and generates | max logit error | same greedy tokens | tokenizer | "
          "chat template |")
    print("| --- | --- | ---: | --- | --- | --- |")
    for version in args.versions.split(","):
        r = check(version, directory, root, args.torch)
        if "error" in r:
            print(f"| {version} | no: {r['error'][:120]} | | | | |", flush=True)
            continue
        ok = r["max_abs_logit_error"] <= 1e-4 and r["same_greedy_tokens"]
        print(f"| {r['transformers']} | {'yes' if ok else 'NO'} | {r['max_abs_logit_error']:.1e} | "
              f"{r['same_greedy_tokens']} | {r['tokenizer']} | {r['chat_template']} |", flush=True)


if __name__ == "__main__":
    main()
