"""Tokenizers: SentencePiece models (LLaMA / OpenLLaMA; bos, eos, pad, byte fallback) and HF
`tokenizer.json` files (models that ship one, e.g. SmolLM2), behind one small interface.

`load_tokenizer(path)` takes a `.model` file, a `tokenizer.json`, a directory holding either, or a
fot_jax workdir / import (its `tokenizer/` folder). `check_vocab` refuses a tokenizer whose ids do
not fit the model's vocabulary. `train_sentencepiece` trains a new model on text files
(`fot-jax tokenizer train`).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from fot_jax.errors import FotError


class TokenizerError(FotError, ValueError):
    pass


class Tokenizer:
    """encode / decode with explicit bos / eos; ids are plain ints."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    path: str

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
                for ids in self._encode_batch(list(texts))]

    def _encode_batch(self, texts):
        return [self._encode(t) for t in texts]

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_text(self, i: int) -> str:
        """How token `i` is written in text (e.g. "<s>", "<|im_start|>")."""
        raise NotImplementedError

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Text in which bos / eos are written out (a rendered chat template) -> ids, those written
        tokens becoming their ids rather than the characters of their names."""
        specials = {self.token_text(i): i for i in (self.bos_id, self.eos_id) if i >= 0}
        ids, rest = [], text
        while rest:
            hits = [(rest.find(t), t) for t in specials if t and rest.find(t) >= 0]
            if not hits:
                ids += self._encode(rest)
                break
            at, token = min(hits)
            if at:
                ids += self._encode(rest[:at])
            ids.append(specials[token])
            rest = rest[at + len(token):]
        return ids

    def __repr__(self):
        return (f"{type(self).__name__}({self.path!r}, vocab {self.vocab_size}, bos {self.bos_id}, "
                f"eos {self.eos_id}, pad {self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str, pad_id: int | None = None):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as err:  # noqa: BLE001
            raise TokenizerError(f"{path}: not a SentencePiece model ({err})") from err
        self.path = path
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
        # LLaMA models have no pad piece; they pad with id 0 (unk), as their HF configs say
        sp_pad = int(self.sp.pad_id())
        self.pad_id = pad_id if pad_id is not None else (sp_pad if sp_pad >= 0 else 0)
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        self.byte_fallback = bool(proto.trainer_spec.byte_fallback)

    def _encode(self, text):
        return list(self.sp.encode(text))

    def _encode_batch(self, texts):
        return [list(x) for x in self.sp.encode(texts)]

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, i):
        return self.sp.id_to_piece(int(i))


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` (the `tokenizers` library); bos / eos from `tokenizer_config.json` or
    the given ids."""

    def __init__(
        self, path: str, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None
    ):
        try:
            from tokenizers import Tokenizer as _T
        except ImportError as err:
            raise TokenizerError(
                "tokenizer.json files need the tokenizers package: pip install tokenizers"
            ) from err
        try:
            self.tok = _T.from_file(path)
        except Exception as err:  # noqa: BLE001
            raise TokenizerError(f"{path}: not a tokenizer.json ({err})") from err
        self.path = path
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        special = _special_ids(os.path.dirname(path), self.tok)
        self.bos_id = bos_id if bos_id is not None else special.get("bos", -1)
        self.eos_id = eos_id if eos_id is not None else special.get("eos", -1)
        self.pad_id = pad_id if pad_id is not None else special.get("pad", self.eos_id)
        self.byte_fallback = True

    def _encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def _encode_batch(self, texts):
        return [list(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_text(self, i):
        return self.tok.id_to_token(int(i))


def _special_ids(directory, tok):
    import json
    out = {}
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        cfg = json.load(open(cfg_path))
        for name in ("bos", "eos", "pad"):
            token = cfg.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token is not None and tok.token_to_id(token) is not None:
                out[name] = int(tok.token_to_id(token))
    return out


def tokenizer_file(directory: str) -> str | None:
    """The tokenizer.model / tokenizer.json of a directory or of its `tokenizer/` subdirectory (what
    `fot-jax import` and training workdirs hold), or None."""
    for candidate in (directory, os.path.join(directory, "tokenizer")):
        for name in ("tokenizer.model", "tokenizer.json"):
            p = os.path.join(candidate, name)
            if os.path.exists(p):
                return p
    return None


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a file or a directory (see the module docstring)."""
    if os.path.isdir(path):
        found = tokenizer_file(path)
        if found is None:
            raise TokenizerError(
                f"{path}: no tokenizer.model or tokenizer.json here (nor in {path}/tokenizer)"
            )
        return load_tokenizer(found)
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def chat_template(path: str) -> str | None:
    """The chat template (Jinja) beside a tokenizer file or in its directory: `chat_template.jinja`
    (how transformers 5 saves it) or the `chat_template` of `tokenizer_config.json`; or None."""
    import json
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    for candidate in (directory, os.path.join(directory, "tokenizer")):
        jinja = os.path.join(candidate, "chat_template.jinja")
        if os.path.exists(jinja):
            return open(jinja, encoding="utf-8").read()
        cfg = os.path.join(candidate, "tokenizer_config.json")
        if os.path.exists(cfg) and json.load(open(cfg)).get("chat_template"):
            return json.load(open(cfg))["chat_template"]
    return None


def apply_chat_template(template: str, tokenizer: Tokenizer, user_text: str) -> str:
    """One user turn rendered with the model's chat template, ready for the assistant's answer."""
    try:
        import jinja2
    except ImportError:
        raise TokenizerError("chat templates need jinja2: pip install jinja2") from None
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    specials = {}
    for name in ("bos", "eos"):
        i = getattr(tokenizer, f"{name}_id")
        specials[f"{name}_token"] = tokenizer.token_text(i) if i >= 0 else ""
    return env.from_string(template).render(messages=[{"role": "user", "content": user_text}],
                                            add_generation_prompt=True, **specials)


def check_vocab(tokenizer: Tokenizer, model_cfg) -> None:
    """Refuses a tokenizer whose ids do not fit the model (ids >= model.vocab_size would index
    padding rows or beyond), and special ids that disagree with the model config."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {model_cfg.vocab_size} (model.vocab_size): they do not belong "
                             "together")
    for name in ("bos", "eos"):
        t, m = getattr(tokenizer, f"{name}_id"), model_cfg[f"{name}_token_id"]
        if t >= 0 and t != m:
            raise TokenizerError(f"tokenizer {name} id {t} differs from the model's {name}_token_id {m}")


def train_sentencepiece(files: Sequence[str], out_prefix: str, vocab_size: int, model_type: str = "bpe",
                        byte_fallback: bool = True, character_coverage: float = 0.9995,
                        max_sentence_length: int = 16384, input_sentence_size: int = 1_000_000) -> str:
    """Trains a LLaMA-style SentencePiece model (bos 1, eos 2, unk 0, no pad piece, digits split,
    byte fallback) on text files; returns the `.model` path."""
    import sentencepiece as spm
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise TokenizerError(f"tokenizer training input(s) missing: {missing}")
    if vocab_size < 300 and byte_fallback:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for byte fallback (256 byte pieces + specials)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=out_prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=byte_fallback, character_coverage=character_coverage, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        minloglevel=2)
    return out_prefix + ".model"


def parse_token_ids(text: str):
    """Token ids written as text ('1 5 9' or '1,5,9') -> an int32 array."""
    import numpy as np
    try:
        return np.array([int(t) for t in text.replace(",", " ").split()], np.int32)
    except ValueError:
        raise TokenizerError(
            f"token ids are integers separated by spaces or commas, got {text[:40]!r}"
        ) from None


def tokenizer_command(action: str, *, tokenizer: str | None = None, text: str | None = None,
                      bos: bool = False, inputs: Sequence[str] | None = None, out: str | None = None,
                      vocab_size: int = 32000, model_type: str = "bpe") -> str:
    """`fot-jax tokenizer ACTION`: train a SentencePiece model (returns a description of it), or
    encode text (returns the ids as JSON) / decode ids (returns the text)."""
    import json
    if action == "train":
        if not inputs or not out:
            raise TokenizerError("tokenizer train: give --input FILE [FILE ...] and --out PREFIX")
        path = train_sentencepiece(inputs, out, vocab_size, model_type=model_type)
        return f"trained {load_tokenizer(path)}"
    if action not in ("encode", "decode"):
        raise TokenizerError(f"unknown tokenizer action {action!r}; one of train, encode, decode")
    if not tokenizer:
        raise TokenizerError("tokenizer encode/decode: give --tokenizer PATH")
    tok = load_tokenizer(tokenizer)
    if action == "encode":
        return json.dumps(tok.encode(text, bos=bos))
    return tok.decode(parse_token_ids(text).tolist())
