"""Probing: where in the network a property of each token becomes linearly readable.

``harvest`` the hidden states of a token-labelled dataset, ``train_probes`` for every layer at once (with
control tasks), ``export_probe`` one of them as an ``ApertusForTokenClassification`` checkpoint, and
``evaluate`` any such checkpoint on a dataset.
"""

from workbench.probing.export import Evaluation, evaluate, export_probe, load_probe_tagger
from workbench.probing.harvest import CorruptHarvestError, Harvest, harvest, residual_hooks
from workbench.probing.probes import ProbeResult, control_labels, train_probes

__all__ = [
    "CorruptHarvestError",
    "Evaluation",
    "Harvest",
    "ProbeResult",
    "control_labels",
    "evaluate",
    "export_probe",
    "harvest",
    "load_probe_tagger",
    "residual_hooks",
    "train_probes",
]
