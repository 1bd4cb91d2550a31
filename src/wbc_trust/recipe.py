"""Recipes: every setting of a training run, their defaults (``wbc train`` with no options) and YAML files of them
(``wbc train --config FILE``; each run folder's ``args.yaml``, as timm writes it). The shipped default model is
``recipes/travel.yaml`` over these defaults.

Kept apart from ``train.py`` so that reading, checking and writing a recipe needs neither torch nor a model.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from wbc_trust import config
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write_text

#: The recipes that ship with the package (``wbc train --config NAME``); any other YAML file is given by its path.
RECIPE_DIR: Path = config.PACKAGE_DIR / "recipes"


@dataclass
class TrainConfig:
    """Everything ``wbc train`` accepts; stored in the model's metadata and, as the run's recipe, in ``args.yaml``.

    The defaults live in ``config.py``; ``recipes/default.yaml`` spells them out.
    """

    data: Path
    out: Path
    arch: str = config.DEFAULT_ARCH
    epochs: int = config.EPOCHS
    batch_size: int = config.BATCH_SIZE  # the whole step's batch: under torchrun each process takes an equal share
    lr: float = config.LEARNING_RATE
    img_size: int | None = None  # None → the architecture's default
    seed: int = config.SEED
    pretrained: str | None = None  # None → the architecture's default (config.DEFAULT_PRETRAINED), else "none"
    freeze_backbone: bool = False
    frozen_stages: int | None = None  # None → config.DEFAULT_FROZEN_STAGES when starting from pretrained weights
    resume: bool = False
    patience: int = config.EARLY_STOP_PATIENCE
    label_smoothing: float = config.LABEL_SMOOTHING
    mixup: float = config.MIXUP_ALPHA  # mixup's α (torchvision's v2.MixUp); 0 = off
    max_images: int | None = None  # cap per split for quick runs and tests
    bf16: bool | None = None  # None → autocast where it pays: CPUs with native bf16, every CUDA GPU (bf16 or fp16)
    test_views: tuple[str, ...] = config.TEST_VIEWS  # what the saved model's predictions average over
    augment: str = "seed"  # or "cross-lab" (config.AUGMENTS)
    crop: str = config.CROP  # "frame" (the whole image resized) or "cell" (the cell finder's view, crop.py)
    device: str = "auto"  # auto | cpu | cuda (auto: CUDA when PyTorch sees a GPU)


#: How a run is started, not what it trains: never read from or written to a recipe.
_NOT_RECIPE = ("resume",)


def shipped_recipes() -> list[str]:
    """Names of the recipes in the package (``recipes/*.yaml``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(source: str | Path) -> Path:
    """``--config``: a shipped recipe's name (``cnn``) or the path of a YAML file (``runs/x/args.yaml``)."""
    path = Path(source).expanduser()
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        path = RECIPE_DIR / f"{path.name}.yaml"
    if not path.is_file():
        raise WbcError(
            f"--config {source}: no such recipe file; pass a YAML file or one of the shipped recipes: "
            f"{', '.join(shipped_recipes())}"
        )
    return path


def load_recipe(source: str | Path) -> dict[str, object]:
    """The settings of a recipe file, each checked against the type of its ``TrainConfig`` field."""
    path = recipe_path(source)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise WbcError(
            f"--config {path} is not a readable YAML file ({exc.__class__.__name__}): fix or replace it"
        ) from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WbcError(
            f"--config {path} must map setting names to values (e.g. `epochs: 8`), not a {type(raw).__name__}"
        )
    return {str(key): _checked(path, str(key), value) for key, value in raw.items()}


def _checked(path: Path, key: str, value: object) -> object:
    """``value`` as the type of the TrainConfig field ``key``. YAML reads ``1e-3`` as a string (1.1 wants ``1.0e-3``),
    so numbers in strings are accepted for float fields; everything else must already have the field's type."""
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints or key in _NOT_RECIPE:
        allowed = ", ".join(f.name for f in fields(TrainConfig) if f.name not in _NOT_RECIPE)
        raise WbcError(f"--config {path}: unknown setting {key!r}; a recipe sets any of: {allowed}")
    hint = hints[key]
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in members
    kind = next(m for m in members if m is not type(None))
    kind = typing.get_origin(kind) or kind  # tuple[str, ...] → tuple
    if value is None and optional:
        return None
    if kind is tuple and isinstance(value, (list, str)):
        items = value.split(",") if isinstance(value, str) else value
        if all(isinstance(v, str) for v in items):
            return tuple(v.strip() for v in items if v.strip())
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    elif kind is Path and isinstance(value, str):
        return Path(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise WbcError(f"--config {path}: {key}: expected {kind.__name__}{' or null' if optional else ''}, got {value!r}")


def make_config(recipe: str | Path | None = None, **settings: object) -> TrainConfig:
    """A TrainConfig from the defaults, then the recipe file's settings, then ``settings`` (options given explicitly
    win over the file, as in timm's ``--config``). ``data`` and ``out`` may come from either."""
    merged = {**(load_recipe(recipe) if recipe is not None else {}), **settings}
    for required in ("data", "out"):
        if merged.get(required) is None:
            raise WbcError(f"--{required} is required (or set `{required}:` in the --config file)")
    return TrainConfig(**merged)  # type: ignore[arg-type]


def plain(settings: dict) -> dict:
    """JSON/YAML-ready values: paths as strings, tuples as lists."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def save_recipe(cfg: TrainConfig, path: Path) -> None:
    """Write the effective recipe (every setting, the architecture's defaults filled in) as ``args.yaml``."""
    settings = {k: v for k, v in plain(asdict(cfg)).items() if k not in _NOT_RECIPE}
    atomic_write_text(
        path,
        "# the effective recipe of this run; `wbc train --config THIS_FILE` repeats it\n"
        + yaml.safe_dump(settings, sort_keys=False),
    )
