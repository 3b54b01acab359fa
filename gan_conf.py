"""Configurations and networks of the PaddlePaddle GAN tutorial, in PyTorch.

Two model families, as in the original `gan_conf.py` and `gan_conf_image.py`:

* uniform: a fully-connected generator and discriminator with one batch norm
  each, learning the 2-D uniform distribution on [0, 1)^2;
* mnist / cifar: the DCGAN variant, transposed convolutions in G and
  convolutions in D; the same nets learn a folder of your own images
  (-d folder), at any size the tutorial's kernel rule admits.

With classes (--conditional 1), both nets also see the label (a conditional GAN,
Mirza & Osindero 2014): G gets the one-hot label beside z, D gets it as constant
one-hot maps beside the image's channels. Everything else stays the tutorial's.

Both discriminators end in a 2-way classifier (label 1 = real, 0 = fake).  The
softmax is folded into the cross-entropy cost (`F.cross_entropy` on logits),
which is the same function with better numerics.

Every batch norm normalises with the statistics of the batch in hand, in
training and in sampling alike (Paddle's `use_global_stats=False`): no running
averages exist anywhere, so `model.eval()` changes nothing.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GANConfig:
    data_source: str
    sample_shape: tuple  # (2,) for points, (C, H, W) for images
    noise_dim: int
    lr: float
    beta1: float = 0.5
    batch_size: int = 128
    iters_per_pass: int = 1000
    passes: int = 100
    hidden_dim: int = 10  # uniform nets
    gf_dim: int = 64      # image nets: G's base width
    df_dim: int = 64      # image nets: D's base width
    # Opt-in departures from the tutorial (the defaults are the original's):
    d_batch_norm: bool = True  # False: D without batch norm (tests/BENCHMARKS.md: it does not help)
    g_sigmoid: bool = False    # uniform: G ends in a sigmoid, so its points lie in (0, 1)^2
    ema: bool = False          # an average of G's weights draws the pictures and samples (gan_trainer: --ema)
    ema_kimg: float = 10.0     # its half-life, in thousands of the images G has made
    augment: str = ""          # DiffAugment of every batch D sees: a comma list of color, translation, cutout
    # What the run was trained on:
    folder: str = ""           # -d folder: the image folder
    images: int = 0            # how many training images (0: not recorded)
    classes: tuple = ()        # class names, for a conditional G and D (empty: unconditional)

    @property
    def is_image(self):
        return len(self.sample_shape) == 3

    @property
    def conditional(self):
        return bool(self.classes)

    def to_dict(self):
        return asdict(self)


CONFIGS = {
    "uniform": GANConfig("uniform", (2,), noise_dim=10, lr=1e-4, iters_per_pass=10000),
    "mnist": GANConfig("mnist", (1, 28, 28), noise_dim=100, lr=2e-4),
    "cifar": GANConfig("cifar", (3, 32, 32), noise_dim=100, lr=2e-4),
    "folder": GANConfig("folder", (3, 64, 64), noise_dim=100, lr=2e-4),  # size and channels: flags
}


# ---------------------------------------------------------------- uniform

def batch_norm_1d(n):
    return nn.BatchNorm1d(n, track_running_stats=False)


def batch_norm_2d(n):
    return nn.BatchNorm2d(n, track_running_stats=False)


class UniformNet(nn.Sequential):
    """A fully-connected net whose forward takes (and ignores) a label, as the image nets do."""

    def forward(self, x, y=None):
        return super().forward(x)


class UniformGenerator(UniformNet):
    """noise(10) -> fc 10 + ReLU -> fc 10 -> batch norm + ReLU -> fc 2."""

    def __init__(self, cfg):
        h = cfg.hidden_dim
        super().__init__(
            nn.Linear(cfg.noise_dim, h), nn.ReLU(),
            nn.Linear(h, h), batch_norm_1d(h), nn.ReLU(),
            nn.Linear(h, cfg.sample_shape[0]),
            # the analogue of the image G's tanh: outputs in the data's range
            *([nn.Sigmoid()] if cfg.g_sigmoid else []),
        )
        init_uniform_net(self)


class UniformDiscriminator(UniformNet):
    """sample(2) -> fc 10 + ReLU -> fc 10 -> batch norm + ReLU -> fc 2 (logits)."""

    def __init__(self, cfg):
        h = cfg.hidden_dim
        super().__init__(
            nn.Linear(cfg.sample_shape[0], h), nn.ReLU(),
            nn.Linear(h, h), *d_batch_norm(cfg, h, batch_norm_1d), nn.ReLU(),
            nn.Linear(h, 2),
        )
        init_uniform_net(self)


def d_batch_norm(cfg, n, make):
    """D's batch norm layer, or none with d_batch_norm=False."""
    return [make(n)] if cfg.d_batch_norm else []


def init_uniform_net(net):
    # Paddle v1 defaults for fc weights (normal, std 1/sqrt(fan_in)); the original
    # config set every bias, the batch-norm shift included, to 1.0.
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, m.in_features ** -0.5)
            nn.init.constant_(m.bias, 1.0)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.constant_(m.bias, 1.0)


# ---------------------------------------------------------------- images

def conv_kernel_padding(big, small):
    """Kernel size and padding of a stride-2 (transposed) conv between sizes big <-> small.

    The rule of the original gan_conf_image.py: d = big - (small - 1) * 2 is what
    the kernel must cover beyond the strides; d <= 3 is met with kernel d + 2 and
    padding 1, 3 < d <= 5 with kernel d and no padding.
    """
    d = big - (small - 1) * 2
    if d <= 1 or d > 5:
        raise ValueError(f"no stride-2 conv maps size {big} to {small} (d = {d})")
    return (d + 2, 1) if d <= 3 else (d, 0)


def image_sizes(cfg):
    s = cfg.sample_shape[1]
    return s, s // 2, s // 4, s // 8


def image_size_ok(s):
    """Whether the tutorial's nets can be built for s x s images: s, s/2, s/4, s/8 (integer
    division) all at least 1, each step met by conv_kernel_padding."""
    try:
        return s // 8 >= 1 and all(conv_kernel_padding(b, b // 2) for b in (s, s // 2, s // 4))
    except ValueError:
        return False


def conv(c_in, c_out, big, small):
    k, p = conv_kernel_padding(big, small)
    return nn.Conv2d(c_in, c_out, k, stride=2, padding=p)


def deconv(c_in, c_out, small, big):
    k, p = conv_kernel_padding(big, small)
    return nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=p)


class ImageGenerator(nn.Module):
    """z -> fc -> batch norm per unit -> 256 x s8 x s8 -> deconv 128 x s4 -> deconv 64 x s2 -> deconv C x s, tanh."""

    def __init__(self, cfg):
        super().__init__()
        c, k = cfg.sample_shape[0], len(cfg.classes)
        s, s2, s4, s8 = image_sizes(cfg)
        g = cfg.gf_dim
        self.start, self.classes = (g * 4, s8, s8), k
        # Paddle's batch_norm_layer on an fc layer takes its size from the fc's output: it
        # normalises each of the s8*s8*256 units over the batch (one scale and shift per unit),
        # before the reshape. The batch norms after the transposed convs are per channel.
        self.fc = nn.Sequential(nn.Linear(cfg.noise_dim + k, g * 4 * s8 * s8), batch_norm_1d(g * 4 * s8 * s8), nn.ReLU())
        self.convs = nn.Sequential(
            deconv(g * 4, g * 2, s8, s4), batch_norm_2d(g * 2), nn.ReLU(),
            deconv(g * 2, g, s4, s2), batch_norm_2d(g), nn.ReLU(),
            deconv(g, c, s2, s), nn.Tanh(),
        )
        init_image_net(self)

    def forward(self, z, y=None):
        if self.classes:  # the label, one-hot, beside the noise
            z = torch.cat([z, F.one_hot(y, self.classes).to(z.dtype)], 1)
        return self.convs(self.fc(z).view(-1, *self.start))


class ImageDiscriminator(nn.Module):
    """image -> conv 64 x s2 -> conv 128 x s4 (bn) -> conv 256 x s8 (bn) -> fc 2 (logits)."""

    def __init__(self, cfg):
        super().__init__()
        c, k = cfg.sample_shape[0], len(cfg.classes)
        s, s2, s4, s8 = image_sizes(cfg)
        d = cfg.df_dim
        self.classes = k
        self.convs = nn.Sequential(
            conv(c + k, d, s, s2), nn.ReLU(),
            conv(d, d * 2, s2, s4), *d_batch_norm(cfg, d * 2, batch_norm_2d), nn.ReLU(),
            conv(d * 2, d * 4, s4, s8), *d_batch_norm(cfg, d * 4, batch_norm_2d), nn.ReLU(),
        )
        self.fc = nn.Linear(d * 4 * s8 * s8, 2)
        init_image_net(self)

    def forward(self, x, y=None):
        if self.classes:  # the label as constant one-hot maps beside the image's channels
            maps = F.one_hot(y, self.classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, maps], 1)
        return self.fc(self.convs(x).flatten(1))


def init_image_net(net):
    # DCGAN initialisation, as in gan_conf_image.py.
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_nets(cfg):
    """(generator, discriminator) for a configuration."""
    if cfg.is_image:
        return ImageGenerator(cfg), ImageDiscriminator(cfg)
    return UniformGenerator(cfg), UniformDiscriminator(cfg)


# ---------------------------------------------------------------- evaluation

class DigitClassifier(nn.Module):
    """A small MNIST classifier whose penultimate features serve the classifier FID."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, x):
        return self.head(self.features(x))


class FeatureNet(nn.Module):
    """The evaluation features of cifar and of a folder, trained on the data itself: a small
    conv trunk (`features`, 128-d) for any channels and size (images larger than 32 x 32 are
    averaged down to it first: the trunk's cost stays that of a 32 x 32 image), and a `head`
    for its task: the classes where there are labels, else a decoder that draws the image back
    from its 128 features (an autoencoder), chosen by measurement (tests/BENCHMARKS.md)."""

    feature_dim = 128
    most_size = 32

    def __init__(self, channels, classes=0):
        super().__init__()
        self.features = nn.Sequential(
            ShrinkTo(self.most_size),
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, classes) if classes else nn.Sequential(
            nn.Linear(self.feature_dim, 32 * 8 * 8), nn.ReLU(), nn.Unflatten(1, (32, 8, 8)),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),                 # 16 x 16
            nn.ConvTranspose2d(16, channels, 4, 2, 1), nn.Tanh(),           # 32 x 32, in [-1, 1]
        )

    def forward(self, x):
        """Logits of the classes, or the image drawn back at most_size x most_size."""
        return self.head(self.features(x))


class ShrinkTo(nn.Module):
    """Images larger than size x size averaged down to it; smaller ones pass unchanged."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.size) if x.shape[-1] > self.size else x
