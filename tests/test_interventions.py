"""Interventions: steering vectors from pairs and probes on cases with known answers, a zero steer that
changes nothing, ablations that write what they say, and the embedded model's induction heads ablated."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import workbench
from workbench.checkpoint.evaluate import induction_scores
from workbench.data.corpus import repeated_token_ids
from workbench.generation import current_step
from workbench.interventions import (
    Ablate,
    Interventions,
    Steer,
    ablate_attention,
    ablate_heads,
    ablate_mlp,
    ablate_neurons,
    contrastive_vector,
    induction_accuracy,
    probe_vector,
)
from workbench.names import act_name
from workbench.probing.probes import ProbeResult

IOI = "When Mary and John went to the store, John gave a drink to"
SWAPPED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def tiny():
    return workbench.load()


def test_a_zero_coefficient_steer_changes_nothing(tiny):
    vector = contrastive_vector(tiny, [SWAPPED], [IOI], 2)
    steer = Steer(vector, layers=[0, 1, 2], alpha=0.0)
    assert torch.equal(tiny.run_with_hooks(IOI, fwd_hooks=steer.hooks(tiny)), tiny(IOI))
    plain = tiny.generate([IOI, "The cat"], 8, return_type="tokens", progress=False)
    steered = tiny.generate(
        [IOI, "The cat"], 8, return_type="tokens", fwd_hooks=steer.hooks(tiny), progress=False
    )
    assert torch.equal(plain, steered)


def test_a_pair_vector_at_the_swapped_token_turns_one_prompt_into_the_other(tiny):
    # The pair differs in one token (S2); entering layer 0 the stream is the embedding, so the difference
    # at that column, added there, makes the second prompt's run the first's: a known answer.
    s2 = tiny.to_str_tokens(IOI).index(" John", 5)
    vector = contrastive_vector(tiny, [SWAPPED], [IOI], 0, at=s2)
    want = tiny.W_E[tiny.to_single_token(" Mary")] - tiny.W_E[tiny.to_single_token(" John")]
    torch.testing.assert_close(vector.vector, want)
    assert vector.norm == pytest.approx(float(want.norm()), rel=1e-5) and vector.stream_norm > 0
    steered = tiny.run_with_hooks(IOI, fwd_hooks=Steer(vector, positions=[s2]).hooks(tiny))
    torch.testing.assert_close(steered, tiny(SWAPPED), atol=1e-5, rtol=1e-4)
    assert "norm" in repr(vector) and "columns" in repr(Steer(vector, positions=[s2]))


def _probe(hook: str, weight: torch.Tensor, labels: list[str]) -> ProbeResult:
    width, classes = weight.shape
    empty = np.zeros(0)
    return ProbeResult(
        hooks=[hook], layers=[int(hook.split(".")[1])], label_names=labels, weight=weight[None],
        bias=torch.zeros(1, classes), control_weight=weight[None], control_bias=torch.zeros(1, classes),
        widths=[width], normalize=False, eps=1e-6, table=pd.DataFrame(), test_gold=empty,
        test_predictions=empty[None], split={}, history=pd.DataFrame(),
    )  # fmt: skip


def test_a_probe_vector_raises_its_label_by_alpha_times_its_norm_where_the_probe_reads(tiny):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(tiny.cfg.d_model, 3, generator=gen)
    probe = _probe(act_name("resid_post", 0), weight, ["NOUN", "VERB", "DET"])
    vector = probe_vector(probe, 0, "VERB")
    expected = weight[:, 1] - weight[:, [0, 2]].mean(1)
    torch.testing.assert_close(vector.vector, expected / expected.norm())
    assert vector.layer == 1  # resid_post of layer 0 is the stream entering layer 1

    def gap(resid):  # the probe's VERB logit against the mean of the others
        logits = probe.logits(resid, 0)
        return logits[..., 1] - logits[..., [0, 2]].mean(-1)

    _, plain = tiny.run_with_cache(IOI, names_filter=act_name("resid_pre", 1))
    with Steer(vector, alpha=3.0).applied(tiny):
        _, steered = tiny.run_with_cache(IOI, names_filter=act_name("resid_pre", 1))
    raised = gap(steered[act_name("resid_pre", 1)]) - gap(plain[act_name("resid_pre", 1)])
    torch.testing.assert_close(
        raised, torch.full_like(raised, 3.0 * float(expected.norm())), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="labels are"):
        probe_vector(probe, 0, "ADJ")


def test_steering_generated_positions_leaves_the_prompt_step_alone(tiny):
    vector = torch.ones(tiny.cfg.d_model)
    seen = []

    def record(resid, hook):
        seen.append((current_step().index, resid.clone()))

    hooks = Steer(vector, 1, alpha=2.0, positions="generated").hooks(tiny) + [
        (act_name("resid_pre", 1), record)
    ]
    plain = []
    tiny.generate(IOI, 3, progress=False, eos_token_id=[], fwd_hooks=Steer(vector, 1, alpha=2.0).hooks(tiny)
                  + [(act_name("resid_pre", 1), lambda r, hook: plain.append(r.clone()))])  # fmt: skip
    tiny.generate(IOI, 3, progress=False, eos_token_id=[], fwd_hooks=hooks)
    first = tiny.run_with_cache(IOI, names_filter=act_name("resid_pre", 1))[1][act_name("resid_pre", 1)]
    assert torch.equal(seen[0][1], first)  # the prompt step: not steered
    torch.testing.assert_close(plain[0], first + 2.0)  # "all" steers the prompt too
    assert all(index > 0 for index, _ in seen[1:])


def test_ablations_write_zero_the_reference_mean_or_a_reference_row(tiny):
    name = act_name("z", 1)
    reference = ["The cat sat on the mat with a dog and a bird", "Anna and Omar walked to the park quickly"]
    _, ref = tiny.run_with_cache(reference, names_filter=name)
    tokens, mask = tiny.tokenize(reference)
    mean = ref[name][mask.bool()].mean(0)
    for ablation, check in [
        (ablate_heads(1, [0, 3]), lambda z: (z[:, :, [0, 3]] == 0).all()),
        (ablate_heads(1, 2, "mean", reference), lambda z: (z[0, :, 2] == mean[2]).all()),
        (ablate_heads(1, 1, "resample", reference, seed=1),
         lambda z: any(torch.equal(z[0, :, 1], ref[name][r, : z.shape[1], 1]) for r in range(2))),
    ]:  # fmt: skip
        with ablation.applied(tiny):
            _, cache = tiny.run_with_cache("The dog ran", names_filter=name)
        assert check(cache[name]), ablation
        untouched = [h for h in range(4) if h not in ablation.index]
        _, plain = tiny.run_with_cache("The dog ran", names_filter=name)
        torch.testing.assert_close(cache[name][:, :, untouched], plain[name][:, :, untouched])
    neurons = ablate_neurons(0, [5, 7])
    with neurons.applied(tiny):
        _, cache = tiny.run_with_cache(IOI, names_filter=act_name("post", 0))
    assert (cache[act_name("post", 0)][..., [5, 7]] == 0).all()
    with (ablate_attention(2) + ablate_mlp(2)).applied(tiny):
        _, cache = tiny.run_with_cache(IOI, names_filter=lambda n: n.endswith(("attn_out", "mlp_out")))
    assert (cache["attn_out", 2] == 0).all() and (cache["mlp_out", 2] == 0).all()
    assert cache["attn_out", 1].abs().sum() > 0


def test_interventions_combine_describe_themselves_and_refuse_bad_arguments(tiny):
    both = ablate_heads(2, [1, 2]) + Steer(torch.zeros(tiny.cfg.d_model), 1, alpha=0.5, positions="prompt")
    both = both + ablate_mlp(0, "mean", reference=[IOI])
    assert isinstance(both, Interventions) and len(both.parts) == 3
    assert repr(both) == (
        "Ablate(zero: layer 2 heads [1, 2]) + "
        "Steer(0.5 x vector of norm 0 at resid_pre [1], prompt positions) + Ablate(mean: layer 0 mlp output)"
    )
    assert [name for name, _ in both.hooks(tiny)] == [
        act_name("z", 2),
        act_name("resid_pre", 1),
        act_name("mlp_out", 0),
    ]
    with pytest.raises(IndexError, match="head"):
        ablate_heads(1, 9).hooks(tiny)
    with pytest.raises(ValueError, match="reference"):
        Ablate("heads", 1, [0], "mean")
    with pytest.raises(ValueError, match="d_model"):
        Steer(torch.ones(3), 0).hooks(tiny)
    with pytest.raises(ValueError, match="longer reference"):
        tiny.run_with_hooks(IOI, fwd_hooks=ablate_heads(0, 0, "resample", ["a"]).hooks(tiny))


def test_ablating_the_induction_heads_collapses_induction(tiny):
    length = 20
    tokens = repeated_token_ids(tiny.tokenizer, 32, length)
    scores = induction_scores(tiny.hf_model, tokens, length)
    layer, head = scores.stack().idxmax()
    assert (layer, head) == (2, 2)  # notebook 01's strongest induction head
    base = induction_accuracy(tiny, tokens, length)
    best_alone = induction_accuracy(tiny, tokens, length, ablate_heads(layer, head))
    layer_heads = [h for h in range(tiny.cfg.n_heads) if scores.loc[layer, h] > 0.5]
    all_of_them = induction_accuracy(tiny, tokens, length, ablate_heads(layer, layer_heads))
    resampled = induction_accuracy(
        tiny,
        tokens,
        length,
        ablate_heads(layer, head, "resample", repeated_token_ids(tiny.tokenizer, 8, length, 5)),
    )
    # Measured: 0.984 -> 0.969 (the best head alone: the other three induction heads of layer 2 cover for it),
    # -> 0.000 with all four zeroed, -> 0.64 when the best head reads another sequence's activations.
    assert base > 0.95 and layer_heads == [0, 1, 2, 3]
    assert 0.005 < base - best_alone < 0.05
    assert all_of_them < 0.02
    assert base - resampled > 0.2


def test_an_intervention_applies_to_a_patching_experiment(tiny):
    """Built and run inside `applied`, an experiment's reference and patched runs all carry the intervention:
    with head L1H3 zeroed everywhere, patching it copies zeros onto zeros and restores nothing, where the
    plain model's L1H3 restores most of the clean logit difference (notebook 07)."""
    from workbench.patching import PatchingExperiment

    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    answers = (" Mary", " John")
    plain = PatchingExperiment(tiny, clean, corrupted, answers).run("heads", progress=False)
    with ablate_heads(1, [3]).applied(tiny):
        experiment = PatchingExperiment(tiny, clean, corrupted, answers)
        ablated = experiment.run("heads", progress=False)

    def cell(result):
        return float(result.table.query("layer == 1 and head == 3")["value"].iloc[0])

    assert cell(plain) > 0.5
    assert cell(ablated) == pytest.approx(0.0, abs=1e-9)
    assert ablated.clean_value != pytest.approx(plain.clean_value)  # the reference runs were ablated too
    assert all(not point.fwd_hooks for point in tiny.hook_dict.values())
