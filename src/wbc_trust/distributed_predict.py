"""Batch prediction and counting on a Ray cluster (``wbc predict|count --ray ADDRESS|local``): the same ``Predictor``
(and ``CellFinder``), run by Ray Data.

Only file *paths* travel: the driver builds a Ray dataset of ``(index, path)`` rows, an actor pool maps it batch by
batch (each actor loads the model once and reads its files itself, so no process ever holds all images), and the
driver puts the returned rows back in input order by their index. Unreadable files get their flagged rows inside
``Predictor.predict_files``, exactly as in a local run, so the CSV is the same row for row.

The Ray plumbing (cluster, actor sizing, batching, ordering) lives in ``map_files`` and knows nothing about
prediction: each per-file job subclasses ``FileBatchWorker`` with its own ``rows`` (``PredictWorker``, ``CountWorker``).
``map_files`` yields the rows in input order as they come, so that ``wbc count --ray`` writes each field's files
(``count.CountWriter``) and lets it go instead of holding all of them. Ray is an optional extra; only this module
imports it, and only when it is used.

On another cluster (an ADDRESS), every node needs wbc-trust installed and must see the model file and the images
under the same paths as the driver (a shared filesystem): the workers open them, not the driver.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.count import CountedImage, CountSummary, CountWriter, count_file
from wbc_trust.crop import CropPolicy
from wbc_trust.data import find_unlabelled
from wbc_trust.errors import WbcError
from wbc_trust.finder import CellFinder
from wbc_trust.modelfile import read_metadata
from wbc_trust.predict import Prediction, Predictor

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'wbc-trust[ray]'"


def import_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a WbcError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate extra of ray: check it is there too)
    except ImportError as exc:
        raise WbcError(f"--ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_cluster(address: str, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address``, or start one on this machine for ``"local"`` (``num_cpus``: None lets
    Ray count the cores, container limits included); disconnect (and stop the local cluster) at the end.

    A Ray session that this process already opened (a notebook, a test) is used as it is and left open.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        # address="local" starts a new cluster even where RAY_ADDRESS points at another one
        ray.init(address=address, num_cpus=num_cpus if address == "local" else None, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise WbcError(
            f"could not connect to the Ray cluster at {address!r} ({str(exc).splitlines()[0]}): start one "
            "with `ray start --head` and pass the address it prints (host:port), or use --ray local"
        ) from None
    log.info("Ray cluster %s: %s", address, ray.cluster_resources())
    try:
        yield ray
    finally:
        ray.shutdown()


def cpus_per_actor(node_cpus: Sequence[float], actors: int) -> int:
    """The largest whole number of CPUs each of ``actors`` actors can get so that all of them fit on the nodes.

    Each actor then runs torch with that many threads (Ray sets OMP_NUM_THREADS from it): one CPU per actor would leave
    most of a big node idle, and more than a node has would never be scheduled.
    """
    fits = [c for c in range(1, int(max(node_cpus, default=0)) + 1) if sum(int(n) // c for n in node_cpus) >= actors]
    if not fits:
        raise WbcError(
            f"the Ray cluster has {sum(node_cpus):g} CPUs, too few for {actors} actors of at least one CPU "
            f"each: use --ray-actors {max(1, int(sum(node_cpus)))} or fewer, or add nodes"
        )
    return max(fits)


class FileBatchWorker:
    """What Ray Data runs in each actor of the pool: built once per actor (load the model there, in ``__init__``), then
    called with one batch of ``(index, path)`` rows at a time.

    Subclasses implement ``rows``: one JSON-able dict per path, in the batch's order. The rows travel as JSON text
    because Ray Data stores batches as Arrow tables, which want one type per column, while these dicts hold Nones,
    nested dicts and lists; JSON gives floats back bit for bit, so the driver rebuilds exactly what the worker made.
    """

    def rows(self, paths: list[Path]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = self.rows([Path(str(p)) for p in batch["path"]])
        return {"index": batch["index"], "row": np.array([json.dumps(r) for r in rows], dtype=object)}


class PredictWorker(FileBatchWorker):
    """``Predictor.predict_files`` on a batch of paths, unreadable files flagged as in a local run."""

    def __init__(
        self, model_path: str | None, coverage: float | None, backend: str, batch_size: int, crop: CropPolicy
    ) -> None:
        self.predictor = Predictor(
            None if model_path is None else Path(model_path), batch_size=batch_size, coverage=coverage, backend=backend
        )
        self.crop = crop  # the whole batch's policy, measured once by the driver (Predictor.batch_policy)

    def rows(self, paths: list[Path]) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.predictor.predict_files(paths, progress=False, crop=self.crop)]


class CountWorker(FileBatchWorker):
    """``count.count_file`` on a batch of paths, the finder and the model loaded once per actor. The annotated picture
    and the gallery crops travel as base64 text in the JSON row (FileBatchWorker's transport): JPEG bytes, a few
    hundred kB per field, so the driver writes the files without re-reading the image."""

    def __init__(self, model_path: str | None) -> None:
        self.finder = CellFinder()
        self.predictor = Predictor(None if model_path is None else Path(model_path))

    def rows(self, paths: list[Path]) -> list[dict[str, Any]]:
        return [_counted_to_json(count_file(p, self.finder, self.predictor)) for p in paths]


def _counted_to_json(counted: CountedImage) -> dict[str, Any]:
    def text(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    row = asdict(counted)
    row["picture"] = None if counted.picture is None else text(counted.picture)
    row["thumbs"] = [text(t) for t in counted.thumbs]
    return row


def _counted_from_json(row: dict[str, Any]) -> CountedImage:
    picture = None if row["picture"] is None else base64.b64decode(row["picture"])
    return CountedImage(**{**row, "picture": picture, "thumbs": [base64.b64decode(t) for t in row["thumbs"]]})


def map_files(
    paths: Sequence[Path],
    worker: type[FileBatchWorker],
    worker_kwargs: dict[str, Any],
    address: str,
    actors: int,
    max_batch: int,
    num_cpus: int | None = None,
    progress: bool = True,
    desc: str = "files",
) -> Iterator[dict[str, Any]]:
    """Run ``worker`` over ``paths`` on a pool of ``actors`` Ray actors; its rows, yielded in the order of ``paths``
    as soon as the batches before them are back (a batch that comes early waits in a buffer till then).

    Batches hold at most ``max_batch`` files, fewer for small jobs so that every actor gets work. ``num_cpus`` only
    matters for ``address="local"``. Close the generator (``contextlib.closing``) when not iterating to the end: that
    stops the local cluster.
    """
    if actors < 1:
        raise WbcError(f"--ray-actors must be at least 1, not {actors}")
    if not paths:
        return
    batch_size = max(1, min(max_batch, math.ceil(len(paths) / actors)))
    with ray_cluster(address, num_cpus) as ray:
        ray.data.DataContext.get_current().enable_progress_bars = False  # one tqdm bar below instead of Ray's
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset start and end
        cpus = cpus_per_actor([n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]], actors)
        dataset = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(paths)])
        mapped = dataset.map_batches(
            worker,
            fn_constructor_kwargs=worker_kwargs,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
        )
        waiting: dict[int, dict[str, Any]] = {}
        next_index = 0
        try:
            with tqdm(total=len(paths), desc=desc, unit="file", leave=False, disable=not progress) as bar:
                for batch in mapped.iter_batches(batch_format="numpy", batch_size=None):
                    waiting.update((int(i), json.loads(r)) for i, r in zip(batch["index"], batch["row"]))
                    bar.update(len(batch["index"]))
                    while next_index in waiting:
                        yield waiting.pop(next_index)
                        next_index += 1
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, WbcError):
                raise cause from None
            raise WbcError(
                f"the Ray job failed ({str(cause).strip().splitlines()[-1]}): every node needs wbc-trust "
                "installed and must see the model file and the images under the driver's paths"
            ) from None


def predict_on_ray(
    paths: Sequence[Path],
    address: str,
    actors: int = config.RAY_ACTORS,
    model_path: Path | None = None,
    coverage: float | None = None,
    backend: str = "torch",
    batch_size: int | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    crop: CropPolicy | None = None,
) -> list[Prediction]:
    """``Predictor(model_path, batch_size, coverage, backend).predict_files(paths)``, computed by ``actors`` Ray actors
    (``batch_size``: None = the Predictor's own default). The batch's crop policy is measured here once, over all
    ``paths`` (``Predictor.batch_policy``; or given as ``crop``), so every actor cuts its share as a local run would."""
    batch_size = batch_size or inspect.signature(Predictor).parameters["batch_size"].default
    if crop is None:
        crop = Predictor(model_path, coverage=coverage, backend=backend).batch_policy(paths)
    kwargs = {
        "model_path": None if model_path is None else str(Path(model_path).resolve()),
        "coverage": coverage,
        "backend": backend,
        "batch_size": batch_size,
        "crop": crop,
    }
    # Workers open absolute paths (their working folder is not the driver's); the rows keep the paths as given.
    rows = map_files(  # a generator: zip below stops before its end, so close it (that stops the local cluster)
        [Path(p).absolute() for p in paths],
        PredictWorker,
        kwargs,
        address,
        actors,
        batch_size,
        num_cpus,
        progress,
        desc="predicting",
    )
    with closing(rows):
        return [Prediction(**{**row, "path": str(path)}) for path, row in zip(paths, rows)]


def count_on_ray(
    paths: Sequence[str | Path],
    out: Path,
    address: str,
    actors: int = config.RAY_ACTORS,
    model_path: Path | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
) -> CountSummary:
    """``count.run_count(paths, out, model_path)``, the images counted by ``actors`` Ray actors: the same output
    folder, written here by the same ``CountWriter`` as each field's part comes back, in input order."""
    start = time.perf_counter()
    import_ray()  # no Ray: say so before the output folder is made
    files = find_unlabelled(paths)
    # the classes (cells.csv's columns) from the metadata alone: the driver loads no model, the actors do
    classes = read_metadata(config.DEFAULT_MODEL_PATH if model_path is None else Path(model_path))["classes"]
    kwargs = {"model_path": None if model_path is None else str(Path(model_path).resolve())}
    rows = map_files(  # closed below, as in predict_on_ray
        [p.absolute() for p in files],
        CountWorker,
        kwargs,
        address,
        actors,
        config.COUNT_RAY_BATCH,
        num_cpus,
        progress,
        desc="counting",
    )
    with CountWriter(out, classes, files) as writer, closing(rows):
        for path, row in zip(files, rows):
            counted = _counted_from_json(row)
            for cell in counted.rows:  # the actors counted absolute paths; the rows keep the paths as given
                cell["image"] = str(path)
            writer.add(counted)
        return writer.finish(start)
