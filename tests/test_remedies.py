"""The opt-in remedies: an averaged G (--ema 1) and DiffAugment of D's inputs (--augment POLICY)."""
import dataclasses

import numpy as np
import torch

import gan_trainer as gt
from conftest import MNIST_ARGS, assert_one_line_error, load_ckpt, make_mnist_dir, read_metrics, run_main
from gan_conf import CONFIGS, build_nets

POLICY = "color,translation,cutout"


def small_mnist(**changes):
    return dataclasses.replace(CONFIGS["mnist"], batch_size=16, gf_dim=8, df_dim=8, **changes)


# ------------------------------------------------------------------ the averaged G

def test_the_averaged_g_is_the_hand_computed_average_of_g_after_each_g_update():
    """After each G update: average <- average + (1 - decay) (G - average), the decay from the
    half-life in images, at most EMA_RAMPUP of the images G has made; computed here in float64."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CONFIGS["uniform"], batch_size=16, ema=True, ema_kimg=0.2)
    run = gt.Run(cfg, 0, gt.Speed(), "cpu")
    step = gt.make_step(run)
    by_hand = {k: v.double().clone() for k, v in run.gen.state_dict().items()}
    g_updates = 0
    for i in range(40):
        done = step(torch.rand(16, 2) * 2 - 1, torch.randn(16, cfg.noise_dim), run.schedule)
        run.record(done)
        if done.trained == "gen":
            g_updates += 1
            half_life = min(200.0, 0.05 * 16 * g_updates)  # images: the run's 0.2 kimg, or the ramp-up
            keep = 0.5 ** (16 / half_life)
            for k, v in run.gen.state_dict().items():
                by_hand[k] = keep * by_hand[k] + (1 - keep) * v.double()
    assert g_updates >= 10 and 16 * 0.05 * g_updates < 200  # the ramp-up was in force throughout
    averaged = run.gen_ema.state_dict()
    assert averaged.keys() == by_hand.keys()
    for k, v in averaged.items():
        assert torch.allclose(v.double(), by_hand[k], rtol=1e-5, atol=1e-6), k  # float32 against float64
    # it differs from G itself: it averages
    assert any(not torch.equal(v, run.gen.state_dict()[k]) for k, v in averaged.items())


def test_resume_with_both_remedies_is_exact(tmp_path, capsys):
    data = tmp_path / "data"
    make_mnist_dir(data)
    args = [*MNIST_ARGS, "--ema", 1, "--augment", POLICY, "--iters", 6, "--data_dir", data]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    code, out, err = run_main([*args, "--passes", 2, "--out_dir", whole], capsys)
    assert code == 0, err
    assert "remedies: augment color,translation,cutout (DiffAugment) on every batch D sees" in out
    code, _, err = run_main([*args, "--passes", 1, "--out_dir", halves], capsys)
    assert code == 0, err
    code, out, err = run_main(["-d", "mnist", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet",
                               "--data_dir", data, "--out_dir", halves], capsys)
    assert code == 0, err
    a, b = (load_ckpt(d / "mnist_params" / "pass_1.pt") for d in (whole, halves))
    assert a["steps"]["gen"] > 0 and a["generator_ema"].keys() == a["generator"].keys()
    for net in ("generator", "discriminator", "generator_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(read_metrics(whole / "mnist_params" / "metrics.jsonl")) == \
        strip(read_metrics(halves / "mnist_params" / "metrics.jsonl"))
    # a resume that would change a remedy is refused, as any configuration change is
    code, _, err = run_main(["-d", "mnist", "--resume", "--passes", 3, "--use_gpu", 0, "--quiet", "--augment", "color",
                             "--data_dir", data, "--out_dir", halves], capsys)
    assert_one_line_error(code, err, "--augment color differs from the run's color,translation,cutout")
    # applying G takes the average, and says so; --ema 0 the raw G
    code, out, err = run_main(["-d", "mnist", "--generate", 4, "--use_gpu", 0, "--out_dir", whole], capsys)
    assert code == 0 and "(the averaged G; --ema 0 takes the raw one)" in out, err
    code, out, err = run_main(["-d", "mnist", "--generate", 4, "--ema", 0, "--use_gpu", 0, "--out_dir", whole,
                               "--output", tmp_path / "raw"], capsys)
    assert code == 0 and "averaged" not in out, err
    averaged, raw = (torch.from_numpy(np.load(p)) for p in
                     (whole / "mnist_samples" / "generated.npy", tmp_path / "raw.npy"))
    assert averaged.shape == raw.shape == (4, 1, 28, 28) and not torch.equal(averaged, raw)


def test_ema_1_at_generate_time_needs_a_run_that_kept_an_average(mnist_run, capsys):
    code, _, err = run_main(["-d", "mnist", "--generate", 2, "--ema", 1, "--use_gpu", 0, "--out_dir", mnist_run.out],
                            capsys)
    assert_one_line_error(code, err, "--ema 1:", "holds no averaged G")


# ------------------------------------------------------------------ augmentation

def test_real_and_generated_batches_are_augmented_by_the_same_random_distribution(monkeypatch):
    """The draws the loop makes for the real batch and those that ride with the noise to G's
    batch: the same number per image, and the same distribution (uniform in [0, 1))."""
    seen = []
    real_augment = gt.augment

    def spy(images, draws, policy):
        seen.append(draws)
        return real_augment(images, draws, policy)
    monkeypatch.setattr(gt, "augment", spy)
    torch.manual_seed(0)
    cfg = small_mnist(augment=POLICY)
    gen = gt.Augmented(build_nets(cfg)[0], cfg)
    real, fake = [], []
    for _ in range(50):
        x, z = gt.augmented_inputs(POLICY, torch.zeros(16, 1, 28, 28), torch.randn(16, cfg.noise_dim))
        real.append(seen.pop())
        gen(z)
        fake.append(seen.pop())
    real, fake = torch.cat(real), torch.cat(fake)
    assert real.shape == fake.shape == (800, 7)
    for draws in (real, fake):
        assert draws.min() >= 0 and draws.max() < 1
        assert draws.mean(0).sub(0.5).abs().max() < 0.05 and draws.std(0).sub(12 ** -0.5).abs().max() < 0.03
    assert not torch.equal(real, fake)  # each batch draws its own


def test_augment_transforms_as_diffaugment_does():
    """Brightness shifts, translation moves by at most an eighth of the side, cutout zeros a
    square of half the side."""
    images = torch.zeros(3, 1, 16, 16)
    images[:, :, 6:10, 6:10] = 1.0
    draws = torch.tensor([[0.0, 0.99, 0.99], [0.5, 0.5, 0.5], [0.99, 0.5, 0.5]])
    bright = gt.augment(images, draws, "color")
    assert bright[1].allclose(images[1]) and bright[0].mean() < images[0].mean() < bright[2].mean()
    # translation: draws 0 and ~1 shift by -2 and +2 rows / columns (16 / 8), 0.5 not at all
    moved = gt.augment(images, torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.99, 0.99]]), "translation")
    assert torch.equal(moved[1], images[1])
    assert torch.equal(moved[0, 0, 4:8, 4:8], torch.ones(4, 4)) and moved[0].sum() == 16
    assert torch.equal(moved[2, 0, 8:12, 8:12], torch.ones(4, 4)) and moved[2].sum() == 16
    cut = gt.augment(torch.ones(1, 1, 16, 16), torch.tensor([[0.5, 0.5]]), "cutout")
    assert (cut == 0).sum() == 64 and torch.equal(cut[0, 0, 4:12, 4:12], torch.zeros(8, 8))


def test_the_augmentation_lets_gradients_through_to_g():
    torch.manual_seed(0)
    cfg = small_mnist(augment=POLICY)
    gen, dis = build_nets(cfg)
    augmented = gt.Augmented(gen, cfg)
    z = torch.cat([torch.randn(16, cfg.noise_dim), gt.augment_draws(POLICY, 16, "cpu")], 1)
    gt.cost(dis(augmented(z)), gt.REAL).backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # and the augmented images are a function of G's: not a copy cut off from the graph
    out = augmented(z)
    assert out.requires_grad and out.shape == (16, 1, 28, 28)


def test_augment_is_refused_on_uniform_data(capsys):
    code, _, err = run_main(["-d", "uniform", "--augment", "color", "--use_gpu", 0, "--iters", 1, "--passes", 1],
                            capsys)
    assert_one_line_error(code, err, "--augment applies to images")


def test_a_policy_must_name_known_augmentations(capsys):
    code, _, err = run_main(["-d", "mnist", "--augment", "colour", "--use_gpu", 0], capsys)
    assert_one_line_error(code, err, "--augment", "a comma list of color, translation, cutout")
