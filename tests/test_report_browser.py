"""The run's page opened in a real browser: headless Chromium, from the disk, with no network."""
import json
import re
import shutil
import subprocess

import pytest

from conftest import run_main

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")

# A page that opens the report in a frame and writes what it finds into its own DOM, which
# --dump-dom prints once the page has loaded (the report itself runs no script).
HARNESS = """<!DOCTYPE html><html><body><pre id="result">the report did not load</pre>
<iframe id="page" src="{src}" width="1366" height="768"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {{
  const w = document.getElementById("page").contentWindow, d = w.document;
  const rows = [...d.querySelectorAll(".scores table tr")].slice(1);
  document.getElementById("result").textContent = JSON.stringify({{
    title: d.querySelector("h1").textContent,
    images: [...d.images].map(i => [i.getAttribute("src"), i.complete ? i.naturalWidth : 0]),
    score_rows: rows.filter(r => !r.classList.contains("floor")).length,
    best_rows: d.querySelectorAll(".scores tr.best").length,
    fetched: w.performance.getEntriesByType("resource").map(e => e.name)}});
}});
</script></body></html>"""


def open_in_chromium(page, tmp_path):
    """What the harness finds in `page`; the network is unreachable (every host name fails)."""
    harness = tmp_path / f"harness_{page.stem}.html"
    harness.write_text(HARNESS.format(src=page.as_uri()))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", harness.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_the_page_of_a_small_run_loads_whole_in_chromium_without_the_network(tmp_path, capsys):
    code, _, err = run_main(["-d", "uniform", "--passes", 3, "--iters", 30, "--eval_every", 1, "--samples", 200,
                             "--use_gpu", 0, "--quiet", "--seed", 2, "--out_dir", tmp_path], capsys)
    assert code == 0, err
    page = tmp_path / "uniform_samples" / "report.html"
    seen = open_in_chromium(page, tmp_path)
    assert "uniform" in seen["title"] and "finished" in seen["title"]
    sources = [src for src, _ in seen["images"]]
    assert sources == ["train_pass2.png", "losses.png", "progress.gif",
                       "train_pass2.png", "train_pass1.png", "train_pass0.png"]
    assert all(width > 0 for _, width in seen["images"]), seen["images"]  # every image loaded
    assert seen["score_rows"] == 3 and seen["best_rows"] == 1
    assert seen["fetched"] == []
    # the same check sees a page that does fetch from elsewhere
    leaky = page.with_name("leaky.html")
    leaky.write_text(page.read_text().replace("</body>", '<img src="http://example.com/x.png"></body>'))
    assert open_in_chromium(leaky, tmp_path)["fetched"] == ["http://example.com/x.png"]
