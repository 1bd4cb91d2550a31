"""`wbc trust ...` sub-commands: each parses its options and calls one ``run_*`` function of the trust modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

trust_app = typer.Typer(no_args_is_help=True, help="Audit how far to trust a model: robustness, Grad-CAM, Fisher "
                                                   "sensitivity, influence, calibration, one report.")


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
