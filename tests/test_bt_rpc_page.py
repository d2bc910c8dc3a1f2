"""The daemon's status page in a real browser: Debian's headless chromium,
driven by selenium through chromium-driver (nothing is downloaded at test
time).  With --rpc-secret given in the URL fragment the page lists a
running, rate-limited download from a libtorrent seed, its progress
changes live, the pause button pauses it (the daemon says "paused"), the
resume button resumes it; without the secret the page asks for it; the
magnet field sends aria2.addUri and shows the daemon's answer."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from bt.bench import libtorrent_settings
from testsupport import BtDaemon, bt_content, require_libtorrent, unavailable, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SECRET = "page-secret"


def _rpc(daemon: BtDaemon, method: str, *params):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                       "params": [f"token:{SECRET}", *params]}).encode()
    with urllib.request.urlopen(urllib.request.Request(daemon.url, body), timeout=10) as r:
        return json.loads(r.read())["result"]


def _browser():
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        unavailable("chromium and chromium-driver (Debian) are not installed",
                    ".ci/run installs chromium and chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        unavailable(f"selenium is not importable ({exc})", "selenium is in the test extra")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


def _wait(what, cond, timeout=30.0, daemon=None):
    # an element re-rendered under us (the table is redrawn every second)
    # is "not yet"
    return wait_until(what, cond, timeout, log=daemon.lines if daemon else None,
                      ignore=(Exception,))


def test_status_page_in_chromium(tmp_path):
    lt = require_libtorrent()
    from selenium.webdriver.common.by import By
    src, names, data = bt_content(tmp_path, (8 * 1024 * 1024,), name="live", piece_length=64 * 1024)
    ses = lt.session(libtorrent_settings("127.0.0.1", "both"))
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(src.parent)
    handle = ses.add_torrent(atp)
    _wait("the libtorrent seed", lambda: handle.status().state == lt.torrent_status.seeding)
    browser = None
    with BtDaemon("-d", str(tmp_path / "dl"), "--bind", "127.0.0.1", "--rpc-secret", SECRET,
                  "--max-download-rate", "400K") as daemon:
        try:
            import base64
            gid = _rpc(daemon, "aria2.addTorrent", base64.b64encode(data).decode())
            handle.connect_peer(("127.0.0.1", daemon.peer_port))
            browser = _browser()
            base = f"http://127.0.0.1:{daemon.rpc_port}/"
            # without the secret: the page asks for it
            browser.get(base)
            _wait("the secret prompt", lambda: browser.find_element(By.ID, "auth").is_displayed())
            browser.get(base + "#secret=" + SECRET)
            browser.refresh()
            row = f'tr[data-gid="{gid}"]'

            def completed() -> int:
                el = browser.find_element(By.CSS_SELECTOR, row + " .pct")
                return int(el.get_attribute("data-completed"))
            _wait("the download's row", lambda: browser.find_element(By.CSS_SELECTOR, row))
            assert browser.find_element(By.CSS_SELECTOR, row + " .name").text == "live"
            _wait("the WebSocket", lambda: browser.find_element(By.ID, "state").text == "live")
            first = _wait("progress", lambda: completed() > 0 and completed(), 30, daemon)
            _wait("progress to change", lambda: completed() > first, 30, daemon)
            assert "1 (1 seeds)" in browser.find_element(By.CSS_SELECTOR, row + " .peers").text
            browser.find_element(By.CSS_SELECTOR, row + " button.pause").click()
            _wait("paused on the page", lambda: browser.find_element(
                By.CSS_SELECTOR, row).get_attribute("data-status") == "paused", 15, daemon)
            assert _rpc(daemon, "aria2.tellStatus", gid, ["status"]) == {"status": "paused"}
            browser.find_element(By.CSS_SELECTOR, row + " button.resume").click()
            _wait("active again", lambda: _rpc(daemon, "aria2.tellStatus", gid, ["status"])
                  == {"status": "active"}, 15, daemon)
            # the magnet field reaches aria2.addUri (the daemon's answer is shown)
            field = browser.find_element(By.ID, "magnet")
            field.send_keys("magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=x")
            browser.find_element(By.CSS_SELECTOR, "#add button").click()
            _wait("the answer to addUri", lambda: field.get_attribute("value") == "" or
                  "magnet" in browser.find_element(By.ID, "msg").text, 15, daemon)
        finally:
            if browser is not None:
                browser.quit()
            ses.remove_torrent(handle)
