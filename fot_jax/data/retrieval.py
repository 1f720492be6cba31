"""Retrieval documents: facts hidden in real text and asked about at its end, as a
tensorflow-datasets builder (array_record, no TensorFlow).

A document (`data.doc_length` tokens with the bos and eos the batcher adds) is a passage of real
text, prose (the `prose` corpus) or code (the standard library), with facts inserted after
sentences (prose) or as comments between lines (code), and questions about some of them at its
end, each answered after a prefix:

    ... text ... Note that the locker code of the old mill is 48213. ... text ...
    # For the record, Ivo Brandt's home town is Lisbon.
    ... text ...
    What is the locker code of the old mill? The locker code of the old mill is 48213.
    Do you remember Ivo Brandt's home town? It is Lisbon.

- Keys are entities ("the old mill", "Ivo Brandt", "record amber-falcon") with an attribute, or an
  attribute alone ("the door code"); values are numbers of 1 to 7 digits or words (cities,
  colours, animals, first names). A document holds several facts, often of one attribute (the
  others are the negatives a lookup must reject), and with `data.near_miss` some entities share
  all but one word with another.
- Chains: "Let QWERT be 4821. KLMNO takes the value of QWERT. ..." and "Which names hold the value
  4821? They are: QWERT, KLMNO." (a lookup of each name in turn).
- Dense documents: the text between facts is other facts of the same attribute (a long list).
- Fact and question sentences come in several wordings each.
- List forms (`data.list_forms`, a share of the dense and chain documents): a registry whose
  entries all share one sentence form, keyed by two words of the haystack joined by a hyphen
  ("Entry ember-harbour has serial number 4821733."), and chains written as assignments
  ("KLMNO = QWERT") in filler that is one short passage repeated, asked with the count of names.

Where a document's facts sit is random; with `k_packing * seq_len = doc_length` its questions sit
in the last chunk and most facts in earlier ones, so answering reads them through crossbatch
memory in training and through kNN memory at inference.

Loss: 1 on answer tokens; `data.text_loss_weight` on the other tokens of the training split (the
language-model loss of the text); the validation split scores answers only, so its accuracy is
retrieval accuracy. `data.plain_share` of the training documents hold no facts (text only).

The evaluation prompts never appear: passkey's task line, filler, needle and question and RULER's
templates, needles and noise (EVAL_TEXT) are absent from every template here, and a document whose
text contains one is drawn again from other text (`contains_eval_text`, checked on every document
written). Deterministic: document i of a split depends only on (seed, split, i) and the corpora.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np

from fot_jax.data.text import DataError
from fot_jax.data.tfds_io import default_data_dir, import_tfds
from fot_jax.errors import ConfigError

SPLIT_IDS = {"train": 0, "validation": 1}
HAYSTACKS = ("mixed", "prose", "code")

# -- what the evaluations say (never in training) --------------------------------------------------
EVAL_TEXT = (
    # passkey (fot_jax.evals.passkey; LongLLaMA's prompt)
    "There is an important info hidden inside a lot of irrelevant text",
    "Find it and memorize them", "I will quiz you about",
    "The grass is green", "The sky is blue", "The sun is yellow", "Here we go", "There and back again",
    "pass key", "passkey", "Remember it.",
    # RULER (niah_*: template, needle, gen prefix; vt: template, answer prefix)
    "special magic", "hidden within the following text", "Make sure to memorize it",
    "mentioned in the provided text", "Memorize and track the chain", "variable assignment",
    "Find all variables that are assigned", "are assgined the value",
)
_EVAL_RE = re.compile("|".join(re.escape(t) for t in EVAL_TEXT) + r"|\bVAR [A-Z]+ = ", re.IGNORECASE)


def contains_eval_text(text: str) -> str | None:
    """The first evaluation phrase found in `text` (case-insensitive), or None."""
    hit = _EVAL_RE.search(text)
    return hit.group(0) if hit else None


# -- words (written for this project) --------------------------------------------------------------
ADJECTIVES = ("old", "red", "north", "south", "quiet", "bright", "hidden", "small", "grand", "silver",
              "golden", "wooden", "stone", "iron", "green", "lower", "upper", "eastern", "western",
              "narrow", "broad", "frozen", "sunny", "misty", "copper", "velvet", "crooked", "empty",
              "busy", "ancient", "modern", "distant", "royal", "humble", "black", "white", "amber",
              "coral", "ivory", "rusty")
NOUNS = ("mill", "harbour", "library", "warehouse", "garden", "tower", "bridge", "station", "market",
         "chapel", "orchard", "cellar", "workshop", "bakery", "lighthouse", "school", "theatre",
         "museum", "hotel", "farm", "castle", "clinic", "factory", "studio", "gallery", "pier",
         "cabin", "barn", "office", "laboratory", "vineyard", "quarry", "observatory", "kitchen",
         "archive", "stable", "garage", "depot", "academy", "inn")
FIRST_NAMES = ("Ivo", "Mara", "Tomas", "Lena", "Oskar", "Nadia", "Felix", "Ruth", "Anton", "Clara",
               "Jonas", "Elif", "Pavel", "Greta", "Hugo", "Ines", "Marek", "Sofia", "Emil", "Dora",
               "Viktor", "Alma", "Rafael", "Hanna", "Kasper", "Yara", "Bruno", "Leila", "Otto", "Zofia",
               "Matteo", "Freya", "Dmitri", "Agnes", "Samir", "Iris", "Lukas", "Nora", "Teodor", "Vera")
LAST_NAMES = ("Brandt", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Castillo", "Haddad",
              "Kowalski", "Andersen", "Petrov", "Silva", "Fischer", "Rossi", "Nakamura", "Dubois",
              "Keller", "Horvat", "Quinn", "Varga", "Ibsen", "Laurent", "Mendes", "Sato", "Weiss",
              "Byrne", "Costa", "Larsen", "Ortiz", "Richter", "Svoboda", "Yilmaz", "Adler", "Berg",
              "Duarte", "Falk", "Gallo", "Holm", "Jensen", "Krause")
CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Prague", "Nairobi", "Seoul", "Quito", "Vienna",
          "Madrid", "Helsinki", "Athens", "Toronto", "Manila", "Warsaw", "Santiago", "Geneva", "Hanoi",
          "Bogota", "Kyoto", "Porto", "Riga", "Tunis", "Perth", "Munich", "Naples", "Boston", "Denver",
          "Havana", "Sofia", "Zagreb", "Milan", "Lyon", "Tallinn", "Ankara", "Delhi", "Osaka", "Rome",
          "Berlin")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink",
           "brown", "violet", "teal", "crimson", "indigo", "gold", "silver", "maroon", "olive", "navy")
ANIMALS = ("falcon", "otter", "badger", "heron", "lynx", "walrus", "gecko", "panther", "beaver",
           "raven", "salmon", "tortoise", "jaguar", "pelican", "ferret", "koala", "moose", "cobra",
           "dolphin", "sparrow", "bison", "hamster", "owl", "zebra", "camel", "lobster", "gazelle",
           "penguin", "weasel", "parrot")

NUMBER_ATTRIBUTES = ("locker code", "room number", "order number", "ticket number", "account number",
                     "serial number", "postal code", "phone extension", "batch number", "invoice number",
                     "badge number", "gate number", "licence number", "reference number", "security code",
                     "door code", "vault combination", "shipment number", "parcel number", "seat number",
                     "membership number", "case number", "registration number", "tracking number")
WORD_ATTRIBUTES = (("home town", CITIES), ("favourite city", CITIES), ("favourite colour", COLOURS),
                   ("lucky colour", COLOURS), ("code name", ANIMALS), ("favourite animal", ANIMALS),
                   ("contact person", FIRST_NAMES), ("password", ANIMALS), ("destination", CITIES))

# {e}: entity, {a}: attribute, {v}: value; entity-less facts use GLOBAL_* ("the door code is ...")
FACT_TEMPLATES = (
    "The {a} of {e} is {v}.",
    "Note that the {a} of {e} is {v}.",
    "Remember: the {a} for {e} is {v}.",
    "For the record, the {a} of {e} is {v}.",
    "Please keep in mind that the {a} of {e} is {v}. Do not forget it.",
    "Important: the {a} assigned to {e} is {v}.",
    "Write this down: the {a} of {e} is {v}.",
    "{V} is the {a} of {e}.",
    "It was agreed that the {a} of {e} would be {v}.",
    "The {a} of {e}, by the way, is {v}.",
)
GLOBAL_FACT_TEMPLATES = (
    "The {a} is {v}.",
    "Note that the {a} is {v}.",
    "Remember this: the {a} is {v}. Keep it safe.",
    "For the record, the {a} is {v}.",
    "{V} is the {a}. Do not forget it.",
)
# (question, answer prefix): the answer follows the prefix after one space
QUESTION_TEMPLATES = (
    ("What is the {a} of {e}?", "The {a} of {e} is"),
    ("What was the {a} for {e}?", "The {a} for {e} was"),
    ("Do you remember the {a} of {e}?", "It is"),
    ("Question: what is the {a} of {e}?", "Answer:"),
    ("Tell me the {a} of {e}.", "The {a} of {e} is"),
    ("Which {a} belongs to {e}?", "The {a} of {e} is"),
    ("Recall the {a} of {e}.", "It was"),
    ("", "The {a} of {e} is"),
)
GLOBAL_QUESTION_TEMPLATES = (
    ("What is the {a}?", "The {a} is"),
    ("Do you remember the {a}?", "It is"),
    ("Question: what was the {a}?", "Answer:"),
    ("Tell me the {a}.", "The {a} is"),
    ("", "The {a} is"),
)
CHAIN_FIRST = ("Let {x} be {v}.", "{x} is set to {v}.", "Assign {v} to {x}.", "The value of {x} is {v}.")
CHAIN_NEXT = ("{y} takes the value of {x}.", "Set {y} equal to {x}.", "{y} copies {x}.",
              "{y} holds whatever {x} holds.")
CHAIN_QUESTIONS = (("Which names hold the value {v}?", "They are:"),
                   ("List every name whose value is {v}.", "The names are:"))
# list forms: one template for every entry of a registry document ({E}: the key capitalised)
LIST_TEMPLATES = ("The {a} recorded for {e} is: {v}.", "Entry {e} has {a} {v}.", "{E}: {a} {v}.",
                  "Under {e}, the {a} reads {v}.", "The {a} registered to {e} is {v}.")
# (first link, next link) of an assignment chain: one pair per document
ASSIGN_FORMS = (("{x} = {v}", "{y} = {x}"), ("let {x} = {v};", "let {y} = {x};"),
                ("set {x} := {v}", "set {y} := {x}"), ("{x} <- {v}", "{y} <- {x}"))
ASSIGN_QUESTIONS = (("Which names end up holding {v}?", "{n} names hold {v}; they are:"),
                    ("List all names set to {v}, directly or through another name.", "There are {n}:"))
INTROS = ("The text below hides a few facts; questions about them come at the end.",
          "Read the following carefully; some details will be asked about later.",
          "")

for _t in (FACT_TEMPLATES + GLOBAL_FACT_TEMPLATES + CHAIN_FIRST + CHAIN_NEXT + INTROS + LIST_TEMPLATES
           + tuple(a + " " + b for a, b in QUESTION_TEMPLATES + GLOBAL_QUESTION_TEMPLATES + CHAIN_QUESTIONS
                   + ASSIGN_FORMS + ASSIGN_QUESTIONS)):
    assert contains_eval_text(_t) is None, _t


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that decides the documents (its hash names the tfds config)."""
    doc_length: int
    facts: int                 # most facts a document holds (at least 1 when it has any)
    questions: int             # most questions a document asks
    plain_share: float         # training documents without facts
    dense_share: float         # documents whose text is other facts
    chain_share: float         # documents with a chain of names instead of facts
    chains: int                # most chains a chain document holds (one asked, the others distractors)
    near_miss: float           # share of entities that differ from another in one word
    haystack: str              # mixed | prose | code
    seed: int
    num_train: int
    num_eval: int
    corpora: str               # digest of the haystack corpora and the tokenizer
    list_forms: float = 0.0    # share of dense and chain documents in list forms (registry, assignments)


# -- entities and values ---------------------------------------------------------------------------

def _entity(rng, kind: int) -> list[str]:
    if kind == 0:
        return ["the", str(rng.choice(ADJECTIVES)), str(rng.choice(NOUNS))]
    if kind == 1:
        return [str(rng.choice(FIRST_NAMES)), str(rng.choice(LAST_NAMES))]
    return ["record", f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}"]


def _entities(rng, n: int, near_miss: float) -> list[str]:
    """n distinct entities of one kind; a `near_miss` share differs from an earlier one in one word."""
    kind = int(rng.integers(3))
    out: list[list[str]] = []
    seen = set()
    while len(out) < n:
        if out and rng.random() < near_miss:
            words = list(out[int(rng.integers(len(out)))])
            fresh = _entity(rng, kind)
            i = int(rng.integers(1 if kind == 0 else 0, len(words)))
            words[i] = fresh[i]
        else:
            words = _entity(rng, kind)
        if " ".join(words) not in seen:
            seen.add(" ".join(words))
            out.append(words)
    return [" ".join(w) for w in out]


def _value(rng, attribute_words) -> str:
    if attribute_words is None:
        digits = int(rng.choice([1, 2, 3, 4, 4, 5, 5, 5, 6, 7, 7]))
        return str(int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)))
    return str(rng.choice(attribute_words))


def _registry_number(rng) -> str:
    """A registry entry's value (list forms): a number of 6 or 7 digits."""
    digits = int(rng.integers(6, 8))
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _name(rng) -> str:
    return "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# -- documents -------------------------------------------------------------------------------------

class Haystack:
    """Real text to hide facts in: tokenised documents of one kind (prose or code) and which tokens
    end a sentence (prose) or a line (code), where a fact may go."""

    def __init__(self, kind: str, docs: list[np.ndarray], tokenizer):
        self.kind, self.docs, self.tok = kind, [d for d in docs if len(d) > 0], tokenizer
        if not self.docs:
            raise DataError(f"the {kind} haystack has no documents")
        ends = ("\n",) if kind == "code" else (".", "!", "?", "\n", ";")
        self.boundary = np.zeros(tokenizer.vocab_size, bool)
        for i in range(tokenizer.vocab_size):
            text = tokenizer.decode([i])
            self.boundary[i] = bool(text) and text.rstrip(" ").endswith(ends)

    def take(self, rng, count: int) -> np.ndarray:
        """`count` consecutive tokens from a random place (documents joined if one is too short)."""
        parts, need = [], count
        while need > 0:
            doc = self.docs[int(rng.integers(len(self.docs)))]
            start = int(rng.integers(max(len(doc) - need, 0) + 1))
            piece = doc[start: start + need]
            parts.append(piece)
            need -= len(piece)
        return np.concatenate(parts)[:count]

    def fact_text(self, sentence: str) -> str:
        return f"\n# {sentence}\n" if self.kind == "code" else f" {sentence}"


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text) if text else []


class DocumentBuilder:
    """Builds documents of `spec` from haystacks (a dict kind -> Haystack) with tokenizer `tok`."""

    def __init__(self, spec: Spec, haystacks: dict, tok):
        self.spec, self.haystacks, self.tok = spec, haystacks, tok
        self.content = spec.doc_length - 2
        self._words = None

    def _word_keys(self, rng, n: int) -> list[str]:
        """n distinct registry keys: two words of the haystacks (4-9 lowercase letters, sorted
        vocabulary of this split's text) joined by a hyphen."""
        if self._words is None:
            vocab = set()
            for hay in self.haystacks.values():
                for doc in hay.docs:
                    vocab.update(re.findall(r"\b[a-z]{4,9}\b", self.tok.decode(doc)))
            self._words = sorted(vocab)
            if len(self._words) < 20:
                raise DataError(f"the haystack text has {len(self._words)} distinct words of 4-9 letters; "
                                 "list forms (data.list_forms) need at least 20 for their keys")
        keys: list[str] = []
        while len(keys) < n:
            a, b = rng.integers(len(self._words), size=2)
            key = f"{self._words[a]}-{self._words[b]}"
            if a != b and key not in keys:
                keys.append(key)
        return keys

    # facts, questions and answers of one document, as text
    def _facts(self, rng, n: int, dense: bool, forms: bool = False):
        """(fact sentences, [(question, answer prefix, answer)], attribute, value words or None,
        the entry template of a dense document). With `forms`: a registry (word-pair keys, numbers
        of 6-7 digits, one template for every entry)."""
        words, template = None, FACT_TEMPLATES[0]
        if forms:
            attribute = str(rng.choice(NUMBER_ATTRIBUTES))
            template = str(rng.choice(LIST_TEMPLATES))
            entities = self._word_keys(rng, n)
            values = [_registry_number(rng) for _ in entities]
            facts = [_cap(template.format(a=attribute, e=e, E=_cap(e), v=v))
                     for e, v in zip(entities, values)]
            return facts, self._questions(rng, attribute, entities, values), attribute, None, template
        if rng.random() < 0.35:
            attribute, words = WORD_ATTRIBUTES[int(rng.integers(len(WORD_ATTRIBUTES)))]
        else:
            attribute = str(rng.choice(NUMBER_ATTRIBUTES))
        if not dense and n == 1 and rng.random() < 0.3:    # one fact, no entity: "the door code is"
            value = _value(rng, words)
            fact = str(rng.choice(GLOBAL_FACT_TEMPLATES)).format(a=attribute, v=value, V=_cap(value))
            q, a = GLOBAL_QUESTION_TEMPLATES[int(rng.integers(len(GLOBAL_QUESTION_TEMPLATES)))]
            return [fact], [(q.format(a=attribute), a.format(a=attribute), value)], attribute, words, template
        entities = _entities(rng, n, self.spec.near_miss)
        values = [_value(rng, words) for _ in entities]
        facts = []
        for e, v in zip(entities, values):
            t = str(rng.choice(FACT_TEMPLATES[:1] if dense else FACT_TEMPLATES))
            facts.append(_cap(t.format(a=attribute, e=e, v=v, V=_cap(v))))
        return facts, self._questions(rng, attribute, entities, values), attribute, words, template

    def _questions(self, rng, attribute, entities, values):
        """[(question, answer prefix, answer)] about 1..spec.questions of the facts."""
        n = len(entities)
        asked = rng.choice(n, size=min(n, int(rng.integers(1, self.spec.questions + 1))), replace=False)
        qas = []
        for i in asked:
            q, a = QUESTION_TEMPLATES[int(rng.integers(len(QUESTION_TEMPLATES)))]
            e = entities[i]
            qas.append((_cap(q.format(a=attribute, e=e)), _cap(a.format(a=attribute, e=e)), values[i]))
        return qas

    def _chain(self, rng, forms: bool = False):
        """Chains of names, each from its own value ("Let A be 4821. B takes the value of A."): one
        is asked about, the others (up to `spec.chains - 1`, other values) are interleaved with it,
        each in its own order, so following the asked chain means rejecting look-alike links. With
        `forms`: assignments of one form ("B = A"), asked with the count of names."""
        assign = ASSIGN_FORMS[int(rng.integers(len(ASSIGN_FORMS)))] if forms else None
        count = int(rng.integers(1, self.spec.chains + 1))
        used, values, chains = set(), set(), []
        for _ in range(count):
            names = []
            while len(names) < int(rng.integers(2, 6)):
                name = _name(rng)
                if name not in used:
                    used.add(name)
                    names.append(name)
            value = _value(rng, None)
            while value in values:
                value = _value(rng, None)
            values.add(value)
            if assign:
                links = [assign[0].format(x=names[0], v=value)]
                links += [assign[1].format(x=a, y=b) for a, b in zip(names, names[1:])]
            else:
                links = [str(rng.choice(CHAIN_FIRST)).format(x=names[0], v=value)]
                links += [str(rng.choice(CHAIN_NEXT)).format(x=a, y=b) for a, b in zip(names, names[1:])]
            chains.append((names, value, links))
        # interleave: each step takes the next link of a chain drawn in proportion to what it has left
        left = [list(links) for _, _, links in chains]
        facts = []
        while any(left):
            sizes = np.array([len(x) for x in left], float)
            facts.append(left[int(rng.choice(len(left), p=sizes / sizes.sum()))].pop(0))
        names, value, _ = chains[0]
        if assign:
            q, a = ASSIGN_QUESTIONS[int(rng.integers(len(ASSIGN_QUESTIONS)))]
            return facts, [(q.format(v=value), a.format(n=len(names), v=value), ", ".join(names))]
        q, a = CHAIN_QUESTIONS[int(rng.integers(len(CHAIN_QUESTIONS)))]
        return facts, [(q.format(v=value), a, ", ".join(names))]

    def _question_block(self, rng, qas):
        """Tokens and answer mask of the questions at a document's end."""
        tokens, answer = [], []
        for j, (q, prefix, value) in enumerate(qas):
            lead = "\n\n" if j == 0 else "\n"
            head = _encode(self.tok, f"{lead}{q} {prefix}" if q else f"{lead}{prefix}")
            ans = _encode(self.tok, f" {value}")
            tail = _encode(self.tok, ".")
            tokens += head + ans + tail
            answer += [0] * len(head) + [1] * len(ans) + [0] * len(tail)
        return tokens, answer

    def document(self, split: str, index: int) -> dict:
        """{"tokens", "answer_mask"}: `doc_length - 2` content tokens."""
        s = self.spec
        for attempt in range(100):
            rng = np.random.default_rng([s.seed, SPLIT_IDS[split], index, attempt])
            kind = s.haystack if s.haystack != "mixed" else ("prose" if rng.random() < 0.5 else "code")
            hay = self.haystacks[kind]
            plain = split == "train" and rng.random() < s.plain_share
            if plain:
                tokens = hay.take(rng, self.content)
                answer = np.zeros(self.content, np.uint8)
            else:
                tokens, answer = self._with_facts(rng, hay)
            if contains_eval_text(self.tok.decode(tokens)) is None:
                return {"tokens": tokens.astype(np.int32), "answer_mask": answer.astype(np.uint8)}
        raise DataError("100 drafts of a retrieval document all held evaluation text; the haystack "
                         "corpus quotes the evaluation prompts")

    def _with_facts(self, rng, hay):
        s = self.spec
        dense = rng.random() < s.dense_share
        attribute = words = template = None
        chain = rng.random() < s.chain_share
        # (drawn only when asked for: documents without list forms stay those of earlier configs)
        forms = bool(s.list_forms) and (dense or chain) and rng.random() < s.list_forms
        if chain:
            facts, qas = self._chain(rng, forms)
            dense = False
        else:
            n = int(rng.integers(1, s.facts + 1))
            facts, qas, attribute, words, template = self._facts(rng, n, dense, forms)
        intro = _encode(self.tok, str(rng.choice(INTROS)))
        q_tokens, q_answer = self._question_block(rng, qas)
        fact_tokens = [_encode(self.tok, hay.fact_text(f)) for f in facts]
        body_len = self.content - len(intro) - len(q_tokens)
        text_len = body_len - sum(len(f) for f in fact_tokens)
        if text_len < 16:
            raise DataError(f"data.doc_length={s.doc_length} leaves no room for text beside "
                             f"{len(facts)} facts and their questions; raise it or lower data.facts_per_doc")
        if dense:
            filler = self._dense_filler(rng, attribute, words, qas, text_len, hay, template,
                                        self._word_keys if forms else None)
        elif forms:                                    # one short passage over and over
            filler = np.resize(hay.take(rng, int(rng.integers(12, 41))), text_len)
        else:
            filler = hay.take(rng, text_len)
        # facts go after boundary tokens at random depths, in the order they were written (chains)
        spots = np.flatnonzero(hay.boundary[filler[:-1]]) + 1
        if len(spots) < len(facts):
            spots = np.arange(1, len(filler))
        where = np.sort(rng.choice(spots, size=len(facts), replace=False))
        pieces, last = [np.asarray(intro, np.int32)], 0
        for w, f in zip(where, fact_tokens):
            pieces += [filler[last:w], np.asarray(f, np.int32)]
            last = w
        pieces += [filler[last:], np.asarray(q_tokens, np.int32)]
        tokens = np.concatenate(pieces)
        answer = np.zeros(len(tokens), np.uint8)
        answer[len(tokens) - len(q_tokens):] = q_answer
        return tokens, answer

    def _dense_filler(self, rng, attribute, words, qas, count, hay, template, word_keys=None):
        """Other facts of the same attribute and template (fresh entities, values other than the
        asked ones) as the text between a document's facts: a long list in which the asked entries
        hide. `word_keys`: entities and numbers of a registry (list forms)."""
        out: list[int] = []
        asked_values = {value for _, _, value in qas}
        asked_entities = {q for q, _, _ in qas}
        while len(out) < count:
            if word_keys is not None:
                entity, value = word_keys(rng, 1)[0], _registry_number(rng)
            else:
                entity, value = _entities(rng, 1, 0.0)[0], _value(rng, words)
            if value in asked_values or any(entity in q for q in asked_entities):
                continue
            sentence = _cap(template.format(a=attribute, e=entity, E=_cap(entity), v=value, V=value))
            out += _encode(self.tok, hay.fact_text(sentence))
        return np.asarray(out[:count], np.int32)


# -- tensorflow-datasets builder and source --------------------------------------------------------

def builder_class():
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    tfds = import_tfds()

    class RetrievalConfig(tfds.core.BuilderConfig):
        def __init__(self, *, spec: Spec, make_builder=None):
            digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()
            super().__init__(name=f"len{spec.doc_length}_{digest[:16]}",
                             description=json.dumps(dataclasses.asdict(spec)))
            self.spec, self.make_builder = spec, make_builder

    class FotRetrieval(tfds.core.GeneratorBasedBuilder):
        """Facts hidden in real text, asked about at the end (fot_jax.data.retrieval)."""
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = []

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "answer_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                }), supervised_keys=None)

        def _split_generators(self, dl_manager):
            c = self.builder_config.spec
            return {"train": self._generate_examples("train", c.num_train),
                    "validation": self._generate_examples("validation", c.num_eval)}

        def _generate_examples(self, split, count):
            builder = self.builder_config.make_builder(split)
            for i in range(count):
                yield i, builder.document(split, i)

    FotRetrieval.__module__ = __name__
    _BUILDER = (FotRetrieval, RetrievalConfig)
    return _BUILDER


_BUILDER = None


class WeightedSource:
    """A split's documents with their loss mask: 1 on answers, `text_weight` elsewhere."""

    def __init__(self, source, text_weight: float):
        self.source, self.text_weight = source, float(text_weight)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        ex = self.source[index]
        answer = np.asarray(ex["answer_mask"], np.float32)
        return {"tokens": ex["tokens"], "loss_mask": answer + self.text_weight * (1.0 - answer)}


def _haystack_config(cfg, kind: str):
    """The text task that supplies `kind` text, with cfg's tokenizer and corpus settings."""
    import ml_collections
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.data.task = "prose" if kind == "prose" else "stdlib"
    return c


def spec_from_config(cfg, num_train: int, corpora: str) -> Spec:
    d = cfg.data
    return Spec(doc_length=int(d.doc_length), facts=int(d.facts_per_doc), questions=int(d.questions_per_doc),
                plain_share=float(d.plain_share), dense_share=float(d.dense_share),
                chain_share=float(d.chain_share), chains=int(d.chains_per_doc), near_miss=float(d.near_miss),
                haystack=d.haystack, list_forms=float(d.list_forms),
                seed=int(d.seed), num_train=int(num_train), num_eval=int(d.num_eval_docs), corpora=corpora)


def data_source(cfg, split: str, num_docs: int | None = None):
    """Prepares (once) and opens a split of retrieval documents, with its loss weights."""
    from fot_jax.data import text
    from fot_jax.data.tokenizer import check_vocab, load_tokenizer

    d = cfg.data
    tok = load_tokenizer(text.tokenizer_path(cfg))
    check_vocab(tok, cfg.model)
    kinds = ("prose", "code") if d.haystack == "mixed" else (d.haystack,)
    corpora = {k: text.corpus_spec(_haystack_config(cfg, k).data, tok.path) for k in kinds}
    digest = hashlib.sha256(json.dumps(corpora, sort_keys=True).encode()).hexdigest()[:16]
    spec = spec_from_config(cfg, num_docs or d.num_train_docs, digest)

    def make_builder(for_split):
        haystacks = {}
        for k in kinds:
            src = text.data_source(_haystack_config(cfg, k), for_split)
            haystacks[k] = Haystack(k, [np.asarray(src[i]["tokens"]) for i in range(len(src))], tok)
        return DocumentBuilder(spec, haystacks, tok)

    builder_cls, config_cls = builder_class()
    builder = builder_cls(config=config_cls(spec=spec, make_builder=make_builder),
                          data_dir=default_data_dir(d.data_dir), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    source = builder.as_data_source(split=split)
    return WeightedSource(source, d.text_loss_weight if split == "train" else 0.0)


def describe(d) -> str:
    return (f"retrieval in {d.haystack} text, up to {d.facts_per_doc} facts / {d.questions_per_doc} "
            f"questions, docs of {d.doc_length}, T={d.seq_len}, {d.batch_size} rows, "
            f"text loss x{d.text_loss_weight:g}"
            + (f", near-miss {d.near_miss:g}" if d.near_miss else ""))


def validate(cfg) -> None:
    from fot_jax.data import text
    d = cfg.data
    if d.haystack not in HAYSTACKS:
        raise ConfigError(f"config field 'data.haystack': {d.haystack!r} is not one of {HAYSTACKS}")
    for name in ("plain_share", "dense_share", "chain_share", "near_miss", "list_forms"):
        if not 0 <= d[name] <= 1:
            raise ConfigError(f"config field 'data.{name}': must lie in [0, 1], got {d[name]}")
    if d.text_loss_weight < 0:
        raise ConfigError(f"config field 'data.text_loss_weight': must be >= 0, got {d.text_loss_weight}")
    if d.chains_per_doc < 1:
        raise ConfigError(f"config field 'data.chains_per_doc': a chain document holds at least one chain, "
                          f"got {d.chains_per_doc}")
    if d.facts_per_doc < 1 or d.questions_per_doc < 1:
        raise ConfigError("config field 'data.facts_per_doc': a retrieval document holds at least one fact "
                          "and one question (data.facts_per_doc, data.questions_per_doc >= 1)")
    k = cfg.crossbatch.k_packing
    if d.doc_length % (k * d.seq_len):
        raise ConfigError(
            f"config field 'data.seq_len': documents of {d.doc_length} tokens do not fill whole steps of "
            f"k_packing*seq_len = {k}*{d.seq_len} tokens; choose them so that k_packing*seq_len divides "
            "data.doc_length (the questions then sit in a stream's last chunk)")
    if d.doc_length < 128:
        raise ConfigError(f"config field 'data.doc_length': {d.doc_length} tokens leave no room for text, "
                          "facts and questions (at least 128)")
    text.validate_tokenizer(cfg)
    if d.haystack in ("mixed", "prose"):
        try:
            text.prose_file()
        except text.DataError as e:
            raise ConfigError(f"config field 'data.haystack': {e}") from None
