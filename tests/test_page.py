"""The page at / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): upload a
PyAV-made clip, ask, and see streamed text, thumbnails and timings appear. Skips where Chromium is absent."""
import os
import shutil

import pytest

import pllava
from pllava.server import ServerConfig
from pllava.testing import make_video
from server_util import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium / chromedriver not installed")
ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


def test_page_uploads_a_clip_and_streams_the_answer(ckpts, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    clip = make_video(str(tmp_path / "clip.mp4"), num_frames=24, size=(160, 120), codec="libx264")
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1100"):
        opts.add_argument(a)
    with LiveServer(eng, ServerConfig(model_name="tiny-pllava", max_new_tokens_limit=64)) as s:
        drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
        try:
            drv.get(s.url + "/")
            drv.find_element(By.ID, "file").send_keys(clip)
            WebDriverWait(drv, 20).until(lambda d: "clip.mp4" in d.find_element(By.ID, "picked").text)
            q = drv.find_element(By.ID, "question")
            q.clear()
            q.send_keys("What is happening in the video?")
            drv.find_element(By.ID, "maxtok").clear()
            drv.find_element(By.ID, "maxtok").send_keys("24")
            drv.find_element(By.ID, "ask").click()
            WebDriverWait(drv, 60).until(lambda d: d.find_element(By.ID, "timings").text.strip() != "")
            answer = drv.find_element(By.ID, "answer").text
            assert answer.strip(), "no streamed text appeared"
            assert drv.find_element(By.ID, "error").text == ""
            thumbs = drv.find_elements(By.CSS_SELECTOR, "#frames img")
            assert len(thumbs) == eng.config.num_frames
            assert "prefill" in drv.find_element(By.ID, "timings").text
            os.makedirs(ARTIFACTS, exist_ok=True)
            drv.save_screenshot(os.path.join(ARTIFACTS, "page.png"))
        finally:
            drv.quit()
