"""The networks of gan_conf.py against the layer sizes of the original (design/original.md)."""
import pytest
import torch
from torch import nn

import gan_conf
from gan_conf import CONFIGS, build_nets, conv_kernel_padding
from gan_trainer import FastConvTranspose2d, use_fast_deconvolutions


def nets(source, seed=0):
    torch.manual_seed(seed)
    return build_nets(CONFIGS[source])


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def fc(n_in, n_out):
    return n_in * n_out + n_out


def bn(c):
    return 2 * c  # scale and shift


def conv(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


# ------------------------------------------------------------------ shapes

@pytest.mark.parametrize("source, sample_shape, noise_dim", [
    ("uniform", (2,), 10),
    ("mnist", (1, 28, 28), 100),
    ("cifar", (3, 32, 32), 100),
])
def test_output_shapes(source, sample_shape, noise_dim):
    gen, dis = nets(source)
    z = torch.randn(16, noise_dim)
    fake = gen(z)
    assert fake.shape == (16, *sample_shape)
    logits = dis(fake)
    assert logits.shape == (16, 2)  # a 2-way classifier: real / fake
    assert dis(torch.rand(16, *sample_shape) * 2 - 1).shape == (16, 2)


def test_discriminator_returns_logits_not_probabilities():
    # The softmax is folded into the cost: D's outputs are unnormalised scores.
    for source in ("uniform", "mnist"):
        gen, dis = nets(source)
        logits = dis(gen(torch.randn(16, CONFIGS[source].noise_dim)))
        assert not torch.allclose(logits.sum(1), torch.ones(16), atol=1e-3)


# ------------------------------------------------------------------ parameter counts

def test_uniform_parameter_counts():
    gen, dis = nets("uniform")
    # G: noise 10 -> fc 10 -> fc 10 -> bn 10 -> fc 2
    assert n_params(gen) == fc(10, 10) + fc(10, 10) + bn(10) + fc(10, 2) == 262
    # D: sample 2 -> fc 10 -> fc 10 -> bn 10 -> fc 2
    assert n_params(dis) == fc(2, 10) + fc(10, 10) + bn(10) + fc(10, 2) == 182


def test_mnist_parameter_counts():
    gen, dis = nets("mnist")
    # G: z 100 -> fc 256*3*3, bn per unit (2304) -> deconv 3->7 (k5) to 128, bn -> deconv 7->14 (k4)
    #    to 64, bn -> deconv 14->28 (k4) to 1
    expected_g = (fc(100, 256 * 3 * 3) + bn(256 * 3 * 3) + conv(256, 128, 5) + bn(128) + conv(128, 64, 4)
                  + bn(64) + conv(64, 1, 4))
    assert n_params(gen) == expected_g == 1189185
    # D: conv 28->14 (k4) to 64 -> conv 14->7 (k4) to 128, bn -> conv 7->3 (k5) to 256, bn -> fc 2
    expected_d = conv(1, 64, 4) + conv(64, 128, 4) + bn(128) + conv(128, 256, 5) + bn(256) + fc(256 * 3 * 3, 2)
    assert n_params(dis) == expected_d == 957122


def test_cifar_parameter_counts():
    gen, dis = nets("cifar")
    # every (transposed) conv maps 4<->8<->16<->32 with kernel 4
    expected_g = (fc(100, 256 * 4 * 4) + bn(256 * 4 * 4) + conv(256, 128, 4) + bn(128) + conv(128, 64, 4)
                  + bn(64) + conv(64, 3, 4))
    assert n_params(gen) == expected_g
    expected_d = conv(3, 64, 4) + conv(64, 128, 4) + bn(128) + conv(128, 256, 4) + bn(256) + fc(256 * 4 * 4, 2)
    assert n_params(dis) == expected_d == 667842


@pytest.mark.parametrize("source, units", [("mnist", 2304), ("cifar", 4096)])
def test_first_generator_batch_norm_is_per_unit_before_the_reshape(source, units):
    # Paddle's batch_norm_layer on the fc output: one scale and shift per unit, each unit
    # normalised over the batch (design/original.md), not per channel after the reshape.
    gen, _ = nets(source)
    first_bn = next(m for m in gen.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    assert isinstance(first_bn, nn.BatchNorm1d) and first_bn.num_features == units
    with torch.no_grad():
        fc_out = gen.fc[0](torch.randn(32, 100))
        normed = first_bn(fc_out)
    # every unit has mean 0 and variance 1 over the batch (weight ~ 1, bias 0 at init)
    scaled = (normed - first_bn.bias) / first_bn.weight
    assert scaled.mean(0).abs().max() < 1e-4
    assert (scaled.var(0, unbiased=False) - 1).abs().max() < 1e-2


def test_activations_are_plain_relu():
    for source in ("uniform", "mnist", "cifar"):
        for net in nets(source):
            kinds = {type(m) for m in net.modules()}
            assert nn.ReLU in kinds
            assert nn.LeakyReLU not in kinds


# ------------------------------------------------------------------ kernel / padding rule

@pytest.mark.parametrize("big, small, expected", [
    (28, 14, (4, 1)),   # d = 2
    (14, 7, (4, 1)),    # d = 2
    (7, 3, (5, 1)),     # d = 3
    (32, 16, (4, 1)),
    (8, 4, (4, 1)),
    (8, 3, (4, 0)),     # d = 4: kernel d, no padding
    (9, 3, (5, 0)),     # d = 5
])
def test_conv_kernel_padding(big, small, expected):
    assert conv_kernel_padding(big, small) == expected


@pytest.mark.parametrize("big, small", [(7, 4), (6, 4), (10, 3), (20, 3)])  # d = 1, 0, 6, 16
def test_conv_kernel_padding_rejects_impossible_sizes(big, small):
    with pytest.raises(ValueError):
        conv_kernel_padding(big, small)


@pytest.mark.parametrize("source, g_kernels, d_kernels", [
    ("mnist", [5, 4, 4], [4, 4, 5]),
    ("cifar", [4, 4, 4], [4, 4, 4]),
])
def test_built_nets_use_the_rule(source, g_kernels, d_kernels):
    gen, dis = nets(source)
    deconvs = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    convs = [m for m in dis.modules() if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size[0] for m in deconvs] == g_kernels
    assert [m.kernel_size[0] for m in convs] == d_kernels
    assert all(m.stride == (2, 2) and m.padding == (1, 1) for m in deconvs + convs)


# ------------------------------------------------------------------ output range, batch norm

@pytest.mark.parametrize("source", ["mnist", "cifar"])
def test_image_generator_output_is_tanh_range(source):
    gen, _ = nets(source)
    with torch.no_grad():
        out = gen(torch.randn(16, 100) * 50)
    assert out.abs().max() <= 1.0
    assert out.abs().max() > 0.5  # not squashed to a constant


@pytest.mark.parametrize("source", ["uniform", "mnist"])
def test_batch_norm_uses_batch_statistics_even_in_eval_mode(source):
    gen, dis = nets(source)
    nd = CONFIGS[source].noise_dim
    z = torch.randn(16, nd)
    other = torch.cat([z[:8], torch.randn(8, nd) * 3 + 1])
    with torch.no_grad():
        train_out = gen(z)
        same_first_rows = gen(other)
        gen.eval()
        dis.eval()
        eval_out = gen(z)
    # the first 8 noise vectors are the same, but the batches differ: so do the outputs
    assert not torch.allclose(train_out[:8], same_first_rows[:8], atol=1e-4)
    # eval() changes nothing: no running averages exist
    assert torch.equal(train_out, eval_out)
    for net in (gen, dis):
        assert not any("running" in k for k in net.state_dict())


def test_uniform_init():
    gen, dis = nets("uniform")
    for net in (gen, dis):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
        assert len(linears) == 3 and len(bns) == 1
        for m in linears:
            assert torch.equal(m.bias, torch.ones_like(m.bias))  # every bias 1.0
        for m in bns:
            assert torch.equal(m.bias, torch.ones_like(m.bias))  # the bn shift too
            assert (m.weight - 1).abs().max() < 0.1              # scale N(1, 0.02)
            assert not torch.equal(m.weight, torch.ones_like(m.weight))


@pytest.mark.parametrize("source", ["mnist", "cifar"])
def test_image_init(source):
    gen, dis = nets(source)
    for net in (gen, dis):
        weighted = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
        assert len(weighted) == 4
        for m in weighted:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert abs(m.weight.mean().item()) < 0.004
            if m.weight.numel() >= 4000:
                assert 0.018 < m.weight.std().item() < 0.022
        norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        assert len(norms) == (3 if net is gen else 2)
        for m in norms:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert (m.weight - 1).abs().max() < 0.1


def test_configs_match_the_tutorial():
    u, m, c = CONFIGS["uniform"], CONFIGS["mnist"], CONFIGS["cifar"]
    assert (u.noise_dim, u.lr, u.iters_per_pass, u.batch_size, u.passes, u.beta1) == (10, 1e-4, 10000, 128, 100, 0.5)
    for cfg in (m, c):
        assert (cfg.noise_dim, cfg.lr, cfg.iters_per_pass, cfg.batch_size, cfg.passes, cfg.beta1) == \
            (100, 2e-4, 1000, 128, 100, 0.5)
    assert (m.sample_shape, c.sample_shape) == ((1, 28, 28), (3, 32, 32))
    assert gan_conf.GANConfig.__dataclass_params__.frozen


# ------------------------------------------------------------------ the adjoint transposed convolution

def bf16_against_nn(layer, x):
    """(layer(x), nn.ConvTranspose2d's x -> same) under CPU bf16 autocast, and both sets of gradients."""
    plain = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                               layer.padding, layer.output_padding, layer.groups, layer.bias is not None,
                               layer.dilation)
    plain.load_state_dict(layer.state_dict())
    plain.to(memory_format=torch.channels_last if layer.weight.is_contiguous(memory_format=torch.channels_last)
             and not layer.weight.is_contiguous() else torch.contiguous_format)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), plain(x)
    g = torch.randn_like(y)
    wrt = lambda m: [x, *m.parameters()]  # noqa: E731
    return y, expected, torch.autograd.grad(y, wrt(layer), g), torch.autograd.grad(expected, wrt(plain), g)


def assert_bf16_roundings_apart(y, expected, bias):
    """The adjoint path rounds the product to bf16 and then the sum with the bias; nn rounds the
    sum once. So they differ by bf16 roundings (unit 2^-8) of the product (|product| is at most
    |sum| + |bias|) and of the sum: within 2^-6 (|sum| + |bias|)."""
    assert y.dtype == expected.dtype == torch.bfloat16 and y.shape == expected.shape
    size = expected.float().abs() + (0 if bias is None else bias.detach().abs().view(1, -1, 1, 1))
    assert ((y.float() - expected.float()).abs() <= 2.0 ** -6 * size + 1e-6).all()


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_first_mnist_deconv_under_cpu_bf16_is_the_adjoint_path_with_nns_numbers(layout):
    """G's first transposed convolution (3x3 -> 7x7, kernel 5) runs as a convolution's input
    gradient under bf16 autocast on the CPU: nn.ConvTranspose2d's output to bf16 rounding,
    the very same gradients, the same layout."""
    torch.manual_seed(0)
    gen, _ = nets("mnist")
    use_fast_deconvolutions(gen)  # as the trainer does under --bf16 1 on the CPU
    layer = gen.convs[0].to(memory_format=layout)
    y, expected, got, want = bf16_against_nn(layer, torch.randn(8, 256, 3, 3).contiguous(memory_format=layout))
    assert type(y.grad_fn).__name__ == "AdjointConvTransposeBackward"
    assert y.shape == (8, 128, 7, 7) and y.is_contiguous(memory_format=layout)
    assert_bf16_roundings_apart(y, expected, layer.bias)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("kwargs, size", [
    ({"kernel_size": 4, "stride": 2, "padding": 1}, (4, 4)),                       # cifar's first
    ({"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}, (2, 3)),  # non-square map
    ({"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 2}, (3, 3)),
    ({"kernel_size": 3, "stride": 2, "groups": 2}, (3, 2)),
    ({"kernel_size": 5, "stride": 2, "padding": 1, "bias": False}, (3, 3)),
])
def test_adjoint_path_matches_nn_for_other_geometries(kwargs, size):
    torch.manual_seed(0)
    layer = FastConvTranspose2d(8, 6, **kwargs)
    y, expected, got, want = bf16_against_nn(layer, torch.randn(4, 8, *size))
    assert type(y.grad_fn).__name__ == "AdjointConvTransposeBackward"
    assert_bf16_roundings_apart(y, expected, layer.bias)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_deconvs_take_nns_path_in_fp32_and_when_the_kernel_is_smaller_than_the_map():
    gen, _ = nets("mnist")
    use_fast_deconvolutions(gen)
    h = torch.randn(8, 256, 3, 3)
    assert gen.convs[0](h).grad_fn.name() == "ConvolutionBackward0"  # fp32: nn's own
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gen.convs[3](torch.randn(8, 128, 7, 7)).grad_fn.name() == "ConvolutionBackward0"  # kernel 4 < 7
        wide = FastConvTranspose2d(8, 4, 3)  # covers the height of a 3 x 8 map, not its width
        assert wide(torch.randn(2, 8, 3, 8)).grad_fn.name() == "ConvolutionBackward0"
        assert gen.convs[0](h, output_size=(7, 7)).grad_fn.name() == "ConvolutionBackward0"


def test_bf16_on_the_cpu_swaps_in_the_fast_deconvolution_with_the_same_state_dict():
    from gan_trainer import Speed, prepare_nets
    gen, dis = nets("mnist")
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    gen, _ = prepare_nets((gen, dis), Speed(bf16=True), "cpu")
    deconvs = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 3 and all(type(m) is FastConvTranspose2d for m in deconvs)
    assert gen.state_dict().keys() == state.keys() and all(torch.equal(gen.state_dict()[k], v) for k, v in state.items())
    plain, _ = prepare_nets(nets("mnist"), Speed(), "cpu")  # fp32: nn's own class
    assert all(type(m) is nn.ConvTranspose2d for m in plain.modules() if isinstance(m, nn.ConvTranspose2d))
