"""A person's browser on the site LAN: Debian's headless Chromium (chromium-driver, selenium),
driven one JSON command per line on stdin, one JSON answer per line on stdout.

The boot tests run it inside the site's network namespace (`ip netns exec`), where the office's
panels are reachable as any LAN client reaches them; the test itself stays outside and checks the
nodes between the steps. Each command names its browser ("browser": "alice"): one Chromium each,
so two people can be signed in at once.

    {"do": "sign_in", "url", "name", "password", "otp"} -> {"page", "message", "host"}
    {"do": "connected", "timeout"}                      -> {"state"}   (noVNC's canvas state)
    {"do": "type", "text"}                              -> {}          (keys into the desktop)
    {"do": "screenshot", "path"}                        -> {}
    {"do": "first_frame", "timeout"}                    -> {"seconds"}  (from the sign-in click to the
                                                           first drawn pixel of the desktop in the page)
    {"do": "sign_out"}                                  -> {"page"}
    {"do": "quit"}                                      -> {} and the browser closes
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the test's side


def spki_pin(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class Seat:
    """This file run in the site's namespace (*netns*), trusting the panels of *hosts* (their
    certificates under *secrets*/nodes), driven from here: seat(do=..., ...) -> its answer."""

    def __init__(self, netns: str, secrets: Path, hosts: list[str], work: Path) -> None:
        pins = ",".join(spki_pin((secrets / "nodes" / f"{h}.crt").read_bytes()) for h in hosts)
        self.secrets, self.log = secrets, work / "seat.log"
        self.used_steps: dict[str, int] = {}
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, __file__, "--pins", pins,
                                          "--profiles", str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True)

    def __call__(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        answer = json.loads(line) if line else {"error": f"the seat ended: {self.log.read_text()[-1500:]}"}
        if "error" in answer:
            raise AssertionError(f"{command.get('do')}: {answer}")
        return answer

    def credentials(self, name: str) -> dict[str, str]:
        """The person's password and a TOTP code from their phone's secret (secrets/<site>/users/),
        never one already used: a code is good once, so a second sign-in waits for the next step."""
        sys.path.insert(0, str(REPO / "overlays/desk/usr/lib/sohocloud"))
        from sohocloud_desk import totp  # the panel's own RFC 6238, as a phone computes it
        users = self.secrets / "users"
        secret = totp.decode_secret((users / f"{name}.totp").read_text().strip())
        while int(time.time()) // 30 == self.used_steps.get(name):
            time.sleep(1)
        self.used_steps[name] = int(time.time()) // 30
        return {"name": name, "password": (users / f"{name}.password").read_text().strip(),
                "otp": totp.totp(secret, time.time())}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


# --------------------------------------------------------------------------- the browser's side

PAGE_TIMEOUT = 240  # a sign-in starts the container before it answers: minutes on an emulated host
clicked: dict[int, float] = {}  # browser -> when its last sign-in was submitted


def browser(profile: Path, pins: str) -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,900",
                # Only the panels' own keys (from the site CA) are accepted: a browser that trusts the site.
                f"--ignore-certificate-errors-spki-list={pins}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    return driver


def page(driver) -> str:
    WebDriverWait(driver, PAGE_TIMEOUT, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                  ).until(lambda d: d.find_element(By.ID, "panel").get_attribute("data-page"))
    return driver.find_element(By.ID, "panel").get_attribute("data-page")


def text_of(driver, element_id: str) -> str:
    found = driver.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def sign_in(d, c: dict) -> dict:
    d.get(c["url"])
    page(d)
    for field in ("name", "password", "otp"):
        d.find_element(By.NAME, field).send_keys(c[field])
    clicked[id(d)] = time.monotonic()
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(d, PAGE_TIMEOUT).until(lambda d: d.execute_script("return document.readyState") == "complete"
                                         and d.find_elements(By.ID, "panel"))
    return {"page": page(d), "message": text_of(d, "message"), "host": text_of(d, "host")}


def connected(d, c: dict) -> dict:
    try:
        WebDriverWait(d, c.get("timeout", 120)).until(
            lambda d: d.find_element(By.ID, "screen").get_attribute("data-state") == "connected")
    except TimeoutException:
        pass
    return {"state": d.find_element(By.ID, "screen").get_attribute("data-state")}


# The session's terminal is up: it fills the desktop (xterm -maximized), white.
TERMINAL_UP = """const c = document.querySelector('#screen canvas');
if (!c || !c.width) return false;
const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let white = 0, n = 0;
for (let i = 0; i < px.length; i += 4 * 101, n++) if (px[i] === 255 && px[i + 1] === 255 && px[i + 2] === 255) white++;
return white > n / 2;"""


def type_keys(d, c: dict) -> dict:
    """Keys into the desktop's terminal, once it shows (keys sent before it exists are lost)."""
    WebDriverWait(d, c.get("timeout", 180), poll_frequency=0.2).until(lambda d: d.execute_script(TERMINAL_UP))
    time.sleep(1)  # mapped is not yet focused
    canvas = d.find_element(By.CSS_SELECTOR, "#screen canvas")
    ActionChains(d).move_to_element(canvas).click().perform()  # focus: the maximized terminal fills the screen
    for ch in c["text"]:  # one key at a time: noVNC sends each as a key event
        ActionChains(d).send_keys(ch).perform()
        time.sleep(0.03)
    return {}


# A pixel of the desktop drawn on noVNC's canvas (it starts all black: nothing received yet).
DRAWN = """const c = document.querySelector('#screen canvas');
if (!c || !c.width) return false;
const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
for (let i = 0; i < px.length; i += 4 * 97) if (px[i] || px[i + 1] || px[i + 2]) return true;
return false;"""


def first_frame(d, c: dict) -> dict:
    WebDriverWait(d, c.get("timeout", 240), poll_frequency=0.05).until(lambda d: d.execute_script(DRAWN))
    return {"seconds": time.monotonic() - clicked[id(d)]}


def sign_out(d, c: dict) -> dict:
    d.find_element(By.ID, "sign-out").click()
    return {"page": page(d)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pins", required=True)
    ap.add_argument("--profiles", type=Path, required=True)
    args = ap.parse_args()
    drivers: dict[str, webdriver.Chrome] = {}
    actions = {"sign_in": sign_in, "connected": connected, "type": type_keys, "sign_out": sign_out,
               "first_frame": first_frame,
               "screenshot": lambda d, c: {"saved": d.save_screenshot(c["path"])}}
    try:
        for line in sys.stdin:
            c = json.loads(line)
            who = c.get("browser", "default")
            try:
                if c["do"] == "quit":
                    if who in drivers:
                        drivers.pop(who).quit()
                    answer = {}
                else:
                    if who not in drivers:
                        drivers[who] = browser(args.profiles / who, args.pins)
                    answer = actions[c["do"]](drivers[who], c)
            except Exception as e:  # noqa: BLE001 (the test gets the reason, the seat stays up)
                answer = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            print(json.dumps(answer), flush=True)
    finally:
        for d in drivers.values():
            d.quit()


if __name__ == "__main__":
    main()
