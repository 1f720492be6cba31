"""`fot-jax` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from fot_jax.errors import ConfigError, FotError  # imports nothing else of the package


def _split_overrides(argv):
    known, overrides = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else known).append(arg)
    return known, overrides


def _join(args):
    """Joins a multi-process run (flags or FOT_JAX_* environment) before JAX touches a device."""
    from fot_jax.parallel import distributed
    settings = distributed.DistributedSettings.from_env(
        coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
        init_timeout_s=args.init_timeout, heartbeat_timeout_s=args.heartbeat_timeout)
    distributed.initialize(settings)


class UsageError(FotError):
    """A command-line mistake: one line naming the problem and the fix, exit 2."""


def _writable_dir(path: str, flag: str = "--workdir"):
    """A directory this run may create or write into; checked before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(
            f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)"
        )
    if "://" in path:       # a bucket: checked when it is written
        return
    parent = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UsageError(
            f"{flag} {path} cannot be written ({parent} is not writable); choose another directory"
        )


def _existing_workdir(path: str, flag: str):
    """A workdir given as input (a model to compare with): it must hold a checkpoint."""
    if "://" in path:       # a bucket: checked when it is read
        return
    if not os.path.isdir(path):
        raise UsageError(
            f"{flag} {path} is not a directory; give a training workdir (fot-jax train --workdir ...)"
        )
    ckpt = os.path.join(path, "checkpoints")
    if not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
        raise UsageError(
            f"{flag} {path} holds no checkpoint; train it first (fot-jax train --workdir {path} ...)"
        )


def cmd_train(args, overrides):
    from fot_jax import config as config_lib
    from fot_jax.train.loop import train
    _writable_dir(args.workdir)
    cfg = config_lib.load_config(args.config, overrides)
    _join(args)
    summary = train(cfg, args.workdir)
    if summary.get("preempted"):
        print(f"fot-jax train: terminated (SIGTERM) after step {summary['steps']}; checkpoint saved, "
              "run the same command to resume", file=sys.stderr)
        return 143
    print(json.dumps(summary["eval"], indent=1))
    return 0


def _parse_tokens(text: str):
    import numpy as np
    try:
        return np.array([int(t) for t in text.replace(",", " ").split()], np.int32)
    except ValueError:
        raise SystemExit(
            f"fot-jax: --tokens wants integer token ids separated by spaces or commas, got {text[:40]!r}"
        )


def _workdir_tokenizer(args, cfg):
    """--tokenizer, else the workdir's own (an import's or a text run's), else its training data's."""
    from fot_jax.data.text import workdir_tokenizer
    return workdir_tokenizer(args.workdir, cfg, args.tokenizer)


def _text_prompts(args, cfg):
    """Token ids of --prompt / --prompt-file texts (with --chat, through the model's chat template)."""
    from fot_jax.data.tokenizer import apply_chat_template, chat_template, check_vocab
    tok, source = _workdir_tokenizer(args, cfg)
    check_vocab(tok, cfg.model)
    texts = list(args.prompt or []) + [open(path, encoding="utf-8").read() for path in args.prompt_file or []]
    template = chat_template(tok.path) if args.chat else None
    if args.chat and template is None:
        raise SystemExit(f"fot-jax generate: --chat, but the tokenizer in {source} has no chat template "
                         "(chat_template.jinja or tokenizer_config.json); leave out --chat")
    ids = []
    for text in texts:
        if template is not None:
            # the template writes bos (and any eos) where the model wants them
            ids.append(tok.encode_with_special_tokens(apply_chat_template(template, tok, text)))
        else:
            ids.append(tok.encode(text, bos=True))
    return tok, ids


def _compilation_cache():
    """JAX's persistent compilation cache ($FOT_JAX_COMPILATION_CACHE, default ~/.cache/fot_jax/xla;
    "" turns it off): a second `fot-jax generate` with the same shapes skips compiling."""

    path = os.environ.get(
        "FOT_JAX_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fot_jax", "xla")
    )
    if not path:
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cmd_generate(args, overrides):
    import time

    import numpy as np

    from fot_jax.checkpoint import load_model
    from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
    prompts = []
    for item in args.tokens or []:
        prompts.append(_parse_tokens(item))
    for path in args.tokens_file or []:
        prompts.append(np.load(path).astype(np.int32).reshape(-1) if path.endswith(".npy")
                       else _parse_tokens(open(path).read()))
    if not prompts and not (args.prompt or args.prompt_file):
        raise SystemExit(
            "fot-jax generate: give a prompt: --prompt TEXT, --prompt-file FILE, or token ids with "
            "--tokens '1 3 7 ...' / --tokens-file"
        )
    if prompts and (args.prompt or args.prompt_file):
        raise SystemExit("fot-jax generate: give either text prompts (--prompt, --prompt-file) or token ids "
                         "(--tokens, --tokens-file), not both")
    cfg, model = load_model(args.workdir, overrides=overrides)
    tok = None
    if not prompts:
        tok, ids = _text_prompts(args, cfg)
        prompts = [np.asarray(i, np.int32) for i in ids]
    rt = MemoryRuntime(model, len(prompts), MemorySettings.from_config(cfg))
    start = time.perf_counter()
    first = []
    stream = tok is not None and len(prompts) == 1
    shown = {"ids": [], "text": ""}

    def on_token(row, token):
        if not first:
            first.append(time.perf_counter() - start)
        if stream:                        # print the decoded text as it grows
            shown["ids"].append(token)
            text = tok.decode([t for t in shown["ids"] if t != cfg.model.eos_token_id])
            print(text[len(shown["text"]):], end="", flush=True)
            shown["text"] = text

    outs = rt.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, on_token=on_token)
    total = time.perf_counter() - start
    n = sum(len(o) for o in outs)
    if stream:
        print()
    elif tok is not None:
        for out in outs:
            print(json.dumps({"generated_text": tok.decode([t for t in out if t != cfg.model.eos_token_id])}))
    else:
        for prompt, out in zip(prompts, outs):
            print(json.dumps({"prompt_tokens": int(prompt.size), "generated": out.tolist()}))
    if first:
        after = total - first[0]
        rate = f", then {(n - len(outs)) / after:.1f} tokens/s" if n > len(outs) and after > 0 else ""
        print(f"fot-jax generate: {n} tokens in {total:.2f} s; first token after {first[0]:.2f} s "
              f"(prompt ingest and compilation){rate}", file=sys.stderr)
    return 0


def _eval_memory_scaling(args, cfg, model, out_dir):
    from fot_jax.checkpoint import load_model
    from fot_jax.data import dictionary
    from fot_jax.evals import memory
    from fot_jax.parallel.mesh import memory_mesh
    if args.query_windows < 1 or args.num_docs < 1:
        raise UsageError("--query-windows and --num-docs must be at least 1")
    baseline = load_model(args.baseline) if args.baseline else None
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else memory.DEFAULT_SIZES
    mesh = memory_mesh(args.memory_shards) if args.memory_shards > 1 else None
    rows = memory.memory_scaling(cfg, model, sizes, num_docs=args.num_docs, top_k=cfg.memory.top_k,
                                 baseline=baseline, search=cfg.memory.search, mem_dtype=cfg.model.mem_dtype,
                                 mesh=mesh, query_windows=args.query_windows, generate=args.generate,
                                 layout=args.layout)
    title = (f"Dictionary lookup accuracy vs tokens in memory (top-k {cfg.memory.top_k}, "
             f"{args.layout} layout)")
    print(memory.write_table(rows, os.path.join(out_dir, "memory_scaling"), title))
    memory.plot_scaling(rows, os.path.join(out_dir, "memory_scaling.png"), chance=1 / dictionary.NUM_SYMBOLS)


def _eval_passkey(args, cfg, model, out_dir):
    import glob

    from fot_jax.data.tokenizer import check_vocab
    from fot_jax.evals import memory, passkey
    from fot_jax.infer.runtime import MemorySettings
    tok, _ = _workdir_tokenizer(args, cfg)
    check_vocab(tok, cfg.model)
    lengths = [int(x) for x in (args.sizes or "2048,8192").split(",")]
    settings = MemorySettings.from_config(cfg)
    rows = passkey.passkey(model, tok, settings, lengths, seeds=args.num_docs)
    w = cfg.model.max_position_embeddings
    label = args.label or (f"mem_layers {list(cfg.model.mem_layers)}, W={w}" if cfg.model.mem_layers
                           else f"no memory, W={w}")
    base = os.path.join(out_dir, "passkey_" + "".join(c if c.isalnum() else "_" for c in label))
    print(memory.write_table(rows, base, f"Passkey retrieval, {label}"))
    if args.export:
        torch_rows = passkey.passkey_torch(args.export, tok, settings, lengths, seeds=args.num_docs)
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
    passkey.plot_passkey(results, os.path.join(out_dir, "passkey.png"))


def _eval_perplexity(args, cfg, model, out_dir):
    import numpy as np

    from fot_jax.data.sources import document_source
    from fot_jax.evals import memory, perplexity
    src = document_source(cfg, "validation")
    docs = [np.asarray(src[i]["tokens"]) for i in range(len(src))]
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else list(perplexity.DEFAULT_MEMORY_SIZES)
    results = {}
    for mode in ([args.mode] if args.mode != "both" else ["single_doc", "multi_doc"]):
        rows = perplexity.perplexity_vs_memory(cfg, model, docs, sizes, per_doc=args.num_docs, mode=mode,
                                               span_memory=args.span_memory)
        results[mode] = rows
        print(memory.write_table(rows, os.path.join(out_dir, f"perplexity_{mode}"),
                                 f"Perplexity of held-out {cfg.data.task} documents vs memory ({mode})"))
    perplexity.plot_perplexity(results, os.path.join(out_dir, "perplexity.png"))


def _eval_distraction(args, cfg, model, out_dir):
    from fot_jax.checkpoint import load_model
    from fot_jax.evals import memory
    results = {}
    for workdir in [args.workdir] + list(args.compare or []):
        c, mdl = (cfg, model) if workdir == args.workdir else load_model(workdir)
        label = f"trained r={c.crossbatch.range}"
        if workdir != args.workdir:
            label += f" ({os.path.basename(workdir.rstrip('/'))})"
        rows = memory.distraction(c, mdl, num_docs=args.num_docs)
        results[label] = rows
        print(memory.write_table(rows, os.path.join(out_dir, f"distraction_r{c.crossbatch.range}"),
                                 f"Positive attention mass, {label}"))
    memory.plot_distraction(results, os.path.join(out_dir, "distraction.png"))


def _eval_harness(args, cfg, model, out_dir):
    try:
        from fot_jax.evals import harness
    except ImportError as e:
        raise UsageError(f"--task harness needs lm-evaluation-harness ({e}): "
                         "pip install 'fot_jax[eval]'") from None
    if not args.tasks:
        raise UsageError("--task harness: give --tasks NAME[,NAME...] (local tasks: configs/eval/*.yaml)")
    tok, _ = _workdir_tokenizer(args, cfg)      # the model cmd_eval loaded, not a second copy
    lm = harness.FotJaxLM(model=model, cfg=cfg, tokenizer=tok, batch_size=args.batch_size)
    lengths = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    print(harness.run(args.workdir, args.tasks.split(","), out_dir, limit=args.limit,
                      num_fewshot=args.num_fewshot, include=args.include, lm=lm, lengths=lengths,
                      tokenizer_dir=os.path.dirname(tok.path)))


def _eval_few_shot(args, cfg, model, out_dir):
    from fot_jax.data.tokenizer import check_vocab
    from fot_jax.evals import few_shot, memory
    from fot_jax.infer.runtime import MemorySettings
    if not args.data:
        raise UsageError("--task few_shot: give --data FILE.jsonl (lines with 'input' and 'label')")
    examples, labels = few_shot.load_examples(args.data)
    sizes = [int(x) for x in (args.contexts or "1024,2048,4096,8192").split(",")]
    tok, _ = _workdir_tokenizer(args, cfg)
    check_vocab(tok, cfg.model)
    rows = few_shot.evaluate(model, cfg, tok, MemorySettings.from_config(cfg), examples, labels, sizes,
                             seeds=args.seeds, num_tests=args.num_docs, mode=args.few_shot_mode,
                             batch_size=args.batch_size)
    name = os.path.splitext(os.path.basename(args.data))[0]
    base = os.path.join(out_dir, f"few_shot_{name}_{args.few_shot_mode}")
    title = f"Few-shot {name} ({args.few_shot_mode}, {len(labels)} labels) vs context"
    print(memory.write_table(rows, base, title))
    few_shot.plot(rows, base + ".png", title)


def _eval_retrieval_heads(args, cfg, model, out_dir):
    from fot_jax.data.tokenizer import check_vocab
    from fot_jax.evals import memory, retrieval_heads
    tok, _ = _workdir_tokenizer(args, cfg)
    check_vocab(tok, cfg.model)
    length = int((args.sizes or "1024").split(",")[0])
    scores, hits = retrieval_heads.retrieval_scores(model, tok, length, seeds=args.num_docs)
    rows, layers = retrieval_heads.strongest(scores)
    print(memory.write_table(rows, os.path.join(out_dir, "retrieval_heads"),
                             f"Retrieval heads: attention on the passkey's tokens, {length}-token prompts"))
    print(f"answered {hits}/{args.num_docs} prompts within the window; the layers of the strongest heads: "
          f"{layers} (--config.model.mem_layers={layers})")


EVAL_TASKS = {"memory_scaling": _eval_memory_scaling, "retrieval_heads": _eval_retrieval_heads,
              "distraction": _eval_distraction, "passkey": _eval_passkey, "perplexity": _eval_perplexity,
              "harness": _eval_harness, "few_shot": _eval_few_shot}


def _host_devices(count: int, replace: bool = False) -> None:
    """`count` CPU devices simulated on this host (kept as XLA_FLAGS has it, unless `replace`);
    effective while JAX's backends have not started (accelerators are unaffected)."""
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "").split()
    if any(f.startswith(flag) for f in flags) and not replace:
        return
    os.environ["XLA_FLAGS"] = " ".join([f for f in flags if not f.startswith(flag)] + [f"{flag}={count}"])


def cmd_eval(args, overrides):
    from fot_jax.checkpoint import load_model
    if args.memory_shards > 1:       # on a CPU host: the shards' simulated devices
        _host_devices(args.memory_shards)
    for path in [args.baseline] if args.baseline else []:
        _existing_workdir(path, "--baseline")
    for path in args.compare or []:
        _existing_workdir(path, "--compare")
    if args.out:
        _writable_dir(args.out, "--out")
    cfg, model = load_model(args.workdir, overrides=overrides)
    out_dir = args.out or os.path.join(args.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    EVAL_TASKS[args.task](args, cfg, model, out_dir)
    print(f"written to {out_dir}")
    return 0


def cmd_sweep(args, overrides):
    from fot_jax.sweep import run_sweep, sweep_points
    if args.list:
        for p in sweep_points(args.config):
            print(p["name"], json.dumps(p["overrides"]))
        return 0
    results = run_sweep(args.config, args.workdir, overrides, launcher=args.launcher or "")
    with open(f"{args.workdir}/sweep.md") as f:
        print(f.read())
    failed = [r["point"] for r in results if r["status"].startswith("FAILED")]
    if failed:
        print(f"fot-jax sweep: {len(failed)} point(s) failed: {', '.join(failed)} (see <point>/train.log)",
              file=sys.stderr)
        return 1
    return 0


def cmd_plan(args, overrides):

    from fot_jax import config as config_lib
    from fot_jax.plan import format_plan, make_plan, parse_mesh
    cfg = config_lib.load_config(args.config, overrides, platform=args.platform)
    if args.mesh:
        for axis, size in parse_mesh(args.mesh).items():
            cfg.mesh[axis] = size
    # Per-device memory does not depend on which links an axis crosses: a multi-slice mesh is planned
    # as one slice with the same axis sizes (simulated CPU devices have no slices).
    for a in ("data", "fsdp", "tensor"):
        dcn = cfg.mesh[f"dcn_{a}"]
        if dcn > 1:
            cfg.mesh[a] = -1 if cfg.mesh[a] == -1 else cfg.mesh[a] * dcn
            cfg.mesh[f"dcn_{a}"] = 1
    sizes = [cfg.mesh[a] for a in ("data", "fsdp", "tensor")]
    devices = args.devices or (0 if -1 in sizes else sizes[0] * sizes[1] * sizes[2])
    if not devices:
        raise config_lib.ConfigError(
            "config field 'mesh' has a -1 axis: give --devices N (the pod's chip count) or a full --mesh"
        )
    # Simulated CPU devices for the pod's shape; must be set before JAX starts its backend.
    _host_devices(devices, replace=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    if len(jax.devices()) < devices:
        raise config_lib.ConfigError(f"the plan needs {devices} devices, JAX already started with "
                                     f"{len(jax.devices())}; run `fot-jax plan` in a fresh process")
    if args.tokens_per_s and args.chip:
        from fot_jax.train.metrics import chip_peak_flops
        if chip_peak_flops(args.chip) is None:
            raise config_lib.ConfigError(
                f"--chip: unknown chip {args.chip!r} (v4, v5e, v5p, v6e, a100, h100, h200)"
            )
    plan = make_plan(cfg, jax.devices()[:devices], platform=args.platform)
    print(format_plan(plan, os.path.basename(args.config), args.device_memory, args.all_params,
                      args.tokens_per_s, args.chip))
    if args.json:
        import dataclasses
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(plan) | {"peak_bytes": plan.peak_bytes}, f, indent=1, default=str)
    if args.device_memory and plan.peak_bytes > args.device_memory * 2 ** 30:
        print(f"fot-jax plan: {plan.peak_bytes / 2**30:.2f} GiB per device does not fit in "
              f"{args.device_memory} GiB", file=sys.stderr)
        return 1
    return 0


def cmd_import(args, overrides):
    from fot_jax.convert.api import import_model
    import_model(args.source, args.out, overrides=overrides, dtype=args.dtype, overwrite=args.overwrite)
    return 0


def cmd_export(args, overrides):
    from fot_jax.convert.api import export_model
    if overrides:
        raise SystemExit(
            "fot-jax export: --config.* overrides do not apply (the checkpoint's config is exported)"
        )
    export_model(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                 fot_extensions=args.fot_extensions, max_shard_size=args.max_shard_size,
                 tokenizer=args.tokenizer)
    return 0


def cmd_tokenizer(args, overrides):
    from fot_jax.data.tokenizer import load_tokenizer, train_sentencepiece
    if args.action == "train":
        if not args.input or not args.out:
            raise SystemExit("fot-jax tokenizer train: give --input FILE [FILE ...] and --out PREFIX")
        path = train_sentencepiece(args.input, args.out, args.vocab_size, model_type=args.model_type)
        tok = load_tokenizer(path)
        print(f"trained {tok}")
        return 0
    if not args.tokenizer:
        raise SystemExit("fot-jax tokenizer encode/decode: give --tokenizer PATH")
    tok = load_tokenizer(args.tokenizer)
    if args.action == "encode":
        print(json.dumps(tok.encode(args.text or sys.stdin.read(), bos=args.bos)))
    else:
        print(tok.decode(_parse_tokens(args.text or sys.stdin.read()).tolist()))
    return 0


def _multi_process_guard(fn, args, overrides):
    """In a multi-process run, a failed collective (a process died: gloo/ICI reports a reset
    connection) stops this process at once with a message that says so, instead of a traceback
    followed by an abort in the coordination service's shutdown."""
    import jax
    try:
        return fn(args, overrides)
    except jax.errors.JaxRuntimeError as e:
        from fot_jax.parallel import distributed
        if not distributed.is_initialized():
            raise
        print(f"fot-jax: process {jax.process_index()} of {jax.process_count()}: a step with the other "
              f"processes failed ({str(e).splitlines()[0][:300]}). Another process probably died or was "
              "preempted; see its log. Stopping; restart all processes to resume from the last "
              "checkpoint.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)  # skip jax's shutdown barrier, which the dead process can never reach


def _distributed_flags(p):
    g = p.add_argument_group("multi-host (default: $FOT_JAX_COORDINATOR, $FOT_JAX_NUM_PROCESSES, "
                             "$FOT_JAX_PROCESS_ID; a TPU VM pod is detected by itself)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int, help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, help="this process, 0..num_processes-1")
    g.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for the others to join")
    g.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without a heartbeat before a process counts as dead")


OVERRIDES_HELP = """config overrides: any config field, after the flags, as --config.SECTION.FIELD=VALUE
  (VALUE is read as a Python literal: numbers, True/False, lists; anything else is a string), e.g.
  fot-jax train --config configs/dictionary_lookup.py --workdir runs/x \\
      --config.train.steps=200 --config.model.mem_layers=[1,3] --config.crossbatch.range=3
The same overrides work for generate, eval and plan."""


def _add_train(sub):
    p = sub.add_parser("train", help="train (and evaluate) a model from a config file",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDES_HELP)
    p.add_argument("--config", required=True, help="a config file in configs/")
    p.add_argument("--workdir", required=True, help="where metrics, plots and checkpoints go")
    _distributed_flags(p)


def _add_generate(sub):
    p = sub.add_parser("generate", help="ingest prompts (any length) with memory and generate")
    p.add_argument("--workdir", required=True, help="a training workdir (its latest checkpoint)")
    p.add_argument(
        "--prompt",
        action="append",
        help="a text prompt, through the workdir's tokenizer (repeat for a batch)",
    )
    p.add_argument("--prompt-file", action="append", help="a text file as the prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the workdir's)")
    p.add_argument("--tokens", action="append", help="a prompt as token ids '1 5 9 ...' (repeat for a batch)")
    p.add_argument("--tokens-file", action="append", help="a prompt file: token ids as text, or .npy")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _add_eval(sub):
    p = sub.add_parser("eval", help="the paper's memory evaluations of a trained model")
    p.add_argument("--workdir", required=True, help="a training workdir (its latest checkpoint)")
    p.add_argument("--task", choices=sorted(EVAL_TASKS), default="memory_scaling")
    p.add_argument("--mode", choices=["single_doc", "multi_doc", "both"], default="both",
                   help="perplexity: memory of the document only, or also of other documents")
    p.add_argument("--span-memory", type=int, default=None,
                   help="perplexity: score the spans that have room for this much memory (default: the "
                        "largest of --sizes); give the same value to runs that split the sizes")
    p.add_argument("--tokenizer", help="passkey: tokenizer file or directory (default: the workdir's)")
    p.add_argument("--label", help="passkey: name of this configuration in the table and plot")
    p.add_argument("--export", help="passkey: also run the same prompts through this PyTorch export of the "
                   "workdir (AutoModelForCausalLM, trust_remote_code) and count equal answers")
    p.add_argument("--baseline", help="memory_scaling: workdir of a baseline model without memory")
    p.add_argument("--compare", action="append", help="distraction: more workdirs (e.g. trained with r=0)")
    p.add_argument("--sizes", help="memory_scaling: dictionary token counts; passkey: prompt lengths; "
                   "perplexity: memory sizes; harness: RULER prompt lengths (comma-separated)")
    p.add_argument("--num-docs", type=int, default=4,
                   help="documents per point (passkey: seeds per length; perplexity: spans per document)")
    p.add_argument("--memory-shards", type=int, default=1,
                   help="memory_scaling: shard each store along N over this many devices")
    p.add_argument("--query-windows", type=int, default=1,
                   help="memory_scaling: query windows read on top of each document's memory "
                        "(25 queries each)")
    p.add_argument("--layout", choices=("windows", "stream"), default="windows",
                   help="memory_scaling: definitions laid out whole in each model window (windows), or "
                        "back to back so that window boundaries cut some records (stream; the rows "
                        "then also give the share of such questions and the accuracy on the others)")
    p.add_argument("--generate", action="store_true",
                   help="memory_scaling: also greedy answers (generate) on documents built outside the "
                        "training data, as many questions as the teacher-forced measure")
    p.add_argument("--out", help="output folder (default <workdir>/eval)")
    p.add_argument("--tasks", help="harness: lm-evaluation-harness task names (comma-separated; RULER's "
                   "offline ones: niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, at --sizes)")
    p.add_argument("--limit", type=float, help="harness: examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, help="harness: demonstrations per example")
    p.add_argument("--include", help="harness: a folder of more task YAMLs")
    p.add_argument("--batch-size", type=int, default=1, help="harness, few_shot: rows read at once")
    p.add_argument("--data", help="few_shot: a JSON-lines file with 'input' and 'label' fields")
    p.add_argument("--contexts", help="few_shot: context sizes in tokens (default 1024,2048,4096,8192)")
    p.add_argument("--seeds", type=int, default=1, help="few_shot: demonstration orders/choices averaged")
    p.add_argument("--few-shot-mode", choices=["classify", "generate"], default="classify",
                   help="few_shot: the label with the highest log-likelihood, or a greedy generation")


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="run a config's sweep points (get_sweep()), each in its own workdir")
    p.add_argument(
        "--config", required=True, help="a config file with get_sweep(), e.g. configs/ablations/*.py"
    )
    p.add_argument(
        "--workdir", required=True, help="points go to WORKDIR/<point>; summary in WORKDIR/sweep.md"
    )
    p.add_argument(
        "--launcher", help="prefix for each point's `fot-jax train ...` (e.g. a pod launch command)"
    )
    p.add_argument("--list", action="store_true", help="only list the points")


def _add_plan(sub):
    p = sub.add_parser("plan", help="compile the train step on a simulated pod mesh: per-device memory, "
                       "shardings")
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", help="e.g. fsdp=32 or data=2,fsdp=16 (default: the config's mesh)")
    p.add_argument("--devices", type=int, help="pod size when the mesh has a -1 axis")
    p.add_argument("--device-memory", type=float, help="GiB per device (v3: 16, v4: 32, v5e: 16, v5p: 95): "
                   "exit 1 when the plan does not fit")
    p.add_argument("--all-params", action="store_true", help="list every parameter, not one per shape")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.add_argument(
        "--tokens-per-s", type=float, help="a global throughput target: with --chip, the MFU it needs"
    )
    p.add_argument("--chip", help="the pod's chip for --tokens-per-s (v4, v5e, v5p, v6e, h100, h200, ...)")
    p.add_argument("--platform", choices=("tpu", "cpu"), default="tpu",
                   help="the chips the plan is for: picks the attention backend that `auto` means there "
                        "(tpu: splash attention; default)")


def _add_import(sub):
    p = sub.add_parser("import", help="an HF LLaMA-family directory or a GGUF file -> a fot_jax checkpoint")
    p.add_argument("source", help="HF model directory (safetensors or .bin, sharded or not) or a .gguf file")
    p.add_argument(
        "--out", required=True, help="new fot_jax workdir (fine-tune with --config.train.init_from=OUT)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--overwrite", action="store_true")


def _add_export(sub):
    p = sub.add_parser("export", help="a fot_jax checkpoint -> an HF directory in the LongLLaMA format")
    p.add_argument("--workdir", required=True, help="a training workdir or an import")
    p.add_argument("--out", required=True, help="the HF directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--max-shard-size", default="5GB", help="split the weights into files of at most this size"
    )
    p.add_argument("--tokenizer", help="tokenizer file or directory to include (default <workdir>/tokenizer)")
    p.add_argument("--fot-extensions", action="store_true",
                   help="allow qk_norm / gated models (readable by fot_jax.torch, not by stock LLaMA code)")
    p.add_argument("--overwrite", action="store_true")


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="train a SentencePiece model, or encode / decode with a tokenizer")
    p.add_argument("action", choices=["train", "encode", "decode"])
    p.add_argument("--input", nargs="+", help="train: text files")
    p.add_argument("--out", help="train: output prefix (writes PREFIX.model, PREFIX.vocab)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--tokenizer", help="encode/decode: .model, tokenizer.json, or a directory / workdir")
    p.add_argument("--text", help="encode: text; decode: ids (default: stdin)")
    p.add_argument("--bos", action="store_true", help="encode: prepend bos")


COMMANDS = {
    "train": lambda args, overrides: _multi_process_guard(cmd_train, args, overrides),
    "generate": lambda args, overrides: (_compilation_cache(), cmd_generate(args, overrides))[1],
    "eval": cmd_eval, "import": cmd_import, "sweep": cmd_sweep, "plan": cmd_plan,
    "export": cmd_export, "tokenizer": cmd_tokenizer,
}


def _parser():
    from fot_jax import __version__
    parser = argparse.ArgumentParser(prog="fot-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fot-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_generate, _add_eval, _add_sweep, _add_plan, _add_import, _add_export,
                _add_tokenizer):
        add(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known, overrides = _split_overrides(argv)
    args = _parser().parse_args(known)
    try:
        return COMMANDS[args.command](args, overrides)
    except ConfigError as e:
        print(f"fot-jax: config error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"fot-jax {args.command}: {e}", file=sys.stderr)
        return 2
    except FotError as e:   # every error fot_jax raises on purpose: its message is for the user
        print(f"fot-jax {args.command}: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
