"""`wbc trust ...` sub-commands: each parses its options and calls one ``run_*`` function of the trust modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

trust_app = typer.Typer(no_args_is_help=True, help="Audit how far to trust a model: robustness, Grad-CAM, Fisher "
                                                   "sensitivity, influence, calibration, one report.")


@trust_app.command("influence")
def influence(
    train_data: Annotated[Path, typer.Option(help="the labelled folder the model was trained on")],
    data: Annotated[Path, typer.Option(help="labelled test images to explain (the model's held-out split if it is its "
                                            "own training folder)")],
    out: Annotated[Path, typer.Option(help="folder for train_influence.csv, test_influence.json, figures, index")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="model file; default: the shipped model")] = None,
    max_train: Annotated[Optional[int], typer.Option(help="use at most this many training images")] = None,
    max_test: Annotated[Optional[int], typer.Option(help="explain at most this many test images")] = None,
) -> None:
    """Rank training images by TracIn self-influence (likely mislabelled first) and list, per test image, the
    training images that helped and hurt it most."""
    from wbc_trust.trust.influence import run_influence

    summary = run_influence(model, train_data, data, out, max_train=max_train, max_test=max_test)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "most_harmful"}, indent=2))
    typer.echo(f"most likely mislabelled first: {out / 'train_influence.csv'}; per test image: "
               f"{out / 'test_influence.json'}; figures: influence_curve.png, influence_harmful.png")


@trust_app.command("calibration")
def calibration(
    data: Annotated[Path, typer.Option(help="labelled images (the model's held-out test split if it is its own "
                                            "training folder)")],
    out: Annotated[Path, typer.Option(help="folder for calibration.json and reliability_diagram.png")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="model file; default: the shipped model")] = None,
    ood_data: Annotated[Optional[Path], typer.Option(help="images that are not white cells: adds the OOD AUROC and "
                                                          "ood_scores.png")] = None,
) -> None:
    """ECE before/after temperature scaling, prediction-set coverage and size, out-of-distribution flags."""
    from wbc_trust.trust.calibration import run_calibration

    typer.echo(json.dumps(run_calibration(model, data, out, ood_data=ood_data), indent=2))
    typer.echo(f"written to {out}/: calibration.json, reliability_diagram.png" + (", ood_scores.png" if ood_data else ""))
