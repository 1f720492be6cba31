"""lm-evaluation-harness model `fot_jax` (the `eval` extra: `pip install 'fot_jax[eval]'`).

    fot-jax-lm-eval --model fot_jax --model_args workdir=runs/x,top_k=32,batch_size=4 --tasks ...
    fot-jax eval --workdir runs/x --task harness --tasks word_categories_mc [--limit N]

(`fot-jax-lm-eval` is the harness's own `lm_eval` command with this model registered.)

Requests run on the inference runtime, so a context longer than the model's window is read through
memory exactly as `fot-jax generate` reads it (LongLLaMA windowing), with the workdir's
tokenizer; `loglikelihood`, `loglikelihood_rolling` and `generate_until` are implemented.
`--config.memory.*` style settings come as model_args (top_k, search, last_context_length).
Tasks must have local data (`configs/eval/*.yaml`: `dataset_path: json` with local
`data_files`): nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fot_jax.checkpoint import load_model
from fot_jax.data.text import workdir_tokenizer
from fot_jax.data.tokenizer import check_vocab
from fot_jax.evals.scoring import Scorer
from fot_jax.infer.runtime import MemorySettings

LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK_DIR = os.path.join(REPO_ROOT, "configs", "eval")


class HarnessError(ValueError):
    """A harness request fot_jax cannot run (a task that needs a download, a bad argument)."""


@register_model("fot_jax")
class FotJaxLM(LM):
    """A fot_jax model in the harness. Give `workdir` (its latest checkpoint and tokenizer), or
    `model`, `cfg` and `tokenizer` objects directly."""

    def __init__(self, workdir: str | None = None, top_k: int | None = None, search: str | None = None,
                 last_context_length: int | None = None, batch_size=1, max_gen_toks: int = 256,
                 model=None, cfg=None, tokenizer=None, **_ignored):
        super().__init__()
        if model is None:
            if not workdir:
                raise HarnessError("fot_jax harness model: give workdir=<a training workdir or an import>")
            overrides = [f"--config.memory.{k}={v}" for k, v in (("top_k", top_k), ("search", search)) if v]
            if last_context_length:
                overrides.append(f"--config.model.last_context_length={last_context_length}")
            cfg, model = load_model(workdir, overrides=overrides)
            tokenizer, _ = workdir_tokenizer(workdir, cfg)
        check_vocab(tokenizer, cfg.model)
        self.cfg, self.tok = cfg, tokenizer
        bs = 1 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.scorer = Scorer(model, MemorySettings.from_config(cfg), batch_size=bs)
        self.max_gen_toks = int(max_gen_toks)

    # -- the harness API -------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str):
        """(context ids with bos, continuation ids): trailing spaces move to the continuation, and
        the continuation's ids are those of the whole text after the context's (as tokenized together)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok.encode(context + continuation, bos=True)
        ctx = self.tok.encode(context, bos=True)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        seqs, starts = [], []
        for req in requests:
            ctx, cont = self._encode_pair(*req.args)
            if not cont:
                raise HarnessError(f"empty continuation after the context {req.args[0][-40:]!r}")
            seqs.append(ctx + cont)
            starts.append(len(ctx))
        return self.scorer.loglikelihoods(seqs, starts)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        seqs = [self.tok.encode(req.args[0], bos=True) for req in requests]
        return [ll for ll, _ in self.scorer.loglikelihoods(seqs, [1] * len(seqs))]

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise HarnessError("fot_jax harness model: generate_until is greedy (do_sample=False)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            (ids,) = self.scorer.generate([self.tok.encode(context, bos=True)], n,
                                          stop_token=self.cfg.model.eos_token_id)
            out.append(cut_at_stops(self.tok.decode([t for t in ids if t != self.cfg.model.eos_token_id]),
                                    until))
        return out


def lm_eval_main():
    """The harness's command line (`lm_eval ...`) with the `fot_jax` model registered."""
    from lm_eval.__main__ import cli_evaluate
    return cli_evaluate()


def cut_at_stops(text: str, until) -> str:
    """The text before the first of the stop sequences."""
    cut = min([text.find(s) for s in until if s and s in text], default=len(text))
    return text[:cut]


def _entry_config(entry) -> dict:
    """A task index entry's parsed YAML (lm-eval's Entry, or the dict of older versions)."""
    cfg = getattr(entry, "cfg", None)
    if cfg is not None:
        return cfg
    path = entry.get("yaml_path") if isinstance(entry, dict) else None
    if not path or path == -1:
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def check_local(task_manager, tasks) -> None:
    """Every task reads local data that exists; otherwise a HarnessError naming it."""
    index = task_manager.task_index
    for name in tasks:
        if name not in index:
            raise HarnessError(f"unknown harness task {name!r}; the local tasks are in {TASK_DIR} "
                               f"({', '.join(sorted(_local_tasks(task_manager)))})")
        spec = _entry_config(index[name])
        builder = spec.get("dataset_path")
        files = (spec.get("dataset_kwargs") or {}).get("data_files")
        if builder is None:
            continue                       # a group or tag: its members are tasks of their own
        if builder not in LOCAL_BUILDERS or not files:
            raise HarnessError(
                f"harness task {name!r} needs a download (dataset_path: {builder}); fot_jax runs tasks "
                f"with local data: write a task YAML with dataset_path: json and local data_files "
                f"(see {TASK_DIR})")
        for f in _data_files(files):
            if not os.path.exists(os.path.join(REPO_ROOT, f)):
                raise HarnessError(f"harness task {name!r}: data file {f} not found (paths are relative "
                                   f"to {REPO_ROOT}, or absolute)")


def _data_files(files) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _data_files(v)]
    return [f for v in files for f in _data_files(v)]


def _local_tasks(task_manager):
    index = task_manager.task_index
    return [n for n, v in index.items()
            if str(getattr(v, "yaml_path", None) or (v.get("yaml_path") if isinstance(v, dict) else "")
                   ).startswith(TASK_DIR)]


def run(workdir: str, tasks, out_dir: str, limit=None, num_fewshot=None, include=None, model_args=None,
        lm=None):
    """Runs harness tasks on a fot_jax workdir (or on `lm`, a FotJaxLM already built); writes the
    harness's results JSON and a markdown summary table into `out_dir`. Returns the table."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = [TASK_DIR] + ([include] if include else [])
    manager = TaskManager(include_path=paths)
    check_local(manager, tasks)
    lm = lm or FotJaxLM(workdir=workdir, **(model_args or {}))
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)                    # the task files' data paths are relative to it
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                          task_manager=manager, log_samples=False)
    finally:
        os.chdir(cwd)
    os.makedirs(out_dir, exist_ok=True)
    name = "harness_" + "_".join(tasks)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}, f,
                  indent=1, default=str)
    table = make_table(results)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(table + "\n")
    return table
