"""Synthetic Stable Diffusion / ControlNet checkpoints with the real key layout.

This module builds checkpoints that have exactly the key names, key order, dtypes and
shapes of the original lllyasviel ControlNet SD1.5 checkpoints (``control_sd15_*.pth``)
and of the SD1.5 base checkpoint (``v1-5-pruned-emaonly.ckpt``, or ``v1-5-pruned.ckpt``
with per-tensor ``model_ema.*``), either at full size (for benchmarks) or scaled down
(for tests: same key names and key counts, consistent but tiny shapes).

Nothing is read from disk: the key lists are generated from the architectures
(ldm ``UNetModel``, cldm ``ControlNet``, ldm ``AutoencoderKL``, the HF ``CLIPTextModel``
for SD1.x or the OpenCLIP text tower for SD2.x, and the DDPM schedule buffers).

Values are deterministic functions of ``(seed, key)``: every tensor is drawn from its own
``torch.Generator`` seeded by a stable hash of the key, so a control checkpoint can be
produced without holding its base in memory, and generation can run in threads.

Value model (``B`` = base UNet tensor, ``E`` = UNet embedded in the control file)::

    base   model.diffusion_model.X = B(X)                      ~ N(0, 0.05^2)
    control model.diffusion_model.X = E(X) = B + 1e-4 * flip(B)  (embedded_unet="offset")
                                     = B                          (embedded_unet="same")
    control control_model.X         = E(X) + P(X),  P ~ N(0, 0.01^2)
                                     = B(X) exactly for unchanged_control_keys(arch, n)
    control control_model.<no UNet counterpart> ~ N(0, 0.02^2)
    VAE / text encoder tensors       ~ N(0, 0.02^2), identical in base and control
    DDPM buffers                     the real SD scaled-linear schedule (float32)

so ``control_model.X - base[model.diffusion_model.X]`` is ``P + 1e-4 * flip(B)`` (or ``P``),
and exactly zero on the unchanged keys (when both files keep float32).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

__all__ = [
    "CONTROL_PREFIX",
    "SD15",
    "SD21",
    "UNET_PREFIX",
    "Arch",
    "TensorSpec",
    "base_spec",
    "base_state_dict",
    "control_only_keys",
    "control_spec",
    "control_state_dict",
    "ema_key",
    "lightning_stub",
    "make_base",
    "make_control",
    "make_pair",
    "paired_control_keys",
    "spec_numel",
    "tiny",
    "unchanged_control_keys",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Format = Literal["pth", "ckpt", "pt", "legacy", "safetensors"]
EmbeddedUnet = Literal["offset", "same"]

#: Prefix of the UNet in SD / original ControlNet checkpoints.
UNET_PREFIX = "model.diffusion_model."
#: Prefix of the ControlNet branch in original ControlNet checkpoints.
CONTROL_PREFIX = "control_model."

_F32 = torch.float32

# Value scales (see the module docstring).
_UNET_STD = 0.05
_OFFSET_REL = 1e-4
_PERTURB_STD = 0.01
_AUX_STD = 0.02

# Tensors with fewer elements than this in total are generated without threads.
_THREAD_MIN_NUMEL = 20_000_000


# --------------------------------------------------------------------------------------
# Specs and architectures
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a checkpoint: key, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Arch:
    """Architecture and size knobs of an SD (+ original ControlNet) checkpoint.

    The defaults are the full-size SD1.5 values.
    """

    name: str
    """Family: ``"sd15"`` or ``"sd21"``."""
    model_channels: int = 320
    context_dim: int = 768
    linear_proj: bool = False
    """SD2.x: SpatialTransformer proj_in/proj_out are Linear ``[C, C]`` (else Conv 1x1)."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    """Levels of the UNet that carry a SpatialTransformer (attention_resolutions 4, 2, 1)."""
    in_channels: int = 4
    out_channels: int = 4
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)
    """Output widths of the ControlNet input_hint_block convs before the final zero conv."""
    vae_channels: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    vae_in_channels: int = 3
    z_channels: int = 4
    text_encoder: Literal["clip", "openclip"] = "clip"
    """``"clip"``: HF CLIPTextModel under ``cond_stage_model.transformer.text_model``;
    ``"openclip"``: OpenCLIP text tower under ``cond_stage_model.model``."""
    text_width: int = 768
    text_layers: int = 12
    text_mlp_ratio: int = 4
    text_vocab: int = 49408
    text_positions: int = 77
    text_proj_dim: int = 1024
    """OpenCLIP only: ``text_projection`` is ``[text_width, text_proj_dim]``."""
    timesteps: int = 1000


SD15 = Arch(name="sd15")
"""Full-size SD1.5 (matches ``control_sd15_*.pth`` / ``v1-5-pruned-emaonly.ckpt``)."""

SD21 = Arch(
    name="sd21",
    context_dim=1024,
    linear_proj=True,
    text_encoder="openclip",
    text_width=1024,
    text_layers=24,
    text_proj_dim=1024,
)
"""Full-size SD2.x (768-v / 512-base): linear proj, context 1024, OpenCLIP ViT-H text."""


def tiny(arch: Arch = SD15) -> Arch:
    """Scaled-down version of ``arch`` with identical key names, order and counts.

    UNet width 4 (channel_mult and block counts unchanged), VAE width 2, text width 16
    (SD1.x) / 24 (SD2.x) with the same number of layers, a 64-token vocabulary and 16
    positions; the context width equals the text width.
    ``in_channels``, ``hint_channels``, ``z_channels``, kernel sizes and the 1000 DDPM
    timesteps are kept.
    """
    width = 16 if arch.text_encoder == "clip" else 24
    return dataclasses.replace(
        arch,
        model_channels=4,
        context_dim=width,
        hint_block_channels=(2, 2, 4, 4, 4, 4, 8),
        vae_channels=2,
        text_width=width,
        text_vocab=64,
        text_positions=16,
        text_proj_dim=width,
    )


class _SpecBuilder:
    """Accumulates TensorSpecs in module registration order."""

    def __init__(self) -> None:
        self.items: list[TensorSpec] = []

    def add(self, key: str, shape: Sequence[int], dtype: torch.dtype = _F32) -> None:
        self.items.append(TensorSpec(key, dtype, tuple(int(s) for s in shape)))

    def wb(self, prefix: str, wshape: Sequence[int], bias: Optional[int] = None) -> None:
        """weight of ``wshape`` and a bias of ``wshape[0]`` (or ``bias``) elements."""
        self.add(f"{prefix}.weight", wshape)
        self.add(f"{prefix}.bias", (wshape[0] if bias is None else bias,))

    def linear(self, prefix: str, out: int, inp: int, bias: bool = True) -> None:
        if bias:
            self.wb(prefix, (out, inp))
        else:
            self.add(f"{prefix}.weight", (out, inp))

    def conv(self, prefix: str, out: int, inp: int, k: int) -> None:
        self.wb(prefix, (out, inp, k, k))

    def norm(self, prefix: str, c: int) -> None:
        self.wb(prefix, (c,))


# ---- UNet / ControlNet (ldm openaimodel.py, cldm.py) ---------------------------------


def _resblock(b: _SpecBuilder, p: str, cin: int, cout: int, emb: int) -> None:
    b.norm(f"{p}.in_layers.0", cin)
    b.conv(f"{p}.in_layers.2", cout, cin, 3)
    b.linear(f"{p}.emb_layers.1", cout, emb)
    b.norm(f"{p}.out_layers.0", cout)
    b.conv(f"{p}.out_layers.3", cout, cout, 3)
    if cin != cout:
        b.conv(f"{p}.skip_connection", cout, cin, 1)


def _spatial_transformer(b: _SpecBuilder, p: str, c: int, arch: Arch) -> None:
    def proj(name: str) -> None:
        if arch.linear_proj:
            b.linear(f"{p}.{name}", c, c)
        else:
            b.conv(f"{p}.{name}", c, c, 1)

    t = f"{p}.transformer_blocks.0"
    b.norm(f"{p}.norm", c)
    proj("proj_in")
    for attn, kv in (("attn1", c), ("attn2", arch.context_dim)):
        if attn == "attn2":
            b.linear(f"{t}.ff.net.0.proj", 8 * c, c)  # GEGLU: 2 * (4 * c)
            b.linear(f"{t}.ff.net.2", c, 4 * c)
        b.linear(f"{t}.{attn}.to_q", c, c, bias=False)
        b.linear(f"{t}.{attn}.to_k", c, kv, bias=False)
        b.linear(f"{t}.{attn}.to_v", c, kv, bias=False)
        b.linear(f"{t}.{attn}.to_out.0", c, c)
    for i in (1, 2, 3):
        b.norm(f"{t}.norm{i}", c)
    proj("proj_out")


def _input_blocks(b: _SpecBuilder, p: str, arch: Arch) -> list[int]:
    """time_embed + input_blocks; returns the output width of every input block."""
    c = arch.model_channels
    emb = 4 * c
    b.linear(f"{p}time_embed.0", emb, c)
    b.linear(f"{p}time_embed.2", emb, emb)
    b.conv(f"{p}input_blocks.0.0", c, arch.in_channels, 3)
    chans = [c]
    ch = c
    idx = 1
    last = len(arch.channel_mult) - 1
    for level, mult in enumerate(arch.channel_mult):
        for _ in range(arch.num_res_blocks):
            out = mult * c
            _resblock(b, f"{p}input_blocks.{idx}.0", ch, out, emb)
            ch = out
            if level in arch.attention_levels:
                _spatial_transformer(b, f"{p}input_blocks.{idx}.1", ch, arch)
            chans.append(ch)
            idx += 1
        if level != last:
            b.conv(f"{p}input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
    return chans


def _middle_block(b: _SpecBuilder, p: str, ch: int, arch: Arch) -> None:
    emb = 4 * arch.model_channels
    _resblock(b, f"{p}middle_block.0", ch, ch, emb)
    _spatial_transformer(b, f"{p}middle_block.1", ch, arch)
    _resblock(b, f"{p}middle_block.2", ch, ch, emb)


def _unet(b: _SpecBuilder, arch: Arch, p: str = UNET_PREFIX) -> None:
    c = arch.model_channels
    emb = 4 * c
    chans = _input_blocks(b, p, arch)
    ch = chans[-1]
    _middle_block(b, p, ch, arch)
    idx = 0
    for level, mult in reversed(list(enumerate(arch.channel_mult))):
        for i in range(arch.num_res_blocks + 1):
            ich = chans.pop()
            out = mult * c
            _resblock(b, f"{p}output_blocks.{idx}.0", ch + ich, out, emb)
            ch = out
            j = 1
            if level in arch.attention_levels:
                _spatial_transformer(b, f"{p}output_blocks.{idx}.1", ch, arch)
                j = 2
            if level and i == arch.num_res_blocks:
                b.conv(f"{p}output_blocks.{idx}.{j}.conv", ch, ch, 3)
            idx += 1
    b.norm(f"{p}out.0", ch)
    b.conv(f"{p}out.2", arch.out_channels, ch, 3)


def _controlnet(b: _SpecBuilder, arch: Arch, p: str = CONTROL_PREFIX) -> None:
    chans = _input_blocks(b, p, arch)
    for i, ch in enumerate(chans):
        b.conv(f"{p}zero_convs.{i}.0", ch, ch, 1)
    cin = arch.hint_channels
    for i, cout in enumerate((*arch.hint_block_channels, arch.model_channels)):
        b.conv(f"{p}input_hint_block.{2 * i}", cout, cin, 3)
        cin = cout
    _middle_block(b, p, chans[-1], arch)
    b.conv(f"{p}middle_block_out.0", chans[-1], chans[-1], 1)


# ---- VAE (ldm AutoencoderKL) ---------------------------------------------------------


def _vae_resblock(b: _SpecBuilder, p: str, cin: int, cout: int) -> None:
    b.norm(f"{p}.norm1", cin)
    b.conv(f"{p}.conv1", cout, cin, 3)
    b.norm(f"{p}.norm2", cout)
    b.conv(f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        b.conv(f"{p}.nin_shortcut", cout, cin, 1)


def _vae_mid(b: _SpecBuilder, p: str, c: int) -> None:
    _vae_resblock(b, f"{p}.mid.block_1", c, c)
    b.norm(f"{p}.mid.attn_1.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        b.conv(f"{p}.mid.attn_1.{name}", c, c, 1)
    _vae_resblock(b, f"{p}.mid.block_2", c, c)


def _vae(b: _SpecBuilder, arch: Arch, p: str = "first_stage_model") -> None:
    ch, mult, nrb, z = arch.vae_channels, arch.vae_ch_mult, arch.vae_num_res_blocks, arch.z_channels
    last = len(mult) - 1
    # Encoder
    e = f"{p}.encoder"
    b.conv(f"{e}.conv_in", ch, arch.vae_in_channels, 3)
    block_in = ch
    for level, m in enumerate(mult):
        block_in = ch * ((1, *mult)[level])
        block_out = ch * m
        for i in range(nrb):
            _vae_resblock(b, f"{e}.down.{level}.block.{i}", block_in, block_out)
            block_in = block_out
        if level != last:
            b.conv(f"{e}.down.{level}.downsample.conv", block_in, block_in, 3)
    _vae_mid(b, e, block_in)
    b.norm(f"{e}.norm_out", block_in)
    b.conv(f"{e}.conv_out", 2 * z, block_in, 3)
    # Decoder (up levels are built top-down but registered as up.0, up.1, ...)
    d = f"{p}.decoder"
    block_in = ch * mult[-1]
    b.conv(f"{d}.conv_in", block_in, z, 3)
    _vae_mid(b, d, block_in)
    ups: dict[int, _SpecBuilder] = {}
    for level in reversed(range(len(mult))):
        ub = _SpecBuilder()
        block_out = ch * mult[level]
        for i in range(nrb + 1):
            _vae_resblock(ub, f"{d}.up.{level}.block.{i}", block_in, block_out)
            block_in = block_out
        if level != 0:
            ub.conv(f"{d}.up.{level}.upsample.conv", block_in, block_in, 3)
        ups[level] = ub
    for level in range(len(mult)):
        b.items.extend(ups[level].items)
    b.norm(f"{d}.norm_out", block_in)
    b.conv(f"{d}.conv_out", arch.vae_in_channels, block_in, 3)
    b.conv(f"{p}.quant_conv", 2 * z, 2 * z, 1)
    b.conv(f"{p}.post_quant_conv", z, z, 1)


# ---- Text encoders --------------------------------------------------------------------


def _clip_text(b: _SpecBuilder, arch: Arch, p: str = "cond_stage_model.transformer") -> None:
    w, mlp = arch.text_width, arch.text_mlp_ratio * arch.text_width
    t = f"{p}.text_model"
    b.add(f"{t}.embeddings.position_ids", (1, arch.text_positions), torch.int64)
    b.add(f"{t}.embeddings.token_embedding.weight", (arch.text_vocab, w))
    b.add(f"{t}.embeddings.position_embedding.weight", (arch.text_positions, w))
    for i in range(arch.text_layers):
        layer = f"{t}.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            b.linear(f"{layer}.self_attn.{name}", w, w)
        b.norm(f"{layer}.layer_norm1", w)
        b.linear(f"{layer}.mlp.fc1", mlp, w)
        b.linear(f"{layer}.mlp.fc2", w, mlp)
        b.norm(f"{layer}.layer_norm2", w)
    b.norm(f"{t}.final_layer_norm", w)


def _openclip_text(b: _SpecBuilder, arch: Arch, p: str = "cond_stage_model.model") -> None:
    w, mlp = arch.text_width, arch.text_mlp_ratio * arch.text_width
    b.add(f"{p}.positional_embedding", (arch.text_positions, w))
    b.add(f"{p}.text_projection", (w, arch.text_proj_dim))
    b.add(f"{p}.logit_scale", ())
    for i in range(arch.text_layers):
        r = f"{p}.transformer.resblocks.{i}"
        b.norm(f"{r}.ln_1", w)
        b.add(f"{r}.attn.in_proj_weight", (3 * w, w))
        b.add(f"{r}.attn.in_proj_bias", (3 * w,))
        b.linear(f"{r}.attn.out_proj", w, w)
        b.norm(f"{r}.ln_2", w)
        b.linear(f"{r}.mlp.c_fc", mlp, w)
        b.linear(f"{r}.mlp.c_proj", w, mlp)
    b.add(f"{p}.token_embedding.weight", (arch.text_vocab, w))
    b.norm(f"{p}.ln_final", w)


def _text(b: _SpecBuilder, arch: Arch) -> None:
    if arch.text_encoder == "clip":
        _clip_text(b, arch)
    elif arch.text_encoder == "openclip":
        _openclip_text(b, arch)
    else:
        raise ValueError(f"unknown text encoder {arch.text_encoder!r}")


# ---- DDPM buffers ---------------------------------------------------------------------

_DDPM_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _ddpm(b: _SpecBuilder, arch: Arch, logvar: bool) -> None:
    for key in _DDPM_KEYS:
        b.add(key, (arch.timesteps,))
    if logvar:
        b.add("logvar", (arch.timesteps,))


@functools.lru_cache(maxsize=64)
def _ddpm_values(timesteps: int) -> dict[str, torch.Tensor]:
    """The SD scaled-linear schedule as registered by ldm's DDPM.register_schedule."""
    f64 = torch.float64
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=f64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=f64), ac[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - ac)
    vals = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(timesteps, dtype=f64),
    }
    return {k: v.to(_F32) for k, v in vals.items()}


# ---- Public spec functions ------------------------------------------------------------


def ema_key(unet_key: str) -> str:
    """LitEma buffer name of a UNet parameter.

    ``model.diffusion_model.time_embed.0.weight`` ->
    ``model_ema.diffusion_modeltime_embed0weight``.
    """
    if not unet_key.startswith("model."):
        raise ValueError(f"not a model.* key: {unet_key!r}")
    return "model_ema." + unet_key[len("model.") :].replace(".", "")


@functools.lru_cache(maxsize=64)
def _control_spec(arch: Arch) -> tuple[TensorSpec, ...]:
    b = _SpecBuilder()
    _ddpm(b, arch, logvar=True)
    _unet(b, arch)
    _vae(b, arch)
    _text(b, arch)
    _controlnet(b, arch)
    return tuple(b.items)


@functools.lru_cache(maxsize=64)
def _base_spec(arch: Arch, ema: bool) -> tuple[TensorSpec, ...]:
    b = _SpecBuilder()
    _ddpm(b, arch, logvar=False)
    _unet(b, arch)
    unet = list(b.items[len(_DDPM_KEYS) :])
    b.add("model_ema.decay", ())
    b.add("model_ema.num_updates", (), torch.int32)
    if ema:
        for s in unet:
            b.add(ema_key(s.key), s.shape, s.dtype)
    _vae(b, arch)
    _text(b, arch)
    return tuple(b.items)


def control_spec(arch: Arch = SD15) -> list[TensorSpec]:
    """Entries of an original ControlNet checkpoint (``control_sd15_*.pth``), in file order.

    DDPM buffers, ``logvar``, ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``, ``control_model.*``.
    """
    return list(_control_spec(arch))


def base_spec(arch: Arch = SD15, *, ema: bool = False) -> list[TensorSpec]:
    """Entries of an SD base ``state_dict`` in file order.

    ``ema=False``: the ``v1-5-pruned-emaonly.ckpt`` layout (``model_ema.decay`` and
    ``model_ema.num_updates`` only). ``ema=True``: the ``v1-5-pruned.ckpt`` layout, which
    additionally has one ``model_ema.<name>`` per UNet parameter (see :func:`ema_key`)
    right after ``model_ema.num_updates``.
    """
    return list(_base_spec(arch, ema))


def paired_control_keys(arch: Arch = SD15) -> list[str]:
    """``control_model.*`` keys that have a ``model.diffusion_model.*`` counterpart."""
    unet = {s.key[len(UNET_PREFIX) :] for s in _control_spec(arch) if s.key.startswith(UNET_PREFIX)}
    return [
        s.key
        for s in _control_spec(arch)
        if s.key.startswith(CONTROL_PREFIX) and s.key[len(CONTROL_PREFIX) :] in unet
    ]


def control_only_keys(arch: Arch = SD15) -> list[str]:
    """``control_model.*`` keys without a UNet counterpart (zero_convs, hint block, ...)."""
    paired = set(paired_control_keys(arch))
    return [
        s.key
        for s in _control_spec(arch)
        if s.key.startswith(CONTROL_PREFIX) and s.key not in paired
    ]


def unchanged_control_keys(arch: Arch = SD15, n: int = 2) -> list[str]:
    """The ``control_model.*`` keys whose value is bit-identical to the base UNet tensor.

    Deterministic: ``n`` bias keys spread evenly over the paired bias keys in file order
    (for n=2 and SD1.5: ``control_model.time_embed.0.bias`` and one in the middle).
    """
    biases = [k for k in paired_control_keys(arch) if k.endswith(".bias")]
    if not 0 <= n <= len(biases):
        raise ValueError(f"n must be in [0, {len(biases)}], got {n}")
    return [biases[(i * len(biases)) // n] for i in range(n)]


def spec_numel(specs: Sequence[TensorSpec], prefix: str = "") -> int:
    """Total number of elements of the specs whose key starts with ``prefix``."""
    return sum(s.numel for s in specs if s.key.startswith(prefix))


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash (blake2b) of ``parts`` (not Python's hash())."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _normal(shape: tuple[int, ...], std: float, *parts: object) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(_stable_seed(*parts))
    return torch.empty(shape, dtype=_F32).normal_(0.0, std, generator=g)


def _unet_base(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """B: the base UNet tensor of ``model.diffusion_model.*`` key ``key``."""
    return _normal(shape, _UNET_STD, "unet", seed, key)


def _offset(b: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """``b + sign * 1e-4 * flip(b)`` (or roll for sign < 0): a cheap, ~1e-4 relative shift."""
    flat = b.reshape(-1)
    other = flat.flip(0) if sign > 0 else flat.roll(1)
    return other.mul_(sign * _OFFSET_REL).add_(flat).reshape(b.shape)


def _aux(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Values of everything outside the UNet / ControlNet (identical in base and control)."""
    key = spec.key
    if key in _DDPM_KEYS or key == "logvar":
        vals = _ddpm_values(spec.shape[0])
        return vals[key].clone()
    if key.endswith("position_ids"):
        return torch.arange(spec.shape[-1], dtype=torch.int64).reshape(spec.shape)
    if key == "model_ema.decay":
        return torch.tensor(0.9999, dtype=_F32)
    if key == "model_ema.num_updates":
        return torch.tensor(840_000, dtype=torch.int32)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(1 / 0.07), dtype=_F32)
    if spec.dtype.is_floating_point:
        return _normal(spec.shape, _AUX_STD, "aux", seed, key)
    return torch.zeros(spec.shape, dtype=spec.dtype)


def _map(fn: Callable[[TensorSpec], torch.Tensor], specs: Sequence[TensorSpec]) -> list:
    """``[fn(s) for s in specs]``, in threads when the total size makes it worthwhile."""
    total = spec_numel(specs)
    workers = min(4, os.cpu_count() or 1)
    if total < _THREAD_MIN_NUMEL or workers < 2:
        return [fn(s) for s in specs]
    # Largest first keeps the threads busy; results are put back in spec order.
    order = sorted(range(len(specs)), key=lambda i: -specs[i].numel)
    out: list = [None] * len(specs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, t in zip(order, pool.map(lambda i: fn(specs[i]), order)):
            out[i] = t
    return out


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Cast the floating point tensors of ``sd`` to ``dtype`` in place (one at a time)."""
    if dtype == _F32:
        return
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    for k, v in sd.items():
        if v.dtype.is_floating_point:
            sd[k] = v.to(dtype)


def base_state_dict(
    arch: Arch = SD15,
    *,
    seed: int = 0,
    ema: bool = False,
    dtype: torch.dtype = _F32,
) -> OrderedDict[str, torch.Tensor]:
    """The base ``state_dict`` (layout of :func:`base_spec`), values from ``seed``.

    ``model.diffusion_model.*`` is B (what :func:`control_state_dict` with
    ``base_seed=seed`` is generated against). With ``ema=True`` the ``model_ema.*``
    copies are ``B - 1e-4 * roll(B)``. Floating point tensors are cast to ``dtype``.
    """
    specs = _base_spec(arch, ema)

    def value(s: TensorSpec) -> torch.Tensor:
        if s.key.startswith(UNET_PREFIX):
            return _unet_base(s.key, s.shape, seed)
        if s.key.startswith("model_ema.") and s.key not in (
            "model_ema.decay",
            "model_ema.num_updates",
        ):
            return _offset(_unet_base(ema_src[s.key], s.shape, seed), sign=-1.0)
        return _aux(s, seed)

    ema_src = {ema_key(s.key): s.key for s in specs if s.key.startswith(UNET_PREFIX)}
    sd = OrderedDict(zip([s.key for s in specs], _map(value, specs)))
    _cast(sd, dtype)
    return sd


def control_state_dict(
    arch: Arch = SD15,
    *,
    seed: int = 0,
    base_seed: Optional[int] = None,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    dtype: torch.dtype = _F32,
) -> OrderedDict[str, torch.Tensor]:
    """An original ControlNet ``state_dict`` (layout of :func:`control_spec`).

    ``base_seed`` (default ``seed``) is the seed of the base the control was trained
    from; ``seed`` drives the control's own perturbation and control-only tensors.
    ``embedded_unet``: ``"offset"`` embeds ``B + 1e-4 * flip(B)`` as
    ``model.diffusion_model.*`` (like non-EMA vs EMA weights), ``"same"`` embeds B itself.
    The ``unchanged_keys`` keys of :func:`unchanged_control_keys` are exactly B.
    Floating point tensors are cast to ``dtype`` at the end.
    """
    if embedded_unet not in ("offset", "same"):
        raise ValueError(f"embedded_unet must be 'offset' or 'same', got {embedded_unet!r}")
    bseed = seed if base_seed is None else base_seed
    specs = _control_spec(arch)
    unchanged = set(unchanged_control_keys(arch, unchanged_keys))
    paired = set(paired_control_keys(arch))
    head = [s for s in specs if not s.key.startswith(CONTROL_PREFIX)]
    tail = [s for s in specs if s.key.startswith(CONTROL_PREFIX)]

    def head_value(s: TensorSpec) -> torch.Tensor:
        if s.key.startswith(UNET_PREFIX):
            b = _unet_base(s.key, s.shape, bseed)
            return b if embedded_unet == "same" else _offset(b)
        return _aux(s, bseed)

    sd: OrderedDict[str, torch.Tensor] = OrderedDict(
        zip([s.key for s in head], _map(head_value, head))
    )

    def tail_value(s: TensorSpec) -> torch.Tensor:
        if s.key in unchanged:
            ukey = UNET_PREFIX + s.key[len(CONTROL_PREFIX) :]
            return _unet_base(ukey, s.shape, bseed)
        if s.key in paired:
            emb = sd[UNET_PREFIX + s.key[len(CONTROL_PREFIX) :]]
            return _normal(s.shape, _PERTURB_STD, "perturb", seed, s.key).add_(emb)
        return _normal(s.shape, _AUX_STD, "control", seed, s.key)

    sd.update(zip([s.key for s in tail], _map(tail_value, tail)))
    _cast(sd, dtype)
    return sd


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _Global:
    """A placeholder pickled as ``GLOBAL module name`` (whatever is importable here)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: object) -> Any:  # pickle requires reduce functions be callable
        raise TypeError(f"placeholder for {self.module}.{self.name}; only for pickling")


class _ForcedGlobalMeta(type):
    """Metaclass of on-the-fly stand-in classes that pickle as their ``__module__``."""


#: What numpy<2 (and the real SD checkpoints) reference for numpy scalars.
_NP_SCALAR = _Global("numpy.core.multiarray", "scalar")

_LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def _make_model_checkpoint_class() -> type:
    """A fresh stand-in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``."""
    cls = _ForcedGlobalMeta("ModelCheckpoint", (), {"__module__": _LIGHTNING_MODULE})
    cls.__qualname__ = "ModelCheckpoint"
    return cls


class _CkptPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler writing the globals of real PL 1.4 / numpy<2 era checkpoints.

    * ``_Global`` placeholders and classes made by ``_ForcedGlobalMeta`` are written as
      ``GLOBAL module name`` without importing the module (pytorch_lightning need not be
      installed, and nothing is registered in ``sys.modules``);
    * numpy scalars are written as ``numpy.core.multiarray.scalar(dtype, bytes)`` as
      numpy<2 does, also under numpy 2 (which would write ``numpy._core...``).
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _write_global(self, module: str, name: str, obj: object) -> None:
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    def _save_placeholder(self, obj: _Global) -> None:
        self._write_global(obj.module, obj.name, obj)

    def _save_forced_class(self, obj: type) -> None:
        self._write_global(obj.__module__, obj.__qualname__, obj)

    dispatch[_Global] = _save_placeholder
    dispatch[_ForcedGlobalMeta] = _save_forced_class

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
            return (_NP_SCALAR, (obj.dtype, obj.tobytes()))
        return NotImplemented


def _ckpt_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for torch.save that uses :class:`_CkptPickler`."""
    mod = types.ModuleType("cndiff._ckpt_pickle")

    def dump(obj: Any, file: Any, protocol: Optional[int] = None) -> None:
        _CkptPickler(file, protocol).dump(obj)

    def dumps(obj: Any, protocol: Optional[int] = None) -> bytes:
        buf = io.BytesIO()
        dump(obj, buf, protocol)
        return buf.getvalue()

    mod.Pickler = _CkptPickler  # type: ignore[attr-defined]
    mod.dump = dump  # type: ignore[attr-defined]
    mod.dumps = dumps  # type: ignore[attr-defined]
    mod.HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL  # type: ignore[attr-defined]
    return mod


@contextmanager
def lightning_stub() -> Iterator[type]:
    """Temporarily register a stub ``pytorch_lightning`` so that ``torch.load`` (with
    ``weights_only=False``) can read lightning checkpoints written by :func:`make_base`.

    Yields the stub ``ModelCheckpoint`` class. ``sys.modules`` is restored on exit.
    """
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", _LIGHTNING_MODULE]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": _LIGHTNING_MODULE})
    mods[_LIGHTNING_MODULE].ModelCheckpoint = cls  # type: ignore[attr-defined]
    mods["pytorch_lightning"].callbacks = mods["pytorch_lightning.callbacks"]  # type: ignore[attr-defined]
    mods["pytorch_lightning.callbacks"].model_checkpoint = mods[_LIGHTNING_MODULE]  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        yield cls
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _lightning_wrap(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The top level of a PL 1.4 checkpoint as found in the SD1.x release files."""
    callbacks = {
        _make_model_checkpoint_class(): {
            "monitor": None,
            "best_model_score": np.float64(0.1234),
            "best_model_path": "",
            "current_score": np.float64(0.1234),
            "dirpath": "logs/checkpoints",
        }
    }
    return {
        "epoch": 6,
        "global_step": 840000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": callbacks,
    }


def _with_metadata(sd: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Attach a small ``_metadata`` attribute like ``nn.Module.state_dict()`` does."""
    meta: OrderedDict[str, dict[str, int]] = OrderedDict()
    for key in sd:
        parts = key.split(".")
        for i in range(min(len(parts) - 1, 2) + 1):
            meta.setdefault(".".join(parts[:i]), {"version": 1})
    sd._metadata = meta  # type: ignore[attr-defined]
    return sd


_EXT = {
    "pth": ".pth",
    "pt": ".pt",
    "ckpt": ".ckpt",
    "legacy": ".pth",
    "safetensors": ".safetensors",
}


def _write(obj: Any, path: Path, fmt: str, *, custom_pickler: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(dict(obj), str(path), metadata={"format": "pt"})
        return
    kwargs: dict[str, Any] = {}
    if custom_pickler:
        kwargs["pickle_module"] = _ckpt_pickle_module()
    if fmt == "legacy":
        kwargs["_use_new_zipfile_serialization"] = False
    elif fmt not in ("pth", "pt", "ckpt"):
        raise ValueError(f"unknown format {fmt!r}; use pth, ckpt, legacy or safetensors")
    torch.save(obj, str(path), **kwargs)


def make_control(
    path: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    base_seed: Optional[int] = None,
    fmt: Format = "pth",
    wrapped: bool = False,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    dtype: torch.dtype = _F32,
) -> Path:
    """Write an original-layout ControlNet checkpoint; see :func:`control_state_dict`.

    ``fmt``: ``"pth"``/``"ckpt"``/``"pt"`` (torch.save zip), ``"legacy"`` (pre-1.6
    torch.save format) or ``"safetensors"``. ``wrapped=True`` saves
    ``{"state_dict": sd}`` (not possible with safetensors). Returns the path.
    """
    if fmt == "safetensors" and wrapped:
        raise ValueError("safetensors files are always flat; wrapped=True is not possible")
    path = Path(path)
    sd = control_state_dict(
        arch,
        seed=seed,
        base_seed=base_seed,
        embedded_unet=embedded_unet,
        unchanged_keys=unchanged_keys,
        dtype=dtype,
    )
    obj: Any = sd
    if fmt != "safetensors":
        obj = _with_metadata(sd)
        if wrapped:
            obj = {"state_dict": obj}
    _write(obj, path, fmt)
    logger.debug("wrote synthetic control %s (%s, %d keys)", path, arch.name, len(sd))
    return path


def make_base(
    path: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    fmt: Format = "ckpt",
    dtype: torch.dtype = _F32,
    lightning: bool = True,
    ema: bool = False,
    flat: bool = False,
) -> Path:
    """Write an SD base checkpoint; see :func:`base_state_dict` and :func:`base_spec`.

    Torch formats are wrapped as ``{"state_dict": sd, ...}`` unless ``flat=True``. With
    ``lightning=True`` (and not flat) the top level also has ``epoch``, ``global_step``,
    ``pytorch-lightning_version`` and ``callbacks`` keyed by the class
    ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (as PL 1.4 wrote
    it) whose state holds numpy float64 scalars (``numpy.core.multiarray.scalar``,
    ``numpy.dtype`` globals). pytorch_lightning is not needed, nothing is registered in
    ``sys.modules``; read such files with :func:`lightning_stub` or a custom unpickler.
    ``safetensors`` is always flat (``lightning``/``flat`` are ignored). Returns the path.
    """
    path = Path(path)
    sd = base_state_dict(arch, seed=seed, ema=ema, dtype=dtype)
    obj: Any = sd
    use_lightning = False
    if fmt != "safetensors":
        obj = _with_metadata(sd)
        if not flat:
            if lightning:
                obj = _lightning_wrap(obj)
                use_lightning = True
            else:
                obj = {"state_dict": obj}
    _write(obj, path, fmt, custom_pickler=use_lightning)
    logger.debug("wrote synthetic base %s (%s, %d keys)", path, arch.name, len(sd))
    return path


def make_pair(
    folder: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    control_fmt: Format = "pth",
    base_fmt: Format = "ckpt",
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    wrapped: bool = False,
    control_dtype: torch.dtype = _F32,
    base_dtype: torch.dtype = _F32,
    lightning: bool = True,
    ema: bool = False,
    flat: bool = False,
) -> tuple[Path, Path]:
    """Write a control checkpoint and the base it was generated against into ``folder``.

    Files: ``control_<arch>_synthetic<ext>`` and ``<arch>_base_synthetic<ext>``, the
    extension following the format. The two are generated one after the other, so at
    most one state dict is in memory. Returns ``(control_path, base_path)``.
    """
    folder = Path(folder)
    control = make_control(
        folder / f"control_{arch.name}_synthetic{_EXT[control_fmt]}",
        arch,
        seed=seed,
        base_seed=seed,
        fmt=control_fmt,
        wrapped=wrapped,
        embedded_unet=embedded_unet,
        unchanged_keys=unchanged_keys,
        dtype=control_dtype,
    )
    base = make_base(
        folder / f"{arch.name}_base_synthetic{_EXT[base_fmt]}",
        arch,
        seed=seed,
        fmt=base_fmt,
        dtype=base_dtype,
        lightning=lightning,
        ema=ema,
        flat=flat,
    )
    return control, base
