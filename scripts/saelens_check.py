"""Load SAEs saved by workbench.sae with SAELens's own loader and compare their encodings with ours.

SAELens pins an older transformer-lens than the workbench, so it lives in a virtualenv of its own
(default ``.venv-saelens/``, created here with ``python -m venv`` and ``pip install sae-lens``). This
script runs in two halves:

    .venv/bin/python scripts/saelens_check.py            # save SAEs, make the venv, run the other half there
    .venv-saelens/bin/python scripts/saelens_check.py --saelens FOLDER   # (called by the first half)

For every architecture (standard, topk, batchtopk saved as jumprelu, jumprelu) it prints the maximum
absolute difference between SAELens's ``sae.encode`` / ``sae.decode(sae.encode(x))`` and ours on the same
random inputs, and exits non-zero if any exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
from pathlib import Path

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")


def save_ours(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from workbench.sae import SAEConfig, SparseAutoencoder, save_sae

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    for arch in ARCHITECTURES:
        cfg = SAEConfig(
            d_in=32,
            d_sae=96,
            architecture=arch,
            k=6 if "topk" in arch else None,
            hook_name="blocks.1.hook_resid_post",
            hook_layer=1,
            model_name="apertus-tiny",
        )
        sae = SparseAutoencoder(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.abs_()
        save_sae(sae, folder / arch)
        save_file(
            {"x": x, "acts": sae.encode(x).detach(), "recon": sae(x).detach()},
            str(folder / arch / "ours.safetensors"),
        )


def check_with_saelens(folder: Path) -> int:
    import sae_lens
    from sae_lens import SAE
    from safetensors.torch import load_file

    print(f"sae-lens {sae_lens.__version__}")
    worst = 0.0
    for arch in ARCHITECTURES:
        sae = SAE.load_from_disk(str(folder / arch), device="cpu")
        ours = load_file(str(folder / arch / "ours.safetensors"))
        acts = sae.encode(ours["x"]).detach()
        recon = sae.decode(acts).detach()
        d_acts = float((acts - ours["acts"]).abs().max())
        d_recon = float((recon - ours["recon"]).abs().max())
        cfg = json.loads((folder / arch / "cfg.json").read_text())
        print(
            f"{arch:10s} loaded as {type(sae).__name__:14s} (cfg architecture {cfg['architecture']}): "
            f"max |encode diff| {d_acts:.2e}, max |reconstruction diff| {d_recon:.2e}, "
            f"L0 {float((acts > 0).float().sum(-1).mean()):.1f}"
        )
        worst = max(worst, d_acts, d_recon)
    print("OK" if worst <= 1e-5 else f"MISMATCH (worst {worst:.2e})")
    return 0 if worst <= 1e-5 else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--saelens", type=Path, help="(second half) check the SAEs in this folder with SAELens"
    )
    parser.add_argument("--venv", type=Path, default=Path(__file__).resolve().parent.parent / ".venv-saelens")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/workbench-saelens-check"))
    args = parser.parse_args()
    if args.saelens:
        return check_with_saelens(args.saelens)
    save_ours(args.folder)
    python = args.venv / "bin" / "python"
    if not python.exists():
        import torch

        # The workbench's own torch version first (pinned as the Makefile pins it), then sae-lens from PyPI.
        pin = f"torch=={torch.__version__.split('+')[0]}"
        print(f"creating {args.venv}, installing {pin} and sae-lens ...", flush=True)
        venv.create(args.venv, with_pip=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, pin], check=True)
        subprocess.run([*pip, "sae-lens"], check=True)
    return subprocess.run([str(python), __file__, "--saelens", str(args.folder)]).returncode


if __name__ == "__main__":
    sys.exit(main())
