"""The data layer on real PBC images: layouts, the corrupt file, duplicate-aware splits, the cache, augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFLICTING_PAIR, CORRUPT_FILE, PBC, make_tree, pbc_files
from kornia.color import rgb_to_lab
from PIL import Image
from torchvision.transforms import v2

from wbc_trust import config
from wbc_trust.crop import CropPolicy
from wbc_trust.data import (
    LabLookJitter,
    RandomTightCrop,
    Record,
    SeedAugment,
    StainAugment,
    UnreadableImage,
    _background_fill,
    file_digest,
    find_dataset,
    image_to_tensor,
    load_images,
    read_image,
    split_records,
    train_transform,
)
from wbc_trust.errors import WbcError


def test_class_folders_in_any_letter_case(tmp_path: Path) -> None:
    names = {
        "basophil": "Basophil",
        "eosinophil": "EOSINOPHIL",
        "lymphocyte": "lymphocyte",
        "monocyte": "MoNoCyTe",
        "neutrophil": "Neutrophil",
    }
    index = find_dataset(make_tree(tmp_path, 3, names))
    assert index.layout == "class-folders"
    counts = index.summary()["splits"]["all"]
    assert counts == {c: 3 for c in config.CLASSES}


def test_kaggle_layout_train_test_a_test_b(tmp_path: Path) -> None:
    make_tree(tmp_path / "Train", 4, {c: c.capitalize() for c in config.CLASSES})
    make_tree(tmp_path / "Test-A", 2, {c: c.capitalize() for c in config.CLASSES}, offset=10)
    make_tree(tmp_path / "Test-B", 1, {c: c.upper() for c in config.CLASSES}, offset=20)
    index = find_dataset(tmp_path)
    assert index.layout == "kaggle"
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 20, "test": 10, "test_b": 5}
    assert all(r.path.parent.parent.name == "Test-A" for r in index.splits["test"])


def test_pbc_layout_reports_and_drops_extra_classes(tmp_path: Path) -> None:
    make_tree(tmp_path, 2)
    platelets = tmp_path / "platelet"
    platelets.mkdir()
    for src in sorted((PBC.parent / "pbc-non-wbc" / "platelet").iterdir())[:3]:
        shutil.copy(src, platelets / src.name)
    index = find_dataset(tmp_path)
    assert index.ignored_classes == {"platelet": 3}
    assert len(index.splits["all"]) == 10


def test_corrupt_file_is_reported_and_skipped(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="not an image"):
        read_image(CORRUPT_FILE)
    records = [Record(CORRUPT_FILE, 4)] + [Record(p, 4) for p in pbc_files("neutrophil", 3)]
    loaded = load_images(records, 32, cache=False)
    assert [p for p, _ in loaded.unreadable] == [CORRUPT_FILE]
    assert len(loaded.records) == 3 and loaded.images.shape == (3, 3, 32, 32)
    assert CORRUPT_FILE not in [r.path for r in loaded.records]


def test_images_are_decoded_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path / "cache"))
    records = [Record(p, 0) for p in pbc_files("basophil", 5)]
    first = load_images(records, 48)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    second = load_images(records, 48)
    assert torch.equal(first.images, second.images) and first.digests == second.digests


def test_duplicates_stay_on_one_side_of_the_split() -> None:
    """The real conflicting pair (neutrophil == eosinophil bytes) and real same-class duplicates never straddle."""
    records = [Record(p, config.CLASSES.index(p.parent.name)) for p in CONFLICTING_PAIR]
    for cls in ("basophil", "eosinophil"):
        records += [Record(p, config.CLASSES.index(cls)) for p in pbc_files(cls, 150)]
    records += [
        Record(p, config.CLASSES.index(c)) for c in ("lymphocyte", "monocyte", "neutrophil") for p in pbc_files(c, 60)
    ]
    digests = [file_digest(r.path) for r in records]
    assert len(set(digests)) < len(digests), "the sample must contain real duplicates"
    for seed in range(5):
        parts = split_records(records, digests, {"val": 0.2, "test": 0.2}, seed=seed)
        side = {}
        for name, part in parts.items():
            for r in part:
                side.setdefault(digests[records.index(r)], set()).add(name)
        assert all(len(s) == 1 for s in side.values())
        assert sum(len(p) for p in parts.values()) == len(records)


def test_split_is_stratified_and_seeded() -> None:
    records = [Record(p, config.CLASSES.index(c)) for c in config.CLASSES for p in pbc_files(c, 40)]
    digests = [file_digest(r.path) for r in records]
    a = split_records(records, digests, {"val": 0.25}, seed=3)
    b = split_records(records, digests, {"val": 0.25}, seed=3)
    c = split_records(records, digests, {"val": 0.25}, seed=4)
    assert a == b and a != c
    val_counts = [sum(r.label == i for r in a["val"]) for i in range(5)]
    assert max(val_counts) - min(val_counts) <= 2


@pytest.mark.parametrize("problem", ["missing", "empty", "no-class-folders", "not-there"])
def test_bad_folders_raise_clear_errors(tmp_path: Path, problem: str) -> None:
    if problem == "missing":
        make_tree(tmp_path, 2)
        shutil.rmtree(tmp_path / "monocyte")
        match = "monocyte missing"
    elif problem == "empty":
        match = "no class folders"
    elif problem == "no-class-folders":
        (tmp_path / "cats").mkdir()
        shutil.copy(pbc_files("basophil", 1)[0], tmp_path / "cats" / "a.jpg")
        match = "no class folders"
    else:
        tmp_path = tmp_path / "nope"
        match = "does not exist"
    with pytest.raises(WbcError, match=match):
        find_dataset(tmp_path)


def _edge_strength(image: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels: falls when an image is blurred or zoomed in."""
    x = image.float()
    return float((x[:, 1:] - x[:, :-1]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean())


def test_cross_lab_augmentation_zooms_and_blurs() -> None:
    """``--augment cross-lab`` shows cells larger and softer than the seed's augmentation (other labs' crops)."""
    image = image_to_tensor(read_image(pbc_files("neutrophil", 1)[0], 96))
    torch.manual_seed(0)
    seed = [_edge_strength(train_transform("seed")(image)) for _ in range(30)]
    cross_lab = [_edge_strength(train_transform("cross-lab")(image)) for _ in range(30)]
    assert sum(cross_lab) < 0.8 * sum(seed), (sum(cross_lab), sum(seed))
    with pytest.raises(WbcError, match="unknown --augment 'heavy'"):
        train_transform("heavy")


def test_augmentation_changes_training_images_only() -> None:
    image = image_to_tensor(read_image(pbc_files("monocyte", 1)[0], 64))
    torch.manual_seed(0)
    augmented = [train_transform()(image) for _ in range(4)]
    assert all(a.shape == image.shape and a.dtype == torch.uint8 for a in augmented)
    assert sum(not torch.equal(a, image) for a in augmented) >= 3


@pytest.mark.parametrize(
    ("angle", "shift", "scale", "flip"),
    [
        (15.0, (8.0, -5.0), 1.1, (1.0, 1.0)),
        (-12.0, (-3.0, 6.0), 0.85, (-1.0, 1.0)),
        (7.0, (2.0, 2.0), 1.0, (1.0, -1.0)),
    ],
)
def test_seed_augmentation_moves_a_cell_as_torchvision_does(angle, shift, scale, flip) -> None:
    """``SeedAugment`` (the seed's list on whole batches) draws what torchvision's ``RandomAffine`` + flips draw and
    moves the image as ``v2.functional.affine`` + flips move it: on a real cell the two differ by under a grey level on
    average (bilinear rounding; the edges of the filled corners), while a different transform differs by 20 or more."""
    image = image_to_tensor(read_image(pbc_files("neutrophil", 1)[0], 96))
    params = {
        "angle": torch.tensor([angle]),
        "shift": torch.tensor([shift]),
        "scale": torch.tensor([scale]),
        "flip": torch.tensor([flip]),
        "brightness": torch.tensor([1.0]),
    }
    ours = SeedAugment.apply(image[None], params)[0]
    theirs = v2.functional.affine(
        image, angle, list(shift), scale, [0.0, 0.0], v2.InterpolationMode.BILINEAR, _background_fill()
    )
    theirs = v2.functional.horizontal_flip(theirs) if flip[0] < 0 else theirs
    theirs = v2.functional.vertical_flip(theirs) if flip[1] < 0 else theirs
    assert float((ours.float() - theirs.float()).abs().mean()) < 1.0
    assert float((image.float() - theirs.float()).abs().mean()) > 20.0


def test_seed_augmentation_draws_for_each_image_of_a_batch() -> None:
    """One batch of the same real cell 64 times: every copy gets its own draw within the seed's ranges (all differ,
    about half of them mirrored each way, brightness within ±20 %), and the same generator state repeats the batch."""
    image = image_to_tensor(read_image(pbc_files("monocyte", 1)[0], 64))
    batch = image.expand(64, -1, -1, -1)
    torch.manual_seed(0)
    params = SeedAugment.draw(64, 64, 64)
    assert params["angle"].abs().max() <= config.AUG_ROTATION_DEG
    assert params["shift"].abs().max() <= config.AUG_SHIFT * 64 and torch.equal(
        params["shift"], params["shift"].round()
    )
    assert ((params["scale"] - 1).abs() <= config.AUG_ZOOM).all()
    assert 16 <= int((params["flip"] < 0).sum(0).min()) and int((params["flip"] < 0).sum(0).max()) <= 48
    torch.manual_seed(1)
    out = train_transform("seed")(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({bytes(o.numpy()) for o in out}) == 64
    torch.manual_seed(1)
    assert torch.equal(train_transform("seed")(batch), out)
    brightness = out.float().mean((1, 2, 3)) / batch.float().mean()
    assert 0.7 < float(brightness.min()) and float(brightness.max()) < 1.3


def test_travel_augmentation_is_seeded_keeps_the_cell_and_varies_the_stain() -> None:
    """``--augment travel`` on a real cell view: the same seed gives the same image; a tight crop keeps the centred
    cell and pads the rest with one colour; the stain jitter changes colours but not the picture's structure."""
    view = CropPolicy("cell", 96).apply(read_image(pbc_files("neutrophil", 1)[0])).image
    travel = train_transform("travel")
    torch.manual_seed(3)
    first = np.asarray(travel(view))
    torch.manual_seed(3)
    assert np.array_equal(first, np.asarray(travel(view)))

    tight = np.asarray(RandomTightCrop((0.5, 0.5))(view))
    assert np.array_equal(tight[24:72, 24:72], np.asarray(view)[24:72, 24:72])
    border = np.concatenate([tight[:20].reshape(-1, 3), tight[-20:].reshape(-1, 3)])
    assert (border == border[0]).all()

    original = np.asarray(view).astype(float)
    torch.manual_seed(0)
    stained = [np.asarray(StainAugment(0.3, 0.02)(view)).astype(float) for _ in range(8)]
    channel_means = np.array([s.reshape(-1, 3).mean(0) for s in stained])
    assert channel_means.std(0).max() > 3  # colours vary from draw to draw ...
    grey = original.mean(2).ravel()
    assert all(np.corrcoef(grey, s.mean(2).ravel())[0, 1] > 0.85 for s in stained)  # ... the cell stays the cell


def test_lab_look_jitter_scales_the_lightness_spread_and_shifts_the_colours() -> None:
    """Another lab's look on a real cell view: a fixed draw halves L*'s spread about its mean and moves b* by the
    shift (a paler, bluer smear, as BCCD's against PBC's), within a unit or two of rounding and clipping; the cell
    stays where it was (lightness correlates with the original's)."""
    view = CropPolicy("cell", 96).apply(read_image(pbc_files("eosinophil", 1)[0])).image

    def lab(image: Image.Image) -> torch.Tensor:
        return rgb_to_lab(v2.functional.pil_to_tensor(image).float() / 255)

    before = lab(view)
    torch.manual_seed(0)
    paler = LabLookJitter(((0.5, 0.5), (1.0, 1.0), (1.0, 1.0)), (0.0, 0.0, 0.0))(view)
    after = lab(paler)
    assert float(after[0].std() / before[0].std()) == pytest.approx(0.5, abs=0.03)
    assert float(after[0].mean()) == pytest.approx(float(before[0].mean()), abs=1.5)
    assert np.corrcoef(before[0].ravel(), after[0].ravel())[0, 1] > 0.99

    bluer = LabLookJitter(((1.0, 1.0),) * 3, (0.0, 0.0, 8.0))
    shifts = []
    for seed in range(6):
        torch.manual_seed(seed)
        shifts.append(float(lab(bluer(view))[2].mean() - before[2].mean()))
    assert max(abs(s) for s in shifts) <= 8.5 and max(shifts) - min(shifts) > 4  # drawn within ± 8, not fixed


def test_too_few_images_to_split_is_a_clear_error(tmp_path: Path) -> None:
    index = find_dataset(make_tree(tmp_path, 3))
    loaded = load_images(index.splits["all"], 32, cache=False)
    with pytest.raises(WbcError, match="too few images to split .* wbc adapt"):
        split_records(loaded.records, loaded.digests, {"val": 0.15, "test": 0.15})
