"""docs/reference/config.md from the config schema: every field of `base_config()` with its default
and the comment that describes it in fot_jax/config.py, section by section.

    python -m fot_jax.config_reference > docs/reference/config.md

A test keeps the file equal to what this prints.
"""
from __future__ import annotations

import inspect
import io
import json
import textwrap
import tokenize

from fot_jax import config as config_lib
from fot_jax.data.tasks import TASKS

SECTIONS = (
    ("model", config_lib._model_fields),
    ("crossbatch", config_lib._crossbatch_fields),
    ("data", config_lib._data_fields),
    ("train", config_lib._train_fields),
    ("memory", config_lib._memory_fields),
    ("mesh", config_lib._mesh_fields),
)


def _comment_text(tok: tokenize.TokenInfo) -> str:
    return tok.string.lstrip("#").strip()


def field_comments(fn) -> list[tuple[str, str, str]]:
    """(kind, name, text) in source order for a `_*_fields` function: ("field", name, its comment)
    for each assignment `x.name = ...`, and ("note", "", text) for a comment block standing on its
    own lines at statement indentation (it describes the fields after it)."""
    source = textwrap.dedent(inspect.getsource(fn))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    body_col = None
    out: list[list[str]] = []
    statement: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type == tokenize.COMMENT and not statement:
            text = _comment_text(tok)
            if body_col is not None and tok.start[1] > body_col and out and out[-1][0] == "field":
                out[-1][2] = f"{out[-1][2]} {text}".strip()      # a continuation of the field's comment
            elif out and out[-1][0] == "note" and out[-1][3] == tok.start[0] - 1:
                out[-1][2] += "\n" + tok.string.lstrip("#")[1:].rstrip()
                out[-1][3] = tok.start[0]
            else:
                out.append(["note", "", text, tok.start[0]])
            continue
        if tok.type in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING) and not statement:
            continue
        statement.append(tok)
        if tok.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
            continue
        code = [t for t in statement if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
        comments = " ".join(_comment_text(t) for t in statement if t.type == tokenize.COMMENT)
        statement = []
        if len(code) >= 4 and code[1].string == "." and code[3].string == "=" and code[0].start[1] > 0:
            body_col = code[0].start[1]
            line = code[0].start[0]
            if not comments and out and out[-1][0] == "note" and out[-1][3] == line - 1:
                comments = out.pop()[2]     # a comment block right above a field with none describes it
            out.append(["field", code[2].string, comments, line])
    return [(kind, name, text) for kind, name, text, _ in out]


def _default(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


def _note(text: str) -> list[str]:
    """A comment block as Markdown: prose joined, indented lines (examples) as a code block."""
    out, prose, code = [], [], []
    for line in text.splitlines():
        if line.startswith(" ") and line.strip():
            if prose:
                out += [" ".join(prose), ""]
                prose = []
            code.append(line.strip())
        else:
            if code:
                out += ["```python", *code, "```", ""]
                code = []
            prose.append(line.strip())
    if code:
        out += ["```python", *code, "```", ""]
    if prose:
        out += [" ".join(prose), ""]
    return out


def markdown() -> str:
    cfg = config_lib.base_config()
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema in `fot_jax/config.py` by "
        "`python -m fot_jax.config_reference > docs/reference/config.md` (a test keeps it current).",
        "",
        "A config file (`configs/*.py`) defines `get_config()`, which starts from `base_config()` and "
        "changes fields; any field can also be set after the flags of `fot-jax train`, `generate`, "
        "`eval` and `plan` as `--config.SECTION.FIELD=VALUE` (VALUE is read as a Python literal). "
        "The schema is locked: an unknown field is an error naming the closest known ones, and "
        "`validate` checks values before anything compiles.",
        "",
        "| section | what it sets |",
        "| --- | --- |",
    ]
    for name, fn in SECTIONS:
        lines.append(f"| [`{name}`](#{name}) | {_cell(_sentence(_section_doc(fn)))} |")
    lines.append("| [`stages`](#stages) | training stages, in order |")
    lines.append("")
    lines.append(f"`name` (default {_default(cfg.name)}): the run's name, shown in logs and summaries.")
    for name, fn in SECTIONS:
        lines += ["", f"## {name}", "", _sentence(_section_doc(fn)), ""]
        lines += section_markdown(name, fn, cfg[name])
        if name == "data":
            lines += ["", "Data tasks (`data.task`):", "", "| task | what it is |", "| --- | --- |"]
            lines += [f"| `{task}` | {_cell(_sentence(spec.summary))} |" for task, spec in TASKS.items()]
    lines += ["", "## stages", ""]
    for kind, field, text in field_comments(config_lib.base_config):
        if field == "stages":
            lines += _note(text)
    overridable = [f"`{section}.{f}`" for section, fields in config_lib.STAGE_FIELDS.items() for f in fields]
    lines.append("Keys of a stage: " + ", ".join(f"`{k}`" for k in config_lib.STAGE_KEYS) +
                 "; the fields it may override: " + ", ".join(overridable) + ".")
    return "\n".join(lines) + "\n"


def section_markdown(name: str, fn, section) -> list[str]:
    """The Markdown lines of one section: its notes, and a table of its fields (name, default and the
    comment that describes it). A field without a comment, or one the source does not assign, is an
    error: the reference describes every field."""
    lines, rows, documented = [], [], set()
    for kind, field, text in field_comments(fn):
        if kind == "note":
            if rows:
                lines += rows + [""]
                rows = []
            lines += _note(text)
            continue
        if not text:
            raise RuntimeError(f"config_reference: {name}.{field} has no comment in fot_jax/config.py")
        documented.add(field)
        if not rows:
            rows = ["| field | default | meaning |", "| --- | --- | --- |"]
        rows.append(f"| `{name}.{field}` | {_default(section[field])} | {_cell(text)} |")
    missing = sorted(set(section.keys()) - documented)
    if missing:
        raise RuntimeError(f"config_reference: fields of {name} not found in its source: {missing}")
    return lines + rows


def _section_doc(fn) -> str:
    """'Fields of `model`: the model: ...' -> 'the model: ...'."""
    return inspect.getdoc(fn).split(":", 1)[-1].strip()


if __name__ == "__main__":
    print(markdown(), end="")
