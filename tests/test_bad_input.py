"""Every bad input gets a clear error: one row per case (what is called, the exception, a phrase of its
message).

A row's callable takes the shared context ``c`` (the shipped model, a small harvest and its probes, a patching
experiment, xIELU statistics, a scratch folder). A regression in any message shows up here as one failing row.
Data-reading cases are in ``test_bad_input_data.py``; the hooked model's own checks are also listed here, and
more of them in the hooked-model tests.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import workbench
from workbench import lens as L
from workbench import xielu as X
from workbench.checkpoint.synthetic import random_apertus
from workbench.data.alignment import LabelledSentence, TokenLabelledDataset
from workbench.data.corpus import tagged_sentences
from workbench.loading import NotApertusError
from workbench.patching import PatchingExperiment, attribution_patch, patch
from workbench.probing import Harvest, evaluate, export_probe, harvest, load_probe_tagger, train_probes
from workbench.widgets.probing import ProbeView
from workbench.widgets.xielu import XIELUExplorer

FAST = {"progress": False}
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
_folders = itertools.count()


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    model = workbench.load()
    data = TokenLabelledDataset.from_tagged(tagged_sentences(24, seed=5), "pos")
    h = harvest(model, data, tmp / "harvest", **FAST)
    probes = train_probes(h, max_steps=20, **FAST)
    experiment = PatchingExperiment(model, CLEAN, CORRUPT, answers=(" Mary", " John"))
    stats = X.xielu_statistics(model, [CLEAN, CORRUPT], **FAST)
    return SimpleNamespace(
        model=model, data=data, h=h, probes=probes, ex=experiment, stats=stats, tmp=tmp, n=len(data)
    )


def fresh(c) -> str:
    """A new folder name in the scratch space."""
    return str(c.tmp / f"case-{next(_folders)}")


def one_class(c) -> TokenLabelledDataset:
    sentences = [
        LabelledSentence(s.words, tuple("NOUN" for _ in s.words), s.space_after) for s in c.data.sentences
    ]
    return TokenLabelledDataset.from_sentences(sentences)


def unlabelled(c) -> TokenLabelledDataset:
    sentences = [LabelledSentence(s.words, (None,) * len(s.words), s.space_after) for s in c.data.sentences]
    return TokenLabelledDataset(sentences, c.data.label_names)


def probe_view(c, **kwargs):
    return ProbeView(c.model, c.probes, c.data, **kwargs)


def set_value(control, value):
    control.value = value


def metric(value):
    return lambda logits: value


def llama_folder(c):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = fresh(c)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def patch_ioi(c, **kwargs):
    options = {"answers": (" Mary", " John"), **FAST, **kwargs}
    return patch(c.model, CLEAN, CORRUPT, options.pop("metric", "logit_diff"), **options)


# fmt: off
CASES = [
    # ---------------------------------------------------------------------------------- probing: harvest
    ("harvest/not-a-dataset", lambda c: harvest(c.model, ["a text"], fresh(c), **FAST), TypeError,
     "TokenLabelledDataset or an EncodedDataset"),
    ("harvest/no-sentences", lambda c: harvest(c.model, c.data[:0], fresh(c), **FAST), ValueError,
     "no sentences"),
    ("harvest/zero-labelled-tokens", lambda c: harvest(c.model, unlabelled(c), fresh(c), **FAST), ValueError,
     "no labelled token"),
    ("harvest/int-dtype", lambda c: harvest(c.model, c.data, fresh(c), dtype=torch.int64, **FAST), TypeError,
     "floating dtype"),
    ("harvest/bool-dtype", lambda c: harvest(c.model, c.data, fresh(c), dtype=torch.bool, **FAST), TypeError,
     "floating dtype"),
    ("harvest/dtype-name", lambda c: harvest(c.model, c.data, fresh(c), dtype="int8", **FAST), TypeError,
     "floating dtype"),
    ("harvest/no-hooks", lambda c: harvest(c.model, c.data, fresh(c), hooks=[], **FAST), ValueError,
     "No hooks given"),
    ("harvest/unknown-hook", lambda c: harvest(c.model, c.data, fresh(c), hooks=["blocks.0.hook_resid_postt"],
     **FAST), KeyError, "not a hook point"),
    ("harvest/per-head-hook", lambda c: harvest(c.model, c.data, fresh(c),
     hooks=["blocks.0.attn.hook_pattern"],
     **FAST), ValueError, "per head and query"),
    ("harvest/hook-twice", lambda c: harvest(c.model, c.data, fresh(c), hooks=["hook_embed", "hook_embed"],
     **FAST), ValueError, "listed twice"),
    ("harvest/batch-size-zero", lambda c: harvest(c.model, c.data, fresh(c), batch_size=0, **FAST),
     ValueError,
     "batch_size must be a whole number"),
    ("harvest/shard-sentences-float", lambda c: harvest(c.model, c.data, fresh(c), shard_sentences=2.5,
     **FAST),
     ValueError, "shard_sentences must be a whole number"),
    ("harvest/other-data-in-folder", lambda c: harvest(c.model, c.data[:5], c.h.folder, **FAST),
     FileExistsError, "another data"),
    ("harvest/into-a-file", lambda c: harvest(c.model, c.data, c.h.folder / "manifest.json", **FAST),
     NotADirectoryError, "is a file"),
    ("harvest/open-empty-folder", lambda c: Harvest.open(c.tmp), FileNotFoundError, "holds no harvest"),
    ("harvest/unknown-hook-on-load", lambda c: c.h.load(["blocks.9.hook_resid_post"]), KeyError,
     "were not harvested"),
    # ---------------------------------------------------------------------------------- probing: probes
    ("probes/one-class", lambda c: train_probes(harvest(c.model, one_class(c), fresh(c), **FAST), **FAST),
     ValueError, "at least two classes"),
    ("probes/max-steps-zero", lambda c: train_probes(c.h, max_steps=0, **FAST), ValueError,
     "max_steps must be a whole number, at least 1"),
    ("probes/max-steps-float", lambda c: train_probes(c.h, max_steps=2.5, **FAST), ValueError,
     "max_steps must be a whole number"),
    ("probes/eval-every-zero", lambda c: train_probes(c.h, eval_every=0, **FAST), ValueError,
     "eval_every must be a whole number"),
    ("probes/patience-negative", lambda c: train_probes(c.h, patience=-1, **FAST), ValueError,
     "patience must be a whole number"),
    ("probes/batch-size-zero", lambda c: train_probes(c.h, batch_size=0, **FAST), ValueError,
     "batch_size must be None"),
    ("probes/lr-zero", lambda c: train_probes(c.h, lr=0, **FAST), ValueError, "lr must be a positive number"),
    ("probes/lr-nan", lambda c: train_probes(c.h, lr=math.nan, **FAST), ValueError,
     "lr must be a positive number"),
    ("probes/weight-decay-negative", lambda c: train_probes(c.h, weight_decay=-1.0, **FAST), ValueError,
     "weight_decay must be a number >= 0"),
    ("probes/no-hooks", lambda c: train_probes(c.h, hooks=[], **FAST), ValueError, "trains nothing"),
    ("probes/unknown-hook", lambda c: train_probes(c.h, hooks=["blocks.7.hook_resid_post"], **FAST), KeyError,
     "were not harvested"),
    ("probes/bad-split", lambda c: train_probes(c.h, split=(0.5, 0.5), **FAST), ValueError,
     "three positive fractions"),
    ("probes/no-harvest-folder", lambda c: train_probes(c.tmp, **FAST), FileNotFoundError,
     "holds no harvest"),
    ("probes/no-such-layer", lambda c: c.probes.index(9), KeyError, "has no probe"),
    ("probes/no-such-hook", lambda c: c.probes.index("blocks.0.hook_mlp_out"), KeyError, "No probe for hook"),
    # ---------------------------------------------------------------------------------- probing: export
    ("export/other-model", lambda c: export_probe(c.probes, 1, fresh(c), workbench.HookedApertus(
        random_apertus(layers=3, d_model=128, vocab=323, seed=1),
        c.model.tokenizer)), ValueError, "another model"),
    ("export/no-base-checkpoint", lambda c: export_probe(c.probes, 1, fresh(c), workbench.HookedApertus(
        c.model.hf_model, c.model.tokenizer, name="in memory")), ValueError, "pass base="),
    ("export/no-such-layer", lambda c: export_probe(c.probes, 9, fresh(c), c.model), KeyError,
     "has no probe"),
    ("export/into-a-file", lambda c: export_probe(c.probes, 1, c.h.folder / "manifest.json", c.model),
     NotADirectoryError, "is a file"),
    ("export/non-empty-folder", lambda c: export_probe(c.probes, 1, c.h.folder, c.model), FileExistsError,
     "pass overwrite=True"),
    ("export/overwrite-other-files", lambda c: export_probe(c.probes, 1, c.h.folder, c.model, overwrite=True),
     FileExistsError, "no probe export wrote"),
    ("export/load-no-probe", lambda c: load_probe_tagger(c.tmp), FileNotFoundError,
     "holds no exported probe"),
    ("evaluate/not-a-classifier", lambda c: evaluate(c.model, c.data, **FAST), TypeError,
     "not a token classifier"),
    # ---------------------------------------------------------------------------------- probing: widget
    ("probe-view/sentence-out-of-range", lambda c: probe_view(c, sentence=c.n), IndexError,
     "out of range: choose a whole number in 0..23"),
    ("probe-view/set-sentence-out-of-range", lambda c: set_value(probe_view(c).sentence, 99), IndexError,
     "sentence 99 is out of range"),
    ("probe-view/set-sentence-negative", lambda c: set_value(probe_view(c).sentence, -1), IndexError,
     "0..23"),
    ("probe-view/set-sentence-text", lambda c: set_value(probe_view(c).sentence, "3"), TypeError,
     "not a whole number"),
    ("probe-view/set-layer-unknown", lambda c: set_value(probe_view(c).layer, "blocks.9.hook_resid_post"),
     ValueError, "is not one of the choices"),
    ("probe-view/not-a-dataset", lambda c: ProbeView(c.model, c.probes, ["text"]), TypeError,
     "TokenLabelledDataset or an EncodedDataset"),
    ("probe-view/other-labels", lambda c: ProbeView(c.model, c.probes, one_class(c)), ValueError,
     "differ from the probes'"),
    # ---------------------------------------------------------------------------------- xIELU explorer
    ("xielu-explorer/neuron-out-of-range", lambda c: XIELUExplorer(c.model, c.stats, neuron=512), IndexError,
     "neuron 512 is out of range (0..511)"),
    ("xielu-explorer/set-neuron", lambda c: set_value(XIELUExplorer(c.model, c.stats).neuron, 600),
     IndexError,
     "0..511"),
    ("xielu-explorer/show-neuron", lambda c: XIELUExplorer(c.model, c.stats).show(neuron=-3), IndexError,
     "out of range"),
    ("xielu-explorer/set-layer", lambda c: set_value(XIELUExplorer(c.model, c.stats).layer, 7), ValueError,
     "is not one of the choices: 0, 1, 2"),
    ("xielu-explorer/set-share-kind", lambda c: set_value(XIELUExplorer(c.model, c.stats).share_kind, "both"),
     ValueError, "'activations', 'output'"),
    ("xielu/neuron", lambda c: X.neuron_output_tokens(c.model, 0, 9999), IndexError,
     "neuron 9999 is out of range"),
    ("xielu/layer", lambda c: X.xielu_figure(c.model, 7), IndexError, "layer 7 is out of range"),
    ("xielu/single-string", lambda c: X.xielu_statistics(c.model, "a text", **FAST), TypeError, "single str"),
    ("xielu/top-k", lambda c: X.xielu_statistics(c.model, [CLEAN], top_k=0, **FAST), ValueError,
     "top_k must be a positive integer"),
    # ---------------------------------------------------------------------------------- patching
    ("patching/empty-layers", lambda c: patch_ioi(c, layers=[]), ValueError, "layers=[] selects nothing"),
    ("patching/empty-positions", lambda c: patch_ioi(c, positions=[]), ValueError,
     "positions=[] selects nothing"),
    ("patching/max-batch-zero", lambda c: patch_ioi(c, max_batch=0), ValueError,
     "max_batch=0: give a whole number of rows"),
    ("patching/max-batch-negative", lambda c: patch_ioi(c, max_batch=-4), ValueError, "at least 1"),
    ("patching/max-batch-float", lambda c: patch_ioi(c, max_batch=2.5), ValueError, "max_batch=2.5"),
    ("patching/memory-budget-zero", lambda c: patch_ioi(c, memory_budget=0), ValueError,
     "memory_budget=0: give a whole number of bytes"),
    ("patching/memory-budget-float", lambda c: patch_ioi(c, memory_budget=1e9), ValueError,
     "memory_budget=1000000000.0"),
    ("patching/metric-nan", lambda c: patch_ioi(c, metric=metric(math.nan), normalize=False), ValueError,
     "not a finite number"),
    ("patching/metric-inf", lambda c: patch_ioi(c, metric=metric(torch.tensor(math.inf)), normalize=False),
     ValueError, "not a finite number"),
    ("patching/metric-string", lambda c: patch_ioi(c, metric=metric("good"), normalize=False), TypeError,
     "The metric returned str"),
    ("patching/metric-none", lambda c: patch_ioi(c, metric=metric(None), normalize=False), TypeError,
     "return a number or a tensor"),
    ("patching/metric-shape", lambda c: patch_ioi(c, metric=metric(torch.zeros(3)), normalize=False),
     ValueError, "one value per prompt"),
    ("patching/attribution-metric-nan", lambda c: attribution_patch(c.model, CLEAN, CORRUPT,
     metric(torch.tensor(math.nan)), normalize=False), ValueError, "not a finite number"),
    ("patching/float-answer-ids", lambda c: patch_ioi(c, answers=torch.tensor([[73.0, 74.0]])), TypeError,
     "token ids must be integers"),
    ("patching/float-answer", lambda c: patch_ioi(c, answers=(73.0, 74.0)), TypeError,
     "give a single-token text"),
    ("patching/answer-set", lambda c: patch_ioi(c, answers={" Mary", " John"}), TypeError,
     "answers is a set"),
    ("patching/unk-answer", lambda c: patch_ioi(c, answers=(" Zebulon", " John")), ValueError,
     "' Zebulon' is not in the tokenizer's vocabulary"),
    ("patching/multi-token-answer", lambda c: patch_ioi(c, answers=(" Mary John", " John")), ValueError,
     "not a single token"),
    ("patching/answer-id-outside-vocab", lambda c: patch_ioi(c, answers=(5000, 3)), ValueError,
     "outside the vocabulary"),
    ("patching/needs-answers", lambda c: patch(c.model, CLEAN, CORRUPT, "logit_diff", **FAST), ValueError,
     "needs answers"),
    ("patching/unknown-metric", lambda c: patch_ioi(c, metric="logit_dif"), ValueError,
     "Did you mean 'logit_diff'"),
    ("patching/unknown-component", lambda c: patch_ioi(c, component="resid_pr"), ValueError, "resid_pre"),
    ("patching/layer-out-of-range", lambda c: patch_ioi(c, layers=[3]), IndexError, "0..2"),
    ("patching/position-out-of-range", lambda c: patch_ioi(c, positions=[40]), IndexError,
     "Position 40 is out of range"),
    ("patching/neurons-without-layer", lambda c: patch_ioi(c, component="neurons"), ValueError,
     "pass layer="),
    ("patching/direction", lambda c: patch_ioi(c, direction="sideways"), ValueError, "'denoise'"),
    ("patching/lengths-differ", lambda c: patch(c.model, CLEAN, CLEAN + " a", "kl", **FAST), ValueError,
     "same length"),
    ("patching/mixed-inputs", lambda c: patch(c.model, CLEAN, c.model.to_tokens(CORRUPT), "kl", **FAST),
     TypeError, "both as texts or both as token tensors"),
    ("patching/prompt-count", lambda c: patch(c.model, [CLEAN, CLEAN], [CORRUPT], "kl", **FAST), ValueError,
     "2 clean prompts but 1 corrupted"),
    ("patching/same-behaviour", lambda c: patch(c.model, CLEAN, CLEAN, "kl", **FAST), ValueError,
     "score the same"),
    ("patching/no-cells", lambda c: c.ex.run("resid_pre", "kl", cells=[], **FAST), ValueError,
     "No cells to patch"),
    ("patching/prompt-out-of-range", lambda c: c.ex.predictions("resid_pre", (0, 1), prompt=3), IndexError,
     "prompt 3 is out of range"),
    # ---------------------------------------------------------------------------------- lenses
    ("lens/unk-target", lambda c: L.target_trajectory(c.model, CLEAN, " Zebulon"), ValueError,
     "' Zebulon' is not in the tokenizer's vocabulary"),
    ("lens/unk-dla-answer", lambda c: L.direct_logit_attribution(c.model, CLEAN, " Zebulon", " John"),
     ValueError, "' Zebulon' is not in the tokenizer's vocabulary"),
    ("lens/unk-dla-wrong", lambda c: L.direct_logit_attribution(c.model, CLEAN, " Mary", " Qwerty"),
     ValueError, "' Qwerty' is not in the tokenizer's vocabulary"),
    ("lens/float-token", lambda c: L.target_trajectory(c.model, CLEAN, 7.5), ValueError, "is not a token"),
    ("lens/position", lambda c: L.target_trajectory(c.model, CLEAN, " Mary", position=40), IndexError,
     "position 40 is out of range"),
    ("lens/multi-token", lambda c: L.direct_logit_attribution(c.model, CLEAN, " Mary John"), ValueError,
     "not a single token"),
    ("lens/answer-count", lambda c: L.direct_logit_attribution(c.model, [CLEAN, CORRUPT, CLEAN],
     [" Mary", " John"]), ValueError, "2 answer tokens for 3 prompts"),
    ("lens/table-one-prompt", lambda c: L.logit_lens_table(c.model, [CLEAN, CORRUPT]), ValueError,
     "one prompt"),
    ("lens/table-k", lambda c: L.logit_lens_table(c.model, CLEAN, k=0), ValueError,
     "k must be a positive integer"),
    # ---------------------------------------------------------------------------------- hooked model, loading
    ("model/unknown-hook", lambda c: c.model.run_with_cache(CLEAN,
     names_filter=["blocks.0.hook_resid_postt"]),
     KeyError, "blocks.0.hook_resid_post"),
    ("model/hook-layer", lambda c: c.model.check_hook_name("blocks.9.hook_resid_pre"), KeyError,
     "layer 9 is out of range"),
    ("model/head", lambda c: c.model.check_head(4), IndexError, "4 heads"),
    ("model/token-outside-vocab", lambda c: c.model(torch.tensor([[1, 2, 400]])), ValueError,
     "outside the vocabulary"),
    ("model/empty-prompt", lambda c: c.model(""), ValueError, "empty"),
    ("model/single-token", lambda c: c.model.to_single_token(" Mary John"), ValueError, "not a single token"),
    ("load/not-apertus-folder", lambda c: workbench.load(c.tmp), FileNotFoundError, "no config.json"),
    ("load/missing-layers", lambda c: workbench.load(num_hidden_layers=4), ValueError,
     "weights of layer(s) 3 are missing"),
    ("load/device-and-map", lambda c: workbench.load(device="cpu", device_map="auto"), ValueError,
     "not both"),
    ("load/not-apertus", lambda c: workbench.load(llama_folder(c)), NotApertusError, "not Apertus"),
]
# fmt: on


def test_the_table_is_unique_and_large():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize(("case", "call", "error", "phrase"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_gets_a_clear_error(c, case, call, error, phrase):
    with pytest.raises(error) as raised:
        call(c)
    assert phrase in str(raised.value), f"{case}: {raised.value}"
    assert not any(point.fwd_hooks for point in c.model.hook_dict.values()), f"{case} left a hook attached"
