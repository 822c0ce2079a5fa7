"""The web page at /ui, in a real headless Chromium (Debian's chromium and chromium-driver,
which `make setup` installs) driven by Selenium. Leaves screenshots in tests/artifacts/."""

import json
from pathlib import Path

import httpx
import pytest

from tests.clients.conftest import KEY, SLOW_CONFIG
from tests.live_server import PATIENCE_S, REPO

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
        "the browser tests need Debian's chromium and chromium-driver: run `make setup`"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # The driver's path is given, so Selenium never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def screenshot(browser, name: str) -> Path:
    """The whole page, as a test artifact."""
    # The window's height is the page's plus the browser's own frame around it.
    height = browser.execute_script(
        "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight")
    browser.set_window_size(1280, height)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def test_pages_hold_no_job_data_and_fragments_need_a_key(server, finished_job):
    page = httpx.get(f"{server.url}/ui/jobs/{finished_job.id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "model.pt" not in page.text
    for fragment in ("/ui/fragments/jobs", f"/ui/fragments/jobs/{finished_job.id}"):
        answer = httpx.get(server.url + fragment)
        assert answer.status_code == 401 and "API key" in answer.json()["detail"]


def test_job_list_and_job_page_in_a_browser(server, finished_job, client, backdoored_digits, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The list re-renders itself every few seconds: an element found a moment ago may be gone.
    wait = WebDriverWait(browser, PATIENCE_S, ignored_exceptions=[StaleElementReferenceException])

    def text_of(selector: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, selector).text

    browser.get(f"{server.url}/ui")
    key_input = wait.until(lambda b: b.find_element(By.ID, "api-key"))
    key_input.send_keys("not-a-key")
    key_input.submit()
    wait.until(lambda b: "not known" in text_of("#key-message"))
    # The server's `baerase keys create` is shown as code, without its backticks.
    assert "`" not in text_of("#key-message")
    assert browser.find_element(By.CSS_SELECTOR, "#key-message code").text == "baerase keys create --tenant NAME"
    key_input.send_keys(KEY)
    key_input.submit()

    # The classes the job's verdict names: the erased target, or those that may survive
    # (test_commands.py says why either verdict can come).
    result = json.loads(finished_job.run.stdout)["result"]
    named = ", ".join(map(str, result["detected_targets" if result["verdict"] == "removed" else "residual_targets"]))
    row = f'tr[data-job-id="{finished_job.id}"]'
    wait.until(lambda b: "succeeded" in text_of(row))
    assert f"backdoor in class {named}" in text_of(row)
    assert KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('baerase.apiKey')") == KEY

    # A job submitted elsewhere shows up, and then changes, without a reload.
    other = client.submit(*backdoored_digits, SLOW_CONFIG)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{other.id}"]'))
    client.cancel(other.id)
    wait.until(lambda b: text_of(f'tr[data-job-id="{other.id}"] .status') == "cancelled")
    screenshot(browser, "job-list.png")

    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f'{row} a[href="/ui/jobs/{finished_job.id}"]').click() or True)
    wait.until(lambda b: text_of(".verdict h2").startswith("Backdoor found") and named in text_of(".verdict h2"))
    flagged = browser.find_elements(By.CSS_SELECTOR, "svg.chart .bar.flagged")
    assert [bar.find_element(By.CSS_SELECTOR, ".label").text for bar in flagged] == ["0"]
    assert "flagged" in flagged[0].text
    colour = "return getComputedStyle(document.querySelector(arguments[0])).fill"
    assert (browser.execute_script(colour, "svg.chart .bar.flagged rect")
            != browser.execute_script(colour, "svg.chart .bar:not(.flagged) rect"))
    assert "Clean accuracy" in text_of("table.metrics")

    sizes = "return [...document.querySelectorAll('.triggers img')].map(i => [i.naturalWidth, i.width])"
    pictures = wait.until(lambda b: (s := b.execute_script(sizes)) and all(n > 0 for n, _ in s) and s)
    assert all(natural >= 256 and shown >= 256 for natural, shown in pictures), pictures
    assert screenshot(browser, "job-page.png").stat().st_size > 0


@pytest.mark.parametrize("page, rendered", [
    ("/docs", ".swagger-ui .info .title"),  # Swagger UI's heading, drawn from /openapi.json
    ("/redoc", "redoc h1"),  # ReDoc's
])
def test_the_api_documentation_renders_from_this_server_alone(server, browser, page, rendered):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + page)
    title = WebDriverWait(browser, 60).until(  # seconds: a page that does not render never will
        expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, rendered)))
    assert "BAERASE" in title.text
    # Scripts, styles and the API description all come from the server. (ReDoc's sidebar footer
    # also shows Redocly's logo from their CDN: offline, that one image is missing.)
    loaded = browser.execute_script("return performance.getEntriesByType('resource')"
                                    ".filter(e => e.initiatorType !== 'img').map(e => e.name)")
    assert loaded and all(url.startswith(server.url) for url in loaded), loaded
    screenshot(browser, f"api{page.replace('/', '-')}.png")


def enter_key_if_asked(browser, wait) -> None:
    from selenium.webdriver.common.by import By

    wait.until(lambda b: b.find_element(By.ID, "key-form").is_displayed()
               or b.find_element(By.ID, "content").is_displayed())
    if browser.find_element(By.ID, "key-form").is_displayed():
        key_input = browser.find_element(By.ID, "api-key")
        key_input.send_keys(KEY)
        key_input.submit()


def test_submit_a_job_then_delete_it_in_a_browser(server, client, backdoored_digits, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from app.client import NotFound

    wait = WebDriverWait(browser, PATIENCE_S, ignored_exceptions=[StaleElementReferenceException])
    browser.get(f"{server.url}/ui")
    enter_key_if_asked(browser, wait)
    form = wait.until(lambda b: b.find_element(By.ID, "submit-form"))
    assert form.is_displayed()
    model, samples = backdoored_digits
    form.find_element(By.ID, "model-file").send_keys(str(model))
    form.find_element(By.ID, "samples-file").send_keys(str(samples))
    config = form.find_element(By.ID, "config-text")

    # The server's refusal shows beside the form, which keeps what was chosen.
    config.send_keys('{"seed": 0, "recovery": {"stepz": 1}}')
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    message = browser.find_element(By.ID, "submit-message")
    wait.until(lambda b: "config.recovery.stepz" in message.text)
    assert browser.current_url == f"{server.url}/ui"
    screenshot(browser, "submit-form.png")

    config.clear()
    config.send_keys(json.dumps(SLOW_CONFIG))
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda b: b.current_url.startswith(f"{server.url}/ui/jobs/"))
    job_id = browser.current_url.rsplit("/", 1)[1]
    job = client.get(job_id)
    assert job.data["inputs"]["model"]["filename"] == model.name and KEY not in browser.current_url
    assert job.data["config"]["recovery"]["screen_steps"] == SLOW_CONFIG["recovery"]["screen_steps"]
    wait.until(lambda b: model.name in b.find_element(By.CSS_SELECTOR, "#content h1").text)

    # Cancelled elsewhere: the page follows, and offers to delete the job once it has stopped.
    client.cancel(job_id)
    delete = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "button[data-delete]"))
    assert "cancelled" in browser.find_element(By.CSS_SELECTOR, "#content h1 .status").text
    delete.click()
    confirmation = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    assert job_id in confirmation.text and "removed for good" in confirmation.text
    confirmation.dismiss()  # changed their mind: nothing happens
    assert client.get(job_id).status == "cancelled" and browser.current_url.endswith(job_id)

    delete.click()
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).accept()
    wait.until(lambda b: b.current_url == f"{server.url}/ui")
    with pytest.raises(NotFound):
        client.get(job_id)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#content h1").text.startswith("Jobs"))
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]')

    # Its old page says so in the page's words, not the API's.
    browser.get(f"{server.url}/ui/jobs/{job_id}")
    notice = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#content .failure"))
    assert f"there is no job {job_id}" in notice.text and "the job list shows yours" in notice.text
    assert "GET /jobs" not in notice.text
