"""Coverage-guided fuzzing of the image intake with atheris (libFuzzer for Python), for longer than a test can run.

The target is the one the hypothesis test checks (tests/test_fuzz.py): ``read_image`` must return an RGB image or
raise ``UnreadableImage``; any other exception is a crash, which atheris reports with the input that caused it (saved
as ``crash-<hash>`` in the working folder). The corpus starts from the same seeds as the test: real PBC cells in every
supported format and mode. Python code (Pillow's parsers, our checks) is instrumented for coverage; the C decoders
are exercised but not instrumented.

    pip install -e ".[fuzz]"        # atheris
    python bench/fuzz_atheris.py -max_total_time=300 -rss_limit_mb=3072   # any libFuzzer option, e.g. -runs=100000

Measured on the 2-core dev machine (shared with other jobs): 448,725 inputs in 300 s, no crash, peak RSS 1.4 GB, after
fixing the two findings that tests/test_fuzz.py now keeps as regression examples (ATHERIS_FINDINGS).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

with atheris.instrument_imports(include=["PIL", "wbc_trust"]):  # torch & co. stay uninstrumented (fast)
    from PIL import Image  # noqa: F401  (instrumented for coverage)

    from wbc_trust.data import UnreadableImage, read_image

from test_fuzz import SEEDS, SIZE  # noqa: E402  (the test's seeds: one definition)


def one_input(data: bytes) -> None:
    """One fuzz case: read or refuse, nothing else."""
    try:
        image = read_image(data, SIZE)
    except UnreadableImage as exc:
        assert str(exc), "a refusal must say why"
        return
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="wbc_fuzz_corpus_"))
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i:02d}").write_bytes(seed)
    print(f"seed corpus: {len(SEEDS)} real-cell files in {corpus}", flush=True)
    atheris.Setup([*sys.argv, "-print_final_stats=1", str(corpus)], one_input)
    atheris.Fuzz()  # libFuzzer exits the process: exit code 0 and "stat::number_of_executed_units" = no crash found


if __name__ == "__main__":
    main()
