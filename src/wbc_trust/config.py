"""Every default of wbc-trust in one place, so that a reader changes a number once."""

from __future__ import annotations

from pathlib import Path

#: The five white-cell classes, in the order every model, CSV and metric uses.
CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

#: Image file endings the data layer looks at (case-insensitive).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})

#: Decompression-bomb guard: images with more pixels than this are refused with a clear reason.
MAX_IMAGE_PIXELS: int = 64_000_000
#: Files larger than this are refused before they are read into memory (a 64-megapixel 16-bit RGB TIFF is ~400 MB).
MAX_IMAGE_FILE_BYTES: int = 512 * 2**20
#: Images longer than this many times their width (or wider than tall) are refused: squeezed into the square model
#: input they no longer show cell shapes, and resizing such strips costs seconds and gigabytes.
MAX_IMAGE_ASPECT_RATIO: float = 20.0

#: ImageNet statistics; the normalisation lives inside every model (inputs are RGB in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def __getattr__(name: str) -> dict[str, int]:
    """``config.DEFAULT_IMG_SIZE``, the input size per architecture (pixels, square): each architecture's
    ``ArchSpec.img_size`` in ``models.REGISTRY``, so that an architecture is added in one place. Derived on access
    (models imports config, so config may import models only lazily, here)."""
    if name == "DEFAULT_IMG_SIZE":
        from wbc_trust.models import REGISTRY

        return {arch: spec.img_size for arch, spec in REGISTRY.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The seed's augmentation list: rotation ±20°, zoom 20 %, shifts 10 %, flips, brightness.
AUG_ROTATION_DEG: float = 20.0
AUG_ZOOM: float = 0.2
AUG_SHIFT: float = 0.1
AUG_BRIGHTNESS: float = 0.2
#: ``--augment cross-lab``: for images from other microscopes, stains and crops. Zoom up to 3× (other labs crop cells
#: tighter: BCCD's fill the frame), Gaussian blur on half the images, colour jitter for stain and camera. On the default
#: recipe it took BCCD accuracy from 8.8 % to 74.6 % and PBC's from 99.54 % to 99.01 % (docs/trust.md, cross-lab).
AUGMENTS: tuple[str, ...] = ("seed", "cross-lab", "travel")
CROSS_LAB_ZOOM: tuple[float, float] = (0.8, 3.0)
CROSS_LAB_BLUR_SIGMA: tuple[float, float] = (0.5, 3.0)
CROSS_LAB_BLUR_P: float = 0.5
CROSS_LAB_JITTER: dict[str, float] = {"brightness": 0.25, "contrast": 0.3, "saturation": 0.3, "hue": 0.04}
#: ``--augment travel`` (data.train_transform), for the cell view: zoom (the view's scale is set by magnification; this
#: covers the ruler's spread, p10-p90 9.1-11.8 px/µm on PBC), tight crops (the share of the view kept, as another
#: lab's tight crop padded to the window: a BCCD crop, about 1.15 cells of CROP_CELL_UM across, covers 0.46), HED
#: stain jitter, colour jitter, blur, JPEG.
TRAVEL_ZOOM: tuple[float, float] = (0.85, 1.15)
TRAVEL_TIGHT_SHARE: tuple[float, float] = (0.45, 0.75)
TRAVEL_TIGHT_P: float = 0.4
TRAVEL_STAIN: tuple[float, float] = (0.3, 0.02)  # HED jitter: scale ±, shift ± of each stain's density
TRAVEL_STAIN_P: float = 0.7
TRAVEL_JITTER: dict[str, float] = {"brightness": 0.25, "contrast": 0.3, "saturation": 0.3, "hue": 0.05}
TRAVEL_BLUR_SIGMA: tuple[float, float] = (0.5, 2.5)
TRAVEL_BLUR_P: float = 0.4
TRAVEL_JPEG_QUALITY: tuple[int, int] = (40, 95)
TRAVEL_JPEG_P: float = 0.3
#: Another lab's look (data.LabLookJitter): per CIELAB channel, the view's spread about its mean scaled by a factor in
#: the range and the mean shifted by up to ± the shift: Reinhard's colour transfer to a random lab's statistics.
#: The ranges cover the TXL-PBC labs' fields against PBC's (CIELAB statistics of each field at 160 px, lab means: L*
#: spread 0.48-0.91×, a* 0.96-1.10×, b* 0.77-0.85×; L* mean -17 to -5, a* -6 to +6, b* -9 to -5): BCCD's smears are
#: pale and bluer, Raabin's darker and redder (BCD's fields, partly BCCD's resized, read like BCCD's). So BCCD, the
#: cross-lab check, informed the ranges (docs/one-view.md, "Another lab's look"). ColorJitter's contrast (0.7-1.3×) never
#: halves the spread.
TRAVEL_LOOK_SCALE: tuple[tuple[float, float], ...] = ((0.45, 1.1), (0.85, 1.15), (0.75, 1.1))
TRAVEL_LOOK_SHIFT: tuple[float, ...] = (18.0, 7.0, 10.0)
TRAVEL_LOOK_P: float = 0.5

#: Split fractions (the rest is training) and the default seed.
VAL_FRACTION: float = 0.15
TEST_FRACTION: float = 0.15
SEED: int = 0
#: Share of the validation split set apart as the calibration split (temperature, prediction sets, OOD statistics),
#: so that the images that chose the best epoch are not also the ones that say how far to trust it. Carved out of the
#: validation split after the train/val/test split (stratified, duplicates together): train and test do not change.
#: 0.7 because class-conditional sets at 99 % need ceil(0.99/0.01) = 99 calibration images per class: PBC's validation
#: split has 155 basophils and 155 lymphocytes, so 0.7 leaves ~108 of each (0.5 left 77, and those classes then joined
#: every set); the remaining ~400 images still choose the checkpoint.
CALIB_FRACTION: float = 0.7

#: Training defaults: ``wbc train`` with no options, spelled out in ``recipes/default.yaml`` (the shipped default model
#: is ``recipes/travel.yaml`` over them). The architecture, and per architecture the starting weights when
#: ``--pretrained`` is not given (ImageNet only where they install offline with the package; VGG16/ResNet50 would
#: download theirs) and the backbone stages kept at those weights when ``--frozen-stages`` is not given (none when
#: training from scratch).
DEFAULT_ARCH: str = "efficientnet_lite0"
DEFAULT_PRETRAINED: dict[str, str] = {f"efficientnet_lite{v}": "imagenet" for v in (0, 1, 2)}
DEFAULT_FROZEN_STAGES: dict[str, int] = {f"efficientnet_lite{v}": 4 for v in (0, 1, 2)}
EPOCHS: int = 8
BATCH_SIZE: int = 48
LEARNING_RATE: float = 1e-3
WEIGHT_DECAY: float = 1e-4
LABEL_SMOOTHING: float = 0.05
#: Mixup's α (Zhang et al. 2018, torchvision's ``v2.MixUp``): each step's batch blended with itself rolled by one,
#: λ ~ Beta(α, α), the targets likewise; 0 = off. One of issue 13's candidates for a model that travels (Tsutsui et al.
#: 2023 report it helping on BCCD); measured in docs/one-view.md.
MIXUP_ALPHA: float = 0.0
EARLY_STOP_PATIENCE: int = 4
#: Per-step decay of the weight average that is validated and saved (≈ 1/(1-decay) = 200 steps of memory).
EMA_DECAY: float = 0.995
#: Test-time views whose logits a trained model's predictions average (names in ``models.VIEWS``; stored in the model
#: file). Chosen on the default model's validation split (1,314 images): 10 errors with the image alone, 5 adding the
#: horizontal flip, 8 adding the vertical flip, 4 adding both (python bench/test_views.py).
TEST_VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip")
#: A training step runs forward + backward in equal chunks of at most this many input pixels (gradients summed, one
#: optimiser step per batch) to bound activation memory: 48 images at 224 px are three chunks of 16.
MICRO_BATCH_PIXELS: int = 16 * 224 * 224
#: ... and of at most this many images. Batch norm normalises over a chunk (a "ghost batch", Hoffer et al. 2017), so
#: every recipe's batch norm sees at most this many images whatever its input size: the default recipe's
#: EfficientNet-Lite0 at 160 px has two chunks of 24 for memory, and the seed CNN at 128 px now has two as well (one of
#: 48 before), which on CPU run at once (CPU_CHUNKS_AT_ONCE): its step 542-640 → 441-448 ms (bench/train_speed.py).
CHUNK_IMAGES: int = 24
#: Inference passes (calibration, evaluation, adaptation) take this many input pixels a batch unless told otherwise:
#: 128 network inputs at the default 160 px, 65 at 224 px (128 there put the calibration of resnet50 at 224 px, and
#: with it training's peak memory, over 4 GiB: bench/train_memory.py).
INFERENCE_BATCH_PIXELS: int = 128 * 160 * 160
#: Under CPU bf16 autocast, the kernels of trainable depthwise convolutions (train.TrainableDepthwiseKernels): oneDNN's
#: depthwise weight-gradient kernel serves only 3×3, larger ones take a generic grouped kernel (5×5: 23.5 ms against
#: 0.48 ms for 3×3, bf16, 24 images of 480 channels at 10×10, one thread).
#: "by-kernel": 3×3 in bf16, larger with stride 1 in bf16 with the weight gradient as a forward convolution, larger
#: strided in fp32 (the default recipe's step: 302 → 259 ms, medians); "fp32": all of them in fp32 (sessions 6-13:
#: 721 → 485 ms against "bf16"); "bf16": autocast's choice, all in bf16.
CPU_TRAINED_DEPTHWISE: str = "by-kernel"
#: On CPU, a training step's chunks (MICRO_BATCH_PIXELS, CHUNK_IMAGES) run at once, one thread each, when there are
#: at most as many as torch threads (train._chunks_at_once): the default recipe's step in `wbc train`, 355-371 →
#: 282-302 ms (medians).
CPU_CHUNKS_AT_ONCE: bool = True
#: DataLoader worker processes that augment the next batches (PIL, one image at a time) while the step runs; 0 = in
#: the training process. 0 on 2 cores: augmenting takes ~1.4 ms per image there, and a worker competing with the
#: step's two threads cost more than it hid (EfficientNet-Lite0 at load 3.5: 39.7 images/s with 1 worker, 45.8 without).
TRAIN_LOADER_WORKERS: int = 0
#: OpenMP's wait policy (wbc_trust/__init__.py sets it unless the environment does): idle threads sleep instead of
#: spinning. On a shared 2-core machine spinning threads take the cores from the thread that has work (their own
#: process's and other jobs'): at load ~4 the default recipe's training step took 13.2 s with OpenMP's default and
#: 1.5 s with PASSIVE (same code, same batch).
OMP_WAIT_POLICY: str = "PASSIVE"

PACKAGE_DIR: Path = Path(__file__).resolve().parent
#: The trained default model that ships inside the package (used when --model is not given).
DEFAULT_MODEL_PATH: Path = PACKAGE_DIR / "assets" / "default_model.safetensors"
#: About 40 real PBC images per class that the default model never trained on.
SAMPLE_DATA_DIR: Path = PACKAGE_DIR / "assets" / "sample"
#: ``wbc predict --ray``: actors in the Ray Data pool; each loads the model once and gets an equal share of the CPUs.
RAY_ACTORS: int = 2
#: ``wbc count --ray``: fields per Ray Data batch (a field takes about a second; small batches keep every actor busy
#: and the driver's buffer of finished fields short).
COUNT_RAY_BATCH: int = 4

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
#: Uploaded model files: each at most this many MB (EfficientNet-Lite0 and the CNN are ~17 MB, ResNet50 ~95 MB), and
#: at most this many kept on the server at once (the least recently uploaded are removed first; ``app.ModelUploads``).
APP_MAX_MODEL_UPLOAD_MB: int = 128
APP_MAX_MODEL_UPLOADS: int = 4
APP_DISPLAY_PX: int = 320
#: How many supporting training images the app shows per answer (when given an influence index).
APP_SUPPORTING_IMAGES: int = 3
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

# --- trust suite: robustness, Grad-CAM, Fisher sensitivity (trust/robustness.py, gradcam.py, fisher.py) ---------

#: Corruption parameter per severity 1..5 (after the BloodMNIST set of MedMNIST-C, Di Salvo et al. 2024).
#: Blur sigma is in pixels at 128 px and scales with the model's input size; stain shift is the relative change of
#: stain optical density (see trust/robustness.py).
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "gaussian_blur": (0.5, 1.0, 1.5, 2.0, 3.0),
    "brightness_up": (1.1, 1.2, 1.3, 1.35, 1.4),
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_up": (1.1, 1.15, 1.2, 1.25, 1.3),
    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "jpeg": (50, 30, 15, 10, 7),
    "stain_shift": (0.15, 0.3, 0.45, 0.6, 0.8),
}
#: Per-channel (R, G, B) direction of the stain shift: more blue-violet dye absorbs more red and green light.
STAIN_SHIFT_DIRECTION: tuple[float, float, float] = (1.0, 0.5, -0.5)
#: L-infinity attack budgets on inputs in [0, 1] (x/255 = x grey levels), from one grey level up (a smaller budget is
#: no 8-bit image), and the PGD recipe (Madry et al. 2018: random start, steps of 2.5·ε/steps).
ATTACK_EPSILONS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
PGD_STEPS: int = 10
#: Images per Grad-CAM gallery, and how many images the faithfulness and randomisation checks use.
GRADCAM_GALLERY: int = 10
GRADCAM_CHECK_IMAGES: int = 32
#: ROAD (Rong et al. 2022) removes this share (%) of pixels, most- and least-relevant first, and averages.
ROAD_PERCENTILES: tuple[int, ...] = (20, 40, 60, 80)
#: The randomisation sanity check passes when the mean Spearman correlation between the trained and the randomised
#: model's maps is below this (Adebayo et al. 2018 call maps that stay alike a failed explanation).
RANDOMISATION_MAX_SPEARMAN: float = 0.5
#: Images in the gallery of highest Fisher-sensitivity scores.
FISHER_GALLERY: int = 15
#: Audit: perceptual-hash size (hash_size² bits) and the largest Hamming distance reported as a near-duplicate.
AUDIT_PHASH_SIZE: int = 8
AUDIT_PHASH_MAX_DISTANCE: int = 4
#: Influence (TracInCP on the last layer): images per forward pass, the replayed last-layer training that gives the
#: checkpoints (epochs = checkpoints, learning rate, batch), training images listed per test image, gallery size.
INFLUENCE_BATCH_SIZE: int = 64
INFLUENCE_REPLAY_EPOCHS: int = 30
INFLUENCE_REPLAY_LR: float = 1e-3
INFLUENCE_REPLAY_BATCH: int = 32
INFLUENCE_TOP_K: int = 5
INFLUENCE_GALLERY: int = 15
#: Training images per captum TracIn batch (features only: 4,096 × 1,280 floats = 20 MB); fewer batches = faster queries.
INFLUENCE_TRAIN_CHUNK: int = 4096
#: Calibration (calibration.py, conformal.py, ood.py; report: trust/calibration.py): confidence bins of the ECE and the reliability diagram;
#: default coverage of the split-conformal prediction sets; share of validation white cells the out-of-distribution
#: threshold accepts; folds that score each validation image with statistics it was not fitted on.
ECE_BINS: int = 15
#: 0.99, not 0.95: the default model is right on 99.5 % of unseen images, so 95 % sets would be its top class and
#: nothing else (or empty); at 0.99 the sets grow to two classes where it hesitates. Not 0.995: the sets are
#: class-conditional, and a class needs ceil(c / (1 - c)) calibration images for coverage c (99 at 0.99, 199 at 0.995;
#: the default model's validation split has 155 basophils and 155 lymphocytes), else that class joins every set.
CONFORMAL_COVERAGE: float = 0.99
#: Prediction sets are class-conditional (Mondrian: every class gets the coverage) with this nonconformity score
#: (conformal.SCORES: "lac", "aps", "raps"; LAC gave the smallest sets, docs/trust.md, "Calibration"); RAPS's penalty per rank
#: beyond its k_reg-th (Angelopoulos et al. 2021; the bench compares RAPS at this setting).
CONFORMAL_SCORE: str = "lac"
#: A class of at least this calibrated probability is always in the set, whatever its quantile: one answer in ten is
#: hesitation a reader should see (it only adds coverage; docs/trust.md, "Calibration" measures what it costs in set size).
CONFORMAL_FLOOR: float = 0.1
RAPS_LAMBDA: float = 0.01
RAPS_K_REG: int = 1
OOD_ACCEPT: float = 0.95
#: Out-of-distribution score written by `wbc train` / `wbc calibrate` (a name in ood.OOD_SCORES).
OOD_METHOD: str = "mahalanobis"
OOD_FOLDS: int = 5

# --- cell finder and `wbc count` (finder.py, count.py) ------------------------------------------------------------

#: The finder's weights (gradient-boosted region verifier + box regressors, fitted by ``python bench/finder.py --fit``).
FINDER_MODEL_PATH: Path = PACKAGE_DIR / "assets" / "finder.npz"
#: Long side (pixels) of the working image the finder thresholds. Images longer than FINDER_TILE_PX may be searched
#: in overlapping tiles (share FINDER_TILE_OVERLAP) FINDER_TILE_RED_CELLS red-cell diameters (as the ruler reads them)
#: across, like the fields the verifier was fitted on: a 3×3 mosaic of BCCD fields (1920×1440) searched whole gave 0
#: of its 9 white cells, in 640 px tiles 8 (the ruler read 143 px there: 4.5 diameters), in 928 px tiles (6.5) 0.
FINDER_WORK_PX: int = 400
FINDER_TILE_PX: int = 640
FINDER_TILE_RED_CELLS: float = 4.5
FINDER_TILE_OVERLAP: float = 0.4
#: Gaussian sigma (working pixels) of the violet index; regions smaller than this share of the working image are
#: not proposed; fewer red cells than this give no scale.
FINDER_SMOOTH_SIGMA: float = 1.5
FINDER_MIN_AREA_SHARE: float = 0.0003
FINDER_MIN_RED_CELLS: int = 5
#: A proposal is a white cell when the verifier's probability is at least this; boxes overlapping more than
#: FINDER_NMS_IOU are one cell, whose box is the score-weighted mean of the boxes overlapping the kept one by at least
#: FINDER_VOTE_IOU (txl-fields val with 0.5 instead: BCCD recall 1.000 → 0.978, BCD 0.936 → 0.915, though BCCD's crops
#: came out tight more often, 86 vs 70 of 117); a found box matches a true one at IoU ≥ FINDER_MATCH_IOU (bench, tests).
FINDER_MIN_SCORE: float = 0.5
FINDER_NMS_IOU: float = 0.3
FINDER_VOTE_IOU: float = 0.3
FINDER_MATCH_IOU: float = 0.5
#: Size of the verifier and of each box regressor (boosting iterations, leaves per tree). The regressors' larger
#: size was chosen on txl-fields val (BCD recall 0.915 → 0.936, bccd-fields' unseen photos 0.959 → 0.974); 3-fold
#: cross-validation on txl-fields train, grouped by image, rates both sizes alike (mean cell-box IoU 0.754 / 0.758).
FINDER_TREES: int = 150
FINDER_LEAVES: int = 15
FINDER_BOX_TREES: int = 300
FINDER_BOX_LEAVES: int = 31
#: The red-cell ruler: a normal red cell is about 7.5 µm across in every smear.
RED_CELL_DIAMETER_UM: float = 7.5
#: The red-cell ruler (finder._ruler): percentile of the distance-transform maxima, and its ratio to the annotated
#: red-cell size (measured on txl-fields train: BCCD 0.84, BCD 0.79, PBC 0.85, Raabin 0.77).
FINDER_RED_CELL_PERCENTILE: float = 90.0
FINDER_RED_CELL_BOX_RATIO: float = 0.81
#: `wbc count`: cells whose box comes within COUNT_EDGE_MARGIN_PX of the image edge are flagged.
COUNT_EDGE_MARGIN_PX: float = 2.0
#: At most this many white cells are classified per image (the rest are reported in images.csv's flag).
COUNT_MAX_CELLS: int = 500
#: Sizes of the annotated pictures (long side) and gallery crops; how many of each report.html inlines.
COUNT_ANNOTATED_PX: int = 1024
COUNT_THUMB_PX: int = 96
COUNT_REPORT_IMAGES: int = 40
COUNT_REPORT_GALLERY: int = 60

# --- one view for the model (crop.py; checked by tests/test_crop.py) ------------------------------------------

#: The crop window's side in µm: PBC's frames (360 px) at the red-cell ruler's median of 10.9 px/µm, so that a PBC
#: image's view is about the image itself. A crop whose found cell's long side is at least CROP_TIGHT_SHARE of the
#: image's short side is tight (the cell fills it: BCCD's crops), and its cell is taken to be CROP_CELL_UM across (the
#: median of PBC's found cells, 144 px at 10.9 px/µm).
CROP_WINDOW_UM: float = 33.0
#: The default crop policy of wbc train (crop.KINDS).
CROP: str = "frame"
CROP_TIGHT_SHARE: float = 0.6
CROP_CELL_UM: float = 13.2
#: The red-cell ruler is believed where the found white cell is this many red cells across (9-20 µm cells).
CROP_RULER_CELLS: tuple[float, float] = (1.0, 3.5)
#: Found boxes that overlap by this share of the smaller one are one cell (the lobes of a neutrophil in a close-up
#: crop). Two white cells side by side can overlap as much: 0.202 for two PBC pairs, which are merged. At 0.3, 8 more
#: BCCD crops would be flagged as several cells, at least 6 of them one neutrophil's lobes (docs/one-view.md, "Session 22").
CROP_MERGE_OVERLAP: float = 0.2
#: A lab's magnification (wbc adapt) is the median red-cell ruler of at least this many of its images: one image's
#: ruler scatters by 7.6 % (coefficient of variation on 200 PBC crops, all from one microscope), the median of many
#: does not, and the size of a cell is information (lymphocyte against monocyte) that such scatter blurs.
LAB_SCALE_MIN_IMAGES: int = 5
#: ... and their readings must agree: interquartile range over median at most this. Rulers of whole frames agree (PBC
#: crops 0.04, BCCD fields 0.12); in small crops the edges cut the red cells and the readings scatter (BCCD's crops
#: 0.58, reading half the true scale), so no scale is taken from them.
LAB_SCALE_MAX_SPREAD: float = 0.25
#: ... and at least this share of the images must read one. Where most images show no ruler, the few that do are tight
#: crops misread from the red cells their edges cut, and a handful of them can agree by chance: 6 of 21 BCCD crops
#: agreed on 8.0 px/µm (the lab's fields read 14.66). Shares measured (`data._scale_reading`): PBC crops 0.57-0.66,
#: BCCD fields 0.98, BCCD crops 0.20 (all 351) and 0.29 (those 21).
LAB_SCALE_MIN_SHARE: float = 0.4
#: Where a folder's red cells give no scale but as many of its images as a ruler needs are tight crops, its
#: magnification is their median frame (short side) over this many µm: a lab's tool cuts a tight crop around its
#: cell, so the median frame is its median white cell. The median annotated white cell (long side, at each field's
#: annotated red-cell ruler) in txl-fields, per lab: PBC 13.4, Raabin 14.5, BCCD 15.7, BCD 16.6 µm, median of the
#: four 15.1 (`python bench/cell_sizes.py`).
CROP_TIGHT_FRAME_UM: float = 15.1
#: A lab's magnification is measured on at most this many of its images, spread over the batch (wbc train on its
#: training folder, wbc adapt on the lab's cells, and every batch a cell-view model reads: data.batch_policy).
SCALE_SAMPLE: int = 300
#: How many images' finder results CellFinder.find keeps by content: a folder's scale is measured on up to
#: 2 x SCALE_SAMPLE - 1 of its images (every len // SCALE_SAMPLE-th), which are then cut without a second search
FINDER_RECENT_IMAGES: int = 2 * SCALE_SAMPLE

# --- another lab's cells: `wbc adapt` and the lab statistic (adapt.py, lab.py; bench/cross_lab.py) ----------------

#: The lab statistic (lab.py): share of the calibration images its cross-fitted threshold accepts, and when a batch
#: gets one message up front instead of a flag per image (at least LAB_BATCH_MIN images, LAB_BATCH_SHARE of them
#: flagged as another lab's). 0.999, not 0.99: the statistic is fitted on views of white cells, and a view centred on
#: a platelet of the same lab lacks the nucleus's dark stain; at 0.99 (threshold 71.8 on the shipped cell-view model)
#: 27 % of 60 PBC platelets read as another lab, at 0.999 (167.8) none, while every one of 100 BCCD crops and 100
#: BCCD fields still does (their scores start at 377; python bench/lab_scores.py --refit 0.99,0.999).
LAB_ACCEPT: float = 0.999
LAB_BATCH_MIN: int = 10
LAB_BATCH_SHARE: float = 0.5
#: `wbc adapt` (adapt.py): coverage of the lab's prediction sets (0.95, not CONFORMAL_COVERAGE's 0.99: a lab labels
#: tens of cells, and 0.99 needs 99 per class); fewest lab cells of a class to adapt on it (below: the base model's
#: knowledge of it is kept); fewest images for batch-norm statistics (the --unlabelled images, else the labelled
#: cells themselves); replay images per class of the base model's training data; the head fit (full-batch Adam steps,
#: learning rate, L2 pull towards the base head, weight of the replay loss against the lab's); folds of the
#: cross-fitted calibration; images per batch-norm batch.
ADAPT_COVERAGE: float = 0.95
ADAPT_MIN_CELLS: int = 2
ADAPT_MIN_UNLABELLED: int = 8
ADAPT_REPLAY_PER_CLASS: int = 40
ADAPT_HEAD_STEPS: int = 300
ADAPT_HEAD_LR: float = 1e-2
ADAPT_HEAD_L2: float = 1e-2
ADAPT_REPLAY_WEIGHT: float = 0.5
ADAPT_FOLDS: int = 5
#: The lab's class prevalence (adapt.lab_prevalence, from --unlabelled images): EM iterations, and the floor no
#: class's estimate goes below (a basophil, 0.3 % of BCCD's cells, must stay possible where its evidence is strong;
#: without the floor EM put BCCD's basophils at 0.0 %), and how many of the lab's images it reads at most, spread
#: over them (each costs a forward pass; 150 images put a class's share within about 4 points).
ADAPT_PRIOR_ITERATIONS: int = 100
ADAPT_PRIOR_FLOOR: float = 0.02
ADAPT_PRIOR_IMAGES: int = 150
#: Fine-tuning before the head re-fit (`wbc adapt --fine-tune-steps`): the stages after the base recipe's frozen ones
#: and the head, one-cycle AdamW, each step ADAPT_FINE_TUNE_BATCH lab cells (augmented as the base model was trained,
#: or by ADAPT_LAB_AUGMENT) plus as many replay cells (augmented as the base model was trained) weighted
#: ADAPT_REPLAY_WEIGHT. Measured on runs/travel2 with 10 BCCD cells per class and
#: --unlabelled (docs/another-lab.md): the head alone 59.5 % on the other 309 cells, 80 steps 76.1 % in 266 s,
#: 120 steps 81.2 % in 395 s; 80 keeps `wbc adapt` of 50 cells within 5 minutes on 2 cores.
ADAPT_FINE_TUNE_STEPS: int = 80
ADAPT_FINE_TUNE_LR: float = 5e-4
ADAPT_FINE_TUNE_WEIGHT_DECAY: float = 1e-4
ADAPT_FINE_TUNE_BATCH: int = 16
#: How the lab's own cells are augmented while fine-tuning (a name of AUGMENTS, or None: as the base model was trained;
#: the replay always keeps the base recipe's). "seed" (moved and flipped, their stain kept: one lab has one stain) was
#: measured against the travel recipe's stain jitter at 10 BCCD cells per class (`bench/adapt_few.py --selection-seed
#: 1-4 --lab-augment seed|travel`): 85.1 % against 82.8 % mean over four selections, paired differences -1.0 to +8.1
#: points, no clear gain; on the reported selection (the first 10 files) 74.8 % against 79.9 %. Not kept.
ADAPT_LAB_AUGMENT: str | None = None
#: Copies fine-tuned without one fold each, whose logits the calibration is fitted on (2: the fewest that leave every
#: cell out once, and each copy costs a fine-tuning)
ADAPT_FINE_TUNE_FOLDS: int = 2
ADAPT_BN_BATCH: int = 32
