"""Start the MMSR denoiser from a Stable Diffusion 2 UNet, InstructPix2Pix style.

The SR UNet reads ``concat(noisy sample, conditioning image)``, so its first convolution has more input channels
than the pretrained one. :func:`unet_from_sd2` loads the pretrained UNet and widens ``conv_in``: the original
channels keep their weights and bias exactly, the extra channels start at zero, so before fine-tuning the widened
UNet computes exactly what the pretrained one computes on the original channels (whatever the extra inputs hold).
This is the initialisation of diffusers' ``examples/instruct_pix2pix/train_instruct_pix2pix.py``.

Nothing is downloaded unless the caller passes ``local_files_only=False``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...errors import ConfigError, WeightsError

log = logging.getLogger(__name__)


def widen_conv_in(unet, *, extra_in_channels: int):
    """Add ``extra_in_channels`` zero-initialised input channels after the existing ones of ``unet.conv_in``.

    Modifies ``unet`` in place (and its config, so ``save_pretrained`` records the new ``in_channels``) and
    returns it.
    """
    import torch
    from torch import nn

    if not isinstance(extra_in_channels, int) or extra_in_channels < 0:
        raise ConfigError(f"extra_in_channels={extra_in_channels!r}: give a non-negative int")
    old = unet.conv_in
    if extra_in_channels == 0:
        return unet
    new = nn.Conv2d(old.in_channels + extra_in_channels, old.out_channels, kernel_size=old.kernel_size,
                    stride=old.stride, padding=old.padding, dilation=old.dilation, groups=old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)  # (C_out, C_in_old, k, k) unchanged
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
    log.info("widened conv_in from %d to %d input channels (new ones zero)", old.in_channels, new.in_channels)
    return unet


def unet_from_sd2(path_or_hub_id: str | Path, *, extra_in_channels: int, subfolder: str | None = "unet",
                  local_files_only: bool = True, torch_dtype=None):
    """A Stable Diffusion 2 ``UNet2DConditionModel`` with ``extra_in_channels`` zero-initialised inputs.

    Args:
        path_or_hub_id: a local pipeline folder (with a ``unet/`` subfolder) or a Hub id such as
            ``"stabilityai/stable-diffusion-2-1"``.
        extra_in_channels: how many input channels to append to ``conv_in`` (the conditioning image's channels).
        subfolder: the UNet's folder inside ``path_or_hub_id``; None when it points at the UNet folder itself.
        local_files_only: True (default) never touches the network; pass False to allow a Hub download.
        torch_dtype: dtype to load the weights in; None keeps the stored one.

    Only ``.safetensors`` weights are read.
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(extra_in_channels, int) or extra_in_channels < 0:
        raise ConfigError(f"extra_in_channels={extra_in_channels!r}: give a non-negative int")
    local = Path(path_or_hub_id)
    if local_files_only and not local.exists() and str(path_or_hub_id).count("/") != 1:
        raise WeightsError(f"{path_or_hub_id}: no such folder; give a local SD2 folder or a Hub id 'owner/name'")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            str(path_or_hub_id), subfolder=subfolder, local_files_only=local_files_only, torch_dtype=torch_dtype,
            use_safetensors=True)
    except (OSError, ValueError) as err:
        hint = " (nothing was downloaded: pass local_files_only=False to allow the Hub)" if local_files_only else ""
        raise WeightsError(f"cannot load a UNet from {path_or_hub_id} subfolder={subfolder!r}{hint}: {err}") from err
    return widen_conv_in(unet, extra_in_channels=extra_in_channels)
