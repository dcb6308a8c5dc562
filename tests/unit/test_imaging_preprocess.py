"""Preprocessing onto the model grid and its inverse back to the study's own grid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from imaging.errors import StudyError
from imaging.metrics import dice
from imaging.preprocess import (
    PreprocessConfig,
    box_to_source,
    labels_to_source,
    points_to_source,
    preprocess,
)
from imaging.study import Study, Volume

SMALL = PreprocessConfig(spacing_mm=2.0, shape=(48, 48, 40))


def oblique_study(missing: str | None = None) -> tuple[Study, np.ndarray]:
    """A 1.5 x 1.2 x 3 mm LPI-oriented study with an ellipsoid 'tumour' label; not on the model grid."""
    shape = (60, 70, 26)
    affine = np.diag([-1.5, -1.2, 3.0, 1.0])  # x and y flipped relative to RAS
    affine[:3, 3] = [45.0, 40.0, -39.0]
    idx = np.indices(shape).astype(float)
    head = ((idx[0] - 30) / 26) ** 2 + ((idx[1] - 35) / 30) ** 2 + ((idx[2] - 13) / 11) ** 2 < 1
    tumour = ((idx[0] - 22) / 8) ** 2 + ((idx[1] - 40) / 9) ** 2 + ((idx[2] - 14) / 3.5) ** 2 < 1
    rng = np.random.default_rng(0)
    images = {}
    for m, base in (("t1", 600), ("t1ce", 650), ("t2", 400), ("flair", 500)):
        if m != missing:
            images[m] = Volume((head * (base + 80 * tumour) + head * rng.normal(0, 10, shape)).astype(np.float32), affine)
    seg = Volume((tumour * 2).astype(np.uint8), affine)
    return Study("OBL-1", images, segmentation=seg), tumour


def test_mask_maps_back_within_one_voxel():
    study, tumour = oblique_study()
    prepared = preprocess(study, SMALL)
    assert prepared.image.shape == (4, 48, 48, 40)
    assert prepared.grid.affine[0, 0] > 0 and prepared.grid.affine[1, 1] > 0  # RAS on the model grid
    back = labels_to_source(prepared.segmentation, prepared)
    assert back.shape == study.reference.shape
    np.testing.assert_allclose(back.affine, study.reference.affine)
    restored = back.data > 0
    assert dice(restored, tumour) > 0.85
    # Every disagreement lies on the boundary: within one voxel of the original mask's surface.
    near = ndimage.binary_dilation(tumour) & ~ndimage.binary_erosion(tumour)
    assert np.all(near[restored != tumour])


def test_study_on_the_model_grid_round_trips_exactly():
    shape = SMALL.shape
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40, -50, -30]
    idx = np.indices(shape)
    data = (((idx[0] - 22) / 17) ** 2 + ((idx[1] - 24) / 18) ** 2 + ((idx[2] - 20) / 16) ** 2 < 1) * np.float32(100.0)
    seg = np.zeros(shape, np.uint8)
    seg[10:20, 12:18, 8:15] = 4
    study = Study("G", {"t1": Volume(data, affine)}, segmentation=Volume(seg, affine))
    prepared = preprocess(study, SMALL)
    np.testing.assert_array_equal(labels_to_source(prepared.segmentation, prepared).data, seg)


def test_points_and_boxes_map_back_through_world_space():
    study, _ = oblique_study()
    prepared = preprocess(study, SMALL)
    centre_model = np.array([[20.0, 25.0, 18.0]])
    world = prepared.grid.vox_to_world(centre_model)
    back = points_to_source(centre_model, prepared)
    np.testing.assert_allclose(study.reference.affine[:3, :3] @ back[0] + study.reference.affine[:3, 3], world[0])
    box = box_to_source(np.array([10, 10, 10, 20, 20, 20]), prepared)
    assert np.all(box[:3] <= box[3:])  # flipped axes still give an ordered box


def test_z_score_inside_the_mask_and_missing_modality_is_a_zero_channel():
    study, _ = oblique_study(missing="flair")
    prepared = preprocess(study, SMALL)
    assert prepared.presence.tolist() == [1, 1, 1, 0]
    assert not prepared.image[3].any()
    inside = prepared.image[0][prepared.brain_mask]
    assert abs(inside.mean()) < 1e-3 and inside.std() == pytest.approx(1.0, abs=1e-3)
    assert not prepared.image[0][~prepared.brain_mask].any()


def test_mismatched_geometry_is_resampled_or_refused_explicitly():
    study, _ = oblique_study()
    t2 = study.images["t2"]
    coarse = Volume(ndimage.zoom(t2.data, (0.5, 0.5, 1.0), order=1), t2.affine @ np.diag([2.0, 2.0, 1.0, 1.0]))
    study.images["t2"] = coarse
    resampled = preprocess(study, SMALL)
    assert resampled.presence[2] == 1 and np.abs(resampled.image[2]).sum() > 0
    with pytest.raises(StudyError, match="t2 geometry .* differs from t1ce .*refusing"):
        preprocess(study, PreprocessConfig(spacing_mm=2.0, shape=(48, 48, 40), mismatched_geometry="refuse"))


def test_modality_from_elsewhere_in_space_is_refused():
    study, _ = oblique_study()
    t2 = study.images["t2"]
    moved = t2.affine.copy()
    moved[:3, 3] += [500.0, 0, 0]
    study.images["t2"] = Volume(t2.data, moved)
    with pytest.raises(StudyError, match="t2 does not overlap t1"):
        preprocess(study, SMALL)


def test_version_names_the_grid():
    assert SMALL.version == "2.0/2mm/48x48x40"
