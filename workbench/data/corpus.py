"""Seeded generators for the synthetic corpus the embedded Apertus checkpoint is trained on.

Every task here has a known ground truth, so the tools in the workbench can be checked against it:

* **Indirect object identification (IOI)**: "When Mary and John went to the store, John gave a drink to"
  -> " Mary". :func:`ioi_prompts` returns clean/corrupted prompt pairs of equal token length with their
  answer and distractor tokens, ready for activation patching.
* **Induction**: random word sequences repeated; the second copy is predictable only by looking back.
  :func:`repeated_sequences` gives word lists, :func:`repeated_token_ids` token-id tensors.
* **A tagged grammar**: sentences from a small phrase-structure grammar in which every word carries a
  Universal-Dependencies part-of-speech tag, a syntactic role (subject / object / other) and a phrase
  depth, for probing. See :func:`tagged_sentences`.
* :func:`training_corpus` mixes the three into the training texts.

Every function takes a ``seed`` and builds its own ``random.Random``; nothing reads or changes global
random state, so the same call always returns the same data.

Held-out split: every unordered pair of names is assigned, by a fixed hash, to ``"train"`` or
``"heldout"`` (about one pair in eight is held out). The training corpus only ever puts train pairs into
an IOI sentence, so IOI evaluation on ``split="heldout"`` runs on name pairs the model never saw together.
Evaluation also uses seeds that training does not (see :data:`EVAL_SEED`).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from workbench.inputs import last_token_index, pad, pad_token_id
from workbench.token_text import word_token_ids

__all__ = [
    "EVAL_SEED",
    "IOI_TEMPLATES",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "UPOS_TAGS",
    "ROLES",
    "IOIPrompt",
    "IOIBatch",
    "TaggedSentence",
    "is_heldout_pair",
    "ioi_prompts",
    "encode_ioi",
    "repeated_sequences",
    "repeated_token_ids",
    "induction_words",
    "tagged_sentences",
    "training_corpus",
    "training_documents",
    "vocabulary",
    "DEFAULT_MIXTURE",
]

#: Seed the evaluation sets in the model card and the tests are drawn with; training never uses it.
EVAL_SEED = 2025

# --------------------------------------------------------------------------------------------------------
# Word lists. Every entry is one word, so a word-level tokenizer makes each of them a single token.

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James", "Laura", "Michael",
    "Anna", "Peter", "Julia", "Thomas", "Lisa", "Daniel", "Kate", "Paul", "Sophie", "Mark",
    "Clara", "Simon", "Nina", "Oliver", "Lucy", "Martin", "Eva", "Robert", "Helen", "Jack",
    "Rachel", "Steven", "Maria", "Andrew", "Linda", "Chris", "Susan", "Kevin", "Amy", "Brian",
    "Hannah", "Luke", "Olivia", "Adam", "Grace", "Ryan", "Chloe", "Tom", "Zoe", "Henry",
    "Leo", "Mia", "Felix", "Ella", "Oscar", "Ruby", "Noah", "Ivy", "Hugo", "Lena",
    "Marco", "Sara", "Luca", "Elena", "Jonas", "Lea", "Tim", "Nora", "Ben", "Jana",
    "Max", "Rosa", "Sam", "Iris", "Karl", "Vera", "Fritz", "Heidi", "Urs", "Petra",
    "Dario", "Giulia", "Reto", "Silvia", "Beat", "Ursula", "Luis", "Carmen", "Pablo", "Ines",
    "Omar", "Leila", "Yusuf", "Amira", "Kenji", "Yuki", "Ravi", "Priya", "Igor", "Olga",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "store", "park", "school", "market", "station", "library", "beach", "museum", "garden", "hospital",
    "restaurant", "church", "bakery", "forest", "lake", "cinema", "theater", "zoo", "farm", "harbor",
    "castle", "bridge", "village", "mountain", "stadium", "pharmacy", "gallery", "kitchen", "cafe", "river",
)  # fmt: skip

#: Objects follow the article "a", so none starts with a vowel sound.
OBJECTS: tuple[str, ...] = (
    "drink", "book", "ball", "letter", "gift", "ring", "key", "basket", "cake", "flower",
    "bottle", "pen", "hat", "map", "coin", "toy", "cup", "ticket", "box", "lamp",
    "guitar", "photo", "sandwich", "kite", "bag", "scarf", "watch", "candle", "rope", "knife",
)  # fmt: skip

#: IOI templates. ``{A}`` and ``{B}`` are the two names introduced first, ``{S}`` the repeated subject;
#: the indirect object (the answer) follows the prompt, which ends with "to".
IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} handed a {object} to",
    "While {A} and {B} were working at the {place}, {S} passed a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
    "{A} and {B} had a long day at the {place}. Afterwards {S} brought a {object} to",
    "The {place} was quiet when {A} and {B} arrived. {S} offered a {object} to",
)

# Grammar lexicon. Nouns and adjectives avoid initial vowels so that "a" is always the right article.
_DETERMINERS = ("the", "a", "this", "that", "every", "some")
_ADJECTIVES = (
    "big", "small", "old", "young", "red", "green", "happy", "quiet", "tall", "little",
    "brown", "clever", "strange", "lazy", "busy", "famous", "cold", "warm", "dark", "tired",
)  # fmt: skip
_NOUNS = (
    "dog", "cat", "teacher", "child", "bird", "house", "car", "tree", "book", "box",
    "student", "farmer", "horse", "city", "window", "door", "table", "letter", "doctor", "baker",
    "friend", "neighbor", "boat", "song", "story", "picture", "garden", "road", "king", "queen",
    "mouse", "fox", "painter", "girl", "boy", "woman", "man", "lamp", "chair", "wall",
)  # fmt: skip
_TRANSITIVE = (
    "saw", "chased", "liked", "found", "helped", "followed", "watched", "painted", "visited", "carried",
    "opened", "called", "met", "pushed", "cleaned", "built", "kept", "bought", "heard", "knew",
)  # fmt: skip
_INTRANSITIVE = (
    "slept", "laughed", "arrived", "waited", "smiled", "ran", "walked", "sat", "danced", "sang",
)  # fmt: skip
_ADPOSITIONS = ("near", "behind", "under", "with", "beside", "in", "on", "at", "from", "across")
_ADVERBS = ("quickly", "slowly", "yesterday", "today", "again", "happily", "quietly", "often")
_SUBJECT_PRONOUNS = ("he", "she", "they", "we", "it", "I", "you")
_OBJECT_PRONOUNS = ("him", "her", "them", "us", "it", "me", "you")

#: The part-of-speech tags the grammar uses (a subset of Universal Dependencies UPOS).
UPOS_TAGS: tuple[str, ...] = ("DET", "ADJ", "NOUN", "PROPN", "PRON", "VERB", "ADP", "ADV", "PUNCT")
#: The syntactic roles of :class:`TaggedSentence`.
ROLES: tuple[str, ...] = ("SUBJ", "OBJ", "OTHER")

_PUNCTUATION = (",", ".")


def _pair_hash(a: str, b: str) -> int:
    # crc32 rather than hash(): Python salts str hashes per process, the split must not move.
    return zlib.crc32("|".join(sorted((a, b))).encode())


def is_heldout_pair(a: str, b: str) -> bool:
    """Whether the unordered name pair ``{a, b}`` is reserved for evaluation (about 1 pair in 8)."""
    return _pair_hash(a, b) % 8 == 0


# --------------------------------------------------------------------------------------------------------
# IOI


@dataclass(frozen=True)
class IOIPrompt:
    """One indirect-object prompt pair.

    ``clean`` and ``corrupted`` tokenize to the same length with the word-level tokenizer (names are
    single tokens). ``answer`` (the indirect object) and ``wrong`` (the subject) are token strings with
    their leading space, e.g. ``" Mary"``; the logit difference ``answer - wrong`` is the usual IOI metric.
    With ``corruption="s2"`` the corrupted prompt names the other person as the second subject, so its
    correct answer is ``wrong``; with ``"abc"`` all three names are replaced by three unrelated ones.
    """

    clean: str
    corrupted: str
    answer: str
    wrong: str
    io: str
    s: str
    template: int
    order: str  # "ABBA" (indirect object named first) or "BABA" (subject named first)
    corruption: str

    @property
    def clean_text(self) -> str:
        """The full clean sentence, as it appears in the training corpus."""
        return f"{self.clean}{self.answer}."


def _pick_pair(rng: random.Random, split: str) -> tuple[str, str]:
    while True:
        io, s = rng.sample(NAMES, 2)
        heldout = is_heldout_pair(io, s)
        if split == "any" or heldout == (split == "heldout"):
            return io, s


def _fill(template: str, first: str, second: str, s2: str, place: str, obj: str) -> str:
    return template.format(A=first, B=second, S=s2, place=place, object=obj)


def ioi_prompts(
    n: int,
    seed: int = EVAL_SEED,
    *,
    split: str = "heldout",
    corruption: str = "s2",
    templates: Sequence[int] | None = None,
) -> list[IOIPrompt]:
    """Generate ``n`` IOI prompt pairs.

    n: number of prompts.
    seed: seed of this call's ``random.Random``.
    split: ``"heldout"`` (name pairs never used in training), ``"train"`` or ``"any"``.
    corruption: ``"s2"`` (the second subject mention becomes the indirect object, flipping the answer; one
        token changes) or ``"abc"`` (the three name tokens become three other names).
    templates: indices into :data:`IOI_TEMPLATES` to draw from (default: all); pass one index to get prompts
        that all have the same token length and name positions.
    """
    if split not in ("heldout", "train", "any"):
        raise ValueError(f"split must be 'heldout', 'train' or 'any', not {split!r}")
    if corruption not in ("s2", "abc"):
        raise ValueError(f"corruption must be 's2' or 'abc', not {corruption!r}")
    template_ids = list(range(len(IOI_TEMPLATES))) if templates is None else list(templates)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        t = rng.choice(template_ids)
        io, s = _pick_pair(rng, split)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        order = rng.choice(("ABBA", "BABA"))
        first, second = (io, s) if order == "ABBA" else (s, io)
        clean = _fill(IOI_TEMPLATES[t], first, second, s, place, obj)
        if corruption == "s2":
            corrupted = _fill(IOI_TEMPLATES[t], first, second, io, place, obj)
        else:
            c1, c2, c3 = rng.sample([x for x in NAMES if x not in (io, s)], 3)
            corrupted = _fill(IOI_TEMPLATES[t], c1, c2, c3, place, obj)
        prompts.append(
            IOIPrompt(
                clean=clean,
                corrupted=corrupted,
                answer=" " + io,
                wrong=" " + s,
                io=io,
                s=s,
                template=t,
                order=order,
                corruption=corruption,
            )
        )
    return prompts


@dataclass
class IOIBatch:
    """Token ids of a list of :class:`IOIPrompt`, right-padded.

    clean_ids, corrupted_ids: ``[n, max_len]`` with BOS first.
    attention_mask: marks real tokens.
    last: index of each prompt's final token (where the answer is predicted), identical for clean and
        corrupted.
    answer_ids, wrong_ids: ``[n]``.
    """

    clean_ids: torch.Tensor
    corrupted_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer, expected 1")
    return ids[0]


def encode_ioi(prompts: Sequence[IOIPrompt], tokenizer) -> IOIBatch:
    """Tokenize prompt pairs (BOS first).

    Raises ``ValueError`` if a clean/corrupted pair differs in length or an answer is not a single token.
    """
    clean = [tokenizer(p.clean)["input_ids"] for p in prompts]
    corrupted = [tokenizer(p.corrupted)["input_ids"] for p in prompts]
    for p, c, k in zip(prompts, clean, corrupted, strict=True):
        if len(c) != len(k):
            raise ValueError(f"clean and corrupted prompts differ in length: {p.clean!r} / {p.corrupted!r}")
    clean_ids, mask = pad(clean, pad_token_id(tokenizer))
    corrupted_ids, _ = pad(corrupted, pad_token_id(tokenizer))
    return IOIBatch(
        clean_ids=clean_ids,
        corrupted_ids=corrupted_ids,
        attention_mask=mask,
        last=last_token_index(mask),
        answer_ids=torch.tensor([_single_token(tokenizer, p.answer) for p in prompts], dtype=torch.long),
        wrong_ids=torch.tensor([_single_token(tokenizer, p.wrong) for p in prompts], dtype=torch.long),
    )


# --------------------------------------------------------------------------------------------------------
# Induction


def induction_words() -> list[str]:
    """The pool repeated sequences are drawn from: every word of the vocabulary, punctuation excluded."""
    return [w for w in vocabulary() if w.isalpha()]


def repeated_sequences(n: int, length: int, seed: int = EVAL_SEED, *, repeats: int = 2) -> list[list[str]]:
    """``n`` word lists, each a random sequence of ``length`` distinct words repeated ``repeats`` times.

    Words are distinct within a copy, so every token of a later copy has exactly one earlier occurrence
    and the induction prediction is unambiguous. ``" ".join(words)`` is the text.
    """
    pool = induction_words()
    if length > len(pool):
        raise ValueError(f"length {length} exceeds the {len(pool)} distinct words available")
    rng = random.Random(seed)
    return [rng.sample(pool, length) * repeats for _ in range(n)]


def repeated_token_ids(
    tokenizer,
    n: int,
    length: int,
    seed: int = EVAL_SEED,
    *,
    repeats: int = 2,
    prepend_bos: bool = True,
) -> torch.Tensor:
    """Random token sequences repeated, as a ``[n, bos + repeats * length]`` ``torch.long`` tensor.

    Tokens are drawn (distinct within a copy) from the tokenizer's whole-word tokens
    (:func:`workbench.token_text.word_token_ids`: letters only, after at most one leading space; no special,
    control, punctuation or partial-UTF-8 tokens), with a ``torch.Generator`` seeded by ``seed``. With
    ``prepend_bos`` the first column is the tokenizer's BOS, so copy ``r`` occupies columns
    ``1 + r*length .. (r+1)*length``.
    """
    pool = torch.tensor(word_token_ids(tokenizer), dtype=torch.long)
    if length > len(pool):
        raise ValueError(f"length {length} exceeds the {len(pool)} distinct tokens available")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:length]] for _ in range(n)])
    ids = rows.repeat(1, repeats)
    if prepend_bos:
        bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
        ids = torch.cat([bos, ids], dim=1)
    return ids


# --------------------------------------------------------------------------------------------------------
# Tagged grammar


@dataclass(frozen=True)
class TaggedSentence:
    """A grammar sentence with one label of each kind per word.

    pos: UPOS tag (:data:`UPOS_TAGS`).
    roles: ``"SUBJ"`` for every word inside the main clause's subject noun phrase (modifiers included),
        ``"OBJ"`` inside its direct-object noun phrase, ``"OTHER"`` elsewhere (verb, adverbs, prepositional
        phrases of the verb, punctuation).
    depths: how many phrases (NP, VP, PP, relative clause) enclose the word; the final full stop is at
        depth 0.
    Words map one-to-one to tokens of the word-level tokenizer; :attr:`text` attaches the punctuation.
    """

    words: tuple[str, ...]
    pos: tuple[str, ...]
    roles: tuple[str, ...]
    depths: tuple[int, ...]

    @property
    def text(self) -> str:
        out = ""
        for w in self.words:
            out += w if (w in _PUNCTUATION or not out) else " " + w
        return out

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class _Builder:
    rng: random.Random
    words: list[str] = field(default_factory=list)
    pos: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)

    def add(self, word: str, tag: str, role: str, depth: int) -> None:
        self.words.append(word)
        self.pos.append(tag)
        self.roles.append(role)
        self.depths.append(depth)

    def np(self, role: str, depth: int, case: str, budget: int) -> None:
        """A noun phrase at ``depth`` (its words are at ``depth``); ``budget`` bounds further nesting."""
        r = self.rng.random()
        if r < 0.15:
            pron = _SUBJECT_PRONOUNS if case == "nom" else _OBJECT_PRONOUNS
            self.add(self.rng.choice(pron), "PRON", role, depth)
            return
        if r < 0.3:
            self.add(self.rng.choice(NAMES), "PROPN", role, depth)
            return
        self.add(self.rng.choice(_DETERMINERS), "DET", role, depth)
        for _ in range(self.rng.choice((0, 0, 1, 1, 2))):
            self.add(self.rng.choice(_ADJECTIVES), "ADJ", role, depth)
        self.add(self.rng.choice(_NOUNS), "NOUN", role, depth)
        if budget > 0:
            r = self.rng.random()
            if r < 0.2:
                self.pp(role, depth + 1, budget - 1)
            elif r < 0.3:
                # Relative clause: "that" is PRON in UD (it is DET in "that dog"), a useful ambiguity.
                self.add("that", "PRON", role, depth + 1)
                self.vp(role, depth + 2, budget - 1)

    def pp(self, role: str, depth: int, budget: int) -> None:
        self.add(self.rng.choice(_ADPOSITIONS), "ADP", role, depth)
        self.np(role, depth + 1, "acc", budget)

    def vp(self, role: str | None, depth: int, budget: int) -> None:
        """A verb phrase; ``role`` is None for the main clause (its object gets OBJ), else inherited."""
        own = "OTHER" if role is None else role
        if self.rng.random() < 0.7:
            self.add(self.rng.choice(_TRANSITIVE), "VERB", own, depth)
            self.np("OBJ" if role is None else role, depth + 1, "acc", budget)
        else:
            self.add(self.rng.choice(_INTRANSITIVE), "VERB", own, depth)
        if budget > 0 and self.rng.random() < 0.3:
            self.pp(own, depth + 1, budget - 1)
        if self.rng.random() < 0.2:
            self.add(self.rng.choice(_ADVERBS), "ADV", own, depth)


def tagged_sentences(n: int, seed: int = EVAL_SEED, *, max_nesting: int = 2) -> list[TaggedSentence]:
    """``n`` sentences of the tagged grammar (see :class:`TaggedSentence`).

    ``S -> NP VP "."``; ``NP -> PRON | PROPN | DET ADJ* NOUN (PP | "that" VP)?``;
    ``VP -> VERB NP (PP)? (ADV)? | VERB (PP)? (ADV)?``; ``PP -> ADP NP``. ``max_nesting`` bounds how many
    PPs/relative clauses nest inside each other. The first word is capitalised (except a name or "I").
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = _Builder(rng)
        b.np("SUBJ", 1, "nom", max_nesting)
        b.vp(None, 1, max_nesting)
        b.add(".", "PUNCT", "OTHER", 0)
        b.words[0] = b.words[0][0].upper() + b.words[0][1:]
        out.append(TaggedSentence(tuple(b.words), tuple(b.pos), tuple(b.roles), tuple(b.depths)))
    return out


# --------------------------------------------------------------------------------------------------------
# Vocabulary and the training mixture


def vocabulary() -> list[str]:
    """Every word the generators can produce (sorted, without the tokenizer's space marker)."""
    words: set[str] = set(NAMES) | set(PLACES) | set(OBJECTS) | set(_PUNCTUATION)
    for t in IOI_TEMPLATES:
        text = t.replace(",", " ").replace(".", " ")
        words |= {w for w in text.split() if not w.startswith("{")}
    lex = (
        _DETERMINERS + _ADJECTIVES + _NOUNS + _TRANSITIVE + _INTRANSITIVE + _ADPOSITIONS + _ADVERBS
        + _SUBJECT_PRONOUNS + _OBJECT_PRONOUNS + ("that",)
    )  # fmt: skip
    words |= set(lex)
    # Sentence-initial forms of the words that can start a grammar sentence.
    words |= {w[0].upper() + w[1:] for w in _DETERMINERS + _SUBJECT_PRONOUNS}
    return sorted(words)


#: Share of each task in :func:`training_corpus` (documents, not tokens).
DEFAULT_MIXTURE: dict[str, float] = {"ioi": 0.35, "induction": 0.45, "grammar": 0.20}


def training_documents(
    seed: int = 0,
    *,
    mixture: dict[str, float] | None = None,
    induction_lengths: tuple[int, int] = (4, 40),
) -> Iterator[str]:
    """An endless, seeded stream of training texts drawn from ``mixture``.

    IOI documents are full sentences ("..., John gave a drink to Mary.") using train name pairs only;
    induction documents are a random word sequence (length uniform in ``induction_lengths``) repeated
    twice, sometimes three times; grammar documents are one to three tagged-grammar sentences.
    """
    mixture = dict(DEFAULT_MIXTURE if mixture is None else mixture)
    tasks, weights = zip(*mixture.items(), strict=True)
    rng = random.Random(seed)
    pool = induction_words()
    while True:
        task = rng.choices(tasks, weights)[0]
        # Each document gets a sub-seed so the generators stay independent of each other's draws.
        sub = rng.getrandbits(63)
        if task == "ioi":
            yield ioi_prompts(1, sub, split="train")[0].clean_text
        elif task == "induction":
            length = rng.randint(*induction_lengths)
            repeats = 3 if rng.random() < 0.2 else 2
            yield " ".join(random.Random(sub).sample(pool, length) * repeats)
        elif task == "grammar":
            yield " ".join(s.text for s in tagged_sentences(rng.randint(1, 3), sub))
        else:
            raise ValueError(f"unknown task {task!r} in mixture")


def training_corpus(n: int, seed: int = 0, *, mixture: dict[str, float] | None = None) -> list[str]:
    """The first ``n`` texts of :func:`training_documents` (same seed, same list)."""
    stream = training_documents(seed, mixture=mixture)
    return [next(stream) for _ in range(n)]
