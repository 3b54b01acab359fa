"""The run's own options (--keep, --eval_every, --samples, --stop_on_collapse), the best checkpoint
and the collapse alarm; checkpoints of the previous format still load."""
import pytest
import torch

import gan_trainer as gt
from conftest import assert_one_line_error, read_metrics, run_main

TINY = ["-d", "uniform", "--batch_size", 16, "--iters", 20, "--seed", 3, "--use_gpu", 0, "--quiet"]


def train(capsys, out, *flags):
    code, stdout, err = run_main([*TINY, "--out_dir", out, *flags], capsys)
    assert code == 0, err
    return stdout


def passes_kept(out):
    return [p.name for p in gt.list_checkpoints(out / "uniform_params")]


def test_a_plain_resume_keeps_the_runs_own_keep(tmp_path, capsys):
    """--keep 0 (keep all) holds after a plain --resume: it is the run's, not the default 3."""
    train(capsys, tmp_path, "--passes", 2, "--keep", 0)
    train(capsys, tmp_path, "--resume", "--passes", 5)
    assert passes_kept(tmp_path) == [f"pass_{k}.pt" for k in range(5)]
    train(capsys, tmp_path, "--resume", "--passes", 6, "--keep", 2)  # a flag given on resume changes it
    assert passes_kept(tmp_path) == ["pass_4.pt", "pass_5.pt"]


def test_the_best_checkpoint_survives_keep_1_and_a_plain_resume_goes_on_evaluating(tmp_path, capsys):
    stdout = train(capsys, tmp_path, "--passes", 3, "--keep", 1, "--eval_every", 1, "--samples", 300)
    params = tmp_path / "uniform_params"
    assert passes_kept(tmp_path) == ["pass_2.pt"]
    evals = [m for m in read_metrics(params / "metrics.jsonl") if "eval" in m]
    assert [m["pass"] for m in evals] == [0, 1, 2]
    best = min(evals, key=lambda m: m["eval"]["sliced_w1"])
    ckpt = torch.load(params / "best.pt")
    assert ckpt["pass"] == best["pass"] and ckpt["quality"]["best"] == best["eval"]["sliced_w1"]
    assert "a new best sliced_w1" in stdout and "best.pt" in stdout
    code, stdout, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 5, "--params", "best",
                                  "--out_dir", tmp_path], capsys)
    assert code == 0 and "best.pt" in stdout, err
    train(capsys, tmp_path, "--resume", "--passes", 4)  # no flags: the run's --eval_every 1, --samples 300
    evals = [m for m in read_metrics(params / "metrics.jsonl") if "eval" in m]
    assert [m["pass"] for m in evals] == [0, 1, 2, 3]
    assert torch.load(params / "pass_3.pt")["run_options"] == {"keep": 1, "eval_every": 1, "samples": 300,
                                                                "stop_on_collapse": False}
    assert (params / "best.pt").exists() and passes_kept(tmp_path) == ["pass_3.pt"]


def test_params_best_without_a_best_checkpoint_says_so(tmp_path, capsys):
    train(capsys, tmp_path, "--passes", 1)
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 5, "--params", "best",
                             "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "no best checkpoint", "--eval_every")


def test_options_that_would_do_nothing_are_said(tmp_path, capsys):
    """--stop_on_collapse 1 without scores could never act: refused, leaving no folder behind;
    an --eval_every beyond the run's passes scores nothing: said."""
    code, _, err = run_main([*TINY, "--passes", 1, "--stop_on_collapse", 1, "--out_dir", tmp_path / "a"], capsys)
    assert_one_line_error(code, err, "--stop_on_collapse 1 acts on the scores of --eval_every K")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    stdout = train(capsys, tmp_path / "b", "--passes", 1, "--eval_every", 2, "--compile", 0)
    assert "note: --eval_every 2: this run of 1 pass scores none of them" in stdout
    assert not (tmp_path / "b" / "uniform_params" / "best.pt").exists()


def test_the_collapse_rule_on_a_scripted_sequence_of_scores():
    quality, seen = gt.Quality(), []
    for pass_id, score in enumerate([10.0, 8.0, 9.0, 17.0, 20.0, 30.0, 7.0, 15.0, 15.0]):
        quality, best, collapsed = quality.judge("fid", score, pass_id)
        seen.append((best, collapsed))
    # new bests at 10, 8 and 7; over 2 x 8 at 17 and 20: the second in a row is the alarm, said
    # once (not again at 30); after the new best 7, over 2 x 7 twice more: a second alarm
    assert seen == [(True, False), (True, False), (False, False), (False, False), (False, True),
                    (False, False), (True, False), (False, False), (False, True)]
    assert (quality.best, quality.best_pass, quality.last_pass) == (7.0, 6, 8)


def test_stop_on_collapse_ends_the_run_cleanly_with_its_checkpoint(tmp_path, capsys, monkeypatch):
    scripted = [0.05, 0.2, 0.3, 0.01, 0.01]  # passes 1 and 2 over twice the best: a collapse at pass 2
    monkeypatch.setattr(gt.Evaluator, "score_generator", lambda self, run, gen, n: {"sliced_w1": scripted[run.pass_id]})
    stdout = train(capsys, tmp_path, "--passes", 5, "--eval_every", 1, "--samples", 100, "--stop_on_collapse", 1)
    params = tmp_path / "uniform_params"
    assert "Pass=2 collapse: sliced_w1 0.3 is over 2x the best (0.05, pass 0)" in stdout
    assert "stopped after pass 2" in stdout
    assert passes_kept(tmp_path) == ["pass_0.pt", "pass_1.pt", "pass_2.pt"]
    assert torch.load(params / "best.pt")["pass"] == 0
    records = [m for m in read_metrics(params / "metrics.jsonl") if "collapse" in m]
    assert records == [{"pass": 2, "iteration": 20, "step": 60, "seconds": records[0]["seconds"],
                        "collapse": {"metric": "sliced_w1", "score": 0.3, "best": 0.05, "best_pass": 0}}]
    # resumed, it goes on (the alarm stays said) and a new best replaces best.pt
    train(capsys, tmp_path, "--resume", "--passes", 4)
    assert torch.load(params / "best.pt")["pass"] == 3


@pytest.mark.parametrize("format", [2, 3])
def test_a_checkpoint_of_a_previous_format_resumes_and_generates(tmp_path, capsys, format):
    """2: before the run's own options and its quality; 3: before the averaged G and --augment."""
    train(capsys, tmp_path, "--passes", 1, "--keep", 0)
    path = tmp_path / "uniform_params" / "pass_0.pt"
    ckpt = torch.load(path)
    ckpt["format"] = format
    del ckpt["generator_ema"], ckpt["config"]["ema"], ckpt["config"]["ema_kimg"], ckpt["config"]["augment"]
    if format == 2:
        del ckpt["run_options"], ckpt["quality"]
    torch.save(ckpt, path)
    code, stdout, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 5, "--out_dir", tmp_path], capsys)
    assert code == 0, err
    train(capsys, tmp_path, "--resume", "--passes", 2)
    assert torch.load(tmp_path / "uniform_params" / "pass_1.pt")["format"] == gt.CHECKPOINT_FORMAT
