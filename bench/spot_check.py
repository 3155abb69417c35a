"""Correctness spot check between merged checkpoints, run as a child process by the runner.

``snapshot`` copies a few named tensors out of a checkpoint directory (any safetensors layout) into
one small file, so the multi-GB output can be deleted right after its run. ``compare`` then checks
each candidate snapshot against the reference one with ``torch.equal`` and prints a JSON verdict per
tensor, including how far apart mismatching tensors are and whether the merge changed the tensor
relative to the base at all.

Usage: python bench/spot_check.py snapshot CHECKPOINT_DIR DEST.safetensors NAME...
       python bench/spot_check.py compare --base BASE.st --reference REF.st CANDIDATE.st...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def locate(checkpoint: Path, names: list[str]) -> dict[str, Path]:
    """Map each wanted tensor name to the safetensors file under ``checkpoint`` that holds it."""
    found: dict[str, Path] = {}
    for path in sorted(checkpoint.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found.update(dict.fromkeys(set(names) & set(handle.keys()), path))
    return found


def snapshot(checkpoint: Path, dest: Path, names: list[str]) -> list[str]:
    """Save the named tensors found in ``checkpoint`` to ``dest``; return the names that are missing."""
    tensors: dict[str, torch.Tensor] = {}
    for name, path in locate(checkpoint, names).items():
        with safe_open(str(path), framework="pt") as handle:
            tensors[name] = handle.get_tensor(name).clone()
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest))
    return [name for name in names if name not in tensors]


def compare_tensor(candidate: torch.Tensor, reference: torch.Tensor, base: torch.Tensor | None) -> dict:
    """Verdict for one tensor: exact equality, and if unequal, by how much."""
    verdict: dict[str, object] = {"equal": torch.equal(candidate, reference)}
    if base is not None:
        verdict["changed_vs_base"] = not torch.equal(candidate, base)
    if candidate.shape != reference.shape or candidate.dtype != reference.dtype:
        verdict["mismatch"] = f"{candidate.dtype}{list(candidate.shape)} vs {reference.dtype}{list(reference.shape)}"
    elif not verdict["equal"]:
        difference = (candidate.float() - reference.float()).abs()
        verdict["max_abs_diff"] = difference.max().item()
        verdict["differing_fraction"] = (difference > 0).float().mean().item()
    return verdict


def compare(base: Path, reference: Path, candidate: Path) -> dict[str, dict]:
    """Compare every reference tensor with the candidate's; absent tensors are reported as missing."""
    base_tensors = load_file(str(base))
    candidate_tensors = load_file(str(candidate))
    verdicts: dict[str, dict] = {}
    for name, tensor in load_file(str(reference)).items():
        if name in candidate_tensors:
            verdicts[name] = compare_tensor(candidate_tensors[name], tensor, base_tensors.get(name))
        else:
            verdicts[name] = {"equal": False, "missing": True}
    return verdicts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    snap = modes.add_parser("snapshot", help="copy named tensors out of a checkpoint directory")
    snap.add_argument("checkpoint", type=Path)
    snap.add_argument("dest", type=Path)
    snap.add_argument("names", nargs="+")
    comp = modes.add_parser("compare", help="compare candidate snapshots with the reference snapshot")
    comp.add_argument("--base", type=Path, required=True)
    comp.add_argument("--reference", type=Path, required=True)
    comp.add_argument("candidates", type=Path, nargs="+")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.mode == "snapshot":
        result: object = {"missing": snapshot(args.checkpoint, args.dest, args.names)}
    else:
        result = {path.stem: compare(args.base, args.reference, path) for path in args.candidates}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
