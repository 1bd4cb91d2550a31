"""Every default of wbc-trust in one place, so that a reader changes a number once."""

from __future__ import annotations

from pathlib import Path

#: The five white-cell classes, in the order every model, CSV and metric uses.
CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

#: Image file endings the data layer looks at (case-insensitive).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
)

#: Decompression-bomb guard: images with more pixels than this are refused with a clear reason.
MAX_IMAGE_PIXELS: int = 64_000_000
#: Files larger than this are refused before they are read into memory (a 64-megapixel 16-bit RGB TIFF is ~400 MB).
MAX_IMAGE_FILE_BYTES: int = 512 * 2**20

#: ImageNet statistics; the normalisation lives inside every model (inputs are RGB in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Input size per architecture (pixels, square).
DEFAULT_IMG_SIZE: dict[str, int] = {"cnn": 128, "vgg16": 224, "resnet50": 224, "efficientnet_lite0": 128}

#: The seed's augmentation list: rotation ±20°, zoom 20 %, shifts 10 %, flips, brightness.
AUG_ROTATION_DEG: float = 20.0
AUG_ZOOM: float = 0.2
AUG_SHIFT: float = 0.1
AUG_BRIGHTNESS: float = 0.2

#: Split fractions (the rest is training) and the default seed.
VAL_FRACTION: float = 0.15
TEST_FRACTION: float = 0.15
SEED: int = 0

#: Training defaults.
EPOCHS: int = 8
BATCH_SIZE: int = 48
LEARNING_RATE: float = 1e-3
WEIGHT_DECAY: float = 1e-4
LABEL_SMOOTHING: float = 0.05
EARLY_STOP_PATIENCE: int = 4

PACKAGE_DIR: Path = Path(__file__).resolve().parent
#: The trained default model that ships inside the package (used when --model is not given).
DEFAULT_MODEL_PATH: Path = PACKAGE_DIR / "assets" / "default_model.safetensors"
#: About 40 real PBC images per class that the default model never trained on.
SAMPLE_DATA_DIR: Path = PACKAGE_DIR / "assets" / "sample"

PBC_CREDIT: str = (
    "Trained on the PBC dataset: Acevedo A. et al., 'A dataset of microscopic peripheral blood cell images "
    "for development of automatic recognition systems', Data in Brief 30 (2020) 105474, CC BY 4.0."
)

#: The web app (``wbc app`` / ``streamlit run app_streamlit.py``). Uploads larger than this many MB are refused
#: (the same number is server.maxUploadSize in .streamlit/config.toml), at most this many images are analysed per
#: batch, and originals are shown at most this many pixels wide.
APP_PORT: int = 8501
APP_MAX_UPLOAD_MB: int = 20
APP_MAX_FILES: int = 200
APP_DISPLAY_PX: int = 320
#: Streamlit options every launch of the app uses (``wbc app`` passes them as flags; .streamlit/config.toml mirrors
#: them for ``streamlit run``): no stack traces in the browser, no usage statistics, no file watcher.
APP_STREAMLIT_OPTIONS: dict[str, object] = {
    "server.maxUploadSize": APP_MAX_UPLOAD_MB,
    "server.headless": True,
    "server.fileWatcherType": "none",
    "client.showErrorDetails": "none",
    "client.toolbarMode": "viewer",
    "browser.gatherUsageStats": False,
}
#: Audit: perceptual-hash size (hash_size² bits) and the largest Hamming distance reported as a near-duplicate.
AUDIT_PHASH_SIZE: int = 8
AUDIT_PHASH_MAX_DISTANCE: int = 4
