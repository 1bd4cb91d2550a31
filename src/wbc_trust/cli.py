"""The ``wbc`` command: each sub-command parses its options, then calls one function of the modules beside it.

Problems with the user's input (``WbcError``) print one line naming the problem and the fix, and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wbc_trust import config
from wbc_trust.cli_options import ModelOption
from wbc_trust.console import make_console, print_table
from wbc_trust.errors import WbcError
from wbc_trust.recipe import TrainConfig, shipped_recipes
from wbc_trust.trust.cli import trust_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Classify white blood cells and tell how far to trust each answer.",
)
app.add_typer(trust_app, name="trust")
console = make_console()  # not a terminal: lines and table rows are written whole


_TRAIN = {f.name: f.default for f in fields(TrainConfig)}  # the defaults shown by --help are TrainConfig's


def _per_arch(defaults: dict[str, object], otherwise: object) -> str:
    """A per-architecture default for the help, e.g. "imagenet for efficientnet_lite0, else none"."""
    return ", ".join(f"{value} for {arch}" for arch, value in defaults.items()) + f", else {otherwise}"


def _log_to_stdout() -> None:
    """The training log (library code logs, the CLI shows it): one line per message on stdout."""
    logger = logging.getLogger("wbc_trust")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


RayOption = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        help="run on Ray Data: 'local' starts a Ray cluster on this "
        "machine, an ADDRESS (host:port) joins one whose nodes see the same "
        "files; needs pip install 'wbc-trust\\[ray]'",
    ),
]
RayActorsOption = Annotated[int, typer.Option(help="with --ray: actors that each load the model once")]


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="image folder: class folders, Kaggle Train/Test-A/Test-B, or "
            "PBC (required unless the --config file names it)"
        ),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="run folder for model.safetensors, history, curves, split, args.yaml")
    ] = None,
    recipe: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            help="recipe: a YAML file of these settings (e.g. a "
            f"run's args.yaml) or a shipped one: {', '.join(shipped_recipes())}"
            "; options given here override it",
        ),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            help="architecture; `--arch list` lists the registered ones (models.REGISTRY: "
            "reading it imports torch, so --help does not)"
        ),
    ] = _TRAIN["arch"],
    epochs: int = _TRAIN["epochs"],
    batch_size: Annotated[
        int, typer.Option(help="one step's batch (under torchrun shared among the processes)")
    ] = _TRAIN["batch_size"],
    lr: float = _TRAIN["lr"],
    img_size: Annotated[Optional[int], typer.Option(help="input size in pixels; default per architecture")] = None,
    seed: int = _TRAIN["seed"],
    pretrained: Annotated[
        Optional[str],
        typer.Option(
            help="imagenet | PATH to a weights file | none; default: " + _per_arch(config.DEFAULT_PRETRAINED, "none")
        ),
    ] = None,
    freeze_backbone: Annotated[bool, typer.Option(help="train only the classifier head (the seed's recipe)")] = _TRAIN[
        "freeze_backbone"
    ],
    frozen_stages: Annotated[
        Optional[int],
        typer.Option(
            help="keep the first N backbone stages at their pretrained "
            "weights; default with pretrained weights: " + _per_arch(config.DEFAULT_FROZEN_STAGES, 0)
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from OUT/checkpoint.pt")] = False,
    max_images: Annotated[
        Optional[int], typer.Option(help="use at most this many images per split (quick runs)")
    ] = None,
    test_views: Annotated[
        str,
        typer.Option(
            help="comma-separated flips whose logits predictions average: "
            "identity, hflip, vflip (identity alone = no test-time flips)"
        ),
    ] = ",".join(_TRAIN["test_views"]),
    augment: Annotated[
        str,
        typer.Option(
            help="seed (the seed's augmentation) | cross-lab (zoom to 3x, blur, colour "
            "jitter: for images from other labs)"
        ),
    ] = _TRAIN["augment"],
    crop: Annotated[
        str,
        typer.Option(
            help="frame (the whole image resized) | cell (the cell finder's most central white cell, cut at one "
            "physical scale: the view other labs' images and smear fields need)"
        ),
    ] = _TRAIN["crop"],
    device: Annotated[str, typer.Option(help="auto (CUDA when there is a GPU) | cpu | cuda")] = _TRAIN["device"],
) -> None:
    """Train a model; the best-on-validation weights go to OUT/model.safetensors.

    Defaults: recipes/default.yaml (whole frames); the shipped model is --config travel.
    Several processes: torchrun --nproc-per-node N wbc train ...
    """
    if arch == "list":
        from wbc_trust.models import arch_help

        console.print(arch_help(), highlight=False)
        return
    from wbc_trust.distributed import is_main_process
    from wbc_trust.recipe import make_config
    from wbc_trust.train import train as run_training

    values = {
        "data": data,
        "out": out,
        "arch": arch,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "img_size": img_size,
        "seed": seed,
        "pretrained": pretrained,
        "freeze_backbone": freeze_backbone,
        "frozen_stages": frozen_stages,
        "resume": resume,
        "max_images": max_images,
        "test_views": tuple(v.strip() for v in test_views.split(",") if v.strip()),
        "augment": augment,
        "crop": crop,
        "device": device,
    }
    given = {k: v for k, v in values.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
    _log_to_stdout()
    cfg = make_config(recipe, **given)
    result = run_training(cfg)
    if is_main_process():
        console.print(f"[bold green]done[/]: {json.dumps(result)}\nmodel: {Path(cfg.out) / 'model.safetensors'}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="labelled image folder")],
    out: Annotated[Path, typer.Option(help="folder for metrics.json, report, confusion matrix, predictions.csv")],
    model: ModelOption = None,
) -> None:
    """Evaluate a model on a labelled folder (its held-out test split if it is the model's own training data)."""
    from wbc_trust.evaluate import evaluate as run_evaluation

    metrics = run_evaluation(model, data, out)
    print_metrics(metrics)
    console.print(f"written to {out}/: metrics.json, classification_report.txt, confusion_matrix.png, predictions.csv")


def print_metrics(metrics: dict) -> None:
    """Per-class table, confusion matrix and headline numbers, as a person would want to read them."""
    table = Table(
        title=f"accuracy {metrics['accuracy']:.2%} · macro-F1 {metrics['macro_f1']:.2%} · "
        f"{metrics['n_images']} images, {metrics.get('n_unreadable', 0)} unreadable"
    )
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    print_table(table, console)
    matrix = Table(title="confusion matrix (rows = truth, columns = prediction)")
    matrix.add_column("")
    for name in metrics["classes"]:
        matrix.add_column(name[:4], justify="right")
    for name, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        matrix.add_row(name, *map(str, row))
    print_table(matrix, console)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files and/or folders (searched recursively)")],
    model: ModelOption = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="write one row per file to this CSV")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    coverage: Annotated[
        Optional[float],
        typer.Option(help="coverage of the prediction sets; default: the one the model was calibrated for (e.g. 0.99)"),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="torch | onnx (onnxruntime; the ONNX graph is exported once per model file and cached)")
    ] = "torch",
    ray: RayOption = None,
    ray_actors: RayActorsOption = config.RAY_ACTORS,
) -> None:
    """Classify images; unreadable files are flagged and skipped; exits non-zero only if nothing could be read."""
    from wbc_trust.data import find_unlabelled
    from wbc_trust.predict import Predictor

    predictor = Predictor(model, coverage=coverage, backend=backend)
    files = find_unlabelled(paths)
    crop = predictor.batch_policy(files)  # a folder from one microscope is read at its one magnification
    if crop.px_per_um != predictor.crop.px_per_um:
        Console(stderr=True).print(
            f"note: every image cut at {crop.px_per_um:.2f} px/µm, the median red-cell ruler of the batch "
            "(one microscope, one magnification)",
            highlight=False,
            soft_wrap=True,
        )
    if ray:
        from wbc_trust.distributed_predict import predict_on_ray

        results = predict_on_ray(files, ray, ray_actors, model, coverage, backend, crop=crop)
    else:
        results = predictor.predict_files(files, crop=crop)
    if csv:
        predictor.write_csv(results, csv)
    notice = predictor.batch_notice(results, crop)  # one message for a folder from another lab, not a flag per row
    if notice:
        Console(stderr=True).print(f"[bold yellow]note:[/] {escape(notice)}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        table = Table()
        for column in ("file", "class", "confidence", *[c[:4] for c in predictor.classes], "flag"):
            table.add_column(column, overflow="fold")
        for r in results:
            probs = (
                [f"{r.probabilities[c]:.3f}" for c in predictor.classes]
                if r.probabilities
                else [""] * len(predictor.classes)
            )
            table.add_row(
                Path(r.path).name, r.prediction or "—", f"{r.confidence:.1%}" if r.confidence else "", *probs, r.flag
            )
        print_table(table, console)
    if csv:
        console.print(f"wrote {len(results)} rows to {csv}")
    if all(r.prediction is None for r in results):
        raise WbcError("none of the files could be read as images (see the flag column)")


@app.command()
def calibrate(
    model: Annotated[Path, typer.Argument(help="model file (.safetensors) to calibrate; rewritten in place")],
    data: Annotated[
        Path,
        typer.Option(
            help="the model's training folder (its validation split is used) or another "
            "folder of labelled held-out images"
        ),
    ],
    coverage: Annotated[float, typer.Option(help="coverage of the prediction sets")] = config.CONFORMAL_COVERAGE,
) -> None:
    """Fit temperature scaling, conformal prediction sets and the out-of-distribution threshold; store them in MODEL."""
    from wbc_trust.calibration import calibrate as run_calibrate

    stored = run_calibrate(model, data, coverage)
    console.print(
        f"temperature {stored['temperature']:.3f} (validation ECE {stored['ece_before']:.2%} → "
        f"{stored['ece_after']:.2%}), {stored['conformal']['coverage']:.1%} class-conditional "
        f"{stored['conformal']['score'].upper()} sets, OOD threshold {stored['ood']['threshold']:.1f}; "
        f"fitted on the {stored['fitted_on']} ({stored['n_images']} images) → {model}"
    )


@app.command()
def adapt(
    out: Annotated[Path, typer.Option(help="run folder for the adapted model.safetensors")],
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="the lab's labelled cells: class folders (any layout `wbc "
            "train` reads); 5-20 cells per class are enough"
        ),
    ] = None,
    model: ModelOption = None,
    unlabelled: Annotated[
        Optional[Path],
        typer.Option(
            help="the lab's unlabelled images: alone, their colours are mapped to the training lab's; with --data, "
            "batch-norm statistics are re-estimated on them; either way the model takes the lab's class prevalence "
            "estimated on them"
        ),
    ] = None,
    coverage: Annotated[float, typer.Option(help="coverage of the lab's prediction sets")] = config.ADAPT_COVERAGE,
    px_per_um: Annotated[
        Optional[float],
        typer.Option(
            min=0.1,
            help="the lab's magnification in pixels per µm, if known (cell-view models); default: measured on the "
            "red cells of the lab's images",
        ),
    ] = None,
    fine_tune_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="steps of fine-tuning the late stages on the lab's cells before the head is re-fitted "
            "(about 1 s each on 2 cores); 0: the head alone, in seconds",
        ),
    ] = config.ADAPT_FINE_TUNE_STEPS,
) -> None:
    """Adapt a model to another lab's images from a few of its labelled cells, and recalibrate it on that lab."""
    from wbc_trust.adapt import adapt as run_adapt

    _log_to_stdout()
    done = run_adapt(
        out,
        data=data,
        model_path=model,
        unlabelled=unlabelled,
        coverage=coverage,
        px_per_um=px_per_um,
        fine_tune_steps=fine_tune_steps,
    )
    cells = ", ".join(f"{c} {n}" for c, n in done.get("cells_per_class", {}).items())
    console.print(
        f"[bold green]done[/] in {done['seconds']:.0f} s"
        + (f" ({cells} cells)" if cells else "")
        + f": {Path(out) / 'model.safetensors'}; predict with --model {Path(out) / 'model.safetensors'}"
    )


@app.command()
def demo(out: Annotated[Path, typer.Option(help="where to write the evaluation files")] = Path("demo_out")) -> None:
    """Evaluate the shipped default model on the shipped sample of PBC images it never trained on."""
    from wbc_trust.evaluate import evaluate as run_evaluation
    from wbc_trust.predict import Predictor

    metrics = run_evaluation(None, config.SAMPLE_DATA_DIR, out)
    print_metrics(metrics)
    predictor = Predictor()
    examples = [sorted((config.SAMPLE_DATA_DIR / c).iterdir())[0] for c in config.CLASSES]
    table = Table(title="a few predictions")
    for column in ("file", "true class", "predicted", "confidence"):
        table.add_column(column)
    for path, r in zip(examples, predictor.predict_files(examples, progress=False)):
        table.add_row(path.name, path.parent.name, r.prediction or "—", f"{r.confidence:.1%}" if r.confidence else "")
    print_table(table, console)
    console.print(f"confusion matrix and per-image predictions: {out}/confusion_matrix.png, {out}/predictions.csv")


@app.command()
def audit(
    data: Annotated[Path, typer.Argument(help="labelled image folder (class folders, Kaggle or PBC layout)")],
    out: Annotated[Path, typer.Option(help="folder for audit.json and class_balance.png")] = Path("audit_out"),
) -> None:
    """Check a labelled folder: unreadable files, duplicates (also under different labels), near-duplicates, balance."""
    from wbc_trust.trust.audit import format_summary, run_audit

    console.print(format_summary(run_audit(data, out)), highlight=False, soft_wrap=True)
    console.print(f"details: {out}/audit.json, {out}/class_balance.png")


@app.command("app")
def serve_app(
    model: ModelOption = None,
    port: int = config.APP_PORT,
    address: Annotated[str, typer.Option(help="network address to listen on; 0.0.0.0 = every interface")] = "localhost",
    models_dir: Annotated[Optional[Path], typer.Option(help="folder the app lists model files from")] = None,
    influence_index: Annotated[
        Optional[Path],
        typer.Option(help="`wbc trust influence`'s index for this model: shows the training images behind each answer"),
    ] = None,
    allow_server_paths: Annotated[
        bool,
        typer.Option(help="let visitors type server folders and index paths into the page (only on a trusted network)"),
    ] = False,
) -> None:
    """Open the web app: upload cell images, see class, trust and Grad-CAM; stop with Ctrl+C."""
    from wbc_trust.serve import launch

    launch(port, address, model, models_dir, influence_index, allow_server_paths)


@app.command("export-onnx")
def export_onnx(
    out: Annotated[Path, typer.Argument(help="the .onnx file to write")],
    model: ModelOption = None,
) -> None:
    """Export a model to ONNX for onnxruntime (`wbc predict --backend onnx --model OUT.onnx`)."""
    from wbc_trust.onnx_export import export_onnx as run_export

    meta = run_export(model, out)
    console.print(f"wrote {out}: {meta['arch']}, {meta['img_size']} px, classes {', '.join(meta['classes'])}")


@app.command()
def count(
    paths: Annotated[list[Path], typer.Argument(help="smear images (fields or crops) and/or folders (recursive)")],
    out: Annotated[Path, typer.Option(help="folder for cells.csv, images.csv, differential.csv/.json, report.html")],
    model: ModelOption = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = config.RAY_ACTORS,
) -> None:
    """Find every white cell, classify it, and count a differential with 95 % intervals (flagged cells apart)."""
    if ray:
        from wbc_trust.distributed_predict import count_on_ray

        summary = count_on_ray(paths, out, ray, ray_actors, model)
    else:
        from wbc_trust.count import run_count

        summary = run_count(paths, out, model)
    table = Table(
        title=f"{summary.n_cells} white cells in {summary.n_images} image(s), {summary.n_flagged} flagged "
        f"(counted apart), {summary.n_unreadable} unreadable image(s)"
    )
    for column in ("class", "count", "%", "95 % interval"):
        table.add_column(column)
    for r in summary.differential:
        ci = "" if r["ci_low"] is None or r["ci_low"] != r["ci_low"] else f"{r['ci_low']:.1f}–{r['ci_high']:.1f}"
        table.add_row(r["class"], str(r["count"]), "" if r["percent"] != r["percent"] else f"{r['percent']:.1f}", ci)
    print_table(table, console)
    console.print(f"wrote {out / 'report.html'} and the CSV/JSON files ({summary.seconds:.1f} s)")


def main() -> None:
    """Entry point of ``wbc``: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except WbcError as exc:
        # escape: a message's own brackets (pip install 'wbc-trust[ray]') are text, not Rich markup
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
