"""A seeded multilingual version of the tagged grammar: English and two synthetic languages, plus translation.

The English sentences are :func:`workbench.data.corpus.tagged_sentences`. The other languages are the same
sentences, word for word, in a vocabulary of their own and with one word-order rule each:

* ``"de"`` (**Deutsch**, German-like): the main verb follows its direct object (S O V: "the dog the cat saw"
  -> "da Hunkel da Schmauk saheit"); intransitive clauses keep their order.
* ``"fr"`` (**Français**, French-like): adjectives follow their noun ("the big dog" -> "lé chiron grandé").

Words are translated by a fixed dictionary (:func:`dictionary`): every English word of the grammar except
names and punctuation gets one pseudo-word per language, generated from syllables typical of that language
(German-like words are longer and carry umlauts, French-like ones accents) by a hash of the word, so the
dictionary is the same on every machine and never collides with another word of any language. Names are
shared by all languages. Part-of-speech tags, syntactic roles and phrase depths travel with their words, so
a :class:`~workbench.data.corpus.TaggedSentence` in any language carries the same labels as its English
original (in the new order): probes trained on one language can be tested on another.

The translation task: ``"English: dog - Deutsch:"`` -> ``" Hunkel"`` (:func:`translation_prompts`), for any
ordered pair of languages, over the grammar's content words (nouns, adjectives, verbs). Training documents
(:func:`training_documents`) mix grammar sentences of every language with lines of translation pairs.

Every function takes a ``seed`` and builds its own ``random.Random``. The same seed gives parallel
sentences in every language (the same English sentence underneath).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

from workbench.data.corpus import EVAL_SEED, NAMES, TaggedSentence, tagged_sentences

__all__ = [
    "CONTENT_POS",
    "DEFAULT_LANGUAGE_WEIGHTS",
    "DEFAULT_MIXTURE",
    "LANGUAGES",
    "LANGUAGE_NAMES",
    "PIVOT",
    "TranslationPrompt",
    "content_words",
    "dictionary",
    "language_texts",
    "lexicon",
    "multilingual_tagged",
    "training_documents",
    "translate_sentence",
    "translate_word",
    "translation_prompts",
    "vocabulary",
]

#: Language codes, English first.
LANGUAGES: tuple[str, ...] = ("en", "de", "fr")
#: How prompts name each language ("English: dog - Deutsch:").
LANGUAGE_NAMES: dict[str, str] = {"en": "English", "de": "Deutsch", "fr": "Français"}
#: The language the training mixture favours (half of all grammar text), the candidate latent language.
PIVOT = "en"
#: Parts of speech whose words make up the translation task.
CONTENT_POS: tuple[str, ...] = ("NOUN", "ADJ", "VERB")
#: Share of each task in :func:`training_documents` (documents) and of each language in grammar documents.
DEFAULT_MIXTURE: dict[str, float] = {"grammar": 0.3, "translation": 0.7}
DEFAULT_LANGUAGE_WEIGHTS: dict[str, float] = {"en": 0.5, "de": 0.25, "fr": 0.25}

# The lexicon is read off a fixed sample of the English grammar, so it follows corpus.py's word lists.
_LEXICON_SEED, _LEXICON_SENTENCES = 12_345, 4000
_PUNCTUATION = (",", ".")
# Syllables per language: German-like words are long with umlauts, French-like ones end in accents/-eau.
_SYLLABLES = {
    "de": {
        "onset": ("b", "d", "f", "g", "h", "k", "l", "m", "n", "r", "s", "t", "w", "z", "sch", "st", "pf",
                  "kr", "gr", "br", "schw", "tr"),
        "vowel": ("a", "e", "i", "o", "u", "ei", "au", "ü", "ö", "ä", "ie"),
        "coda": ("n", "r", "l", "ch", "ck", "t", "nd", "ng", "rk", "tz", ""),
        "suffix": ("en", "el", "er", "ung", "heit", "lich", "ig", "e"),
        "syllables": (1, 2),
    },
    "fr": {
        "onset": ("b", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ch", "gr", "pl", "tr", "qu"),
        "vowel": ("a", "e", "i", "o", "ou", "é", "è", "ai", "u", "oi"),
        "coda": ("", "", "", "n", "r", "l"),
        "suffix": ("ette", "ier", "on", "eur", "é", "eau", "ille", "ais"),
        "syllables": (1, 2),
    },
}  # fmt: skip


@cache
def lexicon() -> dict[str, str]:
    """Every lower-cased English word of the grammar with its part of speech (first seen), names excluded."""
    out: dict[str, str] = {}
    for sentence in tagged_sentences(_LEXICON_SENTENCES, _LEXICON_SEED):
        for word, tag in zip(sentence.words, sentence.pos):
            if tag in ("PROPN", "PUNCT") or word in NAMES:
                continue
            out.setdefault(_key(word), tag)
    return dict(sorted(out.items()))


def _key(word: str) -> str:
    return word if word == "I" else word.lower()


def _pseudo_word(word: str, content: bool, language: str, attempt: int) -> str:
    spec = _SYLLABLES[language]
    rng = random.Random(zlib.crc32(f"{language}:{word}:{attempt}".encode()))
    # Function words get one bare syllable, content words more and a suffix, as in real languages.
    n = rng.randint(*spec["syllables"]) if content else 1
    parts = [
        rng.choice(spec["onset"]) + rng.choice(spec["vowel"]) + rng.choice(spec["coda"]) for _ in range(n)
    ]
    if content:
        parts.append(rng.choice(spec["suffix"]))
    return "".join(parts)


@cache
def dictionary(language: str) -> dict[str, str]:
    """English word (lower case, as in :func:`lexicon`) -> its word in ``language`` (identity for English)."""
    _check_language(language)
    tags = lexicon()
    words = list(tags)
    if language == "en":
        return {w: w for w in words}
    taken = set(words) | {w.lower() for w in NAMES} | {n.lower() for n in LANGUAGE_NAMES.values()}
    for other in LANGUAGES[1 : LANGUAGES.index(language)]:
        taken |= set(dictionary(other).values())
    out = {}
    for word in words:  # sorted order: the result does not depend on which word is asked for first
        attempt = 0
        while (candidate := _pseudo_word(word, tags[word] in CONTENT_POS, language, attempt)) in taken:
            attempt += 1
        taken.add(candidate)
        out[word] = candidate
    return out


def translate_word(word: str, language: str) -> str:
    """``word`` (any English grammar word, a name or punctuation) in ``language``, keeping a capital."""
    if word in NAMES or word in _PUNCTUATION:
        return word
    table = dictionary(language)
    key = _key(word)
    if key not in table:
        raise KeyError(f"{word!r} is not a word of the tagged grammar; known words: lexicon().")
    out = table[key]
    return out[0].upper() + out[1:] if word[0].isupper() else out


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"Unknown language {language!r}; choose one of {LANGUAGES}.")


# ------------------------------------------------------------------------------------------ sentences
def _permute(sentence: TaggedSentence, order: Sequence[int]) -> TaggedSentence:
    pick = [list(sentence.words), list(sentence.pos), list(sentence.roles), list(sentence.depths)]
    return TaggedSentence(*(tuple(column[i] for i in order) for column in pick))


def _verb_after_object(sentence: TaggedSentence) -> list[int]:
    """German-like order: the main verb (the VERB at depth 1 outside subject and object) moves to just after
    the last word of the direct object; an intransitive main verb stays."""
    order = list(range(len(sentence)))
    verbs = [
        i
        for i, (tag, role, depth) in enumerate(zip(sentence.pos, sentence.roles, sentence.depths))
        if tag == "VERB" and role == "OTHER" and depth == 1
    ]
    objects = [i for i, role in enumerate(sentence.roles) if role == "OBJ"]
    if len(verbs) != 1 or not objects:
        return order
    verb = verbs[0]
    order.remove(verb)
    order.insert(order.index(objects[-1]) + 1, verb)
    return order


def _adjectives_after_noun(sentence: TaggedSentence) -> list[int]:
    """French-like order: every run of adjectives moves behind the noun that follows it."""
    order, i = [], 0
    while i < len(sentence):
        j = i
        while j < len(sentence) and sentence.pos[j] == "ADJ":
            j += 1
        if j > i and j < len(sentence) and sentence.pos[j] == "NOUN":
            order += [j, *range(i, j)]
            i = j + 1
        else:
            order.append(i)
            i += 1
    return order


_WORD_ORDER = {"en": lambda s: list(range(len(s))), "de": _verb_after_object, "fr": _adjectives_after_noun}


def translate_sentence(sentence: TaggedSentence, language: str) -> TaggedSentence:
    """An English :class:`TaggedSentence` in ``language``: its words translated, then reordered by the
    language's word-order rule; labels move with their words. Only the first word is capitalised."""
    _check_language(language)
    words = [translate_word(w, language) for w in sentence.words]
    translated = TaggedSentence(tuple(words), sentence.pos, sentence.roles, sentence.depths)
    out = _permute(translated, _WORD_ORDER[language](sentence))
    if out.words[0] != translated.words[0]:  # no rule moves the first word today; stay correct if one does
        raise AssertionError("word-order rule moved the sentence-initial word")
    return out


def multilingual_tagged(
    n: int, seed: int = EVAL_SEED, *, languages: Sequence[str] = LANGUAGES, max_nesting: int = 2
) -> dict[str, list[TaggedSentence]]:
    """``n`` parallel tagged sentences per language: the same English sentences, translated."""
    for language in languages:
        _check_language(language)
    english = tagged_sentences(n, seed, max_nesting=max_nesting)
    return {language: [translate_sentence(s, language) for s in english] for language in languages}


def language_texts(
    n: int, seed: int = EVAL_SEED, *, languages: Sequence[str] = LANGUAGES, parallel: bool = False
) -> dict[str, list[str]]:
    """``n`` grammar sentences per language as plain text (a corpus for per-language statistics).

    ``parallel=False`` (default) draws each language's sentences from its own seed, so no two languages
    share content; ``True`` gives translations of the same sentences."""
    if parallel:
        return {k: [s.text for s in v] for k, v in multilingual_tagged(n, seed, languages=languages).items()}
    out = {}
    for k, language in enumerate(languages):
        sentences = multilingual_tagged(n, seed + 7919 * k, languages=[language])[language]
        out[language] = [s.text for s in sentences]
    return out


# ---------------------------------------------------------------------------------------- translation
def content_words() -> list[str]:
    """The English words of the translation task: the grammar's nouns, adjectives and verbs."""
    return [w for w, tag in lexicon().items() if tag in CONTENT_POS]


@dataclass(frozen=True)
class TranslationPrompt:
    """``prompt`` ("English: dog - Deutsch:") expects ``answer`` (" Hunkel", with its leading space).

    ``words`` holds the concept in every language (``words["en"]`` is the English word): the latent-language
    lens reads the answer's probability in the target, the source and the pivot language from it.
    """

    source: str
    target: str
    concept: str
    words: dict[str, str]

    @property
    def prompt(self) -> str:
        return f"{LANGUAGE_NAMES[self.source]}: {self.words[self.source]} - {LANGUAGE_NAMES[self.target]}:"

    @property
    def answer(self) -> str:
        return " " + self.words[self.target]

    @property
    def text(self) -> str:
        """The full line as it appears in training documents."""
        return f"{self.prompt}{self.answer}."


def _prompt(source: str, target: str, concept: str) -> TranslationPrompt:
    return TranslationPrompt(source, target, concept, {k: dictionary(k)[concept] for k in LANGUAGES})


def translation_prompts(
    n: int | None = None,
    seed: int = EVAL_SEED,
    *,
    source: str | None = None,
    target: str | None = None,
    words: Sequence[str] | None = None,
) -> list[TranslationPrompt]:
    """Translation prompts. ``n=None``: every word of ``words`` (default :func:`content_words`) for every
    ordered pair of distinct languages (restricted to ``source``/``target`` when given), in a fixed order;
    an integer ``n`` draws that many at random (``seed``)."""
    sources = LANGUAGES if source is None else (source,)
    targets = LANGUAGES if target is None else (target,)
    for language in (*sources, *targets):
        _check_language(language)
    pairs = [(s, t) for s in sources for t in targets if s != t]
    if not pairs:
        raise ValueError(f"source and target are both {source!r}: translation needs two languages.")
    concepts = content_words() if words is None else list(words)
    unknown = [w for w in concepts if w not in lexicon()]
    if unknown:
        raise KeyError(f"Not words of the grammar: {unknown[:5]}; choose from content_words().")
    if n is None:
        return [_prompt(s, t, w) for s, t in pairs for w in concepts]
    rng = random.Random(seed)
    return [_prompt(*rng.choice(pairs), rng.choice(concepts)) for _ in range(n)]


# ----------------------------------------------------------------------------------- training mixture
def vocabulary() -> list[str]:
    """Every word the multilingual generators produce (sorted): all languages' words, their sentence-initial
    capitalised forms, names, language names, punctuation, and ``"▁"`` (a lone space before "-")."""
    words = set(NAMES) | set(_PUNCTUATION) | {":", "-", "▁"} | set(LANGUAGE_NAMES.values())
    for language in LANGUAGES:
        for english, word in dictionary(language).items():
            words.add(word)
            if lexicon()[english] in ("DET", "PRON"):  # the words that can start a sentence
                words.add(translate_word(english[0].upper() + english[1:], language))
    return sorted(words)


def training_documents(
    seed: int = 0,
    *,
    mixture: dict[str, float] | None = None,
    language_weights: dict[str, float] | None = None,
) -> Iterator[str]:
    """An endless, seeded stream of training texts.

    Grammar documents: one to three sentences of one language (languages drawn by ``language_weights``,
    English half of the time by default). Translation documents: two to six lines "English: dog - Deutsch:
    Hunkel." of one ordered language pair, pairs and words drawn uniformly.
    """
    mixture = dict(DEFAULT_MIXTURE if mixture is None else mixture)
    weights = dict(DEFAULT_LANGUAGE_WEIGHTS if language_weights is None else language_weights)
    tasks, task_weights = zip(*mixture.items(), strict=True)
    languages, language_weight = zip(*weights.items(), strict=True)
    pairs = [(s, t) for s in LANGUAGES for t in LANGUAGES if s != t]
    concepts = content_words()
    rng = random.Random(seed)
    while True:
        task = rng.choices(tasks, task_weights)[0]
        if task == "grammar":
            language = rng.choices(languages, language_weight)[0]
            english = tagged_sentences(rng.randint(1, 3), rng.getrandbits(63))
            yield " ".join(translate_sentence(s, language).text for s in english)
        elif task == "translation":
            pair = rng.choice(pairs)
            yield " ".join(_prompt(*pair, rng.choice(concepts)).text for _ in range(rng.randint(2, 6)))
        else:
            raise ValueError(f"unknown task {task!r} in mixture; use 'grammar' or 'translation'.")
