"""A small, fully convolutional U-Net-lite denoiser with a stated receptive field.

Why this shape: the emulator must give the same answer on one rank and on many, so the network has
no global operation (no attention, no GroupNorm/BatchNorm over space — only a per-pixel LayerNorm
over channels) and no padding of its own: every 3x3 convolution is 'valid'. The caller pads the input
with `receptive_halo` points (periodic wrap by `pad_halo` or neighbours' data by
`domain.exchange_halo`), and the network returns exactly the interior. A tile evaluated with its halo
therefore equals the same region of the global evaluation, up to float rounding.

Layout (units: folded pixels): 2x2 pixel folding (`fold`) → 3x3 stem → per level: residual blocks,
then (except at the bottom) 2x2 average pooling → back up: nearest upsampling, add the cropped skip,
residual blocks → 1x1 head → unfold. Noise level enters by FiLM (scale and shift after each block's
first LayerNorm) from an embedding of c_noise. Pooling and folding need tiles whose origin and size
are multiples of `alignment` grid points (the emulator arranges that); `receptive_halo` is the halo
such an aligned tile needs. (A single output point can feel inputs up to receptive_halo +
alignment − 1 away, because pooling blocks share information; aligned tiling accounts for that.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture keys (stored in checkpoints; a checkpoint must match them exactly)."""

    in_channels: int = field(default=4, metadata={"min": 1, "help": "input channels: noisy state + condition + static"})
    out_channels: int = field(default=2, metadata={"min": 1, "help": "output channels (= state variables)"})
    fold: int = field(default=2, metadata={"min": 1, "help": "pixel folding factor (1 = none)"})
    channels: tuple[int, ...] = field(default=(64, 128), metadata={"help": "feature channels per level"})
    blocks: tuple[int, ...] = field(default=(1, 1), metadata={"help": "residual blocks per level (down path)"})
    up_blocks: int = field(default=1, metadata={"min": 0, "help": "residual blocks per level on the way up"})
    embed: int = field(default=128, metadata={"min": 8, "help": "width of the noise-level embedding"})

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.blocks) or not self.channels:
            raise ValueError("network: channels and blocks need one entry per level")
        if any(c < 1 for c in self.channels) or any(b < 0 for b in self.blocks):
            raise ValueError("network: channels must be positive and blocks non-negative")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (bf16 autocast in training) back to float32; others unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def crop(x: torch.Tensor, r: int) -> torch.Tensor:
    """Remove r points on each side of the two trailing axes."""
    return x if r == 0 else x[..., r:-r, r:-r]


def conv3x3(layer: nn.Conv2d, x: torch.Tensor, wrap: bool) -> torch.Tensor:
    """A 'valid' 3x3 convolution, or (wrap) one on a doubly periodic field that keeps its size."""
    return layer(F.pad(x, (1, 1, 1, 1), mode="circular") if wrap else x)


def _trace(config: NetworkConfig, halo: int) -> int | None:
    """Halo (in folded pixels) left at the head for an input halo `halo`, or None if too small."""
    if halo % config.fold:
        return None
    r = halo // config.fold - 1  # stem
    levels = len(config.channels)
    skips = []
    for level in range(levels):
        r -= 2 * config.blocks[level]
        if r < 0:
            return None
        if level < levels - 1:
            skips.append(r)
            r = (r - r % 2) // 2
    for level in reversed(range(levels - 1)):
        r = 2 * r
        if skips[level] < r:
            return None
        r -= 2 * config.up_blocks
        if r < 0:
            return None
    return r


def receptive_halo(config: NetworkConfig) -> int:
    """The smallest input halo (grid points) that leaves a non-negative halo at the head."""
    halo = config.fold
    while _trace(config, halo) is None:
        halo += config.fold
    return halo


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel (no statistics across space: tiling-safe)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = full_precision(x)  # statistics in float32 under bf16 autocast
        mu = x.mean(1, keepdim=True)
        var = (x - mu).square().mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class ResBlock(nn.Module):
    """norm → FiLM(noise) → SiLU → conv3x3 → norm → SiLU → conv3x3, plus the cropped input.
    Valid convolutions: the output is 2 points smaller on each side."""

    def __init__(self, channels: int, embed: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = ChannelNorm(channels), ChannelNorm(channels)
        self.film = nn.Linear(embed, 2 * channels)
        self.conv1 = nn.Conv2d(channels, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = conv3x3(self.conv1, F.silu(self.norm1(x) * (1 + scale) + shift), wrap)
        h = conv3x3(self.conv2, F.silu(self.norm2(h)), wrap)
        # the residual stream stays float32 under bf16 autocast
        return full_precision(x if wrap else crop(x, 2)) + h


class NoiseEmbedding(nn.Module):
    """c_noise (B,) → (B, embed): fixed log-spaced Fourier features, then a 2-layer MLP."""

    def __init__(self, embed: int) -> None:
        super().__init__()
        half = embed // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), half)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, embed), nn.SiLU(), nn.Linear(embed, embed), nn.SiLU())

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None].to(self.freqs.dtype) * self.freqs[None, :]
        return self.mlp(torch.cat([arg.cos(), arg.sin()], dim=1))


class UNetLite(nn.Module):
    """F(input_with_halo, c_noise) → output on the interior. Input (B, in_channels, n_y + 2h, n_x + 2h)
    with h = `receptive_halo` and n_y, n_x multiples of `alignment`; output (B, out_channels, n_y, n_x)."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        c, f = config, config.fold
        self.config = config
        self.receptive_halo = receptive_halo(config)
        self.alignment = f * 2 ** (len(c.channels) - 1)
        # Training on whole doubly periodic fields may switch this on: every 3x3 convolution then wraps
        # circularly and the input carries no halo. Same function (periodic padding of the input is the
        # periodic extension each valid convolution would see), without computing the halo's wasted ring.
        self.wrap = False
        self.embed = NoiseEmbedding(c.embed)
        self.stem = nn.Conv2d(c.in_channels * f * f, c.channels[0], 3)
        self.down = nn.ModuleList(nn.ModuleList(ResBlock(ch, c.embed) for _ in range(n))
                                  for ch, n in zip(c.channels, c.blocks))
        self.widen = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(c.channels[:-1], c.channels[1:]))
        self.narrow = nn.ModuleList(nn.Conv2d(b, a, 1) for a, b in zip(c.channels[:-1], c.channels[1:]))
        self.up = nn.ModuleList(nn.ModuleList(ResBlock(ch, c.embed) for _ in range(c.up_blocks))
                                for ch in c.channels[:-1])
        self.head_norm = ChannelNorm(c.channels[0])
        self.head = nn.Conv2d(c.channels[0], c.out_channels * f * f, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def input_halo(self) -> int:
        """The halo the input carries: `receptive_halo`, or 0 while `wrap` is on."""
        return 0 if self.wrap else self.receptive_halo

    def can_wrap(self, shape: tuple[int, ...], periodic: tuple[bool, ...]) -> bool:
        """Whether a whole grid of `shape` may be evaluated with `wrap`: periodic and aligned on both axes."""
        return all(periodic) and all(n % self.alignment == 0 for n in shape)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        f, h, a, wrap = self.config.fold, self.input_halo, self.alignment, self.wrap
        ny, nx = x.shape[-2] - 2 * h, x.shape[-1] - 2 * h
        if ny <= 0 or nx <= 0 or ny % a or nx % a:
            raise ValueError(f"UNetLite: interior {ny} x {nx} (input {tuple(x.shape[-2:])} minus a halo of {h} "
                             f"on each side) must be positive multiples of {a}")
        emb = self.embed(c_noise)
        z = conv3x3(self.stem, F.pixel_unshuffle(x, f) if f > 1 else x, wrap)
        r = 0 if wrap else h // f - 1  # halo left, in pixels of the current level
        shrink = 0 if wrap else 2  # halo points each residual block consumes
        skips: list[tuple[torch.Tensor, int]] = []
        levels = len(self.down)
        for level, blocks in enumerate(self.down):
            for block in blocks:
                z = block(z, emb, wrap)
            r -= shrink * len(blocks)
            if level < levels - 1:
                skips.append((z, r))
                z, r = crop(z, r % 2), r - r % 2
                z = self.widen[level](F.avg_pool2d(z, 2))
                r //= 2
        for level in reversed(range(levels - 1)):
            z = F.interpolate(self.narrow[level](z), scale_factor=2, mode="nearest")
            r *= 2
            skip, rs = skips[level]
            z = z + crop(skip, rs - r)
            for block in self.up[level]:
                z = block(z, emb, wrap)
            r -= shrink * len(self.up[level])
        z = self.head(F.silu(self.head_norm(crop(z, r))))
        z = F.pixel_shuffle(z, f) if f > 1 else z
        return z.to(x.dtype)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
