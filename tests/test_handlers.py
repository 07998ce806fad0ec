import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from synth7t.handlers import LossProgressBar, VolumeMetricsWriter, gaussian_baseline, write_atomically
from synth7t.metrics import volume_metrics


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.csv"
    write_atomically(target, "a\n")
    write_atomically(target, "b\n")
    assert target.read_text() == "b\n"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.csv"]


def _item(seed: int, affine: np.ndarray) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    label = np.zeros((1, 24, 22, 14), np.float32)
    label[:, 3:21, 3:19, 2:12] = rng.random((1, 18, 16, 10))
    meta = {"affine": torch.as_tensor(affine), "filename_or_obj": f"/data/sub-{seed}_3T.nii.gz"}
    as_meta = lambda array: MetaTensor(torch.as_tensor(array), meta=dict(meta))  # noqa: E731
    batch = {"mask": as_meta((label > 0).astype(np.float32))}
    output = {"pred": as_meta(label * 0.95), "image": as_meta(label * 0.8), "label": as_meta(label)}
    return batch, output


def test_volume_metrics_writer_rows_baseline_and_summary(tmp_path):
    flipped = np.diag([-1.0, -1.0, 1.0, 1.0])
    items = [_item(1, np.eye(4)), _item(2, flipped)]
    engine = Engine(lambda engine, batch: None)
    writer = VolumeMetricsWriter(tmp_path)
    writer.attach(engine)
    assert engine.has_event_handler(writer.record, Events.ITERATION_COMPLETED)
    assert engine.has_event_handler(writer.write, Events.COMPLETED)
    engine.state.batch, engine.state.output = [items[0][0], items[1][0]], [items[0][1], items[1][1]]
    writer.reset()
    writer.record(engine)
    writer.write()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("subject,psnr,ssim,ssim3d,ssim_global,mse,mae,psnr_brain")
    assert [row.split(",")[0] for row in rows[1:]] == ["sub-1_3T", "sub-2_3T"]
    expected = volume_metrics(items[0][1]["image"][0], items[0][1]["label"][0], items[0][0]["mask"][0])
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    assert float(first["identity_psnr"]) == pytest.approx(expected["psnr"], rel=1e-5)
    assert float(first["gaussian_sigma"]) in (0.3, 0.5, 0.7, 1.0) and "gaussian_ssim_brain" in header
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert summary["psnr"]["n"] == 2 and "subject" not in summary and summary["gaussian_psnr"]["n"] == 2


def test_gaussian_baseline_picks_the_sigma_closest_to_the_target_and_masks_it():
    generator = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.avg_pool3d(torch.rand((1, 1, 40, 40, 40), generator=generator), 5, 1, 2)[0]
    mask = torch.zeros_like(clean)
    mask[:, 5:35, 5:35, 5:35] = 1
    clean = clean * mask
    noisy = clean + 0.2 * torch.randn(clean.shape, generator=generator)
    sigma, smoothed = gaussian_baseline(noisy, clean, mask, sigmas=(0.3, 1.0))
    assert sigma == 1.0  # strong noise on a smooth image: the wider filter wins
    assert float(smoothed[mask == 0].abs().max()) == 0.0 and float(smoothed.min()) >= 0.0 and float(smoothed.max()) <= 1.0
    assert float(((smoothed - clean) ** 2).mean()) < float(((noisy - clean) ** 2).mean())
    sigma, _ = gaussian_baseline(clean + 0.001 * torch.randn(clean.shape, generator=generator), clean, mask, (0.3, 1.0))
    assert sigma == 0.3  # almost clean: the narrower one wins


def test_volume_metrics_writer_without_gaussian_baseline(tmp_path):
    engine = Engine(lambda engine, batch: None)
    writer = VolumeMetricsWriter(tmp_path, gaussian_sigmas=())
    batch, output = _item(1, np.eye(4))
    engine.state.batch, engine.state.output = [batch], [output]
    writer.record(engine)
    writer.write()
    assert "gaussian_psnr" not in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_loss_progress_bar_shows_the_loss(capsys):
    # MONAI trainers decollate their output into a list of per-sample dicts
    engine = Engine(lambda engine, batch: [{"loss": torch.tensor(0.25)}, {"loss": torch.tensor(0.25)}])
    LossProgressBar().attach(engine)
    engine.run(range(3), max_epochs=1)
    assert "loss=0.25" in capsys.readouterr().err


def test_loss_progress_bar_reads_an_output_that_is_not_decollated(capsys):
    # the GAN trainer runs with decollate=False: its output is one dict
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(0.5), "discriminator_loss": torch.tensor(-1.0)})
    LossProgressBar().attach(engine)
    engine.run(range(2), max_epochs=1)
    err = capsys.readouterr().err
    assert "loss=0.5" in err and "loss_0" not in err


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_gaussian_baseline_smooths_the_brain_box_as_the_whole_volume(sigma):
    """Smoothing only the mask's box (widened by the kernel radius) gives what smoothing everything and masking gives,
    with input outside the mask that the kernels reach and a mask that touches the volume's edge."""
    from monai.transforms import GaussianSmooth

    generator = torch.Generator().manual_seed(1)
    image = torch.rand((1, 30, 26, 22), generator=generator)
    label = torch.rand((1, 30, 26, 22), generator=generator)
    mask = torch.zeros_like(image)
    mask[:, 8:20, 0:12, 5:17] = 1
    _, smoothed = gaussian_baseline(image, label, mask, sigmas=(sigma,))
    expected = GaussianSmooth(sigma)(image).clamp(0.0, 1.0) * (mask > 0)
    torch.testing.assert_close(smoothed, expected, rtol=0, atol=1e-6)
    assert float(smoothed[mask > 0].abs().min()) > 0
