"""Segmentation the nnU-Net way: sliding windows, mirroring TTA, probabilities resampled to the native grid,
region outputs, and the patch augmentation training uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from imaging import sliding_window as sw
from imaging.native_grid import labels_on_grid
from imaging.postprocess import probabilities_to_labels, regions_to_labels
from imaging.preprocess import Grid
from training import losses, tasks
from training.augment import PatchAugmentation


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _onnx_patch_net(tmp_path, roi=(32, 32, 32)):
    """A real exported patch network (random weights), as training exports one."""
    import onnxruntime as ort

    torch.manual_seed(0)
    net = tasks.get("segmentation").network().eval()
    path = tmp_path / "seg.onnx"
    torch.onnx.export(tasks._ActivatedGraph(net, "softmax"), (torch.zeros(1, 4, *roi),), str(path), input_names=["image"],
                      output_names=["probabilities"], dynamic_axes={"image": {0: "b"}, "probabilities": {0: "b"}},
                      opset_version=17, dynamo=False)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda windows: session.run(None, {"image": windows})[0]


def test_sliding_window_equals_the_whole_volume_output_when_the_volume_fits_one_window(tmp_path):
    run = _onnx_patch_net(tmp_path)
    image = np.random.default_rng(0).normal(size=(4, 32, 32, 32)).astype(np.float32)
    result = sw.predict(run, image, sw.WindowSpec(roi=(32, 32, 32), overlap=0.5))
    assert result.windows == 1 and result.passes == 1
    np.testing.assert_allclose(result.probabilities, run(image[None])[0], atol=1e-5)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_windows_cover_the_volume_and_blend_to_the_voxelwise_answer(overlap):
    """A voxelwise model gives the same answer in every window, so any tiling that covers every voxel
    and normalises its Gaussian weights must return it exactly."""
    image = np.random.default_rng(1).normal(size=(4, 48, 56, 40)).astype(np.float32)
    spec = sw.WindowSpec(roi=(32, 32, 32), overlap=overlap, batch=3)
    result = sw.predict(_softmax, image, spec)
    np.testing.assert_allclose(result.probabilities, _softmax(image[None])[0], atol=1e-5)
    assert result.windows == sw.window_count(image.shape[1:], spec) > 1


def test_mirroring_tta_is_deterministic_and_reports_disagreement_only_where_passes_differ():
    image = np.zeros((4, 32, 32, 32), np.float32)
    image[2, 8:20, 8:20, 8:20] = 3.0  # oedema wins the softmax there
    spec = sw.WindowSpec(roi=(32, 32, 32), mirror=True)
    symmetric = sw.predict(_softmax, image, spec)  # a voxelwise model: every mirrored pass agrees
    assert symmetric.passes == 8 and symmetric.disagreement == pytest.approx(0.0)

    def biased(windows):  # tumour only where x is in the first half: mirroring along x moves it
        out = _softmax(windows)
        out[:, 1:, 16:] = 0.0
        out[:, 0, 16:] = 1.0
        return out

    first, second = sw.predict(biased, image, spec), sw.predict(biased, image, spec)
    assert first.disagreement > 0.1 and first.disagreement == second.disagreement
    np.testing.assert_array_equal(first.probabilities, second.probabilities)


def test_window_spec_comes_from_the_version_and_refuses_nonsense():
    assert sw.WindowSpec.of_version({}) is None  # a whole-volume version: one call
    spec = sw.WindowSpec.of_version({"inference": {"roi": [64, 64, 64], "overlap": 0.25}}, overlap=0.5, mirror=True)
    assert spec.roi == (64, 64, 64) and spec.overlap == 0.5 and spec.mirror
    with pytest.raises(ValueError, match="overlap"):
        sw.WindowSpec(roi=(64, 64, 64), overlap=1.0)
    with pytest.raises(ValueError, match="blend"):
        sw.WindowSpec(roi=(64, 64, 64), blend="median")


def _full_resample(probs, grid, target):
    """The reference: every channel resampled over the whole target grid, then labelled."""
    to_model = np.linalg.inv(grid.affine) @ target.affine
    coords = np.indices(target.shape).reshape(3, -1).astype(float)
    mapped = to_model[:3, :3] @ coords + to_model[:3, 3:4]
    channels = [ndimage.map_coordinates(probs[k], mapped, order=1, mode="constant", cval=1.0 if k == 0 else 0.0)
                for k in range(probs.shape[0])]  # fmt: skip
    return probabilities_to_labels(np.stack(channels).reshape(probs.shape[0], *target.shape))


def _blob_probabilities(shape=(24, 28, 24)):
    logits = np.full((4, *shape), -4.0, np.float32)
    logits[0] = 4.0
    x, y, z = np.indices(shape)
    r = np.sqrt((x - 12) ** 2 + (y - 13) ** 2 + (z - 11) ** 2)
    logits[2][r < 7], logits[0][r < 7] = 6.0, 0.0  # oedema
    logits[1][r < 4], logits[2][r < 4] = 8.0, 0.0  # necrosis
    logits[3][(r >= 3) & (r < 4.5)] = 9.0  # an enhancing rim
    return _softmax(logits[None])[0]


def test_labels_on_the_native_grid_equal_a_full_probability_resample_on_an_oblique_finer_grid():
    probs = _blob_probabilities()
    grid = Grid((24, 28, 24), np.diag([2.0, 2.0, 2.0, 1.0]))
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 0.9, 1.1])
    affine[:3, 3] = [4.0, -3.0, 1.5]
    target = Grid((52, 60, 44), affine)
    got = labels_on_grid(probs, grid, target)
    expected = _full_resample(probs, grid, target)
    assert (got > 0).sum() > 1000
    np.testing.assert_array_equal(got, expected)
    # On the model grid itself it is the plain argmax.
    np.testing.assert_array_equal(labels_on_grid(probs, grid, grid), probabilities_to_labels(probs))


def test_native_resampling_gives_smoother_borders_than_nearest_neighbour_labels():
    """A sphere at 2 mm, resampled to 1 mm: interpolated probabilities follow the true surface better
    than upsampled labels (whose borders are 2 mm stairs)."""
    shape = (24, 24, 24)
    x, y, z = np.indices(shape) * 2.0 + 1.0  # voxel centres (mm) of the 2 mm grid, origin at 1 mm
    r = np.sqrt((x - 24.3) ** 2 + (y - 23.7) ** 2 + (z - 24.1) ** 2)
    p = 1 / (1 + np.exp((r - 13.0) / 1.0))  # tumour probability falling across the true 13 mm surface
    probs = np.stack([1 - p, np.zeros_like(p), p, np.zeros_like(p)]).astype(np.float32)
    grid = Grid(shape, np.diag([2.0, 2.0, 2.0, 1.0]) + _origin(1.0))
    fine = Grid((48, 48, 48), np.diag([1.0, 1.0, 1.0, 1.0]) + _origin(0.5))
    xf, yf, zf = np.indices(fine.shape) * 1.0 + 0.5
    truth = np.sqrt((xf - 24.3) ** 2 + (yf - 23.7) ** 2 + (zf - 24.1) ** 2) < 13.0
    interpolated = labels_on_grid(probs, grid, fine) > 0
    nearest = np.repeat(np.repeat(np.repeat(probabilities_to_labels(probs) > 0, 2, 0), 2, 1), 2, 2)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(interpolated, truth) > dice(nearest, truth)


def _origin(value: float) -> np.ndarray:
    out = np.zeros((4, 4))
    out[:3, 3] = value
    return out


def test_region_probabilities_become_nested_brats_labels():
    voxels = [[0.9, 0.9, 0.9],  # WT, TC, ET -> enhancing
              [0.9, 0.9, 0.1],  # -> necrosis (core without enhancement)
              [0.9, 0.1, 0.9],  # ET outside the core cannot be: oedema
              [0.1, 0.9, 0.9]]  # nothing outside the whole tumour
    probs = np.array(voxels, np.float32).T[:, :, None, None]
    np.testing.assert_array_equal(regions_to_labels(probs)[:, 0, 0], [4, 1, 2, 0])
    np.testing.assert_array_equal(probabilities_to_labels(probs), regions_to_labels(probs))


def test_region_training_targets_and_loss():
    classes = torch.tensor([0, 1, 2, 3]).reshape(1, 1, 4, 1, 1)
    regions = losses.classes_to_regions(classes)[0, :, :, 0, 0]
    np.testing.assert_array_equal(regions.numpy(), [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    task = tasks.get("segmentation", {"regions": True, "augment": "none"})
    net = task.network()
    assert net(torch.zeros(1, 4, 16, 16, 16)).shape[1] == 3
    seg = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    seg[..., 4:10, 4:10, 4:10] = 3
    right = torch.where(losses.classes_to_regions(seg) > 0, 8.0, -8.0)
    assert float(task.criterion(right, losses.classes_to_regions(seg))) < float(task.criterion(-right, losses.classes_to_regions(seg)))
    with pytest.raises(ValueError, match="augmentation"):
        tasks.get("segmentation", {"augment": "heavy"})
    with pytest.raises(ValueError, match="no training options"):
        tasks.get("classification", {"regions": True})


def test_patch_augmentation_is_seeded_keeps_missing_channels_zero_and_labels_valid():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 32, 32, 32)).astype(np.float32)
    image[:, :4] = 0.0  # skull-stripped background
    image[2] = 0.0  # a missing sequence
    seg = np.zeros((32, 32, 32), np.int64)
    seg[10:20, 10:22, 8:18], seg[13:17, 13:18, 11:15] = 2, 3
    augment = PatchAugmentation()
    changed = 0
    for seed in range(12):
        a1, s1 = augment(image, seg, np.random.default_rng(seed))
        a2, s2 = augment(image, seg, np.random.default_rng(seed))
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(s1, s2)
        assert a1.shape == image.shape and s1.shape == seg.shape and a1.dtype == np.float32
        assert not a1[2].any(), "a missing modality must stay zero"
        assert set(np.unique(s1)) <= {0, 2, 3}
        changed += not np.array_equal(a1, image)
    assert changed >= 10  # mirroring alone (p = 0.5 per axis) changes almost every patch


def test_a_version_without_a_window_runs_as_one_whole_volume_call():
    calls = []

    def run(batch):
        calls.append(batch.shape)
        return _softmax(batch)

    image = np.random.default_rng(2).normal(size=(4, 24, 24, 24)).astype(np.float32)
    result = sw.predict_version(run, image, {})
    assert calls == [(1, 4, 24, 24, 24)] and result.windows == 1
    np.testing.assert_allclose(result.probabilities, _softmax(image[None])[0])
    windowed = sw.predict_version(run, image, {"inference": {"roi": [16, 16, 16]}}, overlap=0.5)
    assert windowed.windows == 8 and all(shape[2:] == (16, 16, 16) for shape in calls[1:])
