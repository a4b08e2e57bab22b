"""The seeded corpus generators: reproducibility, the held-out split, and the invariants that patching and
probing rely on (equal token lengths, single-token answers, one label per word)."""

import re
from collections import Counter

import pytest
import torch

from workbench.checkpoint.tokenizer import build_tokenizer
from workbench.data import corpus
from workbench.data.corpus import (
    IOI_TEMPLATES,
    NAMES,
    ROLES,
    UPOS_TAGS,
    encode_ioi,
    induction_words,
    ioi_prompts,
    is_heldout_pair,
    repeated_sequences,
    repeated_token_ids,
    tagged_sentences,
    training_corpus,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template + " {IO}.")
    for slot in ("A", "B", "S", "IO"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>\\w+)")
    pattern = pattern.replace(re.escape("{place}"), r"\w+").replace(re.escape("{object}"), r"\w+")
    return re.compile(pattern)


def test_generators_are_reproducible_and_seed_dependent(tok):
    assert ioi_prompts(40, 7) == ioi_prompts(40, 7)
    assert ioi_prompts(40, 7) != ioi_prompts(40, 8)
    assert tagged_sentences(30, 3) == tagged_sentences(30, 3)
    assert tagged_sentences(30, 3) != tagged_sentences(30, 4)
    assert repeated_sequences(5, 10, 1) == repeated_sequences(5, 10, 1)
    assert torch.equal(repeated_token_ids(tok, 8, 12, 5), repeated_token_ids(tok, 8, 12, 5))
    assert not torch.equal(repeated_token_ids(tok, 8, 12, 5), repeated_token_ids(tok, 8, 12, 6))
    assert training_corpus(200, 1) == training_corpus(200, 1)
    assert training_corpus(200, 1) != training_corpus(200, 2)


def test_generators_leave_global_random_state_alone():
    import random

    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    ioi_prompts(20, 1)
    tagged_sentences(20, 1)
    training_corpus(50, 1)
    repeated_token_ids(build_tokenizer(), 4, 8, 1)
    assert (random.random(), torch.rand(1)) == expected


@pytest.mark.parametrize("corruption", ["s2", "abc"])
def test_ioi_pairs_have_equal_lengths_and_single_token_answers(tok, corruption):
    prompts = ioi_prompts(300, 11, corruption=corruption)
    assert {p.template for p in prompts} == set(range(len(IOI_TEMPLATES)))
    assert {p.order for p in prompts} == {"ABBA", "BABA"}
    for p in prompts:
        clean = tok(p.clean)["input_ids"]
        corrupted = tok(p.corrupted)["input_ids"]
        assert len(clean) == len(corrupted)
        assert tok.unk_token_id not in clean + corrupted
        assert len(tok(p.answer, add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(p.wrong, add_special_tokens=False)["input_ids"]) == 1
        assert p.answer == " " + p.io and p.wrong == " " + p.s and p.io != p.s
        # The subject is named twice, the indirect object once: the ground truth of the task.
        words = re.findall(r"\w+", p.clean)
        assert words.count(p.s) == 2 and words.count(p.io) == 1
        differing = [i for i, (a, b) in enumerate(zip(clean, corrupted, strict=True)) if a != b]
        if corruption == "s2":
            assert len(differing) == 1
            assert re.findall(r"\w+", p.corrupted).count(p.io) == 2
        else:
            assert len(differing) == 3
            assert p.io not in p.corrupted and p.s not in p.corrupted


def test_encode_ioi_aligns_final_positions(tok):
    prompts = ioi_prompts(50, 2)
    batch = encode_ioi(prompts, tok)
    assert batch.clean_ids.shape == batch.corrupted_ids.shape
    assert batch.clean_ids[:, 0].eq(tok.bos_token_id).all()
    to_id = tok.convert_tokens_to_ids("▁to")
    assert batch.clean_ids[torch.arange(50), batch.last].eq(to_id).all()
    assert batch.attention_mask.sum(1).tolist() == (batch.last + 1).tolist()
    assert tok.convert_ids_to_tokens(batch.answer_ids.tolist()) == ["▁" + p.io for p in prompts]
    one_template = ioi_prompts(20, 2, templates=[3])
    assert encode_ioi(one_template, tok).attention_mask.all()


def test_heldout_split_is_kept_out_of_training():
    heldout = ioi_prompts(200, 5, split="heldout")
    assert all(is_heldout_pair(p.io, p.s) for p in heldout)
    assert not any(is_heldout_pair(p.io, p.s) for p in ioi_prompts(200, 5, split="train"))
    n_pairs = len(NAMES) * (len(NAMES) - 1) // 2
    n_heldout = sum(is_heldout_pair(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1 :])
    assert 0.08 < n_heldout / n_pairs < 0.17

    regexes = [_template_regex(t) for t in IOI_TEMPLATES]
    seen = 0
    for doc in training_corpus(3000, 0):
        for rx in regexes:
            m = rx.fullmatch(doc)
            if m:
                seen += 1
                assert not is_heldout_pair(m["A"], m["B"])
                assert m["IO"] in (m["A"], m["B"]) and m["S"] in (m["A"], m["B"]) and m["IO"] != m["S"]
    # The default mixture makes IOI about 35% of documents.
    assert 0.3 < seen / 3000 < 0.4


def test_training_corpus_is_covered_by_the_tokenizer(tok):
    docs = training_corpus(1000, 3)
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    # Decoding gives the text back (with the leading space of its first word), so nothing is lost.
    assert [tok.decode(row) for row in ids[:200]] == [" " + d for d in docs[:200]]
    assert tok.decode(ids[0]) == "".join(tok.decode([i]) for i in ids[0])


def test_repeated_sequences_repeat_distinct_words(tok):
    for seq in repeated_sequences(20, 15, 4, repeats=3):
        assert len(seq) == 45
        assert seq[:15] == seq[15:30] == seq[30:]
        assert len(set(seq[:15])) == 15
        assert set(seq) <= set(induction_words())
    ids = repeated_token_ids(tok, 16, 20, 9)
    assert ids.shape == (16, 41) and ids.dtype == torch.long
    assert ids[:, 0].eq(tok.bos_token_id).all()
    assert torch.equal(ids[:, 1:21], ids[:, 21:])
    assert all(len(set(row[1:21].tolist())) == 20 for row in ids)
    assert not set(ids[:, 1:].flatten().tolist()) & set(tok.all_special_ids)


def test_tagged_sentences_label_every_word(tok):
    sentences = tagged_sentences(400, 13)
    pos_counts, role_counts = Counter(), Counter()
    for s in sentences:
        n = len(s.words)
        assert len(s.pos) == len(s.roles) == len(s.depths) == n
        assert set(s.pos) <= set(UPOS_TAGS) and set(s.roles) <= set(ROLES)
        assert s.words[-1] == "." and s.pos[-1] == "PUNCT" and s.depths[-1] == 0
        assert s.roles[0] == "SUBJ" and s.depths[0] == 1
        # Exactly one main verb: a VERB outside subject and object at depth 1.
        main_verbs = [
            i for i in range(n) if s.pos[i] == "VERB" and s.roles[i] == "OTHER" and s.depths[i] == 1
        ]
        assert len(main_verbs) == 1
        v = main_verbs[0]
        assert set(s.roles[:v]) == {"SUBJ"} and "SUBJ" not in s.roles[v:]
        assert all(d >= 2 for d, r in zip(s.depths, s.roles, strict=True) if r == "OBJ")
        # One word, one token: the labels index tokens directly.
        ids = tok(s.text, add_special_tokens=False)["input_ids"]
        assert len(ids) == n and tok.unk_token_id not in ids
        pos_counts.update(s.pos)
        role_counts.update(s.roles)
    assert set(pos_counts) == set(UPOS_TAGS)
    assert set(role_counts) == set(ROLES)


def test_known_sentence_labels():
    sentence = corpus.TaggedSentence(
        words=("The", "dog", "saw", "Mary", "."),
        pos=("DET", "NOUN", "VERB", "PROPN", "PUNCT"),
        roles=("SUBJ", "SUBJ", "OTHER", "OBJ", "OTHER"),
        depths=(1, 1, 1, 2, 0),
    )
    assert sentence.text == "The dog saw Mary."
    # "that" is a determiner before a noun and a pronoun when it opens a relative clause.
    tags = {
        tag for s in tagged_sentences(400, 1) for w, tag in zip(s.words, s.pos, strict=True) if w == "that"
    }
    assert tags == {"DET", "PRON"}
