"""The DC dashboard in a real headless browser (Debian's chromium and chromedriver, driven by
selenium) on a running federation: anvil, a relay, two DCs, two nodes with a tunnel between them.
The screenshot is kept in $NTM_TEST_ARTIFACTS (default test-artifacts/dashboard.png)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from ntm import keys
from labkit.dcnet import raw_http

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("NTM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - `make setup` installs it
    webdriver = None

needs_browser = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not CHROMEDRIVER,
    reason="needs selenium and Debian's chromium + chromium-driver (`make setup` installs them when root)",
)


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--ignore-certificate-errors",  # the DC's certificate is bound to its chain key, not a CA
        "--window-size=1400,1100",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@needs_browser
async def test_the_dashboard_shows_the_federation_chain_nodes_directions_and_relay(net, pair):
    a, b = pair
    t = await a.connect(b.id)
    await asyncio.wait_for(b.accept(), 5)
    # the JSON the page polls
    async with raw_http() as http, http.get(net.urls[0] + "/v1/dashboard") as r:
        assert r.status == 200
        d = await r.json()
    assert [f["hostname"] for f in d["federation"]] == ["dc1", "dc2"] and d["chain"]["chain"] == "ok"
    assert d["directions"]["recent"][0]["route"] == t.kind and d["nodes"]["online"] == 1

    def look() -> dict:
        driver = browser()
        try:
            driver.get(net.urls[0] + "/dashboard")
            wait = WebDriverWait(driver, 40, poll_frequency=0.5)
            # live: it fetched, rendered, and dc2 has been probed and answered
            wait.until(lambda drv: "live" in drv.find_element(By.ID, "status").text)
            wait.until(lambda drv: "yes" in drv.find_element(By.ID, "federation").text.split("dc2", 1)[-1])
            seen = {
                name: driver.find_element(By.ID, name).text
                for name in ("hostname", "chain", "federation", "directions", "nodes", "relay", "nodes-summary")
            }
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
            return seen
        finally:
            driver.quit()

    seen = await asyncio.to_thread(look)
    a_id, b_id = keys.checksum(a.id), keys.checksum(b.id)
    assert seen["hostname"] == "dc1"
    assert "state\nok" in seen["chain"] and f"head\n{d['chain']['head']}" in seen["chain"]
    assert "0 pending" in seen["chain"] and "ETH" in seen["chain"]  # the gas balance, in ether
    assert "dc1 (this DC)" in seen["federation"] and net.urls[1] in seen["federation"]
    assert f"{a_id} {b_id} {t.kind}" in seen["directions"]
    assert a_id in seen["nodes"] and "online" in seen["nodes"] and b_id not in seen["nodes"]  # b is dc2's
    assert "registered here\n1" in seen["nodes-summary"] and "in the registry\n2" in seen["nodes-summary"]
    # b's home DC booked the relay (it directs its node's end, §8.5): dc2's dashboard counts it
    assert "paths booked" in seen["relay"] and net.relays[0] in seen["relay"]
    async with raw_http() as http, http.get(net.urls[1] + "/v1/dashboard") as r:
        assert (await r.json())["relay"]["bookings"] >= 1
    png = (ARTIFACTS / "dashboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
