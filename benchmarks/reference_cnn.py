"""A reference point for the T1w bundles: the plain residual CNN of issue #11, trained briefly, on this project's split.

Issue #11 measured a 168,049-parameter residual CNN (ten 3x3 convolutions, 48 channels, three neighbouring slices
in, the middle one out), trained for 8 minutes on two CPU cores, on three subjects this project does not hold. This
script trains the same network the same short way on the subjects the shipped ``gan_unet_t1w7t`` weights trained on
(the datalist's ``training`` and ``validation`` lists, sub-TELL0101-0105): one network per degradation recipe, as the
issue did, then one on both recipes' pairs, as each bundle's single model serves both. Each is scored on the ``test``
subjects (sub-TELL0106, sub-TELL0107) exactly as that bundle's ``evaluate.yaml`` scores its model: the bundle's
normalisation (1st/99th brain percentiles), the prediction clipped to [0, 1] and masked, the identity baseline the
normalised input unchanged, :func:`synth7t.metrics.volume_metrics`. So its figures stand beside the model card's.
Written here because neither MONAI nor the bundles hold this baseline; training is a plain loop (random 64 x 64
patches of brain slices, L1, Adam with cosine decay over a fixed number of iterations)::

    python -m benchmarks.reference_cnn --iterations 1000 --output benchmarks/results/reference_cnn.json

1,000 iterations of 16 patches take about 9 minutes per network on the 2-core CI-like machine (27 minutes for the
three). Nothing is asserted.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from monai.transforms import Compose
from torch import nn

from benchmarks import quality
from benchmarks.inference import bundle_parser
from synth7t.data import load_datalist
from synth7t.metrics import volume_metrics
from synth7t.networks import plain_cnn

BUNDLE = "gan_unet_t1w7t"  # whose reading and normalisation the figures share
SLABS = 3  # neighbouring axial slices in
PATCH = 64
BATCH = 16


def residual_cnn(width: int = 48, depth: int = 10) -> nn.Sequential:
    """``depth`` 3x3 convolutions with ReLU between them (:func:`synth7t.networks.plain_cnn`); the last starts at
    zero, so the net starts as the identity once the middle input slice is added to its output."""
    return plain_cnn(SLABS, 1, width, depth)


def load_volumes(items: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Each item's 3T ``image``, 7T ``label`` and ``mask`` read by the gan bundle's own ``load_transforms`` (RAS,
    brain mask, both images percentile-scaled), as ``(X, Y, Z)`` arrays."""
    read = Compose(bundle_parser(BUNDLE, "train.yaml", "default", "cpu").get_parsed_content("load_transforms"))
    keys = ("image", "label", "mask")
    return [{key: np.asarray(volume[key][0], dtype=np.float32) for key in keys} for volume in map(read, items)]


def _edge_padded(volume: np.ndarray) -> np.ndarray:
    """``volume`` with its first and last slices replicated, so that every slice has its neighbours."""
    return np.pad(volume, ((0, 0), (0, 0), (SLABS // 2, SLABS // 2)), mode="edge")


def _slab(padded: np.ndarray, z: int) -> np.ndarray:
    """``(SLABS, X, Y)``: slice ``z`` of the unpadded volume with its neighbours, from :func:`_edge_padded`."""
    return padded[..., z : z + SLABS].transpose(2, 0, 1)


def train(network: nn.Module, volumes: list[dict[str, np.ndarray]], iterations: int, seed: int = 0) -> list[float]:
    """Adam (lr 1e-3, cosine to 0) on L1 of random brain patches; returns the loss of every iteration."""
    rng = np.random.default_rng(seed)
    brain_slices = [np.flatnonzero(v["mask"].any(axis=(0, 1))) for v in volumes]
    padded_images = [_edge_padded(v["image"]) for v in volumes]
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / iterations)))
    losses = []
    for _ in range(iterations):
        inputs, targets = [], []
        for _ in range(BATCH):
            which = rng.integers(len(volumes))
            volume = volumes[which]
            z = rng.choice(brain_slices[which])
            x0, y0 = (rng.integers(0, size - PATCH + 1) for size in volume["image"].shape[:2])
            window = (slice(x0, x0 + PATCH), slice(y0, y0 + PATCH))
            inputs.append(_slab(padded_images[which][window], z))
            targets.append(volume["label"][window][None, ..., z])
        x, y = torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))
        loss = (x[:, SLABS // 2 : SLABS // 2 + 1] + network(x) - y).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict(network: nn.Module, image: np.ndarray, mask: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The whole volume, slice by slice; clipped to [0, 1] and zero outside the mask, as the bundle post-processes."""
    padded = _edge_padded(image)
    slabs = torch.from_numpy(np.stack([_slab(padded, z) for z in range(image.shape[2])]))
    residual = torch.cat([network(slabs[i : i + batch_size]) for i in range(0, len(slabs), batch_size)])
    prediction = image + residual[:, 0].numpy().transpose(1, 2, 0)
    return np.clip(prediction, 0.0, 1.0) * (mask > 0)


def _items(recipe: str, split: str) -> list[dict[str, Any]]:
    datalist = quality.dataset(recipe) / "datalist.json"
    return load_datalist(datalist, split, datalist.parent, target_keys=("label",))


def _subject(item: dict[str, Any]) -> str:
    return item.get("subject", Path(item["label"]).name)


def run(recipes: tuple[str, ...], iterations: int, seed: int = 0) -> dict[str, Any]:
    """One network trained on the training + validation subjects of every recipe in ``recipes``, scored on each
    recipe's test subjects: ``test[recipe][subject][metric] = (network, identity)``."""
    train_items = [item for recipe in recipes for item in _items(recipe, "training") + _items(recipe, "validation")]
    torch.manual_seed(seed)
    network = residual_cnn()
    start = time.perf_counter()
    losses = train(network, load_volumes(train_items), iterations, seed)
    seconds = time.perf_counter() - start
    network.eval()
    test: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        test_items = _items(recipe, "test")
        test[recipe] = {}
        for item, volume in zip(test_items, load_volumes(test_items)):
            prediction = predict(network, volume["image"], volume["mask"])
            model = volume_metrics(prediction, volume["label"], volume["mask"])
            identity = volume_metrics(volume["image"], volume["label"], volume["mask"])
            test[recipe][_subject(item)] = {
                name: (round(model[name], 4), round(identity[name], 4)) for name in ("psnr", "ssim", "mae")
            }
    return {
        "training_subjects": sorted({_subject(item) for item in train_items}),
        "iterations": iterations,
        "training_seconds": round(seconds, 1),
        "loss_first_last_50": (round(float(np.mean(losses[:50])), 5), round(float(np.mean(losses[-50:])), 5)),
        "test": test,
        "parameters": sum(p.numel() for p in network.parameters()),
    }


def main(iterations: int = 1000, output: str = "benchmarks/results/reference_cnn.json", seed: int = 0) -> None:
    """One network per recipe (the issue's setting), then one on both recipes' pairs (as the bundles serve both);
    prints each test subject's PSNR network / identity and writes the figures as JSON."""
    settings = {recipe: (recipe,) for recipe in quality.RECIPES} | {"both_recipes": tuple(quality.RECIPES)}
    result = {name: run(recipes, iterations, seed) for name, recipes in settings.items()}
    for name, figures in result.items():
        for recipe, subjects in figures["test"].items():
            for subject, metrics in subjects.items():
                psnr = metrics["psnr"]
                print(f"trained on {name}, {recipe} {subject}: PSNR reference CNN / identity {psnr[0]} / {psnr[1]} dB")
    Path(output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    fire.Fire(main)
