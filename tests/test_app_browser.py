"""The web app driven in a real headless Chromium (Debian's, through Playwright): a real cell image gets its class and a
Grad-CAM picture; a file that is not an image gets a message, and the app keeps working afterwards; a real smear field
gets its boxes and differential, a person reclassifies a cell and downloads the corrections."""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED, pbc_files, require_shared

from wbc_trust import config
from wbc_trust.app import FIELDS_MODE, display_name
from wbc_trust.corrections import ZIP_ROOT
from wbc_trust.serve import CHROMIUM, CHROMIUM_ARGS, free_port, serving, streamlit_command

#: Seconds to wait for the server and for each result (the first one includes loading the model).
TIMEOUT_S = 90


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app served by ``wbc app``'s command on a free localhost port, from a folder without a config file."""
    port = free_port()
    folder = tmp_path_factory.mktemp("app")
    url = f"http://127.0.0.1:{port}"
    with serving(streamlit_command(port=port, address="127.0.0.1"), url, folder / "server.log", TIMEOUT_S, cwd=folder):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's Chromium, headless, driven by Playwright (no browser download)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: run scripts/setup.sh as root")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        yield chromium
        chromium.close()


def open_app(browser, url: str):
    """A fresh page (its own Streamlit session) showing the app, ready for uploads."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_S * 1000)
    page.goto(url)
    page.get_by_text("Drop one or many cell images").wait_for()
    return page


def upload(page, files: list[Path] | list[dict]) -> None:
    """Put files into the image uploader, as a person dropping them would."""
    page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(files)


def test_real_image_shows_class_and_gradcam(app_url: str, browser, tmp_path: Path) -> None:
    from wbc_trust.predict import Predictor

    image = pbc_files("eosinophil", 1)[0]
    expected = Predictor().predict_files([image], progress=False)[0].prediction
    page = open_app(browser, app_url)
    upload(page, [image])
    page.get_by_text(f"Predicted class: {expected}").wait_for()
    gradcam = page.get_by_test_id("stImage").filter(has_text="Grad-CAM").locator("img")
    gradcam.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=gradcam.element_handle())
    assert page.get_by_test_id("stException").count() == 0
    assert page.get_by_role("button", name="Download CSV").is_visible()
    page.screenshot(path=tmp_path / "good_image.png", full_page=True)
    assert (tmp_path / "good_image.png").stat().st_size > 10_000


def test_non_image_gets_a_message_and_the_app_keeps_working(app_url: str, browser, tmp_path: Path) -> None:
    page = open_app(browser, app_url)
    upload(page, [{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"these are lab notes, not a picture\n"}])
    page.get_by_text("could not be read as an image").wait_for()
    assert page.get_by_test_id("stException").count() == 0, "a stack trace reached the browser"
    page.get_by_role("button", name="Download CSV").wait_for()
    page.screenshot(path=tmp_path / "bad_upload.png", full_page=True)
    # the same session still classifies a real image after the bad one
    page.get_by_role("button", name="Remove notes.jpg").click()
    upload(page, pbc_files("lymphocyte", 1))
    page.get_by_text("Predicted class:").wait_for()
    assert page.get_by_text("could not be read as an image").count() == 0


def test_field_shows_boxes_and_differential_and_takes_a_correction(app_url: str, browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    require_shared()
    field = SHARED / "bccd-fields" / "JPEGImages" / "BloodImage_00040.jpg"  # two white cells, one cut by the edge
    page = open_app(browser, app_url)
    page.get_by_text(FIELDS_MODE).click()
    page.get_by_text("Drop one or many smear-field images").wait_for()
    upload(page, [field])
    boxes = page.get_by_test_id("stImage").filter(has_text="white cell(s) found").locator("img")
    boxes.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=boxes.element_handle())
    table = page.get_by_test_id("stTable")
    table.get_by_text("flagged (not counted)").wait_for()

    def count(row: str):
        return table.locator("tr", has=page.get_by_role("rowheader", name=row, exact=True)).locator("td").first

    before = int(count("lymphocyte").inner_text())
    page.get_by_test_id("stSelectbox").first.get_by_role("combobox").click()
    page.keyboard.press("ArrowDown")  # opens the list of choices (a click only focuses the box in headless Chromium)
    page.get_by_role("option", name="lymphocyte", exact=True).click()
    expect(count("lymphocyte")).to_have_text(str(before + 1))
    # the re-run has drawn the table; the download button (with the corrected zip) comes after it in the same run
    page.locator("[data-testid=stApp][data-test-script-state=notRunning]").wait_for()
    assert page.get_by_test_id("stException").count() == 0
    page.screenshot(path=tmp_path / "field.png", full_page=True)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download corrections (zip)").click()
    download.value.save_as(tmp_path / "corrections.zip")
    with zipfile.ZipFile(tmp_path / "corrections.zip") as archive:
        assert f"{ZIP_ROOT}/lymphocyte/{field.stem}_1.png" in archive.namelist()
        rows = list(csv.DictReader(io.TextIOWrapper(archive.open(f"{ZIP_ROOT}/cells.csv"), encoding="utf-8")))
    first = next(r for r in rows if r["cell"] == "1")
    assert first["corrected"] == "lymphocyte" and first["changed_by_person"] == "yes"
    assert first["image"] == field.name and len(rows) >= 2


def test_streamlit_config_file_matches_wbc_app() -> None:
    """``streamlit run app_streamlit.py`` (reads .streamlit/config.toml) and ``wbc app`` (flags) set the same limits."""
    tomllib = pytest.importorskip("tomllib")
    toml = tomllib.loads((Path(__file__).parents[1] / ".streamlit" / "config.toml").read_text())
    for key, value in config.APP_STREAMLIT_OPTIONS.items():
        section, name = key.split(".")
        assert toml[section][name] == value, key
    assert toml["server"]["maxUploadSize"] == config.APP_MAX_UPLOAD_MB


def test_upload_names_are_only_displayed_escaped() -> None:
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\lab\\cell_1.png") == "cell\\_1\\.png"
    assert display_name("[click](x.png)") == "\\[click\\]\\(x\\.png\\)"


def test_cheap_gradcam_gives_the_same_map_as_plain_gradcam(default_model: Path) -> None:
    """The app's Grad-CAM shortcut (graph started at the target layer, no weight gradients) changes nothing shown."""
    from wbc_trust.app import load_model_for_app
    from wbc_trust.modelfile import load_model
    from wbc_trust.trust.gradcam import gradcam_overlay

    fast = load_model_for_app(default_model).predictor
    plain, _ = load_model(default_model)
    for path in pbc_files("monocyte", 2) + pbc_files("basophil", 1):
        image = fast.to_tensor(path)
        target = fast.classes.index(fast.predict_files([path], progress=False)[0].prediction)
        cam_fast, overlay_fast = gradcam_overlay(fast.model, image, target=target)
        cam_plain, _ = gradcam_overlay(plain, image, target=target)
        assert cam_fast.std() > 0.01, "an empty heat map"
        assert abs(cam_fast - cam_plain).max() < 1e-3
        assert overlay_fast.shape == (*image.shape[1:], 3)
