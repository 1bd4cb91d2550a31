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


MaxImagesOption = Annotated[Optional[int], typer.Option(help="use a stratified subset of at most this many images")]
TestDataOption = Annotated[Path, typer.Option(help="labelled images (the model's held-out test split if it is its own "
                                                   "training folder)")]
ModelFileOption = Annotated[Optional[Path], typer.Option("--model", "-m", help="model file; default: the shipped model")]


@trust_app.command("robustness")
def robustness(
    data: TestDataOption,
    out: Annotated[Path, typer.Option(help="folder for robustness.json, robustness_accuracy.png, examples")],
    model: Annotated[Optional[list[Path]], typer.Option("--model", "-m", help="model file; repeat to compare several; "
                                                                              "default: the shipped model")] = None,
    max_images: MaxImagesOption = None,
) -> None:
    """Accuracy under noise, blur, brightness, contrast, JPEG and stain shift (severities 1-5) and FGSM/PGD attacks."""
    from rich.table import Table

    from wbc_trust.console import print_table
    from wbc_trust.trust.robustness import run_robustness

    summary = run_robustness(list(model or [None]), data, out, max_images=max_images)
    rows = summary["comparison"]
    table = Table(title="accuracy: clean, mean over corruptions and severities, under attack (ε in grey levels)")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(f"{v:.1%}" if isinstance(v, float) else str(v) for v in row.values()))
    print_table(table)
    typer.echo(f"written to {out}/: robustness.json, robustness_accuracy.png, robustness_examples.png")


@trust_app.command("gradcam")
def gradcam(
    data: TestDataOption,
    out: Annotated[Path, typer.Option(help="folder for gradcam_correct.png, gradcam_wrong.png, gradcam.json")],
    model: ModelFileOption = None,
    max_images: MaxImagesOption = None,
) -> None:
    """Grad-CAM / Grad-CAM++ galleries of right and wrong answers, ROAD faithfulness, randomisation sanity check."""
    from wbc_trust.trust.gradcam import run_gradcam

    typer.echo(json.dumps(run_gradcam(model, data, out, max_images=max_images), indent=2))
    typer.echo(f"written to {out}/: gradcam_correct.png, gradcam_wrong.png, gradcam.json")


@trust_app.command("fisher")
def fisher(
    data: TestDataOption,
    out: Annotated[Path, typer.Option(help="folder for fisher.csv, fisher.json, fisher_scores.png, fisher_top.png")],
    model: ModelFileOption = None,
    max_images: MaxImagesOption = None,
) -> None:
    """Per-image sensitivity: the seed's ‖softmax − onehot‖² (squared EL2N) and the per-sample gradient norm²."""
    from wbc_trust.trust.fisher import run_fisher

    typer.echo(json.dumps(run_fisher(model, data, out, max_images=max_images), indent=2))
    typer.echo(f"written to {out}/: fisher.csv (highest gradient norm first), fisher.json, fisher_scores.png, "
               "fisher_top.png")


@trust_app.command("report")
def report(
    data: TestDataOption,
    out: Annotated[Path, typer.Option(help="folder for report.html and every method's figures and files")],
    model: ModelFileOption = None,
    train_data: Annotated[Optional[Path], typer.Option(help="the model's training folder: adds the data audit and "
                                                            "influence")] = None,
    max_images: MaxImagesOption = None,
) -> None:
    """Run every trust method and write one self-contained OUT/report.html (figures, tables, model metadata)."""
    from wbc_trust.trust.report import run_report

    typer.echo(f"report: {run_report(model, data, train_data, out, max_images=max_images)}")
