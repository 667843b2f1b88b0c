"""Screenshots of a running TensorBoard's Scalars, Custom Scalars and Text dashboards (run by
tensorboard_screenshots.sh).

Uses Playwright with an existing Chromium (no browser download); waits until both runs' charts have drawn, opens the
legend ("Matches") of the first custom-scalars chart, and keeps the part of the page that holds the charts.
"""

import argparse
import json
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

WIDTH = 1600  # three charts a row


def wait_for_runs(url: str, runs: list[str], timeout: float = 120.0) -> None:
    """Until TensorBoard has loaded every run (it reads the event files in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/data/runs") as response:
                if set(runs) <= set(json.load(response)):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"TensorBoard at {url} did not list runs {runs} within {timeout:.0f} s")
        time.sleep(1)


def show_outliers(page) -> None:
    """Untick "Ignore outliers in chart scaling" (on by default; it cuts off the first steps' values)."""
    box = page.locator("paper-checkbox:visible", has_text="Ignore outliers")
    if box.is_checked():
        box.click()
        page.wait_for_timeout(1000)


def clip(page, selector: str, count: int) -> dict:
    """The page from its top left to the bottom right of the first ``count`` elements matching ``selector``."""
    boxes = [page.locator(selector).nth(i).bounding_box() for i in range(count)]
    return dict(
        x=0,
        y=0,
        width=max(b["x"] + b["width"] for b in boxes) + 24,
        height=max(b["y"] + b["height"] for b in boxes) + 8,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    wait_for_runs(args.url, args.runs)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu", "--disable-quic"]
        )
        page = browser.new_page(viewport={"width": WIDTH, "height": 1400})

        # (a) Scalars: the train/ loss and reward charts of both runs, unsmoothed
        page.goto(f"{args.url}/#scalars&tagFilter=train%2F(loss%7Crewards)&_smoothingWeight=0")
        page.locator("tf-scalar-card").nth(4).wait_for()
        show_outliers(page)
        page.wait_for_timeout(3000)  # the charts draw after their data arrives
        page.screenshot(path=args.out / "tensorboard_scalars.png", clip=clip(page, "tf-scalar-card", 5))

        # (b) Custom Scalars: train and eval of each metric on one chart; the first chart's legend open
        page.goto(f"{args.url}/#custom_scalars&_smoothingWeight=0")
        cards = page.locator("tf-custom-scalar-multi-line-chart-card")
        cards.nth(5).wait_for()
        show_outliers(page)
        page.wait_for_timeout(3000)
        cards.nth(0).locator(".toggle-matches-button").click()
        page.wait_for_timeout(1000)
        page.screenshot(
            path=args.out / "tensorboard_custom_scalars.png",
            clip=clip(page, "tf-custom-scalar-multi-line-chart-card", 6),
        )
        # (c) Scalars: throughput, with the share of computed positions that were needed (token_efficiency)
        page.goto(
            f"{args.url}/#scalars&tagFilter=train%2F(pairs_per_second%7Ctokens_per_second%7Ctoken_efficiency)"
            "&_smoothingWeight=0"
        )
        page.locator("tf-scalar-card").nth(2).wait_for()
        page.wait_for_timeout(3000)
        page.screenshot(path=args.out / "tensorboard_throughput.png", clip=clip(page, "tf-scalar-card", 3))

        # (d) Text: the policy's replies to the held-out prompts (generate_during_eval), as TensorBoard shows them
        page.goto(f"{args.url}/#text&tagFilter=policy")
        page.get_by_text("eval/samples/policy").first.wait_for()
        page.wait_for_timeout(3000)
        page.screenshot(path=args.out / "tensorboard_samples.png", full_page=False)
        browser.close()


if __name__ == "__main__":
    main()
