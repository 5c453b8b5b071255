"""The playground at `/` in a real browser: Debian's chromium, headless, driven by Selenium through
Debian's chromium-driver.

    PIXART_URL=http://127.0.0.1:8000 PIXART_KEY=secret SCREENSHOT=playground.png \\
        tests/clients/python/.venv/bin/python tests/clients/python/playground.py

The server must run with `--api-key $PIXART_KEY` and the tiny model. Checks, each printed as
`ok NAME passed`: the page asks for the key once and sends it; the form built from the schema
(every field of the request is there); a prompt typed and submitted with the keyboard alone
(Ctrl+Enter) gives images of the requested custom size, with seed and timings; the request
copies as curl, JS and Python code; a long request
is cancelled from the page; a prompt with markup is shown as text; after a reload the history
lists the requests; at a phone's width nothing scrolls sideways; no script error in the console
(HTTP error statuses the page handles, such as the 400 of a cancelled request, are not script
errors). Saves a screenshot to $SCREENSHOT. Exits 1 on the first failure.
"""

import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

URL, KEY = os.environ["PIXART_URL"], os.environ["PIXART_KEY"]
SCREENSHOT = os.environ.get("SCREENSHOT", "playground.png")
HOSTILE = '<img src=x onerror="document.title=\'pwned\'">'


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def wait(driver, check, what, timeout=60):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: check(d))
    except Exception as e:
        raise AssertionError(f"timed out waiting for {what}: {driver.find_element(By.ID, 'status').text!r}") from e


def status(driver):
    return driver.find_element(By.ID, "status").text


def script_errors(driver):
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def set_field(driver, name, value):
    field = driver.find_element(By.ID, f"f-{name}")
    field.clear()
    field.send_keys(str(value))


def custom_size(driver, width, height):
    Select(driver.find_element(By.ID, "f-image_size")).select_by_value("custom")
    pair = driver.find_elements(By.CSS_SELECTOR, "[data-name=image_size] .pair input")
    for box, value in zip(pair, [width, height]):
        box.clear()
        box.send_keys(str(value))


def main():
    schema = json.load(urllib.request.urlopen(f"{URL}/playground/schema.json"))
    driver = browser()
    try:
        driver.get(URL + "/")
        wait(driver, lambda d: d.find_elements(By.ID, "f-prompt"), "the form")
        missing = [n for n in schema["properties"] if not driver.find_elements(By.ID, f"f-{n}")]
        assert not missing, f"fields of the schema missing from the form: {missing}"
        csp = urllib.request.urlopen(f"{URL}/").headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
        print("ok form passed")

        # The key: asked for on the first call, then sent.
        prompt = driver.find_element(By.ID, "f-prompt")
        prompt.send_keys("a lighthouse at dusk")
        set_field(driver, "num_inference_steps", 2)
        custom_size(driver, 64, 48)
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        wait(driver, lambda d: d.find_element(By.ID, "key-box").is_displayed(), "the key prompt")
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "save-key").click()
        driver.get_log("browser")  # the 401 is expected: drop it
        print("ok api_key passed")

        # Keyboard alone: Ctrl+Enter in the prompt.
        driver.find_element(By.ID, "f-prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        wait(driver, lambda d: status(d) == "Done", "the images")
        images = driver.find_elements(By.CSS_SELECTOR, "#images img")
        sizes = [driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i) for i in images]
        assert sizes == [[64, 48]], sizes
        details = driver.find_element(By.ID, "details").text
        assert "seed" in details and "inference" in details, details
        print("ok generate passed")
        driver.save_screenshot(SCREENSHOT)

        # The request as code (the clipboard may be refused headless: the text is shown then).
        for kind, marker in [("curl", "curl -X POST"), ("js", "fal.subscribe("), ("python", "fal_client.subscribe(")]:
            driver.find_element(By.CSS_SELECTOR, f"[data-code={kind}]").click()
            code = wait(driver, lambda d: d.find_element(By.ID, "code").get_attribute("value"), f"the {kind} code")
            assert marker in code and "a lighthouse at dusk" in code and '"num_inference_steps": 2' in code, code
        print("ok code passed")

        # A long request, cancelled from the page.
        set_field(driver, "num_inference_steps", 200)
        custom_size(driver, 512, 512)
        driver.find_element(By.ID, "generate").click()
        wait(driver, lambda d: status(d).startswith("Step "), "the long request to run")
        driver.find_element(By.ID, "cancel").click()
        wait(driver, lambda d: "cancelled" in status(d), "the cancel")
        print("ok cancel passed")

        # Markup in a prompt is text.
        prompt = driver.find_element(By.ID, "f-prompt")
        prompt.clear()
        prompt.send_keys(HOSTILE)
        set_field(driver, "num_inference_steps", 1)
        custom_size(driver, 32, 32)
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        wait(driver, lambda d: status(d) == "Done", "the third request")
        assert driver.title != "pwned" and HOSTILE in driver.find_element(By.ID, "details").text
        print("ok escaped passed")

        # History survives a reload.
        driver.refresh()
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) >= 3, "the history")
        history = driver.find_element(By.ID, "history").text
        assert "a lighthouse at dusk" in history and HOSTILE in history, history
        print("ok history passed")

        driver.set_window_size(390, 844)
        time.sleep(0.3)
        wide = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, f"the page scrolls sideways by {wide} px at a phone's width"
        print("ok phone passed")

        errors = script_errors(driver)
        assert not errors, errors
        print("ok console passed")
    finally:
        driver.quit()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
