"""A small patch discriminator and the non-saturating GAN losses, for fine-tuning an expert adversarially.

The discriminator looks at RGB patches in [0, 1] and returns one logit per patch of about 40 px (a 16 x 16 map for a
128 px crop). Spectral normalisation on every convolution keeps it from overpowering a generator that starts already
trained; it is trained from scratch next to the generator (:func:`geosr.training.expert.tune_expert` with
``gan_weight > 0``) and thrown away afterwards: only the generator's difference is kept.
"""

from __future__ import annotations


def patch_discriminator(features: int = 64):
    """RGB ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, 1, H / 8, W / 8)``."""
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    def conv(cin, cout, k, s):
        return spectral_norm(nn.Conv2d(cin, cout, k, s, padding=(k - 1) // 2 if s == 1 else 1))

    f = features
    layers = [conv(3, f, 3, 1), nn.LeakyReLU(0.2, True)]
    for cin, cout in ((f, f), (f, 2 * f), (2 * f, 4 * f)):  # three halvings
        layers += [conv(cin, cout, 4, 2), nn.LeakyReLU(0.2, True)]
    layers += [conv(4 * f, 4 * f, 3, 1), nn.LeakyReLU(0.2, True), conv(4 * f, 1, 3, 1)]
    return nn.Sequential(*layers)


def generator_loss(fake_logits):
    """Non-saturating: the generator wants its patches called real."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(fake_logits, fake_logits.new_ones(()).expand_as(fake_logits))


def discriminator_loss(real_logits, fake_logits):
    import torch.nn.functional as F

    return (F.binary_cross_entropy_with_logits(real_logits, real_logits.new_ones(()).expand_as(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, fake_logits.new_zeros(()).expand_as(fake_logits)))
