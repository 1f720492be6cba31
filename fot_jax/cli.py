"""`fot-jax` command line."""
from __future__ import annotations

import argparse
import json
import sys

from fot_jax.errors import ConfigError, FotError, UsageError
from fot_jax.paths import writable_dir


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


def cmd_train(args, overrides):
    from fot_jax import checks
    from fot_jax.parallel.distributed import exit_on_failed_collective
    from fot_jax.train.loop import train
    writable_dir(args.workdir)
    cfg = checks.load_config(args.config, overrides)
    _join(args)
    summary = exit_on_failed_collective(train, cfg, args.workdir)
    if summary.get("preempted"):
        print(f"fot-jax train: terminated (SIGTERM) after step {summary['steps']}; checkpoint saved, "
              "run the same command to resume", file=sys.stderr)
        return 143
    print(json.dumps(summary["eval"], indent=1))
    return 0


def cmd_generate(args, overrides):
    from fot_jax.infer.generate import GenerateRequest, compilation_cache, run_generate
    compilation_cache()
    run_generate(_request(GenerateRequest, args), overrides)
    return 0


def cmd_eval(args, overrides):
    from fot_jax.evals.tasks import EvalRequest, run_eval
    print(f"written to {run_eval(_request(EvalRequest, args), overrides)}")
    return 0


def cmd_sweep(args, overrides):
    from fot_jax.sweep import sweep_command
    return sweep_command(args.config, args.workdir, overrides, launcher=args.launcher, list_only=args.list)


def cmd_plan(args, overrides):
    from fot_jax.plan import plan_command
    return plan_command(args.config, overrides, mesh=args.mesh, devices=args.devices, platform=args.platform,
                        device_memory=args.device_memory, all_params=args.all_params,
                        tokens_per_s=args.tokens_per_s, chip=args.chip, json_path=args.json)


def cmd_import(args, overrides):
    from fot_jax.convert.api import import_model
    import_model(args.source, args.out, overrides=overrides, dtype=args.dtype, overwrite=args.overwrite)
    return 0


def cmd_export(args, overrides):
    from fot_jax.convert.api import export_model
    if overrides:
        raise UsageError("--config.* overrides do not apply (the checkpoint's config is exported)")
    export_model(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                 fot_extensions=args.fot_extensions, max_shard_size=args.max_shard_size,
                 tokenizer=args.tokenizer)
    return 0


def cmd_tokenizer(args, overrides):
    from fot_jax.data.tokenizer import tokenizer_command
    needs_text = args.action in ("encode", "decode") and args.tokenizer
    text = args.text if args.text is not None or not needs_text else sys.stdin.read()
    print(tokenizer_command(args.action, tokenizer=args.tokenizer, text=text, bos=args.bos, inputs=args.input,
                            out=args.out, vocab_size=args.vocab_size, model_type=args.model_type))
    return 0


def cmd_goodput(args, overrides):
    from fot_jax.train import goodput
    summary = goodput.summarize(goodput.read(args.workdir))
    print(goodput.report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _request(cls, args):
    """A request dataclass from the parsed flags of the same names."""
    import dataclasses
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


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
    p.add_argument("--prompt", action="append",
                   help="a text prompt, through the workdir's tokenizer (repeat for a batch)")
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
    from fot_jax.evals.tasks import EVAL_TASKS
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
    p.add_argument("--config", required=True,
                   help="a config file with get_sweep(), e.g. configs/ablations/*.py")
    p.add_argument("--workdir", required=True,
                   help="points go to WORKDIR/<point>; summary in WORKDIR/sweep.md")
    p.add_argument("--launcher",
                   help="prefix for each point's `fot-jax train ...` (e.g. a pod launch command)")
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
    p.add_argument("--tokens-per-s", type=float,
                   help="a global throughput target: with --chip, the MFU it needs")
    p.add_argument("--chip", help="the pod's chip for --tokens-per-s (v4, v5e, v5p, v6e, h100, h200, ...)")
    p.add_argument("--platform", choices=("tpu", "cpu"), default="tpu",
                   help="the chips the plan is for: picks the attention backend that `auto` means there "
                        "(tpu: splash attention; default)")


def _add_import(sub):
    p = sub.add_parser("import", help="an HF LLaMA-family directory or a GGUF file -> a fot_jax checkpoint")
    p.add_argument("source", help="HF model directory (safetensors or .bin, sharded or not) or a .gguf file")
    p.add_argument("--out", required=True,
                   help="new fot_jax workdir (fine-tune with --config.train.init_from=OUT)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--overwrite", action="store_true")


def _add_export(sub):
    p = sub.add_parser("export", help="a fot_jax checkpoint -> an HF directory in the LongLLaMA format")
    p.add_argument("--workdir", required=True, help="a training workdir or an import")
    p.add_argument("--out", required=True, help="the HF directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split the weights into files of at most this size")
    p.add_argument("--tokenizer", help="tokenizer file or directory to include (default <workdir>/tokenizer)")
    p.add_argument("--fot-extensions", action="store_true",
                   help="allow qk_norm / gated models (readable by fot_jax.torch, not by stock LLaMA code)")
    p.add_argument("--overwrite", action="store_true")


def _add_goodput(sub):
    p = sub.add_parser("goodput", help="where a run's wall time went: goodput and badput by cause "
                       "(a run trained with --config.train.goodput=True)")
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("--json", help="also write the summary as JSON here")


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
    "train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "import": cmd_import, "sweep": cmd_sweep,
    "plan": cmd_plan, "export": cmd_export, "tokenizer": cmd_tokenizer, "goodput": cmd_goodput,
}


def _parser():
    from fot_jax import __version__
    parser = argparse.ArgumentParser(prog="fot-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fot-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_generate, _add_eval, _add_sweep, _add_plan, _add_import, _add_export,
                _add_tokenizer, _add_goodput):
        add(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known, overrides = _split_overrides(argv)
    args = _parser().parse_args(known)
    try:
        return COMMANDS[args.command](args, overrides)
    except FotError as e:   # every error fot_jax raises on bad input: its message is for the user
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"fot-jax {args.command}: {kind}{' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
