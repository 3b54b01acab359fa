"""The run's page, <d>_samples/report.html: written by every run, rebuilt by --report, safe from the
run's own text. tests/test_report_browser.py opens one in Chromium."""
import fcntl
import html.parser
import shutil

import torch

from conftest import assert_one_line_error, run_main
from test_folder_and_conditional import make_folder


class Page(html.parser.HTMLParser):
    """What a page holds: its images' sources, its text, its <meta refresh>, any script."""

    def __init__(self, text):
        super().__init__()
        self.images, self.words, self.refresh, self.scripts = [], [], False, 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.images += [attrs["src"]] if tag == "img" else []
        self.refresh |= tag == "meta" and attrs.get("http-equiv") == "refresh"
        self.scripts += tag in ("script", "iframe", "object", "embed", "link")

    def handle_data(self, data):
        self.words.append(data)

    @property
    def text(self):
        return " ".join(self.words)


def page_of(out, source):
    return Page((out / f"{source}_samples" / "report.html").read_text())


def test_a_finished_run_has_its_page(uniform_run, mnist_run):
    for run, source in ((uniform_run, "uniform"), (mnist_run, "mnist")):
        page = page_of(run.out, source)
        assert f"{source} run: finished" in page.text and "pass 2 of 2" in page.text
        assert not page.refresh and page.scripts == 0  # a finished page stays; nothing runs or loads
        assert page.images[0] == "train_pass1.png"  # the newest first
        assert sorted(set(page.images)) == ["losses.png", "progress.gif", "train_pass0.png", "train_pass1.png"]
        for src in page.images:  # every image beside the page, linked relative to it
            assert (run.out / f"{source}_samples" / src).is_file()
        assert "no scores: the run was not trained with --eval_every K" in page.text


def test_a_conditional_folder_run_escapes_its_class_names_and_path(tmp_path, capsys):
    images = make_folder(tmp_path / "<script>alert(1)</script>", classes=("<b>cat", "dog&co"))
    out = tmp_path / "out"
    code, _, err = run_main(["-d", "folder", "--data_dir", images, "--image_size", 8, "--conditional", 1,
                             "--batch_size", 8, "--iters", 2, "--passes", 1, "--use_gpu", 0, "--quiet",
                             "--out_dir", out], capsys)
    assert code == 0, err
    raw = (out / "folder_samples" / "report.html").read_text()
    assert "<script>" not in raw and "<b>" not in raw and "dog&co" not in raw
    page = Page(raw)
    assert page.scripts == 0
    assert "<script>alert(1)</script>" in page.text and "<b>cat, dog&co" in page.text  # as text
    assert "folder run: finished" in page.text


def test_a_running_run_refreshes_and_a_stopped_one_says_where(tmp_path, capsys, monkeypatch):
    import gan_trainer
    states = []
    real = gan_trainer.write_report
    monkeypatch.setattr(gan_trainer, "write_report", lambda *a: states.append(a[3]) or real(*a))
    code, _, err = run_main(["-d", "uniform", "--passes", 2, "--iters", 5, "--use_gpu", 0, "--quiet",
                             "--out_dir", tmp_path], capsys)
    assert code == 0, err
    assert states == ["running", "finished"]
    page = page_of(tmp_path, "uniform")
    assert not page.refresh and "updated" in page.text
    # the page as pass 0 left it: it reloads itself
    ckpt = torch.load(tmp_path / "uniform_params" / "pass_0.pt")
    gan_trainer.write_report(tmp_path / "uniform_samples", ckpt, [], "running")
    page = page_of(tmp_path, "uniform")
    assert page.refresh and "uniform run: running" in page.text and "time left" in page.text


def test_report_rebuilds_the_page_of_an_existing_run_and_writes_nothing_else(uniform_run, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(uniform_run.out, out)
    (out / "uniform_samples" / "report.html").unlink()
    (out / "uniform_samples" / "losses.png").unlink()  # as a run made before it drew one
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, stdout, err = run_main(["-d", "uniform", "--report", "--out_dir", out], capsys)
    assert code == 0, err
    assert "wrote" in stdout and "(finished)" in stdout
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert set(after) - set(before) == {(out / "uniform_samples" / "report.html").relative_to(out)}
    page = page_of(out, "uniform")
    assert "losses: not recorded" in page.text and "uniform run: finished" in page.text
    assert "losses.png" not in page.images


def test_report_is_refused_on_a_folder_a_live_run_holds(uniform_run, tmp_path, capsys):
    out = tmp_path / "live"
    shutil.copytree(uniform_run.out, out)
    with open(out / "uniform_params" / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the live run holds it
        code, _, err = run_main(["-d", "uniform", "--report", "--out_dir", out], capsys)
    assert_one_line_error(code, err, "--report: a live run holds", "rewrites")


def test_report_takes_no_training_flags_and_needs_a_run(tmp_path, capsys):
    code, _, err = run_main(["-d", "mnist", "--report", "--data_dir", tmp_path, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "--data_dir does not apply to --report")
    code, _, err = run_main(["-d", "mnist", "--report", "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "no checkpoint")
