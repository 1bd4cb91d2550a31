"""Prediction sets a hematologist can use, on real images: never empty, class-conditional (Mondrian) coverage on
held-out halves of the shipped model's calibration split, two classes where the model hesitates, and model files
calibrated before (marginal LAC) still predicting exactly as they did, and marginal sets weighted by class for a
lab's class prevalence (``wbc adapt``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PBC

from wbc_trust import config
from wbc_trust.adapt import Adapted, sets_at_lab_prevalence
from wbc_trust.calibration import FLAG_UNCERTAIN, Calibration, fit_temperature
from wbc_trust.conformal import MondrianConformal, SplitConformal, aps_scores, conformal_from_metadata, raps_scores
from wbc_trust.data import list_files, model_labels, validation_split
from wbc_trust.modelfile import load_extra, load_model, save_model
from wbc_trust.models import logits_and_features
from wbc_trust.predict import Predictor

STEP = 1  # every image of the calibration split: 920, enough for 95 % sets per class on each half (54 basophils)


@pytest.fixture(scope="module")
def validation(default_model: Path) -> dict[str, torch.Tensor]:
    """Logits and features of every STEP-th image of the shipped model's own calibration split (recomputed from the
    file hashes and seed by ``validation_split``, as ``wbc calibrate`` does)."""
    model, meta = load_model(default_model)
    val, fitted_on = validation_split(meta, PBC)
    assert fitted_on.startswith("calibration split") and len(val.records) == meta["data"]["n_calib"]
    loaded = val.subset(range(0, len(val.records), STEP))
    logits, features = logits_and_features(model, loaded.images)
    return {
        "logits": logits,
        "features": features,
        "labels": torch.from_numpy(model_labels(loaded.records, meta["classes"])),
    }


def _halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random half of every class, and the rest."""
    generator = torch.Generator().manual_seed(seed)
    fit = torch.zeros(len(labels), dtype=torch.bool)
    for k in labels.unique():
        members = (labels == k).nonzero().flatten()
        fit[members[torch.randperm(len(members), generator=generator)[: len(members) // 2]]] = True
    return fit, ~fit


def test_calibrated_sets_are_never_empty_on_held_out_images(validation: dict) -> None:
    logits, features, labels = validation["logits"], validation["features"], validation["labels"]
    fit, held = _halves(labels, 0)
    calibration = Calibration.fit(logits[fit], features[fit], labels[fit], 0.95)  # what calibrating fits now
    for coverage in (0.8, 0.9, 0.95):  # a half has too few basophils for 0.99 (they would be in every set)
        trusted = calibration.apply(logits[held], features[held], coverage)
        sizes = trusted.sets.sum(1)
        assert int(sizes.min()) >= 1, f"{int((sizes == 0).sum())} empty sets at {coverage}"
        assert bool(trusted.sets[torch.arange(len(sizes)), trusted.probs.argmax(1)].all()), "top class not in its set"
        assert all(
            (flag == FLAG_UNCERTAIN) == (int(n) >= 2)
            for flag, n in zip(trusted.flags, sizes)
            if flag != "out-of-distribution"
        )


def test_every_class_gets_the_coverage_on_held_out_halves(validation: dict) -> None:
    """Fit on one half of the validation images, measure on the other; the guarantee is over random splits, so the
    per-class coverage averaged over 100 splits must reach the target for every class, monocytes included."""
    logits, labels = validation["logits"], validation["labels"]
    coverage, per_class, sizes = 0.95, [], []
    for seed in range(100):
        fit, held = _halves(labels, seed)
        probs = torch.softmax(logits / fit_temperature(logits[fit], labels[fit]), 1)
        sets = MondrianConformal.fit(probs[fit], labels[fit], coverage).sets(probs[held])
        covered = sets[torch.arange(int(held.sum())), labels[held]]
        per_class.append([float(covered[labels[held] == k].float().mean()) for k in range(logits.shape[1])])
        sizes.append(float(sets.sum(1).float().mean()))
    per_class = np.mean(per_class, 0)
    assert per_class.min() >= coverage - 0.005, dict(enumerate(per_class.round(4)))
    assert np.mean(sizes) <= 1.1, np.mean(sizes)  # covered by a few extra classes, not by full sets


def test_sets_hold_two_classes_where_the_top_two_are_close(validation: dict) -> None:
    logits, labels = validation["logits"], validation["labels"]
    sets, probs = torch.zeros_like(logits, dtype=torch.bool), torch.zeros_like(logits)
    for fit, held in (_halves(labels, 0), _halves(labels, 0)[::-1]):  # each half's sets fitted on the other half
        scaled = torch.softmax(logits / fit_temperature(logits[fit], labels[fit]), 1)
        sets[held] = MondrianConformal.fit(scaled[fit], labels[fit], 0.95).sets(scaled[held])
        probs[held] = scaled[held]
    top2 = probs.topk(2, 1).values
    hesitant = top2[:, 1] >= 0.1  # the runner-up has one chance in ten or more
    assert int(hesitant.sum()) >= 3, "the fixture needs images where the model hesitates"
    assert bool((sets[hesitant].sum(1) >= 2).all())
    assert bool((sets[hesitant].gather(1, probs[hesitant].topk(2, 1).indices)).all()), "both top classes in the set"
    assert float((sets.sum(1) >= 2).float().mean()) <= 0.1, "two-class sets where the model hesitates, not everywhere"


def test_aps_and_raps_scores_follow_their_definitions() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert torch.allclose(aps_scores(probs), torch.tensor([[0.6, 0.9, 1.0], [0.8, 1.0, 0.6]]))
    # RAPS: + lambda per rank beyond k_reg (ties keep the sort's order: class 0 ranks before class 1 in row 2)
    assert torch.allclose(raps_scores(probs, lam=0.1, k_reg=1), torch.tensor([[0.6, 1.0, 1.2], [0.9, 1.2, 0.6]]))


def test_model_file_calibrated_with_marginal_lac_still_predicts_as_before(
    default_model: Path, validation: dict, tmp_path: Path
) -> None:
    """A file written before the class-conditional sets (``"method": "LAC"``) loads as marginal LAC and predicts the
    same sets as then (empty ones included); a file calibrated now loads as class-conditional."""
    model, meta = load_model(default_model)
    tensors = load_extra(default_model)
    new = Calibration.from_model(meta, tensors)
    assert isinstance(new.conformal, MondrianConformal), "the shipped model carries class-conditional sets"
    probs = torch.softmax(validation["logits"] / new.temperature, 1)
    old_sets = SplitConformal.fit(probs, validation["labels"], 0.95)
    old_meta, old_tensors = old_sets.metadata()
    assert old_meta["method"] == "LAC"
    old = tmp_path / "old.safetensors"
    save_model(
        old, model, {**meta, "calibration": {**meta["calibration"], "conformal": old_meta}}, {**tensors, **old_tensors}
    )
    predictor = Predictor(old)
    assert isinstance(predictor.calibration.conformal, SplitConformal)
    sets = predictor.calibration.apply(validation["logits"], validation["features"]).sets
    assert torch.equal(sets, (1.0 - probs) <= old_meta["qhat"])  # the rule of the files written then
    files = [f for cls in meta["classes"] for f in list_files(config.SAMPLE_DATA_DIR / cls)[:2]]
    for answer, p in zip(
        predictor.predict_files(files, progress=False),
        predictor.probabilities(torch.stack([predictor.to_tensor(f) for f in files])),
    ):
        assert answer.prediction_set == [c for c, q in zip(meta["classes"], p) if 1 - q <= old_meta["qhat"]]
    restored = conformal_from_metadata(json.loads(json.dumps(new.conformal.metadata()[0])), tensors)
    assert torch.equal(restored.sets(probs), new.conformal.sets(probs))


def test_class_weighted_marginal_sets_cover_the_class_mix_they_are_weighted_for(validation: dict) -> None:
    """Marginal sets for images to come in another class mix (``wbc adapt`` with a lab's prevalence), on the shipped
    model's real calibration scores at an input temperature that makes it unsure: with equal weights the weighted
    quantile is the plain one; with class weights it is the smallest score whose weight, with the new image's largest
    one, reaches the coverage, so the calibration images cover that class mix, which the plain quantile does not.
    The weights survive the model file."""
    logits, labels = validation["logits"], validation["labels"]
    probs = torch.softmax(logits / 3.0, 1)  # blurred: a model as unsure as on another lab's cells
    plain = SplitConformal.fit(probs, labels, 0.9)
    equal = SplitConformal.fit(probs, labels, 0.9, torch.ones(5))
    for coverage in (0.5, 0.8, 0.9, 0.95):
        assert equal.qhat(coverage) == pytest.approx(plain.qhat(coverage))

    scores = 1 - probs[torch.arange(len(labels)), labels]

    def class_coverage(qhat: float) -> torch.Tensor:
        return torch.stack([(scores[labels == k] <= qhat).float().mean() for k in range(5)])

    # a lab where the classes this model finds hardest (least covered by the plain sets) are the most common
    mix = torch.empty(5)
    mix[class_coverage(plain.qhat()).argsort()] = torch.tensor([0.65, 0.25, 0.06, 0.03, 0.01])
    share = torch.bincount(labels, minlength=5).float() / len(labels)
    weighted = SplitConformal.fit(probs, labels, 0.9, mix / share)
    w, q = weighted.weights.double(), weighted.qhat()
    total = w.sum() + w.max()
    assert float(w[weighted.scores <= q].sum() / total) >= 0.9 > float(w[weighted.scores < q].sum() / total)

    def mix_coverage(qhat: float) -> float:
        return float(mix @ class_coverage(qhat))

    assert mix_coverage(weighted.qhat()) >= 0.9 > mix_coverage(plain.qhat())

    meta, tensors = weighted.metadata()
    restored = conformal_from_metadata(json.loads(json.dumps(meta)), tensors)
    assert meta["weighted"] and torch.equal(restored.sets(probs), weighted.sets(probs))


@pytest.mark.parametrize("per_class, weighted", [(5, False), (40, True)])
def test_adapted_sets_weigh_the_lab_prevalence_where_the_cells_allow(
    validation: dict, per_class: int, weighted: bool
) -> None:
    """``wbc adapt``'s sets at a lab's class prevalence (``sets_at_lab_prevalence``), on real calibration logits as a
    lab's labelled cells: 40 per class get marginal sets weighted by class that cover the lab's mix on those cells;
    5 per class are too few for a weighted 95 % quantile (every set would hold every class), so the sets fitted on
    the cells as they are stay."""
    logits, labels = validation["logits"], validation["labels"]
    picked = torch.cat([(labels == k).nonzero().flatten()[:per_class] for k in range(5)])
    cells, cell_labels = logits[picked], labels[picked]
    temperature = fit_temperature(cells, cell_labels)
    plain = SplitConformal.fit(torch.softmax(cells / temperature, 1), cell_labels, 0.95)
    fitted = Adapted(None, Calibration(temperature, plain, None), {}, list(range(5)), 1.0, cells, cell_labels)
    prevalence = torch.tensor([0.01, 0.25, 0.07, 0.06, 0.61])
    sets = sets_at_lab_prevalence(fitted, prevalence, 0.95)
    if not weighted:
        assert sets is plain
        return
    assert isinstance(sets, SplitConformal) and sets.weights is not None and sets.qhat() < 1.0
    probs = torch.softmax(cells / temperature + torch.log(5 * prevalence), 1)  # as the shifted head gives them
    covered = sets.sets(probs)[torch.arange(len(cell_labels)), cell_labels].float()
    assert float(sum(prevalence[k] * covered[cell_labels == k].mean() for k in range(5))) >= 0.95
