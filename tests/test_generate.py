"""--generate N: the trained generator applied to fresh noise, written as FILE.npy and FILE.png."""
import shutil

import numpy as np
import pytest
import torch
import torch.serialization
from PIL import Image

import gan_trainer
from conftest import assert_one_line_error, load_ckpt, run_main


def copy_params(run, source, out_dir):
    shutil.copytree(run.params(source), out_dir / f"{source}_params")
    return out_dir / f"{source}_params"


def expected_samples(ckpt_path, n, seed):
    """What --generate n --seed seed must produce with the generator of ckpt_path."""
    ckpt = load_ckpt(ckpt_path)
    cfg = gan_trainer.check_config(ckpt["config"])
    gen, _ = gan_trainer.build_nets(cfg)
    gen.load_state_dict(ckpt["generator"])
    torch.manual_seed(seed)
    samples = gan_trainer.generate_samples(gen, torch.randn(n, cfg.noise_dim), cfg.batch_size)
    return (samples.clamp(-1, 1) if cfg.is_image else samples).numpy()


def test_generate_uniform_default_output(uniform_run, tmp_path, capsys):
    assert uniform_run.proc.returncode == 0
    copy_params(uniform_run, "uniform", tmp_path)
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 50, "--seed", 3,
                               "--out_dir", tmp_path], capsys)
    assert code == 0, err
    assert err == ""
    npy, png = tmp_path / "uniform_samples" / "generated.npy", tmp_path / "uniform_samples" / "generated.png"
    samples = np.load(npy)
    assert samples.dtype == np.float32 and samples.shape == (50, 2)
    assert np.isfinite(samples).all()
    # the default checkpoint is the newest one
    assert "pass_1.pt" in out
    np.testing.assert_allclose(samples, expected_samples(tmp_path / "uniform_params" / "pass_1.pt", 50, 3),
                               rtol=1e-5, atol=1e-6)
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_generate_mnist_honours_output_and_params(mnist_run, tmp_path, capsys):
    assert mnist_run.proc.returncode == 0
    pass0 = mnist_run.params("mnist") / "pass_0.pt"
    out_file = tmp_path / "made" / "digits"
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 20, "--seed", 7,
                               "--params", pass0, "--output", out_file, "--out_dir", tmp_path / "elsewhere"], capsys)
    assert code == 0, err
    samples = np.load(tmp_path / "made" / "digits.npy")
    assert samples.dtype == np.float32 and samples.shape == (20, 1, 28, 28)
    assert samples.min() >= -1 and samples.max() <= 1
    with Image.open(tmp_path / "made" / "digits.png") as im:
        assert im.format == "PNG"
        assert im.width == 8 * 28
    # the samples come from the generator of --params (pass 0), not from the newest checkpoint
    np.testing.assert_allclose(samples, expected_samples(pass0, 20, 7), atol=1e-5)
    newest = expected_samples(mnist_run.params("mnist") / "pass_1.pt", 20, 7)
    assert not np.allclose(samples, newest, atol=1e-5)
    assert not (tmp_path / "elsewhere" / "mnist_samples" / "generated.npy").exists()


def test_generate_output_given_with_extension(uniform_run, tmp_path, capsys):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 10, "--params",
                               uniform_run.params("uniform") / "pass_1.pt", "--output", tmp_path / "pts.npy"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "pts.npy").shape == (10, 2)
    assert (tmp_path / "pts.png").exists()


def test_generate_output_name_with_a_dot(uniform_run, tmp_path, capsys):
    # --output FILE writes FILE.npy and FILE.png, also when FILE has a dot in its name
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 10, "--params",
                               uniform_run.params("uniform") / "pass_1.pt",
                               "--output", tmp_path / "samples.pass1"], capsys)
    assert code == 0, err
    assert (tmp_path / "samples.pass1.npy").exists(), sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "samples.pass1.png").exists()


def save_as_if_on_gpu(state, path, monkeypatch):
    """torch.save, with every storage tagged 'cuda:0' as a checkpoint written on a GPU is."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


def test_checkpoint_saved_on_a_gpu_generates_on_cpu(uniform_run, tmp_path, monkeypatch, capsys):
    gpu_ckpt = tmp_path / "from_gpu.pt"
    save_as_if_on_gpu(load_ckpt(uniform_run.params("uniform") / "pass_1.pt"), gpu_ckpt, monkeypatch)
    # the file really is a GPU checkpoint: plain torch.load refuses it on this machine
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu_ckpt, weights_only=False)
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 8, "--params", gpu_ckpt,
                               "--output", tmp_path / "g"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "g.npy").shape == (8, 2)


def test_checkpoint_saved_on_a_gpu_resumes_on_cpu(uniform_run, tmp_path, monkeypatch, capsys):
    ckpt = load_ckpt(uniform_run.params("uniform") / "pass_1.pt")
    params = tmp_path / "uniform_params"
    params.mkdir()
    save_as_if_on_gpu(ckpt, params / "pass_1.pt", monkeypatch)
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--resume", "--passes", 3, "--quiet",
                               "--out_dir", tmp_path], capsys)
    assert code == 0, err
    assert "resuming" in out and "pass 2 iteration 0" in out
    assert load_ckpt(params / "pass_2.pt")["pass"] == 2


def test_mnist_checkpoint_given_to_uniform(mnist_run, tmp_path, capsys):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 5, "--params",
                               mnist_run.params("mnist") / "pass_1.pt", "--output", tmp_path / "g"], capsys)
    assert code == 1
    assert_one_line_error(code, err, "-d mnist", "pass_1.pt")
    assert not (tmp_path / "g.npy").exists()


def test_truncated_checkpoint(uniform_run, tmp_path, capsys):
    data = (uniform_run.params("uniform") / "pass_1.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 5, "--params", tmp_path / "cut.pt",
                               "--output", tmp_path / "g"], capsys)
    assert code == 1
    assert_one_line_error(code, err, "cut.pt")
    assert not (tmp_path / "g.npy").exists()


def test_not_a_checkpoint_of_this_trainer(tmp_path, capsys):
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 5, "--params", tmp_path / "other.pt"],
                              capsys)
    assert_one_line_error(code, err, "other.pt")


def test_generate_before_any_training(tmp_path, capsys):
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 5, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "mnist_params")
    (tmp_path / "mnist_params").mkdir(exist_ok=True)
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 5, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "no checkpoint", "train first")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_needs_a_positive_count(uniform_run, tmp_path, capsys, n):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", n, "--params",
                               uniform_run.params("uniform") / "pass_1.pt", "--output", tmp_path / "g"], capsys)
    assert_one_line_error(code, err, "--generate")
    assert not (tmp_path / "g.npy").exists()


def test_use_gpu_1_falls_back_to_the_cpu(uniform_run, tmp_path, capsys):
    # --use_gpu defaults to 1, as in the original; on a machine without CUDA the run goes on
    assert not torch.cuda.is_available()
    code, out, err = run_main(["-d", "uniform", "--generate", 4, "--params", uniform_run.params("uniform") / "pass_1.pt",
                               "--output", tmp_path / "g"], capsys)
    assert code == 0, err
    assert "CUDA is not available: running on the CPU" in out
    assert np.load(tmp_path / "g.npy").shape == (4, 2)
