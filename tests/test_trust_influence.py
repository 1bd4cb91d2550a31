"""Influence on real PBC images: flipped labels rank first, the seed's score is the closed form it claims to be,
helpful training images share the query's class, and `wbc trust influence` writes its files."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pbc_files
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.data import Record, load_images
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import load_model
from wbc_trust.trust.influence import (
    InfluenceIndex,
    build_index,
    extract_features,
    influential_training_images,
    last_linear,
)

PER_CLASS = 24
N_FLIPPED = 12


def _records(per_class: int, offset: int = 0) -> list[Record]:
    return [Record(p, label) for label, cls in enumerate(config.CLASSES) for p in pbc_files(cls, per_class, offset)]


@pytest.fixture(scope="module")
def flipped(default_model: Path) -> dict:
    """120 real PBC images (24 per class) with 12 labels flipped to another class (seeded), indexed with the
    default model's features."""
    model, meta = load_model(default_model)
    loaded = load_images(_records(PER_CLASS), meta["img_size"])
    rng = np.random.default_rng(0)
    which = rng.choice(len(loaded.records), N_FLIPPED, replace=False)
    labels = loaded.labels.clone()
    labels[which] = (labels[which] + torch.as_tensor(rng.integers(1, len(config.CLASSES), N_FLIPPED))) % 5
    index = build_index(
        model, loaded.images, labels, [str(r.path) for r in loaded.records], meta["classes"], meta["img_size"]
    )
    queries = load_images(_records(2, offset=PER_CLASS), meta["img_size"])
    return {
        "model": model,
        "index": index,
        "flipped": which,
        "true": loaded.labels,
        "queries": queries,
        "query_features": extract_features(model, queries.images),
    }


@pytest.mark.parametrize("method", ["tracin", "grad_dot"])
def test_flipped_labels_rank_above_clean_ones(flipped: dict, method: str) -> None:
    scores = flipped["index"].self_influence(method).numpy()
    ranks = np.argsort(np.argsort(-scores))  # 0 = most suspicious
    is_flipped = np.zeros(len(scores), dtype=bool)
    is_flipped[flipped["flipped"]] = True
    assert ranks[is_flipped].mean() < ranks[~is_flipped].mean() / 3
    assert is_flipped[np.argsort(-scores)[:N_FLIPPED]].sum() >= 9  # random order finds about 1


def test_seed_score_is_the_closed_form_last_layer_gradient_product(flipped: dict) -> None:
    """−g_train·g_test with g = (softmax − onehot) ⊗ features, computed here by hand for every pair."""
    index, features = flipped["index"], flipped["query_features"][:4]
    labels = flipped["queries"].labels[:4]
    head = last_linear(flipped["model"]).float()
    with torch.no_grad():
        residual_train = head(index.features).softmax(1) - torch.nn.functional.one_hot(index.labels, 5)
        residual_test = head(features).softmax(1) - torch.nn.functional.one_hot(labels, 5)
    by_hand = -(residual_test @ residual_train.T) * (features @ index.features.T)
    found = index.top_k(features, labels, 5, method="grad_dot")
    for kind, pick in (("harmful", torch.topk(by_hand, 5)), ("helpful", torch.topk(-by_hand, 5))):
        idx, scores = found[kind]
        assert torch.equal(idx, pick.indices)
        assert torch.allclose(scores, by_hand.gather(1, pick.indices), rtol=1e-3, atol=1e-4)
    self_by_hand = (residual_train**2).sum(1) * (index.features**2).sum(1)
    assert torch.allclose(index.self_influence("grad_dot"), self_by_hand, rtol=1e-3)


@pytest.mark.parametrize("method", ["tracin", "grad_dot"])
def test_cached_query_scores_equal_captum_tracincpfast(flipped: dict, method: str) -> None:
    index, features = flipped["index"], flipped["query_features"][:3]
    labels = flipped["queries"].labels[:3]
    reference = index.tracer(method).influence((features, labels)).detach()
    assert torch.allclose(index.scores(features, labels, method), reference, rtol=1e-3, atol=1e-6)


def test_helpful_images_share_the_query_class_and_harmful_ones_are_mostly_flipped(flipped: dict) -> None:
    index, queries = flipped["index"], flipped["queries"]
    found = index.top_k(flipped["query_features"], queries.labels, 5)
    helpful_labels = index.labels[found["helpful"][0]]
    assert (helpful_labels == queries.labels[:, None]).float().mean() >= 0.9
    assert (found["helpful"][1] < 0).all() and (found["harmful"][1][:, 0] > 0).all()
    harmful = found["harmful"][0][:, :2].flatten().numpy()
    assert np.isin(harmful, flipped["flipped"]).mean() >= 0.5  # 10 % of the training images are flipped


def test_index_round_trip_and_refuses_another_model(flipped: dict, tmp_path: Path) -> None:
    index = flipped["index"]
    index.save(tmp_path / "index.safetensors")
    again = InfluenceIndex.load(tmp_path / "index.safetensors")
    assert again.paths == index.paths and len(again.checkpoints) == config.INFLUENCE_REPLAY_EPOCHS
    assert torch.equal(again.self_influence(), index.self_influence())
    image = flipped["queries"].images[0]
    answer = influential_training_images(flipped["model"], image, again, k=3)
    assert answer["prediction"] == config.CLASSES[int(flipped["queries"].labels[0])]
    assert len(answer["helpful"]) == len(answer["harmful"]) == 3
    assert all(h["label"] == answer["prediction"] for h in answer["helpful"])
    other = copy.deepcopy(flipped["model"])
    with torch.no_grad():
        last_linear(other).weight.add_(0.01)
    with pytest.raises(WbcError, match="another model"):
        influential_training_images(other, image, again)


def test_wbc_trust_influence_writes_its_files(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "influence"
    done = CliRunner().invoke(
        app,
        [
            "trust",
            "influence",
            "--train-data",
            str(small_tree),
            "--data",
            str(small_tree),
            "--out",
            str(out),
            "--max-train",
            "60",
            "--max-test",
            "6",
        ],
    )
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader((out / "train_influence.csv").open()))
    assert list(rows[0])[:3] == ["path", "label", "score"] and len(rows) == 60
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r["label"] for r in rows} == set(config.CLASSES)  # the subsample keeps every class
    images = json.loads((out / "test_influence.json").read_text())["images"]
    assert len(images) == 6
    assert all(len(i["helpful"]) == len(i["harmful"]) == config.INFLUENCE_TOP_K for i in images)
    for name in ("influence_curve.png", "influence_harmful.png"):
        assert (out / name).stat().st_size > 10_000
    assert set(InfluenceIndex.load(out / "influence_index.safetensors").paths) == {r["path"] for r in rows}


def test_a_trained_model_file_carries_its_real_checkpoints_and_influence_uses_them(
    tiny_run: Path, tmp_path: Path
) -> None:
    """TracInCP explains the model's own training: `wbc train` keeps the last layer of every epoch up to the saved
    one in the model file, and the influence index sums over those, not over a replay; its training images are the
    training split only (no validation, calibration or test image)."""
    from wbc_trust.modelfile import head_checkpoints, load_model

    model_path = tiny_run / "model.safetensors"
    heads = head_checkpoints(model_path)
    history = json.loads((tiny_run / "history.json").read_text())
    assert len(heads) == len(history) >= 1
    model, _ = load_model(model_path)
    final = model.last_linear().state_dict()
    assert all(torch.equal(heads[-1][k], final[k].float()) for k in ("weight", "bias"))  # the saved epoch's layer

    split = json.loads((tiny_run / "split.json").read_text())
    data_root = Path(split["data_root"])
    out = tmp_path / "influence"
    done = CliRunner().invoke(
        app,
        [
            "trust",
            "influence",
            "--model",
            str(model_path),
            "--train-data",
            str(data_root),
            "--data",
            str(data_root),
            "--out",
            str(out),
            "--max-test",
            "4",
        ],
    )
    assert done.exit_code == 0, done.output
    index = InfluenceIndex.load(out / "influence_index.safetensors")
    assert len(index.checkpoints) == len(heads)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(index.checkpoints, heads) for k in ("weight", "bias"))
    assert sorted(str(Path(p).relative_to(data_root)) for p in index.paths) == sorted(split["train"])
