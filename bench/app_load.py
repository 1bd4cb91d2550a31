"""The web app under load: N concurrent browser sessions (default 20) each open the app and upload a different real
cell image, all at once, against one server on localhost. Reports errors and the latency from upload to the answer
on screen (p50, p95, max); exits 1 on any error.

    python bench/app_load.py [--sessions 20] [--timeout 300]

Bounded: N sessions, one upload each, localhost only, the whole run stops after --timeout seconds. Each session is
its own Playwright browser context (its own cookies and websocket = its own Streamlit session) in one headless
Debian Chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from playwright.async_api import Browser, async_playwright

from wbc_trust import config
from wbc_trust.serve import CHROMIUM, CHROMIUM_ARGS, free_port, serving, streamlit_command


async def one_session(browser: Browser, url: str, image: Path, timeout_ms: float) -> tuple[float, str]:
    """Open the app in a fresh context, upload ``image``; return (seconds from upload to answer, error or "")."""
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(timeout_ms)
    try:
        await page.goto(url)
        await page.get_by_text("Drop one or many cell images").wait_for()
        start = time.perf_counter()
        await page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(image)
        await page.get_by_text("Predicted class:").wait_for()
        latency = time.perf_counter() - start
        if await page.get_by_test_id("stException").count():
            return latency, "an exception reached the browser"
        if await page.get_by_test_id("stAlertContentError").count():
            return latency, "an error message was shown"
        return latency, ""
    except Exception as exc:  # a timeout or a browser failure is this session's error, reported, not raised
        return float("nan"), f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    finally:
        await context.close()


async def run(url: str, images: list[Path], timeout_s: float) -> list[tuple[float, str]]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            sessions = [one_session(browser, url, image, timeout_s * 1000) for image in images]
            return await asyncio.wait_for(asyncio.gather(*sessions), timeout_s)
        finally:
            await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="concurrent browser sessions, one upload each")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the whole run is stopped")
    args = parser.parse_args()
    per_class = [sorted(folder.iterdir()) for folder in sorted(config.SAMPLE_DATA_DIR.iterdir())]
    images = [per_class[i % len(per_class)][i // len(per_class)] for i in range(args.sessions)]  # all different
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        tempfile.TemporaryDirectory() as folder,
        serving(streamlit_command(port, "127.0.0.1"), url, Path(folder) / "server.log", cwd=Path(folder)),
    ):
        start = time.perf_counter()
        results = asyncio.run(run(url, images, args.timeout))
        wall = time.perf_counter() - start
    latencies = np.array([latency for latency, error in results if not error])
    errors = [error for _, error in results if error]
    print(
        f"\n{args.sessions} concurrent browser sessions, one different PBC image (360×363 JPEG) each, one server on "
        f"localhost; wall time {wall:.1f} s"
    )
    for error in errors:
        print(f"  error: {error}")
    if len(latencies):
        print(
            f"upload → answer on screen: p50 {np.percentile(latencies, 50):.1f} s, "
            f"p95 {np.percentile(latencies, 95):.1f} s, max {latencies.max():.1f} s"
        )
    print(f"errors: {len(errors)} of {args.sessions}")
    print(f"command: python {shlex.join(sys.argv)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
