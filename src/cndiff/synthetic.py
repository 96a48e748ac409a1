"""Synthetic Stable Diffusion / ControlNet checkpoints with the real key layouts.

This module writes checkpoints that have exactly the key names, key order, dtypes and
shapes of the files users hold, either at full size (for benchmarks) or scaled down (for
tests: same key names and counts, consistent tiny shapes):

* original ControlNet 1.0 checkpoints (``control_sd15_*.pth``: ``control_model.*`` plus
  the whole SD model), ``layout="original"``;
* ControlNet 1.1 checkpoints (``control_v11p_sd15_*.pth``: ``control_model.*`` only),
  ``layout="control-only"``;
* diffusers ControlNets (``diffusion_pytorch_model.safetensors`` + ``config.json``),
  ``layout="diffusers"``, for SD1.x, SD2.x and SDXL;
* SD bases: ``v1-5-pruned-emaonly.ckpt`` / ``v1-5-pruned.ckpt`` (Lightning-wrapped, with
  or without per-tensor EMA), SD2.x, the single-file SDXL base
  (``sd_xl_base_1.0.safetensors``: ``model.diffusion_model.*``,
  ``conditioner.embedders.0/1.*``, ``first_stage_model.*``, float16), and diffusers UNets
  (``unet/diffusion_pytorch_model.safetensors``).

Nothing is read from disk. The UNet and ControlNet tables come from :mod:`cndiff.layouts`
(derived from the architecture's configuration); the VAE (ldm ``AutoencoderKL``), the
text encoders (HF ``CLIPTextModel``, the OpenCLIP text tower) and the DDPM buffers are
generated here.

No torch is needed: values are made with numpy, ``.safetensors`` files and torch's zip
format (``.pth``/``.ckpt``/``.pt``) are written byte by byte, tensor by tensor, so a
full-size file (5 GB SDXL ControlNet, 6.9 GB SDXL base) is written in bounded memory.
Only the pre-1.6 ``legacy`` format and the ``*_state_dict`` functions (which return torch
tensors) import torch.

Values are deterministic functions of ``(seed, key)``, the key being the canonical ldm
key whatever the layout: every tensor is drawn from its own numpy generator seeded by a
stable hash of the key, so a control checkpoint can be produced without holding its
base in memory, generation runs in threads, and a diffusers ControlNet carries the same
values as the ldm one of the same seed.

Value model (``B`` = base UNet tensor, ``E`` = UNet embedded in the control file, keys
without prefix; ``X`` is a ControlNet key whose UNet counterpart has the same shape)::

    base   model.diffusion_model.X = B(X)                      ~ N(0, 0.05^2)
    control model.diffusion_model.X = E(X) = B + 1e-4 * flip(B)  (embedded_unet="offset")
                                     = B                          (embedded_unet="same")
    control control_model.X         = E(X) + P(X),  P ~ N(0, 0.01^2)
                                     = B(X) exactly for unchanged_control_keys(arch, n)
    control control_model.<no UNet counterpart> ~ N(0, 0.02^2)
    VAE / text encoder tensors       ~ N(0, 0.02^2), identical in base and control
    DDPM buffers                     the real SD scaled-linear schedule (float32)

so ``control_model.X - base[model.diffusion_model.X]`` is ``P + 1e-4 * flip(B)`` (or
``P``), and exactly zero on the unchanged keys (when both files keep float32). The
control-only and diffusers ControlNets hold the same ``control_model.X`` values (``E`` is
computed, not stored); a diffusers UNet holds ``B``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import pickle
import struct
import sys
import types
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from . import layouts
from .layouts import UNetConfig

__all__ = [
    "CONTROL_PREFIX",
    "SD15",
    "SD21",
    "SDXL",
    "UNET_PREFIX",
    "Arch",
    "DType",
    "TensorSpec",
    "TextEncoder",
    "base_arrays",
    "base_spec",
    "base_state_dict",
    "control_arrays",
    "control_model_spec",
    "control_only_keys",
    "control_spec",
    "control_state_dict",
    "diffusers_controlnet_spec",
    "diffusers_unet_spec",
    "ema_key",
    "lightning_stub",
    "make_base",
    "make_control",
    "make_diffusers_controlnet",
    "make_diffusers_unet",
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
ControlLayout = Literal["original", "control-only", "diffusers"]
BaseLayout = Literal["original", "diffusers"]

#: Prefix of the UNet in SD / original ControlNet checkpoints.
UNET_PREFIX = layouts.UNET_PREFIX
#: Prefix of the ControlNet branch in original ControlNet checkpoints.
CONTROL_PREFIX = layouts.CONTROL_PREFIX

# Value scales (see the module docstring).
_UNET_STD = 0.05
_OFFSET_REL = 1e-4
_PERTURB_STD = 0.01
_AUX_STD = 0.02

# Below this many elements in total, tensors are generated without threads.
_THREAD_MIN_NUMEL = 20_000_000
# At most this many bytes of generated tensors wait to be written (plus one tensor).
_WINDOW_BYTES = 256 << 20
# Normal values are drawn in chunks of this many elements (fixed: values depend on it).
_CHUNK = 1 << 18


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------

# name: (itemsize, safetensors code, torch storage class, numpy dtype holding the data)
_DTYPES: dict[str, tuple[int, str, str, str]] = {
    "float64": (8, "F64", "DoubleStorage", "<f8"),
    "float32": (4, "F32", "FloatStorage", "<f4"),
    "float16": (2, "F16", "HalfStorage", "<f2"),
    "bfloat16": (2, "BF16", "BFloat16Storage", "<u2"),  # raw bits
    "int64": (8, "I64", "LongStorage", "<i8"),
    "int32": (4, "I32", "IntStorage", "<i4"),
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
            "float": "float32", "fp64": "float64", "double": "float64", "long": "int64",
            "int": "int32"}  # fmt: skip


class DType(str):
    """A dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``, ``"int64"``...).

    Compares equal to the torch dtype and the numpy dtype of that name (and to its name,
    with or without ``torch.``), so that ``tensor.dtype == spec.dtype`` holds without
    this module importing torch. Construct from a name, an alias (``fp16``), a torch
    dtype or a numpy dtype.
    """

    __slots__ = ()

    def __new__(cls, value: object) -> DType:
        if isinstance(value, DType):
            return value
        if isinstance(value, np.dtype) or (
            isinstance(value, type) and issubclass(value, np.generic)
        ):
            name = np.dtype(value).name
        else:
            name = str(value).removeprefix("torch.").lower()
        name = _ALIASES.get(name, name)
        if name not in _DTYPES:
            raise ValueError(f"unsupported dtype {value!r}; use one of {', '.join(_DTYPES)}")
        return super().__new__(cls, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str.__eq__(self, other.removeprefix("torch."))
        if isinstance(other, np.dtype):
            return self != "bfloat16" and other == np.dtype(self.numpy)
        if type(other).__module__.startswith("torch"):
            return str(other) == "torch." + self
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = str.__hash__

    @property
    def itemsize(self) -> int:
        return _DTYPES[self][0]

    @property
    def is_floating_point(self) -> bool:
        return self.startswith(("float", "bfloat"))

    @property
    def safetensors(self) -> str:
        """The safetensors dtype code (``F32``...)."""
        return _DTYPES[self][1]

    @property
    def storage(self) -> str:
        """The torch storage class name used in pickles (``FloatStorage``...)."""
        return _DTYPES[self][2]

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype holding the data (bfloat16: its raw bits as uint16)."""
        return np.dtype(_DTYPES[self][3])

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, str(self))


_F32 = DType("float32")


# --------------------------------------------------------------------------------------
# Specs and architectures
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a checkpoint: key, dtype and shape."""

    key: str
    dtype: DType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder of an SD checkpoint, by the layout of its state dict."""

    kind: Literal["clip", "openclip"]
    """``"clip"``: HF ``CLIPTextModel`` (``<prefix>.text_model.*``); ``"openclip"``: the
    OpenCLIP text tower (``<prefix>.transformer.resblocks.*``...)."""
    prefix: str
    width: int
    layers: int
    mlp_ratio: int = 4
    vocab: int = 49408
    positions: int = 77
    proj_dim: int = 0
    """OpenCLIP only: ``text_projection`` is ``[width, proj_dim]``."""


_CLIP_L = TextEncoder("clip", "cond_stage_model.transformer", 768, 12)
_OPENCLIP_H = TextEncoder("openclip", "cond_stage_model.model", 1024, 24, proj_dim=1024)
_XL_CLIP_L = dataclasses.replace(_CLIP_L, prefix="conditioner.embedders.0.transformer")
_XL_BIGG = TextEncoder("openclip", "conditioner.embedders.1.model", 1280, 32, proj_dim=1280)


@dataclass(frozen=True)
class Arch:
    """An SD checkpoint family: the UNet/ControlNet config and the rest of the model.

    The defaults are the full-size SD1.5 values. The UNet fields of earlier versions
    (``model_channels``, ``context_dim``...) are read-only properties now; the UNet is
    ``unet``, a :class:`cndiff.layouts.UNetConfig`.
    """

    name: str
    """Family, used in file names: ``"sd15"``, ``"sd21"`` or ``"sdxl"``."""
    unet: UNetConfig = layouts.SD1
    text_encoders: tuple[TextEncoder, ...] = (_CLIP_L,)
    vae_channels: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    vae_in_channels: int = 3
    z_channels: int = 4
    timesteps: int = 1000
    ddpm: bool = True
    """The checkpoint holds ldm's DDPM schedule buffers (SD1.x/2.x; SDXL files do not)."""
    base_dtype: str = "float32"
    """dtype of the published base checkpoint (SDXL: float16)."""
    control_layout: str = "original"
    """Default layout of :func:`make_control` / :func:`make_pair` for this family."""

    # The fields of the previous Arch, read from the UNet config.
    @property
    def model_channels(self) -> int:
        return self.unet.model_channels

    @property
    def context_dim(self) -> int:
        return self.unet.context_dim

    @property
    def linear_proj(self) -> bool:
        return self.unet.linear_proj

    @property
    def channel_mult(self) -> tuple[int, ...]:
        return self.unet.channel_mult

    @property
    def num_res_blocks(self) -> int:
        return self.unet.num_res_blocks

    @property
    def attention_levels(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.unet.transformer_depth) if d)

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def hint_channels(self) -> int:
        return self.unet.hint_channels

    @property
    def hint_block_channels(self) -> tuple[int, ...]:
        """Output widths of the ldm input_hint_block convs before the final one."""
        w = self.unet.hint_widths
        return tuple(x for x in w[:-1] for _ in (0, 1)) + (w[-1],)


SD15 = Arch(name="sd15")
"""Full-size SD1.5 (matches ``control_sd15_*.pth`` / ``v1-5-pruned-emaonly.ckpt``)."""

SD21 = Arch(name="sd21", unet=layouts.SD2, text_encoders=(_OPENCLIP_H,))
"""Full-size SD2.x (768-v / 512-base): linear proj, context 1024, OpenCLIP ViT-H text."""

SDXL = Arch(
    name="sdxl",
    unet=layouts.SDXL,
    text_encoders=(_XL_CLIP_L, _XL_BIGG),
    ddpm=False,
    base_dtype="float16",
    control_layout="diffusers",
)
"""Full-size SDXL 1.0 base (``sd_xl_base_1.0.safetensors``, float16; UNet = the published
one; CLIP-L and OpenCLIP bigG under ``conditioner.embedders.0/1``; the SD VAE). Its
ControlNets default to the diffusers layout (diffusers/controlnet-canny-sdxl-1.0)."""


def tiny(arch: Arch = SD15) -> Arch:
    """Scaled-down version of ``arch`` with identical key names, order and counts.

    UNet width 4 (see :func:`cndiff.layouts.tiny`), VAE width 2, text widths 16 (CLIP) /
    24 (OpenCLIP) with the same number of layers, a 64-token vocabulary and 16 positions;
    the context width is the sum of the text widths. ``in_channels``, ``hint_channels``,
    ``z_channels``, kernel sizes and the 1000 DDPM timesteps are kept.
    """
    texts = tuple(
        dataclasses.replace(
            t,
            width=16 if t.kind == "clip" else 24,
            vocab=64,
            positions=16,
            proj_dim=0 if t.kind == "clip" else 24,
        )
        for t in arch.text_encoders
    )
    return dataclasses.replace(
        arch, unet=layouts.tiny(arch.unet), vae_channels=2, text_encoders=texts
    )


class _SpecBuilder:
    """Accumulates TensorSpecs in module registration order."""

    def __init__(self) -> None:
        self.items: list[TensorSpec] = []

    def add(self, key: str, shape: Sequence[int], dtype: str = _F32) -> None:
        self.items.append(TensorSpec(key, DType(dtype), tuple(int(s) for s in shape)))

    def wb(self, prefix: str, wshape: Sequence[int], bias: Optional[int] = None) -> None:
        """weight of ``wshape`` and a bias of ``wshape[0]`` (or ``bias``) elements."""
        self.add(f"{prefix}.weight", wshape)
        self.add(f"{prefix}.bias", (wshape[0] if bias is None else bias,))

    def linear(self, prefix: str, out: int, inp: int) -> None:
        self.wb(prefix, (out, inp))

    def conv(self, prefix: str, out: int, inp: int, k: int) -> None:
        self.wb(prefix, (out, inp, k, k))

    def norm(self, prefix: str, c: int) -> None:
        self.wb(prefix, (c,))

    def table(self, prefix: str, rows: Sequence[layouts.Entry]) -> None:
        for key, shape in rows:
            self.add(prefix + key, shape)


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


def _clip_text(b: _SpecBuilder, enc: TextEncoder) -> None:
    w, mlp = enc.width, enc.mlp_ratio * enc.width
    t = f"{enc.prefix}.text_model"
    b.add(f"{t}.embeddings.position_ids", (1, enc.positions), "int64")
    b.add(f"{t}.embeddings.token_embedding.weight", (enc.vocab, w))
    b.add(f"{t}.embeddings.position_embedding.weight", (enc.positions, w))
    for i in range(enc.layers):
        layer = f"{t}.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            b.linear(f"{layer}.self_attn.{name}", w, w)
        b.norm(f"{layer}.layer_norm1", w)
        b.linear(f"{layer}.mlp.fc1", mlp, w)
        b.linear(f"{layer}.mlp.fc2", w, mlp)
        b.norm(f"{layer}.layer_norm2", w)
    b.norm(f"{t}.final_layer_norm", w)


def _openclip_text(b: _SpecBuilder, enc: TextEncoder) -> None:
    w, mlp, p = enc.width, enc.mlp_ratio * enc.width, enc.prefix
    b.add(f"{p}.positional_embedding", (enc.positions, w))
    b.add(f"{p}.text_projection", (w, enc.proj_dim))
    b.add(f"{p}.logit_scale", ())
    for i in range(enc.layers):
        r = f"{p}.transformer.resblocks.{i}"
        b.norm(f"{r}.ln_1", w)
        b.add(f"{r}.attn.in_proj_weight", (3 * w, w))
        b.add(f"{r}.attn.in_proj_bias", (3 * w,))
        b.linear(f"{r}.attn.out_proj", w, w)
        b.norm(f"{r}.ln_2", w)
        b.linear(f"{r}.mlp.c_fc", mlp, w)
        b.linear(f"{r}.mlp.c_proj", w, mlp)
    b.add(f"{p}.token_embedding.weight", (enc.vocab, w))
    b.norm(f"{p}.ln_final", w)


def _text(b: _SpecBuilder, arch: Arch) -> None:
    for enc in arch.text_encoders:
        if enc.kind == "clip":
            _clip_text(b, enc)
        elif enc.kind == "openclip":
            _openclip_text(b, enc)
        else:
            raise ValueError(f"unknown text encoder {enc.kind!r}")


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
    if not arch.ddpm:
        return
    for key in _DDPM_KEYS:
        b.add(key, (arch.timesteps,))
    if logvar:
        b.add("logvar", (arch.timesteps,))


@functools.lru_cache(maxsize=16)
def _ddpm_values(timesteps: int) -> dict[str, np.ndarray]:
    """The SD scaled-linear schedule as registered by ldm's DDPM.register_schedule."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    prev = np.concatenate([np.ones(1), ac[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - ac)
    vals = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(alphas) / (1.0 - ac),
        "logvar": np.zeros(timesteps),
    }
    return {k: v.astype(np.float32) for k, v in vals.items()}


# ---- Public spec functions ------------------------------------------------------------


def ema_key(unet_key: str) -> str:
    """LitEma buffer name of a UNet parameter.

    ``model.diffusion_model.time_embed.0.weight`` ->
    ``model_ema.diffusion_modeltime_embed0weight``.
    """
    if not unet_key.startswith("model."):
        raise ValueError(f"not a model.* key: {unet_key!r}")
    return "model_ema." + unet_key[len("model.") :].replace(".", "")


def _cast_specs(specs: Sequence[TensorSpec], dtype: Optional[str]) -> tuple[TensorSpec, ...]:
    """The specs with every floating point dtype replaced by ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tuple(specs)
    dt = DType(dtype)
    if not dt.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    return tuple(
        dataclasses.replace(s, dtype=dt) if s.dtype.is_floating_point else s for s in specs
    )


def _body(b: _SpecBuilder, arch: Arch, *, base: bool, ema: bool = False) -> None:
    """Everything of an SD checkpoint: DDPM buffers (``logvar`` in a control file), UNet,
    LitEma entries (in a base), VAE, text encoders."""
    _ddpm(b, arch, logvar=not base)
    start = len(b.items)
    b.table(UNET_PREFIX, layouts.ldm_unet(arch.unet))
    unet = list(b.items[start:])
    if arch.ddpm and base:  # LitEma of the ldm training code
        b.add("model_ema.decay", ())
        b.add("model_ema.num_updates", (), "int32")
        if ema:
            for s in unet:
                b.add(ema_key(s.key), s.shape, s.dtype)
    elif ema:
        raise ValueError(f"{arch.name} checkpoints have no EMA layout")
    if arch.ddpm:
        _vae(b, arch)
        _text(b, arch)
    else:  # sgm order: conditioner before first_stage_model
        _text(b, arch)
        _vae(b, arch)


@functools.lru_cache(maxsize=64)
def _control_spec(arch: Arch) -> tuple[TensorSpec, ...]:
    b = _SpecBuilder()
    _body(b, arch, base=False)
    b.table(CONTROL_PREFIX, layouts.ldm_controlnet(arch.unet))
    return tuple(b.items)


@functools.lru_cache(maxsize=64)
def _base_spec(arch: Arch, ema: bool) -> tuple[TensorSpec, ...]:
    b = _SpecBuilder()
    _body(b, arch, base=True, ema=ema)
    return _cast_specs(b.items, arch.base_dtype if arch.base_dtype != "float32" else None)


def control_spec(arch: Arch = SD15) -> list[TensorSpec]:
    """Entries of an original ControlNet checkpoint (``control_sd15_*.pth``), in file order.

    DDPM buffers, ``logvar``, ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``, ``control_model.*``, all float32. (For SDXL, which has no such
    published file: the SDXL base's entries in float32, then ``control_model.*``.)
    """
    return list(_control_spec(arch))


def control_model_spec(arch: Arch = SD15) -> list[TensorSpec]:
    """Entries of a ControlNet 1.1 checkpoint (``control_v11p_sd15_*.pth``): the
    ``control_model.*`` entries of :func:`control_spec` only, float32."""
    return [s for s in _control_spec(arch) if s.key.startswith(CONTROL_PREFIX)]


def diffusers_controlnet_spec(arch: Arch = SD15) -> list[TensorSpec]:
    """Entries of a diffusers ControlNet (``diffusion_pytorch_model.safetensors``), in
    ``ControlNetModel`` order, float32."""
    return [TensorSpec(k, _F32, s) for k, s in layouts.diffusers_controlnet(arch.unet)]


def diffusers_unet_spec(arch: Arch = SD15) -> list[TensorSpec]:
    """Entries of a diffusers UNet (``unet/diffusion_pytorch_model.safetensors``), in
    ``UNet2DConditionModel`` order, float32."""
    return [TensorSpec(k, _F32, s) for k, s in layouts.diffusers_unet(arch.unet)]


def base_spec(arch: Arch = SD15, *, ema: bool = False) -> list[TensorSpec]:
    """Entries of an SD base ``state_dict`` in file order, in the published dtypes.

    SD1.x/2.x, ``ema=False``: the ``v1-5-pruned-emaonly.ckpt`` layout (``model_ema.decay``
    and ``model_ema.num_updates`` only). ``ema=True``: the ``v1-5-pruned.ckpt`` layout,
    which additionally has one ``model_ema.<name>`` per UNet parameter (see
    :func:`ema_key`) right after ``model_ema.num_updates``. SDXL: the
    ``sd_xl_base_1.0.safetensors`` layout, float16 (``position_ids`` int64).
    """
    return list(_base_spec(arch, ema))


def paired_control_keys(arch: Arch = SD15) -> list[str]:
    """``control_model.*`` keys that have a ``model.diffusion_model.*`` counterpart."""
    return [CONTROL_PREFIX + k for k in layouts.shared_keys(arch.unet)]


def control_only_keys(arch: Arch = SD15) -> list[str]:
    """``control_model.*`` keys without a UNet counterpart (zero_convs, hint block, ...)."""
    return [CONTROL_PREFIX + k for k in layouts.control_only_keys(arch.unet)]


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


_TWO_PI = np.float32(2.0 * math.pi)


def _normal(shape: tuple[int, ...], std: float, *parts: object) -> np.ndarray:
    """N(0, std^2) float32 values seeded by ``parts``: Box-Muller on the uniform float32
    stream of an SFC64 generator, in fixed chunks (about twice as fast as numpy's
    ``standard_normal`` and as torch's ``normal_``; releases the GIL)."""
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    n = flat.size
    rng = np.random.Generator(np.random.SFC64(_stable_seed(*parts)))
    u = np.empty(min(n + 1, _CHUNK), np.float32)
    r = np.empty(len(u) // 2 + 1, np.float32)
    m2 = np.float32(-2.0 * std * std)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        k = (m + 1) // 2
        uu = u[: 2 * k]
        rng.random(dtype=np.float32, out=uu)
        u1, u2 = uu[:k], uu[k:]
        rr = r[:k]
        np.subtract(np.float32(1.0), u1, out=rr)  # (0, 1]
        np.log(rr, out=rr)
        rr *= m2
        np.sqrt(rr, out=rr)
        u2 *= _TWO_PI
        seg = flat[start : start + m]
        a, b = seg[:k], seg[k:]
        np.cos(u2, out=a)
        a *= rr
        np.sin(u2[: m - k], out=b)
        b *= rr[: m - k]
    return out


def _offset(b: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """``b + sign * 1e-4 * flip(b)`` (or roll for sign < 0): a cheap, ~1e-4 relative shift."""
    flat = b.reshape(-1)
    other = flat[::-1] if sign > 0 else np.roll(flat, 1)
    out = np.multiply(other, np.float32(sign * _OFFSET_REL))
    out += flat
    return out.reshape(b.shape)


def _to_dtype(a: np.ndarray, dt: DType) -> np.ndarray:
    """``a`` in the storage dtype of ``dt`` (bfloat16: round-to-nearest-even bits)."""
    if a.dtype == dt.numpy and dt != "bfloat16":
        return a
    if dt == "bfloat16":
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        bits = bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))
        return (bits >> 16).astype(np.uint16)
    return a.astype(dt.numpy)


class _Values:
    """The value model of the module docstring, by canonical ldm key."""

    def __init__(
        self,
        arch: Arch,
        *,
        seed: int,
        base_seed: Optional[int] = None,
        embedded_unet: EmbeddedUnet = "offset",
        unchanged_keys: int = 2,
    ) -> None:
        if embedded_unet not in ("offset", "same"):
            raise ValueError(f"embedded_unet must be 'offset' or 'same', got {embedded_unet!r}")
        self.seed = seed
        self.bseed = seed if base_seed is None else base_seed
        self.same = embedded_unet == "same"
        self.shared = set(layouts.shared_keys(arch.unet))
        self.unchanged = {
            k[len(CONTROL_PREFIX) :] for k in unchanged_control_keys(arch, unchanged_keys)
        }

    def base(self, rel: str, shape: tuple[int, ...]) -> np.ndarray:
        """B: the base UNet tensor of ``model.diffusion_model.<rel>``."""
        return _normal(shape, _UNET_STD, "unet", self.bseed, UNET_PREFIX + rel)

    def embedded(self, rel: str, shape: tuple[int, ...]) -> np.ndarray:
        """E: the UNet embedded in an original control file."""
        b = self.base(rel, shape)
        return b if self.same else _offset(b)

    def control(self, rel: str, shape: tuple[int, ...]) -> np.ndarray:
        """``control_model.<rel>``."""
        if rel in self.unchanged:
            return self.base(rel, shape)
        key = CONTROL_PREFIX + rel
        if rel in self.shared:
            p = _normal(shape, _PERTURB_STD, "perturb", self.seed, key)
            p += self.embedded(rel, shape)
            return p
        return _normal(shape, _AUX_STD, "control", self.seed, key)

    def ema(self, rel: str, shape: tuple[int, ...]) -> np.ndarray:
        """``model_ema.*`` of ``model.diffusion_model.<rel>``: ``B - 1e-4 * roll(B)``."""
        return _offset(self.base(rel, shape), sign=-1.0)

    def aux(self, spec: TensorSpec) -> np.ndarray:
        """Everything outside the UNet / ControlNet (identical in base and control)."""
        key = spec.key
        if key in _DDPM_KEYS or key == "logvar":
            return _ddpm_values(spec.shape[0])[key].copy()
        if key.endswith("position_ids"):
            return np.arange(spec.numel, dtype=np.int64).reshape(spec.shape)
        if key == "model_ema.decay":
            return np.array(0.9999, dtype=np.float32)
        if key == "model_ema.num_updates":
            return np.array(840_000, dtype=np.int32)
        if key.endswith("logit_scale"):
            return np.array(math.log(1 / 0.07), dtype=np.float32)
        if spec.dtype.is_floating_point:
            return _normal(spec.shape, _AUX_STD, "aux", self.bseed, key)
        return np.zeros(spec.shape, dtype=spec.dtype.numpy)


@dataclass(frozen=True)
class _Plan:
    """What a file holds: its entries (final dtypes) and how to make each value."""

    specs: tuple[TensorSpec, ...]
    value: Callable[[str, tuple[int, ...]], np.ndarray]
    """key, shape -> float32 (or integer) values, before the cast to the spec's dtype."""

    def make(self, spec: TensorSpec) -> np.ndarray:
        return _to_dtype(self.value(spec.key, spec.shape), spec.dtype)


def _control_plan(
    arch: Arch,
    layout: str,
    *,
    seed: int,
    base_seed: Optional[int],
    embedded_unet: EmbeddedUnet,
    unchanged_keys: int,
    dtype: Optional[str],
) -> _Plan:
    vals = _Values(
        arch,
        seed=seed,
        base_seed=base_seed,
        embedded_unet=embedded_unet,
        unchanged_keys=unchanged_keys,
    )
    aux = {s.key: s for s in _control_spec(arch)}
    nc, nu = len(CONTROL_PREFIX), len(UNET_PREFIX)

    if layout == "diffusers":
        to_ldm = {p.diffusers: p.ldm for p in layouts.controlnet_pairs(arch.unet)}
        specs = diffusers_controlnet_spec(arch)

        def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
            return vals.control(to_ldm[key], shape)

    elif layout in ("original", "control-only"):
        specs = control_spec(arch) if layout == "original" else control_model_spec(arch)

        def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
            if key.startswith(CONTROL_PREFIX):
                return vals.control(key[nc:], shape)
            if key.startswith(UNET_PREFIX):
                return vals.embedded(key[nu:], shape)
            return vals.aux(aux[key])

    else:
        raise ValueError(
            f"unknown control layout {layout!r}; use 'original', 'control-only' or 'diffusers'"
        )
    return _Plan(_cast_specs(specs, dtype), value)


def _base_plan(arch: Arch, layout: str, *, seed: int, ema: bool, dtype: Optional[str]) -> _Plan:
    vals = _Values(arch, seed=seed)
    nu = len(UNET_PREFIX)
    if layout == "diffusers":
        if ema:
            raise ValueError("a diffusers UNet has no EMA entries")
        to_ldm = {p.diffusers: p.ldm for p in layouts.unet_pairs(arch.unet)}
        specs = diffusers_unet_spec(arch)

        def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
            return vals.base(to_ldm[key], shape)

    elif layout == "original":
        specs = base_spec(arch, ema=ema)
        aux = {s.key: s for s in specs}
        ema_src = {ema_key(k): k[nu:] for k in aux if k.startswith(UNET_PREFIX)}

        def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
            if key.startswith(UNET_PREFIX):
                return vals.base(key[nu:], shape)
            if key in ema_src:
                return vals.ema(ema_src[key], shape)
            return vals.aux(aux[key])

    else:
        raise ValueError(f"unknown base layout {layout!r}; use 'original' or 'diffusers'")
    return _Plan(_cast_specs(specs, dtype), value)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _generate(
    plan: _Plan, *, crc: bool = False, workers: Optional[int] = None
) -> Iterator[tuple[TensorSpec, np.ndarray, int]]:
    """``(spec, array, crc32 or 0)`` for every entry, in order; in threads for large plans,
    with at most about ``_WINDOW_BYTES`` of generated tensors waiting."""

    def job(spec: TensorSpec) -> tuple[np.ndarray, int]:
        arr = plan.make(spec)
        if not arr.flags.c_contiguous:
            arr = arr.copy()
        return arr, (zlib.crc32(arr.reshape(-1).view(np.uint8)) if crc else 0)

    n = workers or _workers()
    if n < 2 or spec_numel(plan.specs) < _THREAD_MIN_NUMEL:
        for spec in plan.specs:
            yield (spec, *job(spec))
        return
    pending: deque[tuple[TensorSpec, Future]] = deque()
    waiting = 0
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="cndiff-synthetic") as pool:
        try:
            for spec in plan.specs:
                while pending and (len(pending) >= 2 * n or waiting >= _WINDOW_BYTES):
                    done, fut = pending.popleft()
                    waiting -= done.nbytes
                    yield (done, *fut.result())
                pending.append((spec, pool.submit(job, spec)))
                waiting += spec.nbytes
            while pending:
                done, fut = pending.popleft()
                yield (done, *fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()


def _arrays(plan: _Plan) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((s.key, a) for s, a, _ in _generate(plan))


def control_arrays(
    arch: Arch = SD15,
    *,
    layout: ControlLayout = "original",
    seed: int = 0,
    base_seed: Optional[int] = None,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    dtype: Any = None,
) -> OrderedDict[str, np.ndarray]:
    """A ControlNet as numpy arrays (no torch needed); see :func:`control_state_dict`.

    bfloat16 tensors are returned as their raw bits (uint16 arrays).
    """
    return _arrays(
        _control_plan(
            arch,
            layout,
            seed=seed,
            base_seed=base_seed,
            embedded_unet=embedded_unet,
            unchanged_keys=unchanged_keys,
            dtype=dtype,
        )
    )


def base_arrays(
    arch: Arch = SD15,
    *,
    layout: BaseLayout = "original",
    seed: int = 0,
    ema: bool = False,
    dtype: Any = None,
) -> OrderedDict[str, np.ndarray]:
    """A base as numpy arrays (no torch needed); see :func:`base_state_dict`."""
    return _arrays(_base_plan(arch, layout, seed=seed, ema=ema, dtype=dtype))


def _to_torch(arrays: OrderedDict[str, np.ndarray], specs: Sequence[TensorSpec]) -> OrderedDict:
    import torch

    out: OrderedDict[str, Any] = OrderedDict()
    for s in specs:
        t = torch.from_numpy(arrays.pop(s.key))
        out[s.key] = t.view(torch.bfloat16) if s.dtype == "bfloat16" else t
    return out


def base_state_dict(
    arch: Arch = SD15,
    *,
    seed: int = 0,
    ema: bool = False,
    dtype: Any = None,
    layout: BaseLayout = "original",
) -> OrderedDict[str, Any]:
    """The base ``state_dict`` (layout of :func:`base_spec`, or :func:`diffusers_unet_spec`
    with ``layout="diffusers"``) as torch tensors; values from ``seed``.

    ``model.diffusion_model.*`` is B (what :func:`control_state_dict` with
    ``base_seed=seed`` is generated against). With ``ema=True`` the ``model_ema.*``
    copies are ``B - 1e-4 * roll(B)``. Floating point tensors are cast to ``dtype``
    (torch or numpy dtype, or a name; default: the published dtype). Imports torch.
    """
    plan = _base_plan(arch, layout, seed=seed, ema=ema, dtype=dtype)
    return _to_torch(_arrays(plan), plan.specs)


def control_state_dict(
    arch: Arch = SD15,
    *,
    seed: int = 0,
    base_seed: Optional[int] = None,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    dtype: Any = None,
    layout: ControlLayout = "original",
) -> OrderedDict[str, Any]:
    """A ControlNet ``state_dict`` as torch tensors (imports torch).

    ``layout``: ``"original"`` (:func:`control_spec`), ``"control-only"``
    (:func:`control_model_spec`) or ``"diffusers"`` (:func:`diffusers_controlnet_spec`).
    ``base_seed`` (default ``seed``) is the seed of the base the control was trained
    from; ``seed`` drives the control's own perturbation and control-only tensors.
    ``embedded_unet``: ``"offset"`` takes ``E = B + 1e-4 * flip(B)`` as the UNet the
    control was trained from (and embeds it as ``model.diffusion_model.*`` in the
    original layout), ``"same"`` takes B itself. The ``unchanged_keys`` keys of
    :func:`unchanged_control_keys` are exactly B. Floating point tensors are cast to
    ``dtype`` (default float32).
    """
    plan = _control_plan(
        arch,
        layout,
        seed=seed,
        base_seed=base_seed,
        embedded_unet=embedded_unet,
        unchanged_keys=unchanged_keys,
        dtype=dtype,
    )
    return _to_torch(_arrays(plan), plan.specs)


# --------------------------------------------------------------------------------------
# Pickles
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
_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {name: _Global("torch", v[2]) for name, v in _DTYPES.items()}

_LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def _make_model_checkpoint_class() -> type:
    """A fresh stand-in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``."""
    cls = _ForcedGlobalMeta("ModelCheckpoint", (), {"__module__": _LIGHTNING_MODULE})
    cls.__qualname__ = "ModelCheckpoint"
    return cls


class _Storage:
    """Stands for a torch storage in a pickle: ``archive/data/<key>``."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: DType, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Stands for a contiguous tensor filling its own storage."""

    __slots__ = ("storage", "shape")

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    @property
    def stride(self) -> tuple[int, ...]:
        out, acc = [], 1
        for d in reversed(self.shape):
            out.append(acc)
            acc *= d
        return tuple(reversed(out))


class _CkptPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler writing what ``torch.save`` writes, without torch.

    * :class:`_TensorRef` is written as ``torch._utils._rebuild_tensor_v2(storage, 0,
      shape, stride, False, OrderedDict())`` and :class:`_Storage` as the persistent id
      ``('storage', torch.<X>Storage, key, 'cpu', numel)``, as torch's zip format does;
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

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", _STORAGE_GLOBALS[obj.dtype], obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _TensorRef):
            args = (obj.storage, 0, obj.shape, obj.stride, False, OrderedDict())
            return (_REBUILD_TENSOR, args)
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


def _lightning_wrap(sd: Any) -> dict[str, Any]:
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


def _with_metadata(sd: OrderedDict[str, Any]) -> OrderedDict[str, Any]:
    """Attach a small ``_metadata`` attribute like ``nn.Module.state_dict()`` does."""
    meta: OrderedDict[str, dict[str, int]] = OrderedDict()
    for key in sd:
        parts = key.split(".")
        for i in range(min(len(parts) - 1, 2) + 1):
            meta.setdefault(".".join(parts[:i]), {"version": 1})
    sd._metadata = meta  # type: ignore[attr-defined]
    return sd


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _write_safetensors(f: Any, plan: _Plan, metadata: dict[str, str]) -> None:
    """A ``.safetensors`` file: header, then every tensor in plan order as it is made."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for s in plan.specs:
        header[s.key] = {
            "dtype": s.dtype.safetensors,
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, arr, _ in _generate(plan):
        f.write(arr.reshape(-1).view(np.uint8).data)


_ZIP64_LIMIT = 0xFFFFFFFF
_ALIGN = 64  # torch aligns storages to 64 bytes in its zip files
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01


class _ZipWriter:
    """A zip archive of stored (uncompressed) entries, written front to back, with zip64
    records where sizes or offsets need them and entry data aligned to 64 bytes (a
    padding extra field, as torch writes its checkpoints)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, offset, size, crc

    def add(self, name: str, data: Any, crc: Optional[int] = None) -> None:
        view = memoryview(data).cast("B")
        size = view.nbytes
        crc = zlib.crc32(view) if crc is None else crc
        raw_name = name.encode()
        offset = self.f.tell()
        big = size >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        fixed = 30 + len(raw_name) + len(extra) + 4
        extra += struct.pack("<HH", 0x4246, -(offset + fixed) % _ALIGN)
        extra += b"Z" * (-(offset + fixed) % _ALIGN)
        sz = _ZIP64_LIMIT if big else size
        self.f.write(
            struct.pack(
                "<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, 0, 0, 0, _DOS_DATE, crc, sz, sz,
                len(raw_name), len(extra),
            )
        )  # fmt: skip
        self.f.write(raw_name)
        self.f.write(extra)
        self.f.write(view)
        self.entries.append((raw_name, offset, size, crc))

    def close(self) -> None:
        start = self.f.tell()
        for raw_name, offset, size, crc in self.entries:
            fields, big_size = b"", size >= _ZIP64_LIMIT
            if big_size:
                fields += struct.pack("<QQ", size, size)
            if offset >= _ZIP64_LIMIT:
                fields += struct.pack("<Q", offset)
            extra = struct.pack("<HH", 1, len(fields)) + fields if fields else b""
            sz = _ZIP64_LIMIT if big_size else size
            version = 45 if fields else 20
            self.f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, 0, _DOS_DATE, crc,
                    sz, sz, len(raw_name), len(extra), 0, 0, 0, 0, min(offset, _ZIP64_LIMIT),
                )
            )  # fmt: skip
            self.f.write(raw_name)
            self.f.write(extra)
        end = self.f.tell()
        count, cd_size = len(self.entries), end - start
        if count >= 0xFFFF or start >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
            self.f.write(
                struct.pack(
                    "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, start
                )
            )
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        self.f.write(
            struct.pack(
                "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                min(cd_size, _ZIP64_LIMIT), min(start, _ZIP64_LIMIT), 0,
            )
        )  # fmt: skip


def _write_torch_zip(
    f: Any, plan: _Plan, wrap: Callable[[OrderedDict[str, Any]], Any], archive: str = "archive"
) -> None:
    """torch's zip format (what ``torch.save`` writes since 1.6), without torch.

    ``wrap`` turns the state dict of tensor placeholders into the pickled object.
    Entries: ``archive/data.pkl`` (protocol 2), ``archive/byteorder``, one
    ``archive/data/<i>`` per tensor, written as the tensors are made, ``archive/version``.
    """
    sd: OrderedDict[str, Any] = OrderedDict()
    for i, s in enumerate(plan.specs):
        sd[s.key] = _TensorRef(_Storage(str(i), s.dtype, s.numel), s.shape)
    buf = io.BytesIO()
    _CkptPickler(buf, 2).dump(wrap(sd))
    z = _ZipWriter(f)
    z.add(f"{archive}/data.pkl", buf.getvalue())
    z.add(f"{archive}/byteorder", b"little")
    for i, (_, arr, crc) in enumerate(_generate(plan, crc=True)):
        z.add(f"{archive}/data/{i}", arr.reshape(-1).view(np.uint8), crc)
    z.add(f"{archive}/version", b"3\n")
    z.close()


def _write_legacy(path: Path, plan: _Plan, wrap: Callable[[Any], Any], custom: bool) -> None:
    """torch's pre-1.6 format; needs torch (the whole state dict is built in memory)."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("writing the legacy (pre-1.6) torch format needs torch") from None
    sd = _to_torch(_arrays(plan), plan.specs)
    kwargs: dict[str, Any] = {"_use_new_zipfile_serialization": False}
    if custom:
        kwargs["pickle_module"] = _ckpt_pickle_module()
    torch.save(wrap(_with_metadata(sd)), str(path), **kwargs)


_EXT = {
    "pth": ".pth",
    "pt": ".pt",
    "ckpt": ".ckpt",
    "legacy": ".pth",
    "safetensors": ".safetensors",
}


def _write(
    path: Path, plan: _Plan, fmt: str, wrap: Callable[[Any], Any], *, lightning: bool = False
) -> None:
    """Write ``plan`` to ``path`` (via ``<path>.partial``, renamed when complete)."""
    if fmt not in _EXT:
        raise ValueError(f"unknown format {fmt!r}; use pth, ckpt, pt, legacy or safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        if fmt == "legacy":
            _write_legacy(tmp, plan, wrap, custom=lightning)
        else:
            with open(tmp, "wb") as f:
                if fmt == "safetensors":
                    _write_safetensors(f, plan, {"format": "pt"})
                else:
                    _write_torch_zip(f, plan, lambda sd: wrap(_with_metadata(sd)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_FMT_OF_SUFFIX = {".safetensors": "safetensors", ".pth": "pth", ".pt": "pt", ".ckpt": "ckpt",
                  ".bin": "pth"}  # fmt: skip


def _ext(fmt: str) -> str:
    try:
        return _EXT[fmt]
    except KeyError:
        raise ValueError(
            f"unknown format {fmt!r}; use pth, ckpt, pt, legacy or safetensors"
        ) from None


def _fmt_for(path: Path, fmt: Optional[str], default: str) -> str:
    """``fmt``, else the format the path's suffix names, else ``default``."""
    if fmt is not None:
        return fmt
    return _FMT_OF_SUFFIX.get(path.suffix.lower(), default)


def make_control(
    path: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    base_seed: Optional[int] = None,
    fmt: Optional[Format] = None,
    layout: Optional[ControlLayout] = None,
    wrapped: bool = False,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    dtype: Any = None,
) -> Path:
    """Write a ControlNet checkpoint; see :func:`control_state_dict` for the values.

    ``layout``: ``"original"`` (``control_sd15_*.pth``), ``"control-only"``
    (``control_v11p_sd15_*.pth``) or ``"diffusers"`` (the weights file only; see
    :func:`make_diffusers_controlnet` for a loadable folder); default
    ``arch.control_layout``. ``fmt``: ``"pth"``/``"ckpt"``/``"pt"`` (torch zip, written
    without torch), ``"legacy"`` (pre-1.6 torch.save format, needs torch) or
    ``"safetensors"``; default: safetensors for a ``.safetensors`` path or the diffusers
    layout, else pth. ``wrapped=True`` saves ``{"state_dict": sd}`` (not possible with
    safetensors). ``dtype``: of the floating point tensors (default float32).
    Returns the path.
    """
    path = Path(path)
    layout = layout or arch.control_layout  # type: ignore[assignment]
    fmt = _fmt_for(path, fmt, "safetensors" if layout == "diffusers" else "pth")  # type: ignore[assignment]
    if fmt == "safetensors" and wrapped:
        raise ValueError("safetensors files are always flat; wrapped=True is not possible")
    if fmt not in _EXT:
        raise ValueError(f"unknown format {fmt!r}; use pth, ckpt, pt, legacy or safetensors")
    plan = _control_plan(
        arch,
        str(layout),
        seed=seed,
        base_seed=base_seed,
        embedded_unet=embedded_unet,
        unchanged_keys=unchanged_keys,
        dtype=dtype,
    )
    _write(path, plan, str(fmt), (lambda sd: {"state_dict": sd}) if wrapped else (lambda sd: sd))
    logger.debug("wrote synthetic control %s (%s, %s, %d keys)", path, arch.name, layout,
                 len(plan.specs))  # fmt: skip
    return path


def make_base(
    path: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    fmt: Optional[Format] = None,
    dtype: Any = None,
    lightning: bool = True,
    ema: bool = False,
    flat: bool = False,
    layout: BaseLayout = "original",
) -> Path:
    """Write an SD base checkpoint; see :func:`base_state_dict` and :func:`base_spec`.

    ``layout="diffusers"`` writes a diffusers UNet weights file instead (see
    :func:`make_diffusers_unet` for a loadable folder). ``fmt`` defaults to safetensors
    for a ``.safetensors`` path, SDXL and the diffusers layout, else ckpt. ``dtype``
    defaults to the published one (float32; SDXL float16).

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
    default = "safetensors" if layout == "diffusers" or arch.base_dtype != "float32" else "ckpt"
    fmt = _fmt_for(path, fmt, default)  # type: ignore[assignment]
    plan = _base_plan(arch, layout, seed=seed, ema=ema, dtype=dtype)
    use_lightning = fmt != "safetensors" and not flat and lightning

    def wrap(sd: Any) -> Any:
        if flat:
            return sd
        return _lightning_wrap(sd) if lightning else {"state_dict": sd}

    _write(path, plan, str(fmt), wrap, lightning=use_lightning)
    logger.debug("wrote synthetic base %s (%s, %d keys)", path, arch.name, len(plan.specs))
    return path


def _weights_name(variant: Optional[str]) -> str:
    return (
        f"diffusion_pytorch_model.{variant}.safetensors"
        if variant
        else ("diffusion_pytorch_model.safetensors")
    )


def make_diffusers_controlnet(
    folder: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    base_seed: Optional[int] = None,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    dtype: Any = None,
    variant: Optional[str] = None,
) -> Path:
    """Write a diffusers ControlNet folder: ``config.json``
    (:func:`cndiff.layouts.diffusers_controlnet_config`) and
    ``diffusion_pytorch_model[.<variant>].safetensors``, loadable with
    ``diffusers.ControlNetModel.from_pretrained(folder)``. Returns the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(layouts.diffusers_controlnet_config(arch.unet), indent=2, sort_keys=True) + "\n"
    )
    return make_control(
        folder / _weights_name(variant),
        arch,
        seed=seed,
        base_seed=base_seed,
        layout="diffusers",
        fmt="safetensors",
        embedded_unet=embedded_unet,
        unchanged_keys=unchanged_keys,
        dtype=dtype,
    )


def make_diffusers_unet(
    folder: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    dtype: Any = None,
    variant: Optional[str] = None,
) -> Path:
    """Write a diffusers UNet folder (``config.json`` + weights), loadable with
    ``diffusers.UNet2DConditionModel.from_pretrained(folder)``. Returns the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(layouts.diffusers_unet_config(arch.unet), indent=2, sort_keys=True) + "\n"
    )
    return make_base(
        folder / _weights_name(variant),
        arch,
        seed=seed,
        layout="diffusers",
        fmt="safetensors",
        dtype=dtype,
    )


def make_pair(
    folder: PathLike,
    arch: Arch = SD15,
    *,
    seed: int = 0,
    control_fmt: Optional[Format] = None,
    base_fmt: Optional[Format] = None,
    embedded_unet: EmbeddedUnet = "offset",
    unchanged_keys: int = 2,
    wrapped: bool = False,
    control_dtype: Any = None,
    base_dtype: Any = None,
    lightning: bool = True,
    ema: bool = False,
    flat: bool = False,
    control_layout: Optional[ControlLayout] = None,
    base_layout: BaseLayout = "original",
) -> tuple[Path, Path]:
    """Write a control checkpoint and the base it was generated against into ``folder``.

    Files (the extension following the format):

    * control, ``"original"`` layout: ``control_<arch>_synthetic<ext>``; ``"control-only"``:
      ``control_v11p_<arch>_synthetic<ext>``; ``"diffusers"``:
      ``controlnet_<arch>_synthetic/diffusion_pytorch_model.safetensors`` (+ config.json);
    * base, ``"original"``: ``<arch>_base_synthetic<ext>``; ``"diffusers"``:
      ``<arch>_unet_synthetic/diffusion_pytorch_model.safetensors`` (+ config.json).

    ``control_layout`` defaults to ``arch.control_layout`` (SD1.x/2.x: original, SDXL:
    diffusers), the formats to the layout's usual one (see :func:`make_control`,
    :func:`make_base`). The two are generated one after the other, tensor by tensor.
    Returns ``(control_path, base_path)``.
    """
    folder = Path(folder)
    layout = control_layout or arch.control_layout
    name = arch.name
    if layout == "diffusers" and control_fmt in (None, "safetensors"):
        control = make_diffusers_controlnet(
            folder / f"controlnet_{name}_synthetic",
            arch,
            seed=seed,
            base_seed=seed,
            embedded_unet=embedded_unet,
            unchanged_keys=unchanged_keys,
            dtype=control_dtype,
        )
    else:
        cfmt = control_fmt or ("safetensors" if layout == "diffusers" else "pth")
        stem = {"original": "control_", "control-only": "control_v11p_"}.get(layout, "controlnet_")
        control = make_control(
            folder / f"{stem}{name}_synthetic{_ext(cfmt)}",
            arch,
            seed=seed,
            base_seed=seed,
            fmt=cfmt,  # type: ignore[arg-type]
            layout=layout,  # type: ignore[arg-type]
            wrapped=wrapped,
            embedded_unet=embedded_unet,
            unchanged_keys=unchanged_keys,
            dtype=control_dtype,
        )
    if base_layout == "diffusers" and base_fmt in (None, "safetensors"):
        base = make_diffusers_unet(
            folder / f"{name}_unet_synthetic", arch, seed=seed, dtype=base_dtype
        )
    else:
        default = (
            "safetensors" if base_layout == "diffusers" or arch.base_dtype != "float32" else "ckpt"
        )
        bfmt = base_fmt or default
        base = make_base(
            folder / f"{name}_base_synthetic{_ext(bfmt)}",
            arch,
            seed=seed,
            fmt=bfmt,  # type: ignore[arg-type]
            dtype=base_dtype,
            lightning=lightning,
            ema=ema,
            flat=flat,
            layout=base_layout,
        )
    return control, base
