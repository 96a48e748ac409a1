"""Key layouts of Stable Diffusion UNets and ControlNets, derived from their configuration.

Two layouts name the same tensors:

* **ldm** (CompVis / Stability / lllyasviel): ``input_blocks.N.M...``, ``middle_block``,
  ``output_blocks``; a UNet sits under ``model.diffusion_model.``, a ControlNet under
  ``control_model.`` (``time_embed``, ``label_emb`` for SDXL, ``input_blocks``,
  ``zero_convs``, ``input_hint_block``, ``middle_block``, ``middle_block_out``);
* **diffusers**: ``conv_in``, ``time_embedding``, ``down_blocks.L.resnets.J...``,
  ``mid_block``, ``up_blocks`` (UNet) or ``controlnet_cond_embedding``,
  ``controlnet_down_blocks``, ``controlnet_mid_block`` (ControlNet).

Every table here is computed from a :class:`UNetConfig` (channels, channel multipliers,
res blocks per level, transformer depth per level and in the middle, context width,
linear or 1x1-conv projections, the SDXL ``label_emb`` input width, the hint block...),
the way the model classes build their modules; nothing is read from disk and no key list
is copied. Tables are tuples of :class:`Entry` ``(key, shape)`` or :class:`Pair`
``(ldm, diffusers, shape)``: names and shapes only, in the order the model registers its
parameters (what ``state_dict()`` and the published files use), for consumers that stream
tensors one by one.

:func:`infer` goes the other way: it reads the configuration off a file's keys and shapes
(either layout, any prefix, full size or channel-scaled), checks that the table derived
from it is exactly what the file holds, and returns a :class:`Found` that maps every
file key to its canonical ldm key (``control_model.X`` / ``model.diffusion_model.X``).

This module needs only the standard library.

>>> from cndiff import layouts
>>> len(layouts.ldm_controlnet(layouts.SD1)), len(layouts.shared_keys(layouts.SD1))
(340, 298)
>>> layouts.controlnet_pairs(layouts.SDXL)[0]
Pair(ldm='input_blocks.0.0.weight', diffusers='conv_in.weight', shape=(320, 4, 3, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

__all__ = [
    "CONTROL_PREFIX",
    "UNET_PREFIX",
    "SD1",
    "SD2",
    "SDXL",
    "CONFIGS",
    "Entry",
    "Pair",
    "Mapped",
    "Found",
    "LayoutError",
    "UNetConfig",
    "tiny",
    "ldm_unet",
    "ldm_controlnet",
    "diffusers_unet",
    "diffusers_controlnet",
    "unet_pairs",
    "controlnet_pairs",
    "shared_keys",
    "control_only_keys",
    "diffusers_controlnet_config",
    "diffusers_unet_config",
    "config_from_diffusers",
    "infer",
    "detect",
    "family_of",
]

#: where an ldm checkpoint keeps its UNet
UNET_PREFIX = "model.diffusion_model."
#: where an ldm ControlNet checkpoint keeps its ControlNet
CONTROL_PREFIX = "control_model."

Shape = tuple[int, ...]
Layout = Literal["ldm", "diffusers"]
Kind = Literal["unet", "controlnet"]


class Entry(NamedTuple):
    """One tensor of a layout: its key (relative to the model's prefix) and shape."""

    key: str
    shape: Shape


class Pair(NamedTuple):
    """The same tensor in both layouts (keys relative to the model's prefix)."""

    ldm: str
    diffusers: str
    shape: Shape


class Mapped(NamedTuple):
    """A tensor of a file: its key in the file, its canonical ldm key, its shape."""

    key: str
    ldm_key: str
    shape: Shape


class LayoutError(ValueError):
    """A file's keys look like a UNet or ControlNet but are not one this module knows."""


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """The architecture of an SD UNet and of the ControlNet built on it.

    Field names follow ldm's ``UNetModel`` / cldm's ``ControlNet`` arguments. The
    defaults are SD1.x at full size.
    """

    family: str = "sd1"
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` (or ``"custom"`` for an inferred config that
    matches none of them structurally); see :func:`family_of`."""
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    """SpatialTransformer blocks per level (0: no attention at that level)."""
    transformer_depth_middle: int = 1
    context_dim: int = 768
    linear_proj: bool = False
    """SpatialTransformer ``proj_in``/``proj_out`` are Linear ``[C, C]`` (else Conv 1x1)."""
    adm_in_channels: int = 0
    """Input width of ``label_emb`` (SDXL: 2816); 0 = no ``label_emb``."""
    in_channels: int = 4
    out_channels: int = 4
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    """ControlNet hint block widths (diffusers ``conditioning_embedding_out_channels``):
    the ldm ``input_hint_block`` convs output ``w0, w0, w1, w1, ..., w_last, C``."""
    num_heads: int = 8
    """Attention heads per SpatialTransformer (-1: use ``num_head_channels``)."""
    num_head_channels: int = -1
    """Channels per attention head (-1: use ``num_heads``)."""
    norm_num_groups: int = 32
    addition_time_embed_dim: int = 0
    """SDXL: width of each of the 6 size/crop embeddings (256); 0 without ``label_emb``."""

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        if n < 1 or len(self.transformer_depth) != n:
            raise ValueError(
                f"transformer_depth {self.transformer_depth} needs one entry per level of "
                f"channel_mult {self.channel_mult}"
            )
        if self.transformer_depth_middle < 1:
            raise ValueError("transformer_depth_middle must be at least 1")
        if self.model_channels < 1 or self.num_res_blocks < 1 or len(self.hint_widths) < 1:
            raise ValueError(f"invalid UNet config {self}")
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError("set exactly one of num_heads and num_head_channels")

    @property
    def label(self) -> str:
        """``"SD1.x"``, ``"SD2.x"``, ``"SDXL"`` or ``"custom"``."""
        return _LABELS.get(self.family, self.family)

    @property
    def widths(self) -> tuple[int, ...]:
        """Output width of each level."""
        return tuple(m * self.model_channels for m in self.channel_mult)

    def heads(self, width: int) -> int:
        """Attention heads of a SpatialTransformer of ``width`` channels."""
        if self.num_heads > 0:
            return self.num_heads
        return max(1, width // self.num_head_channels)


_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}

SD1 = UNetConfig()
"""SD1.x (1.4, 1.5 and their fine-tunes; in_channels 9 for the inpainting models)."""

SD2 = UNetConfig(
    family="sd2",
    context_dim=1024,
    linear_proj=True,
    num_heads=-1,
    num_head_channels=64,
)
"""SD2.x (2.0, 2.1, 512-base and 768-v): linear projections, context 1024, 64-ch heads."""

SDXL = UNetConfig(
    family="sdxl",
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    context_dim=2048,
    linear_proj=True,
    adm_in_channels=2816,
    num_heads=-1,
    num_head_channels=64,
    addition_time_embed_dim=256,
)
"""SDXL 1.0 base: three levels, transformer depth 0/2/10 (10 in the middle), context 2048
(CLIP-L 768 + OpenCLIP bigG 1280), ``label_emb`` input 2816 (1280 pooled + 6 x 256)."""

#: the known configurations by family
CONFIGS: dict[str, UNetConfig] = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}

# What tiny() uses: UNet width 4; context widths of the scaled text encoders (SD1.x: 16,
# SD2.x: 24, SDXL: 16 + 24); hint widths 2, 4, 4, 8; SDXL size embeddings of width 8.
_TINY_CHANNELS = 4
_TINY_CONTEXT = {"sd1": 16, "sd2": 24, "sdxl": 40}
_TINY_POOLED = 24
_TINY_TIME_EMBED = 8
_TINY_HINT = (2, 4, 4, 8)


def tiny(config: UNetConfig = SD1) -> UNetConfig:
    """``config`` scaled down: the same keys in the same order, tiny shapes.

    Width 4 (channel multipliers, block counts and transformer depths unchanged), hint
    widths ``(2, 4, 4, 8)``, context 16 (SD1.x) / 24 (SD2.x) / 40 (SDXL); SDXL's
    ``label_emb`` takes 24 + 6 x 8 = 72. Heads and GroupNorm groups shrink so that
    diffusers can build the model.
    """
    extra: dict[str, Any] = {}
    if config.adm_in_channels:
        extra["addition_time_embed_dim"] = _TINY_TIME_EMBED
        extra["adm_in_channels"] = _TINY_POOLED + 6 * _TINY_TIME_EMBED
    return _scaled_defaults(
        dataclasses.replace(
            config,
            model_channels=_TINY_CHANNELS,
            context_dim=_TINY_CONTEXT.get(config.family, 16),
            hint_widths=_TINY_HINT,
            **extra,
        )
    )


def _scaled_defaults(config: UNetConfig) -> UNetConfig:
    """Heads and norm groups that divide the widths of ``config`` (the full-size values
    where they do): gcd with 8 heads (SD1.x style) or with 64-channel heads."""
    mc = config.model_channels
    heads: dict[str, int]
    if config.num_heads > 0:
        heads = {"num_heads": math.gcd(config.num_heads, mc)}
    else:
        heads = {"num_head_channels": math.gcd(config.num_head_channels, mc)}
    return dataclasses.replace(config, norm_num_groups=math.gcd(32, mc), **heads)


def family_of(config: UNetConfig) -> str:
    """The family whose structure ``config`` has (``"sd1"``, ``"sd2"``, ``"sdxl"``), or
    ``"custom"``. Levels, res blocks, transformer depths, linear projections and having
    ``label_emb`` count; widths do not (channel-scaled models keep their family), except
    that a full-width model must also have the family's context width."""

    def shape(c: UNetConfig) -> tuple:
        return (
            c.channel_mult,
            c.num_res_blocks,
            c.transformer_depth,
            c.transformer_depth_middle,
            c.linear_proj,
            c.adm_in_channels > 0,
        )

    for name, known in CONFIGS.items():
        scaled = config.model_channels != known.model_channels
        if shape(config) == shape(known) and (scaled or config.context_dim == known.context_dim):
            return name
    return "custom"


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

# A tensor of both layouts while the tables are built: (ldm key, diffusers key, shape).
_T = tuple[str, str, Shape]


def _weight_bias(ldm: str, dif: str, wshape: Shape, bias: bool = True) -> list[_T]:
    out = [(f"{ldm}.weight", f"{dif}.weight", wshape)]
    if bias:
        out.append((f"{ldm}.bias", f"{dif}.bias", (wshape[0],)))
    return out


def _linear(ldm: str, dif: str, cout: int, cin: int, bias: bool = True) -> list[_T]:
    return _weight_bias(ldm, dif, (cout, cin), bias)


def _conv(ldm: str, dif: str, cout: int, cin: int, k: int) -> list[_T]:
    return _weight_bias(ldm, dif, (cout, cin, k, k))


def _norm(ldm: str, dif: str, c: int) -> list[_T]:
    return [(f"{ldm}.weight", f"{dif}.weight", (c,)), (f"{ldm}.bias", f"{dif}.bias", (c,))]


def _resblock(ldm: str, dif: str, cin: int, cout: int, emb: int) -> list[_T]:
    """ldm ``ResBlock`` = diffusers ``ResnetBlock2D`` (same parameter order)."""
    out = _norm(f"{ldm}.in_layers.0", f"{dif}.norm1", cin)
    out += _conv(f"{ldm}.in_layers.2", f"{dif}.conv1", cout, cin, 3)
    out += _linear(f"{ldm}.emb_layers.1", f"{dif}.time_emb_proj", cout, emb)
    out += _norm(f"{ldm}.out_layers.0", f"{dif}.norm2", cout)
    out += _conv(f"{ldm}.out_layers.3", f"{dif}.conv2", cout, cout, 3)
    if cin != cout:
        out += _conv(f"{ldm}.skip_connection", f"{dif}.conv_shortcut", cout, cin, 1)
    return out


def _transformer(
    ldm: str, dif: str, c: int, depth: int, cfg: UNetConfig
) -> tuple[list[_T], list[_T]]:
    """ldm ``SpatialTransformer`` = diffusers ``Transformer2DModel``.

    Returns the tensors in ldm order and in diffusers order: the block internals are
    registered as attn1, ff, attn2, norm1-3 by ldm/sgm and as norm1, attn1, norm2, attn2,
    norm3, ff by diffusers. The names inside the block are the same in both.
    """

    def proj(name: str) -> list[_T]:
        if cfg.linear_proj:
            return _linear(f"{ldm}.{name}", f"{dif}.{name}", c, c)
        return _conv(f"{ldm}.{name}", f"{dif}.{name}", c, c, 1)

    head = _norm(f"{ldm}.norm", f"{dif}.norm", c) + proj("proj_in")
    ldm_order, dif_order = list(head), list(head)
    for k in range(depth):
        lb, db = f"{ldm}.transformer_blocks.{k}", f"{dif}.transformer_blocks.{k}"

        def attn(name: str, kv: int, lb: str = lb, db: str = db) -> list[_T]:
            out = _linear(f"{lb}.{name}.to_q", f"{db}.{name}.to_q", c, c, bias=False)
            out += _linear(f"{lb}.{name}.to_k", f"{db}.{name}.to_k", c, kv, bias=False)
            out += _linear(f"{lb}.{name}.to_v", f"{db}.{name}.to_v", c, kv, bias=False)
            out += _linear(f"{lb}.{name}.to_out.0", f"{db}.{name}.to_out.0", c, c)
            return out

        attn1, attn2 = attn("attn1", c), attn("attn2", cfg.context_dim)
        ff = _linear(f"{lb}.ff.net.0.proj", f"{db}.ff.net.0.proj", 8 * c, c)  # GEGLU
        ff += _linear(f"{lb}.ff.net.2", f"{db}.ff.net.2", c, 4 * c)
        norms = [_norm(f"{lb}.norm{i}", f"{db}.norm{i}", c) for i in (1, 2, 3)]
        ldm_order += attn1 + ff + attn2 + norms[0] + norms[1] + norms[2]
        dif_order += norms[0] + attn1 + norms[1] + attn2 + norms[2] + ff
    tail = proj("proj_out")
    return ldm_order + tail, dif_order + tail


@dataclass
class _Parts:
    """The pieces both layouts are assembled from, each in its own order."""

    time: list[_T]
    label: list[_T]
    conv_in: list[_T]
    ldm_input: list[_T]  # input_blocks.1 and up (input_blocks.0.0 is conv_in)
    dif_down: list[_T]
    ldm_middle: list[_T]
    dif_middle: list[_T]
    input_widths: list[int]  # output width of every input block (zero_convs)


def _parts(cfg: UNetConfig) -> _Parts:
    mc = cfg.model_channels
    emb = 4 * mc
    time = _linear("time_embed.0", "time_embedding.linear_1", emb, mc)
    time += _linear("time_embed.2", "time_embedding.linear_2", emb, emb)
    label: list[_T] = []
    if cfg.adm_in_channels:
        label = _linear("label_emb.0.0", "add_embedding.linear_1", emb, cfg.adm_in_channels)
        label += _linear("label_emb.0.2", "add_embedding.linear_2", emb, emb)
    conv_in = _conv("input_blocks.0.0", "conv_in", mc, cfg.in_channels, 3)
    ldm_input: list[_T] = []
    dif_down: list[_T] = []
    widths = [mc]
    ch, idx, last = mc, 1, len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        depth = cfg.transformer_depth[level]
        attentions: list[_T] = []
        resnets: list[_T] = []
        for j in range(cfg.num_res_blocks):
            out = mult * mc
            res = _resblock(
                f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", ch, out, emb
            )
            ldm_input += res
            resnets += res
            ch = out
            if depth:
                tl, td = _transformer(
                    f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}", ch, depth, cfg
                )
                ldm_input += tl
                attentions += td
            widths.append(ch)
            idx += 1
        dif_down += attentions + resnets
        if level != last:
            down = _conv(
                f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv", ch, ch, 3
            )
            ldm_input += down
            dif_down += down
            widths.append(ch)
            idx += 1
    res0 = _resblock("middle_block.0", "mid_block.resnets.0", ch, ch, emb)
    tl, td = _transformer(
        "middle_block.1", "mid_block.attentions.0", ch, cfg.transformer_depth_middle, cfg
    )
    res1 = _resblock("middle_block.2", "mid_block.resnets.1", ch, ch, emb)
    return _Parts(
        time, label, conv_in, ldm_input, dif_down, res0 + tl + res1, td + res0 + res1, widths
    )


@functools.lru_cache(maxsize=64)
def _unet_tables(cfg: UNetConfig) -> tuple[tuple[_T, ...], tuple[_T, ...]]:
    """(ldm order, diffusers order) of a UNet."""
    p = _parts(cfg)
    mc = cfg.model_channels
    emb = 4 * mc
    widths = list(p.input_widths)
    ch = widths[-1]
    ldm_output: list[_T] = []
    dif_up: list[_T] = []
    idx = 0
    for up, level in enumerate(reversed(range(len(cfg.channel_mult)))):
        depth = cfg.transformer_depth[level]
        attentions: list[_T] = []
        resnets: list[_T] = []
        upsamplers: list[_T] = []
        for j in range(cfg.num_res_blocks + 1):
            out = cfg.channel_mult[level] * mc
            res = _resblock(
                f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{j}", ch + widths.pop(), out, emb
            )
            ldm_output += res
            resnets += res
            ch = out
            sub = 1
            if depth:
                tl, td = _transformer(
                    f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{j}", ch, depth, cfg
                )
                ldm_output += tl
                attentions += td
                sub = 2
            if level and j == cfg.num_res_blocks:
                upsample = _conv(
                    f"output_blocks.{idx}.{sub}.conv",
                    f"up_blocks.{up}.upsamplers.0.conv",
                    ch,
                    ch,
                    3,
                )
                ldm_output += upsample
                upsamplers += upsample
            idx += 1
        dif_up += attentions + resnets + upsamplers
    tail = _norm("out.0", "conv_norm_out", ch)
    tail += _conv("out.2", "conv_out", cfg.out_channels, ch, 3)
    ldm = p.time + p.label + p.conv_in + p.ldm_input + p.ldm_middle + ldm_output + tail
    dif = p.conv_in + p.time + p.label + p.dif_down + dif_up + p.dif_middle + tail
    return tuple(ldm), tuple(dif)


@functools.lru_cache(maxsize=64)
def _controlnet_tables(cfg: UNetConfig) -> tuple[tuple[_T, ...], tuple[_T, ...]]:
    """(ldm order, diffusers order) of a ControlNet."""
    p = _parts(cfg)
    zero: list[_T] = []
    for i, w in enumerate(p.input_widths):
        zero += _conv(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", w, w, 1)
    hint = _conv(
        "input_hint_block.0",
        "controlnet_cond_embedding.conv_in",
        cfg.hint_widths[0],
        cfg.hint_channels,
        3,
    )
    n = 1
    for i in range(len(cfg.hint_widths) - 1):
        a, b = cfg.hint_widths[i], cfg.hint_widths[i + 1]
        for cout, cin in ((a, a), (b, a)):
            hint += _conv(
                f"input_hint_block.{2 * n}",
                f"controlnet_cond_embedding.blocks.{n - 1}",
                cout,
                cin,
                3,
            )
            n += 1
    hint += _conv(
        f"input_hint_block.{2 * n}",
        "controlnet_cond_embedding.conv_out",
        cfg.model_channels,
        cfg.hint_widths[-1],
        3,
    )
    ch = p.input_widths[-1]
    mid_out = _conv("middle_block_out.0", "controlnet_mid_block", ch, ch, 1)
    ldm = p.time + p.label + p.conv_in + p.ldm_input + zero + hint + p.ldm_middle + mid_out
    dif = p.conv_in + p.time + p.label + hint + p.dif_down + zero + mid_out + p.dif_middle
    return tuple(ldm), tuple(dif)


def ldm_unet(config: UNetConfig) -> tuple[Entry, ...]:
    """The UNet's tensors in ldm names (relative to ``model.diffusion_model.``), in the
    order of ldm's / sgm's ``UNetModel.state_dict()``."""
    return tuple(Entry(k, s) for k, _, s in _unet_tables(config)[0])


def ldm_controlnet(config: UNetConfig) -> tuple[Entry, ...]:
    """The ControlNet's tensors in ldm names (relative to ``control_model.``): time_embed,
    label_emb (SDXL), input_blocks, zero_convs, input_hint_block, middle_block,
    middle_block_out, each in ldm's registration order."""
    return tuple(Entry(k, s) for k, _, s in _controlnet_tables(config)[0])


def diffusers_unet(config: UNetConfig) -> tuple[Entry, ...]:
    """The UNet's tensors in diffusers names, in ``UNet2DConditionModel`` order."""
    return tuple(Entry(k, s) for _, k, s in _unet_tables(config)[1])


def diffusers_controlnet(config: UNetConfig) -> tuple[Entry, ...]:
    """The ControlNet's tensors in diffusers names, in ``ControlNetModel`` order."""
    return tuple(Entry(k, s) for _, k, s in _controlnet_tables(config)[1])


def unet_pairs(config: UNetConfig) -> tuple[Pair, ...]:
    """The bijection diffusers UNet key <-> ldm UNet key, in diffusers order."""
    return tuple(Pair(*t) for t in _unet_tables(config)[1])


def controlnet_pairs(config: UNetConfig) -> tuple[Pair, ...]:
    """The bijection diffusers ControlNet key <-> ldm ControlNet key, in diffusers order."""
    return tuple(Pair(*t) for t in _controlnet_tables(config)[1])


@functools.lru_cache(maxsize=64)
def shared_keys(config: UNetConfig) -> tuple[str, ...]:
    """ControlNet keys (ldm, relative) whose UNet counterpart, the same relative key, has
    the same shape: what a difference model stores as ``control - base``. In ControlNet
    order. SD1.x: 298, SDXL: 808."""
    unet = dict(ldm_unet(config))
    return tuple(k for k, s in ldm_controlnet(config) if unet.get(k) == s)


def control_only_keys(config: UNetConfig) -> tuple[str, ...]:
    """ControlNet keys (ldm, relative) without a UNet counterpart: zero_convs,
    input_hint_block, middle_block_out. SD1.x: 42, SDXL: 36."""
    shared = set(shared_keys(config))
    return tuple(k for k, _ in ldm_controlnet(config) if k not in shared)


# --------------------------------------------------------------------------------------
# diffusers config.json
# --------------------------------------------------------------------------------------


def _diffusers_common(cfg: UNetConfig) -> dict[str, Any]:
    if cfg.transformer_depth_middle != (cfg.transformer_depth[-1] or 1):
        raise ValueError(
            "diffusers gives the middle block the depth of the last level; this config has "
            f"{cfg.transformer_depth_middle} in the middle and {cfg.transformer_depth[-1]} there"
        )
    widths = cfg.widths
    if cfg.num_heads > 0:
        heads: Any = cfg.num_heads
    else:
        heads = [cfg.heads(w) for w in widths]
    out: dict[str, Any] = {
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": list(widths),
        "class_embed_type": None,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": [
            "CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": cfg.in_channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": cfg.norm_num_groups,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "resnet_time_scale_shift": "default",
        "use_linear_projection": cfg.linear_proj,
    }
    depths = [d or 1 for d in cfg.transformer_depth]
    if any(d != 1 for d in depths):
        out["transformer_layers_per_block"] = depths
    out["projection_class_embeddings_input_dim"] = None
    if cfg.adm_in_channels:
        out.update(
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=cfg.addition_time_embed_dim,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
        )
    return out


def diffusers_controlnet_config(config: UNetConfig) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``ControlNetModel`` with this architecture.

    Written to a folder next to ``diffusion_pytorch_model.safetensors`` (with the tensors
    of :func:`diffusers_controlnet`), ``ControlNetModel.from_pretrained(folder)`` builds
    exactly these tensors. For SD1.x and SDXL the values equal those of the published
    lllyasviel/sd-controlnet-* and diffusers/controlnet-canny-sdxl-1.0 configs.
    """
    out = {"_class_name": "ControlNetModel", **_diffusers_common(config)}
    out.update(
        conditioning_channels=config.hint_channels,
        conditioning_embedding_out_channels=list(config.hint_widths),
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return dict(sorted(out.items()))


def diffusers_unet_config(config: UNetConfig) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``UNet2DConditionModel`` with this architecture
    (the tensors of :func:`diffusers_unet`)."""
    out = {"_class_name": "UNet2DConditionModel", **_diffusers_common(config)}
    out.update(
        center_input_sample=False,
        out_channels=config.out_channels,
        up_block_types=[
            "CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(config.transformer_depth)
        ],
    )
    return dict(sorted(out.items()))


def config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``config.json`` (ControlNetModel or
    UNet2DConditionModel). Raises :class:`LayoutError` for what the ldm layout cannot
    express (no cross-attention in the middle, class embeddings, ...)."""
    get = config.get
    widths = list(get("block_out_channels", (320, 640, 1280, 1280)))
    mc = widths[0]
    if any(w % mc for w in widths):
        raise LayoutError(f"block_out_channels {widths} are not multiples of the first")
    n = len(widths)
    types = list(get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
    if len(types) != n:
        raise LayoutError(f"down_block_types {types} do not match block_out_channels {widths}")
    layers = get("transformer_layers_per_block", 1)
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    if any(not isinstance(x, int) for x in layers):
        raise LayoutError("per-block transformer_layers_per_block lists are not supported")
    depth = tuple(layers[i] if "CrossAttn" in t else 0 for i, t in enumerate(types))
    if get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise LayoutError(f"mid_block_type {get('mid_block_type')!r} is not supported")
    for key in ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type"):
        if get(key) is not None:
            raise LayoutError(f"{key}={get(key)!r} is not supported")
    adm, time_dim = 0, 0
    if get("addition_embed_type") is not None:
        if get("addition_embed_type") != "text_time":
            raise LayoutError(
                f"addition_embed_type {get('addition_embed_type')!r} is not supported"
            )
        adm = int(get("projection_class_embeddings_input_dim"))
        time_dim = int(get("addition_time_embed_dim"))
    heads = get("num_attention_heads") or get("attention_head_dim", 8)
    head_fields: dict[str, int]
    if isinstance(heads, int):
        head_fields = {"num_heads": heads, "num_head_channels": -1}
    else:
        per = {w // h for w, h, d in zip(widths, heads, depth) if d and h}
        head_fields = {"num_heads": -1, "num_head_channels": per.pop() if len(per) == 1 else 64}
    cfg = UNetConfig(
        family="custom",
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=int(get("layers_per_block", 2)),
        transformer_depth=depth,
        transformer_depth_middle=layers[-1],
        context_dim=int(get("cross_attention_dim", 1280)),
        linear_proj=bool(get("use_linear_projection", False)),
        adm_in_channels=adm,
        in_channels=int(get("in_channels", 4)),
        out_channels=int(get("out_channels", 4)),
        hint_channels=int(get("conditioning_channels", 3)),
        hint_widths=tuple(get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        norm_num_groups=int(get("norm_num_groups", 32)),
        addition_time_embed_dim=time_dim,
        **head_fields,
    )
    family = family_of(cfg)
    cfg = dataclasses.replace(cfg, family=family)
    if get("conditioning_embedding_out_channels") is None:  # a UNet: no hint block
        t = _template(family, mc)
        cfg = dataclasses.replace(cfg, hint_channels=t.hint_channels, hint_widths=t.hint_widths)
    return cfg


# --------------------------------------------------------------------------------------
# Inference from keys and shapes
# --------------------------------------------------------------------------------------

#: top-level module names of each model, by (layout, kind)
_TOP = {
    ("ldm", "unet"): {"time_embed", "label_emb", "input_blocks", "middle_block",
                      "output_blocks", "out"},
    ("ldm", "controlnet"): {"time_embed", "label_emb", "input_blocks", "zero_convs",
                            "input_hint_block", "middle_block", "middle_block_out"},
    ("diffusers", "unet"): {"conv_in", "time_embedding", "add_embedding", "class_embedding",
                            "down_blocks", "up_blocks", "mid_block", "conv_norm_out",
                            "conv_out"},
    ("diffusers", "controlnet"): {"conv_in", "time_embedding", "add_embedding",
                                  "class_embedding", "controlnet_cond_embedding",
                                  "down_blocks", "controlnet_down_blocks",
                                  "controlnet_mid_block", "mid_block"},
}  # fmt: skip

#: the key that marks each model and the sibling every candidate must also have
_MARKERS = (
    ("ldm", "input_blocks.0.0.weight", "time_embed.0.weight"),
    ("diffusers", "conv_in.weight", "time_embedding.linear_1.weight"),
)
_CONTROL_MARKERS = {
    "ldm": ("input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight"),
    "diffusers": (
        "controlnet_cond_embedding.conv_in.weight",
        "controlnet_down_blocks.0.weight",
        "controlnet_mid_block.weight",
    ),
}


@dataclass(frozen=True)
class Found:
    """A UNet or ControlNet found in a file by :func:`infer` / :func:`detect`."""

    layout: Layout
    kind: Kind
    prefix: str
    """What the file puts before the model's keys (``"control_model."``, ``""``...)."""
    config: UNetConfig

    @property
    def family(self) -> str:
        """``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"custom"``."""
        return self.config.family

    @property
    def ldm_prefix(self) -> str:
        """The canonical prefix of this kind: ``control_model.`` or ``model.diffusion_model.``."""
        return CONTROL_PREFIX if self.kind == "controlnet" else UNET_PREFIX

    def table(self) -> tuple[Mapped, ...]:
        """Every tensor of the model: ``(key in the file, canonical ldm key, shape)``, in
        the file layout's registration order. The canonical key carries
        :attr:`ldm_prefix`, so a ControlNet in either layout maps onto
        ``control_model.X`` and a UNet onto ``model.diffusion_model.X``."""
        return _mapped(self.layout, self.kind, self.prefix, self.config)

    def to_ldm(self) -> dict[str, str]:
        """File key -> canonical ldm key."""
        return {m.key: m.ldm_key for m in self.table()}


@functools.lru_cache(maxsize=64)
def _mapped(layout: str, kind: str, prefix: str, cfg: UNetConfig) -> tuple[Mapped, ...]:
    canon = CONTROL_PREFIX if kind == "controlnet" else UNET_PREFIX
    ldm_t, dif_t = (_controlnet_tables if kind == "controlnet" else _unet_tables)(cfg)
    if layout == "ldm":
        return tuple(Mapped(prefix + lk, canon + lk, s) for lk, _, s in ldm_t)
    return tuple(Mapped(prefix + dk, canon + lk, s) for lk, dk, s in dif_t)


def _shape_of(value: Any) -> Shape:
    shape = getattr(value, "shape", value)
    return tuple(int(x) for x in shape)


_INDEX = re.compile(r"(\d+)")


def _count(keys: Iterable[str], head: str) -> int:
    """How many ``head<N>.`` blocks there are: N must run over 0, 1, ... without gaps
    (else :class:`LayoutError`), so a count never exceeds the number of keys."""
    seen = set()
    n = len(head)
    for k in keys:
        if k.startswith(head):
            m = _INDEX.match(k, n)
            if m and k[m.end() : m.end() + 1] == ".":
                seen.add(int(m.group(1)))
    if seen and max(seen) != len(seen) - 1:
        raise LayoutError(f"{head}N: the indices are not 0..{len(seen) - 1}")
    return len(seen)


def _indices(keys: Iterable[str], head: str) -> list[int]:
    """The sorted indices N of ``head<N>.weight`` keys."""
    out = set()
    for k in keys:
        if k.startswith(head) and k.endswith(".weight"):
            m = _INDEX.fullmatch(k[len(head) : -len(".weight")])
            if m:
                out.add(int(m.group(1)))
    return sorted(out)


def _template(family: str, model_channels: int) -> UNetConfig:
    base = CONFIGS.get(family, SD1)
    if model_channels == _TINY_CHANNELS:
        return tiny(base)
    if model_channels == base.model_channels:
        return base
    return _scaled_defaults(dataclasses.replace(base, model_channels=model_channels))


def _attention_facts(shapes: Mapping[str, Shape]) -> tuple[Optional[int], Optional[bool]]:
    """(context width, linear projections) from any transformer in ``shapes``."""
    context = linear = None
    for k, s in shapes.items():
        if context is None and k.endswith(".attn2.to_k.weight") and len(s) == 2:
            context = s[1]
        if linear is None and k.endswith(".proj_in.weight"):
            linear = len(s) == 2
        if context is not None and linear is not None:
            break
    return context, linear


def _finish(found: dict[str, Any], kind: str, shapes: Mapping[str, Shape]) -> UNetConfig:
    """A full UNetConfig from the facts read off the keys (``found``)."""
    context, linear = _attention_facts(shapes)
    probe = UNetConfig(
        family="custom",
        model_channels=found["model_channels"],
        channel_mult=found["channel_mult"],
        num_res_blocks=found["num_res_blocks"],
        transformer_depth=found["transformer_depth"],
        transformer_depth_middle=found["transformer_depth_middle"],
        linear_proj=bool(linear),
        adm_in_channels=found["adm_in_channels"],
        context_dim=context or 0,
    )
    family = family_of(probe)
    base = _template(family, found["model_channels"])
    fields = {k: v for k, v in found.items() if v is not None}
    if context is not None:
        fields["context_dim"] = context
    cfg = dataclasses.replace(base, family=family, linear_proj=bool(linear), **fields)
    if not cfg.adm_in_channels:
        cfg = dataclasses.replace(cfg, addition_time_embed_dim=0)
    elif not cfg.addition_time_embed_dim:
        cfg = dataclasses.replace(cfg, addition_time_embed_dim=base.addition_time_embed_dim or 256)
    return cfg


def _read_ldm(rel: Mapping[str, Shape], kind: str) -> UNetConfig:
    mc, cin = rel["input_blocks.0.0.weight"][:2]
    blocks = _count(rel, "input_blocks.")
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (width, depth) of each resblock
    for i in range(1, blocks):
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in rel:
            levels.append([])
        elif p + "0.in_layers.2.weight" in rel:
            width = rel[p + "0.in_layers.2.weight"][0]
            levels[-1].append((width, _count(rel, p + "1.transformer_blocks.")))
        else:
            raise LayoutError(f"input_blocks.{i} is neither a res block nor a downsampler")
    return _levels(
        levels,
        shapes=rel,
        kind=kind,
        model_channels=mc,
        in_channels=cin,
        middle=_count(rel, "middle_block.1.transformer_blocks."),
        adm=rel.get("label_emb.0.0.weight", (0, 0))[1],
        out=rel.get("out.2.weight", (None,))[0],
        hint=[rel[f"input_hint_block.{i}.weight"] for i in _indices(rel, "input_hint_block.")],
    )


def _read_diffusers(rel: Mapping[str, Shape], kind: str) -> UNetConfig:
    mc, cin = rel["conv_in.weight"][:2]
    levels: list[list[tuple[int, int]]] = []
    for level in range(_count(rel, "down_blocks.")):
        p = f"down_blocks.{level}."
        row = []
        for j in range(_count(rel, p + "resnets.")):
            width = rel.get(f"{p}resnets.{j}.conv1.weight", (0,))[0]
            row.append((width, _count(rel, f"{p}attentions.{j}.transformer_blocks.")))
        levels.append(row)
    hint: list[Shape] = []
    if "controlnet_cond_embedding.conv_in.weight" in rel:
        hint.append(rel["controlnet_cond_embedding.conv_in.weight"])
        for n in range(_count(rel, "controlnet_cond_embedding.blocks.")):
            hint.append(rel.get(f"controlnet_cond_embedding.blocks.{n}.weight", (0, 0)))
        hint.append(rel.get("controlnet_cond_embedding.conv_out.weight", (0, 0)))
    return _levels(
        levels,
        shapes=rel,
        kind=kind,
        model_channels=mc,
        in_channels=cin,
        middle=_count(rel, "mid_block.attentions.0.transformer_blocks."),
        adm=rel.get("add_embedding.linear_1.weight", (0, 0))[1],
        out=rel.get("conv_out.weight", (None,))[0],
        hint=hint,
    )


def _levels(
    levels: list[list[tuple[int, int]]],
    *,
    shapes: Mapping[str, Shape],
    kind: str,
    model_channels: int,
    in_channels: int,
    middle: int,
    adm: int,
    out: Optional[int],
    hint: list[Shape],
) -> UNetConfig:
    if not levels or not levels[0]:
        raise LayoutError("no res blocks in the first level")
    nrb = len(levels[0])
    mult, depth = [], []
    for row in levels:
        widths = {w for w, _ in row}
        depths = {d for _, d in row}
        if len(row) != nrb or len(widths) != 1 or len(depths) != 1:
            raise LayoutError(f"levels differ in structure: {levels}")
        w = widths.pop()
        if w % model_channels:
            raise LayoutError(f"level width {w} is not a multiple of {model_channels}")
        mult.append(w // model_channels)
        depth.append(depths.pop())
    found: dict[str, Any] = {
        "model_channels": model_channels,
        "in_channels": in_channels,
        "channel_mult": tuple(mult),
        "num_res_blocks": nrb,
        "transformer_depth": tuple(depth),
        "transformer_depth_middle": middle,
        "adm_in_channels": adm,
    }
    if middle < 1:
        raise LayoutError("the middle block has no transformer")
    if kind == "unet":
        found["out_channels"] = out
    elif hint:
        if len(hint) % 2 or len(hint) < 2:
            raise LayoutError(f"a hint block of {len(hint)} convs")
        found["hint_channels"] = hint[0][1]
        found["hint_widths"] = tuple(s[0] for s in hint[:-1:2])
    return _finish(found, kind, shapes)


def _candidates(shapes: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(layout, kind, prefix) of every model whose marker keys are present. The markers
    are found by a C-level search of the joined key names (a file may hold a million
    keys), each key ending at a NUL; a key that itself holds a NUL is not a model key."""
    joined = "\0" + "\0".join(shapes) + "\0"
    out = []
    for layout, marker, sibling in _MARKERS:
        needle = marker + "\0"
        pos = joined.find(needle)
        while pos != -1:
            start = joined.rfind("\0", 0, pos) + 1
            key = joined[start : pos + len(marker)]
            pos = joined.find(needle, pos + 1)
            prefix = key[: -len(marker)]
            if key not in shapes or (prefix and not prefix.endswith(".")):
                continue
            if prefix + sibling not in shapes:
                continue
            control = any(prefix + m in shapes for m in _CONTROL_MARKERS[layout])
            cand = (layout, "controlnet" if control else "unet", prefix)
            if cand not in out:  # (a NUL inside a longer key can repeat a real one)
                out.append(cand)
    return out


def _check(layout: str, kind: str, prefix: str, shapes: Mapping[str, Any]) -> Found:
    """The Found for a candidate, or a LayoutError saying why its keys do not fit."""
    top = _TOP[(layout, kind)]
    n = len(prefix)
    heads = tuple(f"{prefix}{t}." for t in top)
    exact = {prefix + t for t in top}
    rel = {k[n:]: _shape_of(s) for k, s in shapes.items() if k.startswith(heads) or k in exact}
    what = f"{prefix or '(no prefix)'}: {layout} {kind}"
    try:
        cfg = (_read_ldm if layout == "ldm" else _read_diffusers)(rel, kind)
    except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
        raise LayoutError(f"{what}: cannot read its configuration ({exc})") from None
    found = Found(layout, kind, prefix, cfg)  # type: ignore[arg-type]
    want = {m.key[n:]: m.shape for m in found.table()}
    missing = [k for k in want if k not in rel]
    extra = [k for k in rel if k not in want]
    other = [k for k in want if k in rel and rel[k] != want[k]]
    if missing or extra or other:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("other shape", other)):
            if keys:
                sample = ", ".join(prefix + k for k in keys[:3])
                parts.append(f"{len(keys)} {label} ({sample}{', ...' if len(keys) > 3 else ''})")
        raise LayoutError(
            f"{what} ({cfg.label}-like, {cfg.model_channels} channels) does not match its "
            f"derived layout: " + "; ".join(parts)
        )
    return found


def detect(shapes: Mapping[str, Any]) -> list[Found]:
    """Every UNet and ControlNet in a file whose keys exactly match a derived layout.

    ``shapes`` maps keys to shapes (tuples, lists, or objects with a ``shape``). Keys of
    other models (VAE, text encoders, DDPM buffers...) are ignored. An original
    ControlNet checkpoint gives two: the ControlNet under ``control_model.`` and the SD
    UNet under ``model.diffusion_model.``.
    """
    out = []
    for layout, kind, prefix in _candidates(shapes):
        try:
            out.append(_check(layout, kind, prefix, shapes))
        except LayoutError:
            continue
    return out


def infer(shapes: Mapping[str, Any], kind: Optional[Kind] = None) -> Optional[Found]:
    """The UNet or ControlNet in a file, from its keys and shapes alone.

    ``kind``: ``"controlnet"``, ``"unet"``, or None for the ControlNet if the file has
    one, else the UNet. Returns None when the file has no model of that kind (a VAE, a
    text encoder, a LoRA, a Control-LoRA...). Raises :class:`LayoutError` when keys that
    mark a UNet/ControlNet are there but the rest does not fit any layout derived from the
    configuration they imply (the message names the first missing / unexpected keys), or
    when two models of the kind are present.

    >>> found = infer({"control_model." + k: s for k, s in ldm_controlnet(SD1)})
    >>> found.layout, found.kind, found.prefix, found.config.label
    ('ldm', 'controlnet', 'control_model.', 'SD1.x')
    >>> found = infer(dict(diffusers_controlnet(SDXL)))
    >>> found.layout, found.family, found.to_ldm()["controlnet_mid_block.weight"]
    ('diffusers', 'sdxl', 'control_model.middle_block_out.0.weight')
    """
    if kind not in (None, "unet", "controlnet"):
        raise ValueError(f"kind must be 'unet', 'controlnet' or None, not {kind!r}")
    cands = _candidates(shapes)
    for want in ("controlnet", "unet") if kind is None else (kind,):
        mine = [c for c in cands if c[1] == want]
        if not mine:
            continue
        found = [_check(layout, k, prefix, shapes) for layout, k, prefix in mine]
        if len(found) > 1:
            places = ", ".join(f"{f.prefix or '(no prefix)'} ({f.layout})" for f in found)
            raise LayoutError(f"the file holds {len(found)} {want}s: {places}")
        return found[0]
    return None
