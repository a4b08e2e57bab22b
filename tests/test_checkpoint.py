"""The shipped checkpoint: loads with plain transformers, is a real (small) Apertus, has the abilities its
model card claims, measured on freshly generated held-out samples."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from workbench.checkpoint import DEFAULT_CHECKPOINT
from workbench.checkpoint.evaluate import (
    induction_accuracy,
    induction_scores,
    ioi_table,
    measure_abilities,
    previous_token_scores,
)
from workbench.data.corpus import EVAL_SEED, NAMES, ioi_prompts, repeated_token_ids

# A second evaluation seed, used neither in training nor for the card: the bars must hold beyond the card.
FRESH_SEED = 424242

# Agreement the card promises between its figures and a recomputation (float reduction order).
TOLERANCE = {
    "ioi_accuracy": 0.01,
    "ioi_logit_diff": 0.01,
    "induction_accuracy": 0.01,
    "max_induction_score": 0.005,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def figures(model, tokenizer):
    return measure_abilities(model, tokenizer)


@pytest.fixture(scope="module")
def card() -> str:
    return (DEFAULT_CHECKPOINT / "README.md").read_text()


def test_folder_holds_a_small_complete_checkpoint():
    names = {p.name for p in DEFAULT_CHECKPOINT.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    total = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir())
    assert total <= 25 * 1024 * 1024


def test_config_is_a_real_apertus(model):
    cfg = model.config
    assert type(model).__name__ == "ApertusForCausalLM" and cfg.model_type == "apertus"
    assert cfg.num_hidden_layers >= 2
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.hidden_act == "xielu"
    assert cfg.max_position_embeddings >= 4096
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert cfg.rope_parameters["original_max_position_embeddings"] < cfg.max_position_embeddings
    assert not cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 3)
    assert model.model.layers[0].self_attn.q_norm is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_xielu_parameters_were_trained(model):
    init = torch.log(torch.expm1(torch.tensor(0.8)))  # XIELUActivation's default alpha_p
    for layer in model.model.layers:
        act = layer.mlp.act_fn
        assert type(act).__name__ == "XIELUActivation"
        assert act.alpha_p.dtype == act.alpha_n.dtype == act.beta.dtype == torch.float32
        assert not torch.allclose(act.alpha_p, init, atol=1e-3)


def test_tokenizer_makes_names_single_tokens(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    for name in NAMES:
        assert len(tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 15
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("name", ["apertus-tiny", "apertus-tiny-multi"])
def test_shipped_tokenizer_files_are_what_the_one_builder_writes(name, tmp_path):
    # build_tokenizer is the only tokenizer builder (the random test checkpoints use it too): rebuilding
    # the shipped tokenizers must give their files byte for byte.
    from workbench.checkpoint.tokenizer import build_tokenizer
    from workbench.data import multilingual

    words = multilingual.vocabulary() if name.endswith("multi") else None
    build_tokenizer(words).save_pretrained(tmp_path)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / file).read_bytes() == (DEFAULT_CHECKPOINT.parent / name / file).read_bytes(), file


def test_random_checkpoints_word_tokenizer_comes_from_the_same_builder():
    from workbench.checkpoint.synthetic import made_up_words
    from workbench.checkpoint.tokenizer import build_tokenizer

    tok = build_tokenizer(made_up_words(96))
    assert len(tok) == 96 and tok.convert_tokens_to_ids("▁w5") == 9 and tok.pad_token_id == 3
    # Not sorted as strings: w10 comes after w9, so ids follow the made-up words' numbering.
    assert tok(" w9 w10", add_special_tokens=False).input_ids == [13, 14]
    assert tok.decode([9]) == " w5"  # the shipped tokenizer's decoder keeps the leading space


def test_pipeline_generates():
    generator = pipeline("text-generation", model=str(DEFAULT_CHECKPOINT))
    prompt = "The old dog saw"
    out = generator(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt + " ") and len(out.split()) > len(prompt.split())
    # Greedy generation completes held-out IOI prompts with the indirect object.
    prompts = ioi_prompts(5, FRESH_SEED)
    outs = generator([p.clean for p in prompts], max_new_tokens=2, do_sample=False)
    completed = [
        o[0]["generated_text"].startswith(p.clean + p.answer) for p, o in zip(prompts, outs, strict=True)
    ]
    assert sum(completed) >= 4


def test_ioi_ability_on_card_samples(figures):
    assert figures["ioi_accuracy"] >= 0.90
    assert figures["ioi_logit_diff"] >= 2.0


def test_induction_ability_on_card_samples(figures):
    assert figures["induction_accuracy"] >= 0.90
    assert figures["max_induction_score"] >= 0.5


def test_abilities_hold_on_another_fresh_seed(model, tokenizer):
    table = ioi_table(model, tokenizer, ioi_prompts(256, FRESH_SEED, split="heldout"))
    assert table["correct"].mean() >= 0.90
    assert table["logit_diff"].mean() >= 2.0
    # Both name orders (ABBA/BABA) must work, not just one that a shortcut could solve.
    assert table.groupby("order")["correct"].mean().min() >= 0.85
    tokens = repeated_token_ids(tokenizer, 64, 24, FRESH_SEED)
    assert induction_accuracy(model, tokens, 24) >= 0.90
    assert induction_scores(model, tokens, 24).to_numpy().max() >= 0.5


def test_induction_circuit_has_a_previous_token_head(model, tokenizer, figures):
    # An induction head reads a previous-token head's output, so one must sit in an earlier layer.
    tokens = repeated_token_ids(tokenizer, 32, 24, FRESH_SEED)
    prev = previous_token_scores(model, tokens)
    assert prev.iloc[: figures["best_induction_layer"]].to_numpy().max() >= 0.3


def test_model_card_figures_match_measurement(card, figures):
    claimed = {k: float(v) for k, v in re.findall(r"^\| `(\w+)` \| (-?[\d.]+) \|$", card, flags=re.M)}
    assert set(TOLERANCE) <= set(claimed)
    for key, tol in TOLERANCE.items():
        assert abs(claimed[key] - figures[key]) <= tol, (key, claimed[key], figures[key])
    assert f"seed {EVAL_SEED}" in card
    best = f"layer {figures['best_induction_layer']}, head {figures['best_induction_head']}"
    assert best in card
