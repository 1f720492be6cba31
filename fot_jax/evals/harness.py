"""lm-evaluation-harness model `fot_jax` (the `eval` extra: `pip install 'fot_jax[eval]'`).

    fot-jax-lm-eval --model fot_jax --model_args workdir=runs/x,top_k=32,batch_size=4 --tasks ...
    fot-jax eval --workdir runs/x --task harness --tasks word_categories_mc [--limit N]

(`fot-jax-lm-eval` is the harness's own `lm_eval` command with this model registered.)

Requests run on the inference runtime, so a context longer than the model's window is read through
memory exactly as `fot-jax generate` reads it (LongLLaMA windowing), with the workdir's
tokenizer; `loglikelihood`, `loglikelihood_rolling` and `generate_until` are implemented.
`--config.memory.*` style settings come as model_args (top_k, search, last_context_length).
Tasks must have local data (`configs/eval/*.yaml`: `dataset_path: json` with local
`data_files`) or generate their data offline: RULER's synthetic tasks in RULER_OFFLINE, sized to
`max_seq_lengths` by the workdir's tokenizer. Nothing is downloaded: lm-eval's RULER module asks
nltk for its `punkt_tab` sentence model when it is imported, and `offline_nltk` provides one,
trained here on the Python documentation that ships with the interpreter (the tasks run here
never split essays into sentences; essay-haystack tasks download their essays and are refused).
"""
from __future__ import annotations

import json
import os
import re

import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fot_jax.checkpoint import load_model
from fot_jax.data.text import workdir_tokenizer
from fot_jax.data.tokenizer import check_vocab
from fot_jax.errors import FotError
from fot_jax.evals.scoring import Scorer
from fot_jax.infer.runtime import MemorySettings

LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK_DIR = os.path.join(REPO_ROOT, "configs", "eval")


# RULER tasks whose data lm-eval generates without a download (repeated-sentence, needle or
# noise haystacks); the essay-haystack ones (niah_single_2/3, niah_multikey_1, multivalue,
# multiquery) fetch Paul Graham's essays
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt")
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


class HarnessError(FotError, ValueError):
    """A harness request fot_jax cannot run (a task that needs a download, a bad argument)."""


def offline_nltk(root: str | None = None) -> str:
    """A `punkt_tab` English sentence model in `<root>/tokenizers/punkt_tab/english` (default root:
    ~/.cache/fot_jax/nltk_data), trained with nltk's PunktTrainer on the interpreter's own
    documentation (pydoc_data) when absent, and that root on nltk's search path: importing
    lm-eval's RULER tasks then finds it instead of downloading. Returns the root."""
    from pydoc_data.topics import topics

    import nltk
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "fot_jax", "nltk_data")
    english = os.path.join(root, "tokenizers", "punkt_tab", "english")
    if root not in nltk.data.path:           # (nltk writes data only under its search path)
        nltk.data.path.insert(0, root)
    if not os.path.exists(os.path.join(english, "collocations.tab")):
        trainer = PunktTrainer()
        trainer.train("\n\n".join(topics[k] for k in sorted(topics)), finalize=True)
        tmp = english + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        save_punkt_params(trainer.get_params(), dir=tmp)
        os.replace(tmp, english)
    return root


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
    """Every task reads local data that exists, or is one of RULER_OFFLINE; otherwise a
    HarnessError naming it."""
    index = task_manager.task_index
    for name in tasks:
        if name not in index:
            raise HarnessError(f"unknown harness task {name!r}; the local tasks are in {TASK_DIR} "
                               f"({', '.join(sorted(_local_tasks(task_manager)))}), and RULER's "
                               f"offline ones are {', '.join(RULER_OFFLINE)}")
        if name in RULER_OFFLINE:
            continue
        spec = _entry_config(index[name])
        builder = spec.get("dataset_path")
        files = (spec.get("dataset_kwargs") or {}).get("data_files")
        if builder is None and not spec.get("custom_dataset"):
            continue                       # a group or tag: its members are tasks of their own
        if spec.get("custom_dataset") or "ruler" in str(getattr(index[name], "yaml_path", "")):
            raise HarnessError(
                f"harness task {name!r} builds its data with code that may download (RULER's essay "
                f"haystacks do); fot_jax runs RULER's offline tasks: {', '.join(RULER_OFFLINE)}")
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
        lm=None, lengths=None, tokenizer_dir: str | None = None):
    """Runs harness tasks on a fot_jax workdir (or on `lm`, a FotJaxLM already built); writes the
    harness's results JSON and a markdown summary table into `out_dir`. Returns the table.
    RULER tasks run once per length of `lengths` (default 4096; `limit` examples each), their
    prompts sized by the tokenizer in `tokenizer_dir` (default: the workdir's); their table has a
    column per length and the mean over the tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = [TASK_DIR] + ([include] if include else [])
    ruler = [t for t in tasks if t in RULER_OFFLINE]
    others = [t for t in tasks if t not in RULER_OFFLINE]
    lengths = list(lengths or [4096])
    if ruler:
        offline_nltk()
        bad = [n for n in lengths if n not in RULER_LENGTHS]
        if bad:
            raise HarnessError(f"RULER lengths {bad} are not among the task's metrics {RULER_LENGTHS}")
    check_local(TaskManager(include_path=paths), tasks)
    lm = lm or FotJaxLM(workdir=workdir, **(model_args or {}))

    def evaluate(names, metadata=None):
        manager = TaskManager(include_path=paths, metadata=metadata)
        cwd = os.getcwd()
        os.chdir(REPO_ROOT)                    # the task files' data paths are relative to it
        try:
            return lm_eval.simple_evaluate(model=lm, tasks=list(names), limit=limit, num_fewshot=num_fewshot,
                                           task_manager=manager, log_samples=True)
        finally:
            os.chdir(cwd)

    os.makedirs(out_dir, exist_ok=True)
    name = "harness_" + "_".join(tasks)
    saved, tables, samples = {}, [], []
    if others:
        results = evaluate(others)
        samples += sample_rows(results, None)
        saved = {k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}
        tables.append(make_table(results))
    if ruler:
        scores = {t: {} for t in ruler}
        for n in lengths:
            results = evaluate(ruler, {"max_seq_lengths": [n],
                                       "tokenizer": tokenizer_dir or os.path.join(workdir, "tokenizer")})
            samples += sample_rows(results, n)
            for t in ruler:
                scores[t][n] = float(results["results"][t][f"{n},none"])
        saved["ruler"] = {t: {str(n): v for n, v in by_len.items()} for t, by_len in scores.items()}
        tables.append(ruler_table(scores, lengths, limit))
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(saved, f, indent=1, default=str)
    with open(os.path.join(out_dir, name + "_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(row, default=str) + "\n" for row in samples)
    table = "\n\n".join(tables)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(table + "\n")
    return table


def sample_rows(results: dict, length, prompt_tail: int = 600) -> list[dict]:
    """One row per scored example: task, RULER length, the reference, the model's answer (after the
    task's filter), its scores, whether the answer's first word (3+ letters or digits) occurs in
    the prompt (a wrong answer copied from the context, or made up) and the prompt's last
    `prompt_tail` characters (RULER prompts run to 32K tokens; their question sits at the end)."""
    rows = []
    for task, logged in (results.get("samples") or {}).items():
        for s in logged:
            args = s.get("arguments") or [()]
            prompt = args[0][0] if args[0] and isinstance(args[0][0], str) else ""
            scores = {m: s[m] for m in s.get("metrics", []) if m in s}
            if length is not None:         # a RULER example is scored at its own length only
                scores = {m: v for m, v in scores.items() if m == str(length)}
            response = s.get("filtered_resps")
            first = response[0] if isinstance(response, list) and response else response
            word = re.search(r"[A-Za-z0-9]{3,}", first) if isinstance(first, str) else None
            rows.append({"task": task, "length": length, "doc_id": s.get("doc_id"), "target": s.get("target"),
                         "response": response, "scores": scores,
                         "answer_in_prompt": None if word is None else word.group(0) in prompt,
                         "prompt_tail": prompt[-prompt_tail:]})
    return rows


def ruler_table(scores: dict, lengths, limit) -> str:
    """Markdown: a row per RULER task, a column per prompt length, and the mean of the tasks."""
    head = "| task | " + " | ".join(f"{n:,}" for n in lengths) + " |"
    lines = [f"### RULER ({limit or 'all'} examples a task and length; string match, 0-100)", "", head,
             "|---|" + "---:|" * len(lengths)]
    for t, by_len in scores.items():
        lines.append(f"| {t} | " + " | ".join(f"{100 * by_len[n]:.1f}" for n in lengths) + " |")
    mean = [sum(by_len[n] for by_len in scores.values()) / len(scores) for n in lengths]
    lines.append("| mean | " + " | ".join(f"{100 * m:.1f}" for m in mean) + " |")
    return "\n".join(lines)
