"""Probing speed: harvesting against a plain forward, and all-layer probes against per-layer logistic
regressions.

1. Harvest throughput (tokens per second) against the plain forward pass over the same batches: HookedApertus
   with no hooks, and the transformers model itself. Interleaved rounds, median ratio. Target: harvest >= 0.9x
   forward.
2. Time to train the probes of every layer and their control-task twins with `train_probes` (one batched
   fit), against scikit-learn `LogisticRegression` (lbfgs) fitting the same probes one after the other, on
   the same RMS-normalised features and split, in the same run; test accuracies of both are reported. Twice:
   on the embedded model's harvest, and on a random 8-layer d_model 512 Apertus (the width where per-layer
   fits start to cost what they cost on real models).

The model is the embedded checkpoint when it is trained, else a random Apertus of its shape with its
tokenizer; the data are tagged-grammar sentences (part of speech). Float32 on the CPU.

    python benchmarks/probing.py [--sentences 1000 --batch 32 --rounds 7 --threads 1 --wide-sentences 300]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, time_interleaved, write_json  # noqa: E402

import workbench  # noqa: E402
from workbench.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from workbench.data.alignment import TokenLabelledDataset  # noqa: E402
from workbench.data.corpus import EVAL_SEED, tagged_sentences  # noqa: E402
from workbench.probing import harvest, train_probes  # noqa: E402
from workbench.probing.probes import rms_normalize  # noqa: E402


def random_model(folder: Path, **shape):
    """A random Apertus of `shape` with the embedded model's tokenizer, loaded from `folder`."""
    from workbench.checkpoint.synthetic import random_apertus
    from workbench.checkpoint.tokenizer import build_tokenizer

    tok = build_tokenizer()
    random_apertus(vocab=len(tok), **shape).save_pretrained(folder)
    tok.save_pretrained(folder)
    return workbench.load(folder)


def embedded_or_random(workdir: Path):
    if (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        return workbench.load(), "embedded checkpoint"
    model = random_model(workdir / "random", layers=3, d_model=192, heads=4, kv_heads=2, d_mlp=768)
    return model, "random Apertus of the embedded shape (checkpoint not trained yet)"


def harvest_vs_forward(model, encoded, batch: int, rounds: int, workdir: Path) -> dict:
    batches = [
        encoded.batch(list(range(s, min(s + batch, len(encoded))))) for s in range(0, len(encoded), batch)
    ]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def hooked_forward():
        with torch.inference_mode():
            for b in batches:
                model(b["input_ids"], attention_mask=b["attention_mask"])

    def hf_forward():
        with torch.inference_mode():
            for b in batches:
                model.hf_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    folder = workdir / "harvest"

    def harvest_all():
        shutil.rmtree(folder, ignore_errors=True)
        harvest(model, encoded, folder, batch_size=batch, progress=False)

    rows = time_interleaved(
        {"hooked_forward": hooked_forward, "hf_forward": hf_forward, "harvest": harvest_all},
        baseline="hooked_forward",
        rounds=rounds,
        warmup=1,
    )
    for row in rows.values():
        row["tokens_per_s"] = n_tokens / row["median_s"]
    hf_ratio = rows["hf_forward"]["median_s"] / rows["harvest"]["median_s"]
    return {
        "tokens": n_tokens,
        "labelled_tokens": encoded.n_labelled,
        "batch": batch,
        "variants": rows,
        "harvest_throughput_vs_hooked_forward": 1 / rows["harvest"]["ratio"],
        "harvest_throughput_vs_hf_forward": hf_ratio,
        "target_met": 1 / rows["harvest"]["ratio"] >= 0.9,
    }


def probes_vs_sklearn(harvest_folder: Path) -> dict:
    """Our one batched fit of every layer's probe and control probe, against scikit-learn fitting the same
    probes (real and control labels) one after the other."""
    from sklearn.linear_model import LogisticRegression

    from workbench.probing.probes import control_labels

    start = time.perf_counter()
    result = train_probes(harvest_folder, progress=False)
    ours = time.perf_counter() - start

    h = workbench.probing.Harvest.open(harvest_folder)
    data = h.load()
    sentence = data["sentence"].numpy()
    train = np.isin(sentence, np.concatenate([result.split["train"], result.split["val"]]))
    test = np.isin(sentence, result.split["test"])
    labels = data["labels"]
    tasks = {
        "real": labels.numpy(),
        "control": control_labels(data["types"].long(), labels.long(), len(h.label_names), 0).numpy(),
    }
    rows = []
    start = time.perf_counter()
    for hook in h.hooks:
        x = rms_normalize(data[hook], result.eps).numpy()
        row = {"hook": hook}
        for task, y in tasks.items():
            clf = LogisticRegression(max_iter=1000).fit(x[train], y[train])
            row[f"sklearn_{task}_accuracy"] = float((clf.predict(x[test]) == y[test]).mean())
        rows.append(row)
    sklearn_s = time.perf_counter() - start
    for row, (_, ours_row) in zip(rows, result.table.iterrows()):
        row["probe_accuracy"] = float(ours_row["accuracy"])
        row["probe_control_accuracy"] = float(ours_row["control_accuracy"])
    return {
        "width": int(data[h.hooks[0]].shape[1]),
        "labelled_tokens": int(len(labels)),
        "train_probes_s": ours,
        "train_probes_steps": int(result.history["step"].max()),
        "probes": f"{len(h.hooks)} real-label + {len(h.hooks)} control-task probes, both sides",
        "sklearn_loop_s": sklearn_s,
        "speedup_vs_sklearn_loop": sklearn_s / ours,
        "accuracy": rows,
    }


def wide_harvest(workdir: Path, sentences: int, batch: int) -> Path:
    """A harvest from a random Apertus as wide as the overhead benchmark's (8 layers, d_model 512), where the
    batched fit meets the sizes of real models (scikit-learn's per-layer cost grows with the width)."""
    model = random_model(workdir / "wide-model", layers=8, d_model=512, heads=8, kv_heads=4, d_mlp=2048)
    data = TokenLabelledDataset.from_tagged(tagged_sentences(sentences, seed=EVAL_SEED), "pos")
    harvest(model, data, workdir / "wide-harvest", batch_size=batch, progress=False)
    return workdir / "wide-harvest"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the harvest comparison")
    parser.add_argument(
        "--wide-sentences", type=int, default=300, help="sentences for the d_model 512 case (0: skip it)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers.activations").setLevel(logging.ERROR)

    workdir = Path(tempfile.mkdtemp(prefix="bench-probing-"))
    try:
        model, which = embedded_or_random(workdir)
        data = TokenLabelledDataset.from_tagged(tagged_sentences(args.sentences, seed=EVAL_SEED), "pos")
        encoded = data.encode(model.tokenizer)
        throughput = harvest_vs_forward(model, encoded, args.batch, args.rounds, workdir)
        # Probe fitting on every core, as scikit-learn's BLAS uses them whatever torch is told.
        torch.set_num_threads(os.cpu_count() or 1)
        training = {which: probes_vs_sklearn(workdir / "harvest")}
        if args.wide_sentences:
            wide = wide_harvest(workdir, args.wide_sentences, args.batch)
            training["random 8 layers, d_model 512"] = probes_vs_sklearn(wide)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "model": which,
        "sentences": args.sentences,
        "machine": machine(),
        "harvest": throughput,
        "probes": training,
    }
    path = write_json("probing", payload)
    h = throughput
    print(f"model: {which}; {h['tokens']} tokens in batches of {h['batch']}")
    for name, row in h["variants"].items():
        print(f"  {name:15s} {row['median_s']:.3f} s  {row['tokens_per_s']:9.0f} tok/s")
    print(
        f"harvest throughput: {h['harvest_throughput_vs_hooked_forward']:.2f}x the hooked forward, "
        f"{h['harvest_throughput_vs_hf_forward']:.2f}x the transformers forward (target >= 0.9x)"
    )
    for name, p in training.items():
        print(
            f"probes on {name} (width {p['width']}, {p['labelled_tokens']} tokens; {p['probes']}): "
            f"train_probes {p['train_probes_s']:.2f} s ({p['train_probes_steps']} steps), scikit-learn loop "
            f"{p['sklearn_loop_s']:.2f} s: {p['speedup_vs_sklearn_loop']:.1f}x"
        )
        for row in p["accuracy"]:
            print(
                f"  {row['hook']:26s} probe {row['probe_accuracy']:.3f} (control "
                f"{row['probe_control_accuracy']:.3f})  sklearn {row['sklearn_real_accuracy']:.3f} (control "
                f"{row['sklearn_control_accuracy']:.3f})"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
