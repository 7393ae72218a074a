"""The console in a real browser (issue 18): three journeys through the pages only, in headless
Chromium (Debian's ``chromium`` and ``chromium-driver``), every service its own process.

1. A resident signs up, tells the platform who they are, registers with 白浜町 and applies; a 白浜町
   reviewer signs in (password + TOTP) and approves; the resident sees the certificate and the JAL
   grant in マイページ; JAL's own feed has the certificate.
2. A reviewer of another municipality (田辺市) cannot see or act on 白浜町's queue: not in their
   queue, refused on direct URLs, refused on a forged approve.
3. A 白浜町 manager revokes; the resident sees it; the CSV of certificates has a BOM and Japanese
   headings.

axe-core (vendored, tests/vendor/axe-core) runs in the same browser on every page the journeys
visit: no serious or critical violation. Each journey saves screenshots under the pytest tmp dir
(``NICHIIKI_CONSOLE_SCREENSHOTS=docs`` also copies the main ones to docs/console/). The browser
tests never skip: without Chromium they fail and say how to install it (``./nichiiki test`` does).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest

from shared.cli.demo import JAL_FEED, JAL_PROGRAM, SHIRAHAMA, STAFF_TOTP_SECRET, PartnerFeed
from shared.cli.fleet import ServiceFleet
from shared.contracts.partners import PartnerCertificate
from shared.kit.settings import REPO_ROOT, Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings

pytestmark = [pytest.mark.stack, pytest.mark.timeout(420)]

AXE = REPO_ROOT / "tests" / "vendor" / "axe-core" / "axe.min.js"
#: How long a page may take to replace the last one (a loaded machine, a form's service calls).
NAVIGATION_S = 30
DOCS_SHOTS = REPO_ROOT / "docs" / "console"
#: A prefecture one registers with directly (新潟県).
NIIGATA = "150002"
PHONE = (412, 915)
DESKTOP = (1280, 1000)
#: What the journeys go through, the console last (it is given the others' URLs).
JOURNEY_SERVICES = (
    "registration", "certification", "subsidy", "donation", "notification", "partner_gateway", "identity", "console",
)
#: Impacts that fail a page (axe: minor, moderate, serious, critical).
BLOCKING = {"serious", "critical"}


def _swapped_under_us(error: Exception) -> bool:
    """ChromeDriver's answer when the page an element came from is replaced between finding it and
    reading it (a reload or navigation finishing meanwhile): sometimes a stale-element error, sometimes
    this "unknown error" from its inspector. Either means "that page is gone", not a failure."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    return isinstance(error, StaleElementReferenceException) or (
        isinstance(error, WebDriverException) and "does not belong to the document" in (error.msg or "")
    )


def _settled(check: Callable[[], bool]) -> bool:
    """``check`` on the page now; False (look again) when the page was swapped while it looked."""
    try:
        return check()
    except Exception as error:
        if _swapped_under_us(error):
            return False
        raise


def _replaced(stale: Callable[[Any], Any], driver: Any) -> bool:
    """Selenium's ``staleness_of``, also taking ChromeDriver's inspector error as "replaced"."""
    try:
        return bool(stale(driver))
    except Exception as error:
        if _swapped_under_us(error):
            return True
        raise


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: `apt-get install -y chromium "
            "chromium-driver fonts-noto-cjk` (./nichiiki test installs them when run as root)", pytrace=False,
        )
    return browser, driver


@dataclass
class Browser:
    """One headless Chromium for the module, with the journeys' helpers: pages, forms, screenshots, axe."""

    driver: Any
    base: str
    shots: Path
    visited: list[str] = field(default_factory=list)

    def size(self, width_height: tuple[int, int]) -> None:
        self.driver.set_window_size(*width_height)

    def go(self, path: str) -> None:
        self.driver.get(self.base + path)
        self.checked()

    @property
    def path(self) -> str:
        url: str = self.driver.current_url
        return url.removeprefix(self.base)

    @property
    def text(self) -> str:
        body: str = self.driver.find_element("tag name", "body").text
        return body

    def field(self, name: str) -> Any:
        return self.driver.find_element("id", f"field-{name}")

    def fill(self, **values: str) -> None:
        for name, value in values.items():
            element = self.field(name)
            if element.get_attribute("type") == "date":  # typing into a date input depends on the locale
                self.driver.execute_script("arguments[0].value = arguments[1]", element, value)
            else:
                element.clear()
                element.send_keys(value)

    def submit(self, action: str) -> None:
        """Press the submit button of the form posting to ``action`` (by keyboard: Enter on the button)."""
        form = self.driver.find_element("css selector", f"form[action='{action}']")
        self.follow(form.find_element("css selector", "button[type=submit]"))

    def follow(self, element: Any) -> None:
        """Click a link or button that loads the next page, and check that page once it is there.

        A click only starts the navigation: checked at once, ``checked`` could find the old page
        (axe already in it), and the new one then load under the audit ("axe is not defined")."""
        from selenium.webdriver.support.expected_conditions import staleness_of
        from selenium.webdriver.support.wait import WebDriverWait

        old = self.driver.find_element("tag name", "html")
        element.click()
        WebDriverWait(self.driver, NAVIGATION_S).until(lambda driver: _replaced(staleness_of(old), driver))
        self.checked()

    def shot(self, name: str) -> Path:
        target = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(target))
        return target

    def checked(self) -> None:
        """axe-core on the page now: no serious or critical violation."""
        from selenium.webdriver.support.wait import WebDriverWait

        WebDriverWait(self.driver, NAVIGATION_S).until(
            lambda driver: driver.execute_script("return document.readyState") == "complete"
        )
        self.visited.append(self.path)
        if not self.driver.execute_script("return typeof axe !== 'undefined'"):
            self.driver.execute_script(AXE.read_text())
        violations = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map("
            "v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))}))))"
        )
        blocking = [v for v in violations if v["impact"] in BLOCKING]
        assert not blocking, f"axe on {self.path}: {blocking}"

    def sign_in(self, username: str, password: str, totp_secret: str | None = None) -> None:
        self.go("/signin")
        self.fill(username=username, password=password)
        if totp_secret:
            self.fill(totp=pyotp.TOTP(totp_secret).now())
        self.submit("/signin")
        assert "/signin" not in self.path, self.text

    def sign_out(self) -> None:
        self.submit("/signout")
        assert self.path.startswith("/signin"), self.path

    def until(self, what: str, check: Callable[[], bool], timeout: float = 45.0, reload: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not _settled(check):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not show within {timeout:.0f} s on {self.path}:\n{self.text}")
            time.sleep(0.5)
            if reload:
                self.driver.refresh()

    def fetch(self, path: str, method: str = "GET", body: str | None = None) -> tuple[int, bytes]:
        """What the page's own fetch gets (same cookies): status and bytes."""
        status, encoded = self.driver.execute_async_script(
            "const [path, method, body, done] = arguments;"
            "fetch(path, {method, body, headers: body ? {'content-type': 'application/x-www-form-urlencoded'} : {},"
            " redirect: 'manual'}).then(async r => { const b = new Uint8Array(await r.arrayBuffer()); let s = '';"
            " for (const x of b) s += String.fromCharCode(x); done([r.status, btoa(s)]); });",
            path, method, body,
        )
        return int(status), base64.b64decode(encoded)


@pytest.fixture(scope="module")
def console_settings(backends: Backends, run_id: str) -> Settings:
    return make_settings(backends, f"{run_id}c")


@pytest.fixture(scope="module")
def fleet(console_settings: Settings, backends: Backends, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServiceFleet]:
    _chromium()  # fail fast, before the fleet starts
    fleet = ServiceFleet(console_settings, backends, tmp_path_factory.mktemp("console-logs"))
    try:
        fleet.start(JOURNEY_SERVICES)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def browser(fleet: ServiceFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--lang=ja-JP",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(30)
    shots = tmp_path_factory.mktemp("console-screenshots")
    try:
        yield Browser(driver, fleet.url("console"), shots)
    finally:
        driver.quit()
        if os.environ.get("NICHIIKI_CONSOLE_SCREENSHOTS") == "docs":
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            for name in DOCS_NAMES:
                if (shots / f"{name}.png").exists():
                    shutil.copy(shots / f"{name}.png", DOCS_SHOTS / f"{name}.png")


#: The screenshots docs/console.md shows.
DOCS_NAMES = ("signin", "my-profile", "my-apply-error", "staff-home", "staff-queue", "staff-application",
              "my-certificates", "other-town-refused", "staff-certificate-revoke", "my-revoked")


@dataclass
class Shared:
    """What one journey leaves for the next (they run in order, in one module)."""

    email: str = ""
    password: str = ""
    application_id: str = ""
    certificate_number: str = ""


@pytest.fixture(scope="module")
def shared() -> Shared:
    return Shared()


@pytest.fixture(scope="module")
def jal_feed(console_settings: Settings) -> Iterator[PartnerFeed]:
    # A partner's consumer groups start with "<code>." (its ACLs allow no other).
    feed = PartnerFeed(console_settings, console_settings.topic(JAL_FEED), f"jal.console-{secrets.token_hex(3)}")
    # The demo runs it under its event loop; the browser tests are synchronous: its own thread.
    thread = threading.Thread(target=feed._consume, daemon=True)
    thread.start()
    yield feed
    feed._stop.set()
    thread.join(10)


def test_1_a_resident_applies_and_a_reviewer_approves(
    browser: Browser, shared: Shared, jal_feed: PartnerFeed
) -> None:
    tag = secrets.token_hex(3)
    shared.email, shared.password = f"console.{tag}@example.jp", f"console-pass-{tag}-long"
    browser.size(PHONE)
    browser.go("/signin")
    assert browser.driver.find_element("tag name", "html").get_attribute("lang") == "ja"
    browser.shot("signin")

    # Sign up (a mismatched password first: the page says so and keeps the e-mail).
    browser.go("/signup")
    browser.fill(username=shared.email, password=shared.password, password_again="something else entirely")
    browser.submit("/signup")
    assert "パスワードが一致しません" in browser.text
    assert browser.field("username").get_attribute("value") == shared.email
    browser.fill(password=shared.password, password_again=shared.password)
    browser.submit("/signup")
    assert browser.path.startswith("/my"), browser.text

    # Who they are, with consents to e-mail and to share the certificate with JAL.
    browser.fill(name="山田 花子", name_kana="ヤマダ ハナコ", phone="090-1234-5678", date_of_birth="1985-06-15",
                 legal_address_code="131016")
    browser.field("consent_email").click()
    browser.field("consent_jal").click()
    browser.shot("my-profile")
    browser.submit("/my/profile")
    assert "登録しました" in browser.text, browser.text

    browser.fill(municipality_code=SHIRAHAMA)
    browser.submit("/my/registrations")
    assert "和歌山県白浜町" in browser.text and "基本登録" in browser.text, browser.text
    # And with a prefecture itself (新潟県): its confirmation reaches the inbox in words of its own.
    browser.fill(municipality_code=NIIGATA)
    browser.submit("/my/registrations")
    assert "新潟県" in browser.text, browser.text
    browser.go("/my/inbox")
    browser.until("both confirmations", lambda: "（新潟県）" in browser.text and "（和歌山県白浜町）" in browser.text)
    niigata = browser.driver.find_element("xpath", "//li[contains(@class, 'message')][contains(., '（新潟県）')]")
    assert "新潟県へのふるさと住民登録（ベーシック）" in niigata.text and "山田 花子 様" in niigata.text, niigata.text

    # Apply, first with too few stay days: the page says what is wrong (or that the registration is
    # still on its way to certification), in Japanese, and keeps what was typed.
    browser.go("/my/apply")
    browser.fill(municipality_code=SHIRAHAMA, planned_stay_days="5", address_there="和歌山県西牟婁郡白浜町1234番地",
                 jal_member_number="123456789")
    browser.submit("/my/apply")
    assert browser.path == "/my/apply", browser.path
    summary = browser.driver.find_element("css selector", ".error-summary")
    assert "入力内容を確認してください" in summary.text
    assert browser.field("address_there").get_attribute("value") == "和歌山県西牟婁郡白浜町1234番地"
    assert browser.field("jal_member_number").get_attribute("value") == "123456789"
    browser.shot("my-apply-error")
    browser.fill(planned_stay_days="90")
    deadline = time.monotonic() + 45
    browser.submit("/my/apply")
    while not browser.path.startswith("/my/certificates"):
        assert time.monotonic() < deadline, browser.text
        assert browser.field("address_there").get_attribute("value") == "和歌山県西牟婁郡白浜町1234番地"
        time.sleep(1)
        browser.submit("/my/apply")
    assert "申請しました" in browser.text
    browser.sign_out()

    # The reviewer: password + TOTP.
    browser.size(DESKTOP)
    browser.sign_in("reviewer@shirahama.example", "nichiiki-dev-reviewer-pass", STAFF_TOTP_SECRET)
    assert browser.path == "/staff"
    assert "審査待ちの認定申請" in browser.text
    browser.shot("staff-home")
    browser.go("/staff/applications")
    links = browser.driver.find_elements("css selector", "tbody th a")
    assert len(links) == 1, browser.text
    shared.application_id = links[0].text
    browser.shot("staff-queue")
    browser.follow(links[0])
    assert "市町村の要件の確認" in browser.text and "適合" in browser.text
    assert "123456789" in browser.text
    browser.shot("staff-application")
    browser.submit(f"/staff/applications/{shared.application_id}/approve")
    assert "承認しました" in browser.text, browser.text
    shared.certificate_number = browser.driver.find_element(
        "css selector", "main dl.facts a[href^='/staff/certificates/']").text
    assert shared.certificate_number.startswith(f"NCH-{SHIRAHAMA}-"), shared.certificate_number
    browser.sign_out()

    # The resident sees the certificate and the JAL grant.
    browser.size(PHONE)
    browser.sign_in(shared.email, shared.password)
    browser.go("/my/certificates")
    browser.until("the certificate and the JAL grant", lambda: shared.certificate_number in browser.text
                  and bool(browser.driver.find_elements("css selector", f"tr.grant[data-program='{JAL_PROGRAM}']")))
    certificate = browser.driver.find_element("css selector", f"li[data-number='{shared.certificate_number}']")
    assert "有効" in certificate.text
    grant = browser.driver.find_element("css selector", f"tr.grant[data-program='{JAL_PROGRAM}']")
    assert "交付済み" in grant.text, grant.text
    browser.shot("my-certificates")

    # JAL's own consumer has the certificate on its feed.
    deadline = time.monotonic() + 45
    while not any(r.key == shared.certificate_number and r.ce_type == PartnerCertificate.event_type
                  for r in jal_feed.records()):
        assert time.monotonic() < deadline, f"not on JAL's feed: {jal_feed.last_error}"
        time.sleep(0.5)
    record = next(r for r in jal_feed.records() if r.key == shared.certificate_number and r.data)
    assert record.data is not None and record.data["status"] == "valid"
    assert record.data["municipality_code"] == SHIRAHAMA
    browser.sign_out()


def test_2_staff_of_another_municipality_cannot_see_or_act(browser: Browser, shared: Shared) -> None:
    assert shared.application_id, "journey 1 must run first"
    browser.size(DESKTOP)
    browser.sign_in("reviewer@tanabe.example", "nichiiki-dev-reviewer-pass", STAFF_TOTP_SECRET)
    browser.go("/staff/applications?status=any")
    assert shared.application_id not in browser.text
    for path in (f"/staff/applications/{shared.application_id}", f"/staff/certificates/{shared.certificate_number}"):
        browser.go(path)
        assert browser.driver.find_element("tag name", "h1").text == "エラー", browser.text
        assert shared.application_id not in browser.text.replace(path, "")
        status, _ = browser.fetch(path)
        assert status in (403, 404), (path, status)
    browser.go(f"/staff/applications/{shared.application_id}")
    browser.shot("other-town-refused")
    # A forged approve with this session's own CSRF token: the service refuses it.
    csrf = browser.driver.find_element(
        "css selector", "form[action='/signout'] input[name=csrf]").get_attribute("value")
    status, page = browser.fetch(f"/staff/applications/{shared.application_id}/approve", "POST", f"csrf={csrf}")
    assert status in (403, 404), (status, page.decode()[:500])
    # Without the token, the console refuses before any service hears of it.
    status, _ = browser.fetch(f"/staff/applications/{shared.application_id}/approve", "POST", "csrf=forged")
    assert status == 403
    browser.sign_out()


def test_3_a_manager_revokes_and_the_resident_sees_it(browser: Browser, shared: Shared) -> None:
    assert shared.certificate_number, "journey 1 must run first"
    browser.size(DESKTOP)
    browser.sign_in("manager@shirahama.example", "nichiiki-dev-manager-pass", STAFF_TOTP_SECRET)
    browser.go(f"/staff/certificates/{shared.certificate_number}")
    browser.driver.find_element("css selector", "#field-reason_code option[value='holder_request']").click()
    browser.fill(note="本人より窓口で申出（テスト）")
    browser.shot("staff-certificate-revoke")
    browser.submit(f"/staff/certificates/{shared.certificate_number}/revoke")
    assert "取り消しました" in browser.text and "取消" in browser.text, browser.text

    status, body = browser.fetch("/staff/certificates.csv")
    assert status == 200
    assert body.startswith(b"\xef\xbb\xbf"), body[:10]
    rows = list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    assert rows[0][:5] == ["証明書番号", "住民ID", "状態", "有効期間開始", "有効期間終了"], rows[0]
    (row,) = [r for r in rows[1:] if r[0] == shared.certificate_number]
    assert row[2] == "revoked"
    browser.sign_out()

    browser.size(PHONE)
    browser.sign_in(shared.email, shared.password)
    browser.go("/my/certificates")
    browser.until("the revocation", lambda: "取消" in browser.driver.find_element(
        "css selector", f"li[data-number='{shared.certificate_number}']").text)
    browser.shot("my-revoked")
    # English on request, the same page.
    browser.follow(browser.driver.find_element("css selector", "a.lang"))
    assert browser.driver.find_element("tag name", "html").get_attribute("lang") == "en"
    assert "Revoked" in browser.text
    browser.follow(browser.driver.find_element("css selector", "a.lang"))
    browser.sign_out()
