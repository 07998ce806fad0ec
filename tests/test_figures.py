import numpy as np
from PIL import Image

from synth7t.figures import _centre_of, _section, comparison_figure


def test_comparison_figure_writes_a_png_with_five_columns_of_three_views(tmp_path):
    rng = np.random.default_rng(0)
    target = np.zeros((30, 34, 26), np.float32)
    target[5:25, 6:28, 4:22] = rng.random((20, 22, 18))
    image = np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1) * (target > 0)
    path = comparison_figure(image, target * 0.9, target, target > 0, tmp_path / "figure.png", title="test")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 1.4 * png.size[1] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # written atomically, no temporary left


def test_both_error_maps_share_the_input_error_scale(tmp_path, monkeypatch):
    from synth7t import figures

    shown = []
    original = figures.plt.Axes.imshow
    monkeypatch.setattr(figures.plt.Axes, "imshow", lambda self, *a, **k: shown.append(k) or original(self, *a, **k))
    target = np.zeros((20, 20, 20), np.float32)
    target[4:16, 4:16, 4:16] = 0.5
    image = target.copy()
    image[4:16, 4:16, 4:16] += 0.2  # input error 0.2 in the brain
    comparison_figure(image, target, target, target > 0, tmp_path / "figure.png")
    error_scales = {k["vmax"] for k in shown if k.get("cmap") == "inferno"}
    assert len(error_scales) == 1 and abs(float(error_scales.pop()) - 0.2) < 1e-6  # one scale, the input's error


def test_sections_cut_through_the_centre_of_the_mask():
    mask = np.zeros((20, 30, 40), bool)
    mask[2:8, 10:20, 30:40] = True
    assert _centre_of(mask) == (4, 14, 34)
    volume = np.arange(20 * 30 * 40).reshape(20, 30, 40)
    assert np.array_equal(_section(volume, "axial", (4, 14, 34)), np.rot90(volume[:, :, 34]))
    assert np.array_equal(_section(volume, "coronal", (4, 14, 34)), np.rot90(volume[:, 14, :]))
    assert np.array_equal(_section(volume, "sagittal", (4, 14, 34)), np.rot90(volume[4, :, :]))
