"""Exact low-memory decode for diffusers' HunyuanVideo VAE.

`vae.decode` (what the original FramePack calls) already splits time into tiles of 4+1 latent frames
and blends their seams; inside a tile, its GroupNorms take statistics over every frame, so a tile
cannot simply be cut further. Its peak memory (22.7 GB for one 640x640 section) comes from whole-tile
activations at full resolution, several alive at once.

This module decodes the same tiles with the same modules and weights, but layer by layer: each
GroupNorm's statistics are gathered over the whole tile first, then norm -> SiLU -> causal conv runs
over bands of rows (all frames, one row of halo), written into preallocated outputs. The math is the
stock decoder's, so the output matches `vae.decode` to float rounding, while at most two
full-resolution activations (plus one band of temporaries) are alive. The one 256-channel
full-resolution tensor (the last upsampler's output) is never stored: it is recomputed per pass.

Quality Mode decodes with temporal tiles as long as memory allows (the whole section when it fits),
which removes the tile seams the stock decode blends over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("framepack.vae")

Rows = Callable[[int, int], torch.Tensor]  # rows [r0, r1) of a (B, C, T, H, W) tensor, all frames


@dataclass
class Source:
    """A tile activation known by shape; rows come from storage or are recomputed on demand."""

    shape: tuple[int, int, int, int, int]
    rows: Rows
    stored: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.shape[1]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Source":
        return cls(tuple(tensor.shape), lambda r0, r1: tensor[:, :, :, r0:r1], tensor)


class _GroupStats:
    """Mean and variance per (batch, group) over a whole tile, merged band by band (Chan et al.)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.n = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor) -> None:
        g = x.reshape(x.shape[0], self.groups, -1)
        n = g.shape[-1]
        # fp32 accumulation without an fp32 copy of the band
        mean = g.mean(-1, dtype=torch.float32).double()
        sumsq = torch.linalg.vector_norm(g, dim=-1, dtype=torch.float32).double() ** 2
        m2 = (sumsq - n * mean ** 2).clamp_min(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total

    def scale_shift(self, norm: torch.nn.GroupNorm, channels: int):
        """Per-channel a, b with norm(x) = a * x + b, in float32."""
        rstd = torch.rsqrt(self.m2 / self.n + norm.eps)
        rep = channels // self.groups
        a = rstd.repeat_interleave(rep, dim=1).float()
        mean = self.mean.repeat_interleave(rep, dim=1).float()
        if norm.weight is not None:
            a = a * norm.weight.float()[None]
        b = -mean * a
        if norm.bias is not None:
            b = b + norm.bias.float()[None]
        return a[..., None, None, None], b[..., None, None, None]


def _norm_silu_into(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = silu(a * x + b) in float32, rounded once to out's dtype (the stored source is never changed)."""
    y = x.to(torch.float32, copy=True)
    y.mul_(a).add_(b)
    out.copy_(F.silu(y, inplace=True))


def _replicate_pad(x: torch.Tensor, pad: tuple[int, ...], ab=None) -> torch.Tensor:
    """F.pad(x, pad, mode="replicate") for (B, C, T, H, W), written as slice copies into one buffer; with
    ab=(a, b) the interior is silu(a * x + b) instead of x, so the normalised band is never a tensor of its own.

    PyTorch's replication-pad kernel took 30% of a 640x640 section decode on the H200 (0.4 ms a call, 989
    calls); copies of the border planes cost a fraction of that, and the values are the same."""
    wl, wr, ht, hb, tf, tb = pad
    _, _, t, h, w = x.shape
    out = x.new_empty(x.shape[:2] + (t + tf + tb, h + ht + hb, w + wl + wr))
    core = out[:, :, tf:tf + t, ht:ht + h, wl:wl + w]
    if ab is None:
        core.copy_(x)
    else:
        _norm_silu_into(core, x, *ab)
    rows = out[:, :, tf:tf + t, ht:ht + h]
    if wl:
        rows[..., :wl] = rows[..., wl:wl + 1]
    if wr:
        rows[..., wl + w:] = rows[..., wl + w - 1:wl + w]
    frames = out[:, :, tf:tf + t]
    if ht:
        frames[:, :, :, :ht] = frames[:, :, :, ht:ht + 1]
    if hb:
        frames[:, :, :, ht + h:] = frames[:, :, :, ht + h - 1:ht + h]
    if tf:
        out[:, :, :tf] = out[:, :, tf:tf + 1]
    if tb:
        out[:, :, tf + t:] = out[:, :, tf + t - 1:tf + t]
    return out


def _conv_band(causal_conv, x: torch.Tensor, top: int, bottom: int, ab=None) -> torch.Tensor:
    """A HunyuanVideoCausalConv3d on a band of rows (of silu(a * x + b) when ab is given): causal time padding
    and replicate borders as the module pads the whole frame, but rows inside the frame come from the
    neighbouring bands."""
    w_l, w_r, _, _, t_front, t_back = causal_conv.time_causal_padding
    pad = (w_l, w_r, top, bottom, t_front, t_back)
    if causal_conv.pad_mode == "replicate" and (any(pad) or ab is not None):
        x = _replicate_pad(x, pad, ab)
    else:
        if ab is not None and causal_conv.pad_mode != "replicate":
            normed = torch.empty_like(x)
            _norm_silu_into(normed, x, *ab)
            x = normed
        if any(pad):
            x = F.pad(x, pad, mode=causal_conv.pad_mode)
    return causal_conv.conv(x)


def _halo(causal_conv) -> int:
    return causal_conv.time_causal_padding[2]


def _upsample_rows(x: torch.Tensor, factor) -> torch.Tensor:
    """Nearest upsampling as HunyuanVideoUpsampleCausal3D does it: the tile's first frame is not
    repeated in time, every later frame is (when the factor asks for time upsampling)."""
    ft, fh, fw = (int(f) for f in factor)
    if ft > 1:
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(ft, dim=2)], dim=2)
    if fh > 1:
        x = x.repeat_interleave(fh, dim=3)
    if fw > 1:
        x = x.repeat_interleave(fw, dim=4)
    return x


# -- layer-major decoder -------------------------------------------------------------------------------


class LayerwiseDecoder:
    """Decode one temporal tile of latents exactly like `vae.decoder(vae.post_quant_conv(z))`."""

    def __init__(self, vae, chunk_budget_bytes: int = 512 * 1024**2, max_attention_tokens: int = 8192):
        self.vae = vae
        self.dec = vae.decoder
        self.budget = chunk_budget_bytes
        self.max_attention_tokens = max_attention_tokens

    def _band(self, shape, dtype) -> int:
        """Rows per band so one band's temporaries (about 6 copies, some in fp32) stay within budget."""
        _, c, t, _, w = shape
        per_row = 6 * c * t * w * torch.finfo(dtype).bits // 8
        return max(1, int(self.budget // max(per_row, 1)))

    def _bands(self, shape, dtype):
        step = self._band(shape, dtype)
        for r0 in range(0, shape[3], step):
            yield r0, min(shape[3], r0 + step)

    def _stats(self, src: Source, norm, dtype, extra: Callable[[int, int, torch.Tensor], None] | None = None):
        stats = _GroupStats(norm.num_groups)
        for r0, r1 in self._bands(src.shape, dtype):
            band = src.rows(r0, r1)
            stats.add(band)
            if extra is not None:
                extra(r0, r1, band)
        return stats.scale_shift(norm, src.channels)

    def _norm_conv_into(self, src: Source, ab, conv, out: torch.Tensor, add: bool = False) -> None:
        """out[rows] (+)= conv(silu(norm(src))) band by band."""
        a, b = ab
        halo = _halo(conv)
        height = src.shape[3]
        for r0, r1 in self._bands(src.shape, out.dtype):
            lo, hi = max(0, r0 - halo), min(height, r1 + halo)
            y = _conv_band(conv, src.rows(lo, hi), halo - (r0 - lo), halo - (hi - r1), (a, b))
            if add:
                out[:, :, :, r0:r1] += y
            else:
                out[:, :, :, r0:r1] = y

    def _resnet(self, x: Source | torch.Tensor, resnet) -> torch.Tensor:
        """x may be recomputed per pass (the upsampler output); returns the stored output."""
        if isinstance(x, torch.Tensor):
            x = Source.of(x)
        b, _, t, h, w = x.shape
        out_c = resnet.conv1.conv.out_channels
        p = next(resnet.parameters())
        if resnet.conv_shortcut is not None or x.stored is None:
            # the residual is written while the statistics pass reads the input anyway
            residual = torch.empty((b, out_c, t, h, w), dtype=p.dtype, device=p.device)
            shortcut = resnet.conv_shortcut

            def keep_residual(r0, r1, band):
                residual[:, :, :, r0:r1] = band if shortcut is None else _conv_band(shortcut, band, 0, 0)

            ab1 = self._stats(x, resnet.norm1, p.dtype, keep_residual)
        else:
            ab1 = self._stats(x, resnet.norm1, p.dtype)
            residual = x.stored
        h1 = torch.empty((b, out_c, t, h, w), dtype=p.dtype, device=p.device)
        self._norm_conv_into(x, ab1, resnet.conv1, h1)
        h1_src = Source.of(h1)
        ab2 = self._stats(h1_src, resnet.norm2, p.dtype)
        # in place: each residual row band is read only for its own output band
        self._norm_conv_into(h1_src, ab2, resnet.conv2, residual, add=True)
        return residual

    def _attention(self, x: torch.Tensor, attn) -> torch.Tensor:
        """The mid block's causal frame attention, query chunks of at most max_attention_tokens
        (no N x N mask)."""
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
        normed = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2) if attn.group_norm is not None else tokens
        q, k, v = attn.to_q(normed), attn.to_k(normed), attn.to_v(normed)
        heads = attn.heads
        hd = k.shape[-1] // heads

        def split(z):
            return z.view(b, -1, heads, hd).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        hw = h * w
        step = max(1, min(hw, self.max_attention_tokens))
        outs = []
        for f in range(t):
            keys = slice(0, (f + 1) * hw)
            for q0 in range(f * hw, (f + 1) * hw, step):
                q1 = min(q0 + step, (f + 1) * hw)
                outs.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, keys], v[:, :, keys]))
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, -1, heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + tokens
        out = out / attn.rescale_output_factor
        return out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    def _upsample(self, x: torch.Tensor, up) -> Source:
        """The upsampler's output as rows recomputed on demand: the largest activation, never stored."""
        ft, fh, fw = (int(f) for f in up.upsample_factor)
        b, _, t, h, w = x.shape
        out_h = h * fh
        halo = _halo(up.conv)

        def rows(r0: int, r1: int) -> torch.Tensor:
            lo, hi = max(0, r0 - halo), min(out_h, r1 + halo)  # upsampled rows the conv reads
            src = x[:, :, :, lo // fh: (hi - 1) // fh + 1]
            upsampled = _upsample_rows(src, up.upsample_factor)[:, :, :, lo - (lo // fh) * fh:]
            upsampled = upsampled[:, :, :, : hi - lo]
            return _conv_band(up.conv, upsampled, halo - (r0 - lo), halo - (hi - r1))

        return Source((b, up.conv.conv.out_channels, 1 + (t - 1) * ft, out_h, w * fw), rows)

    @torch.no_grad()
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        dec = self.dec
        x = self.vae.post_quant_conv(z)
        x = dec.conv_in(x)
        mid = dec.mid_block
        x = self._resnet(x, mid.resnets[0])
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                x = self._attention(x, attn)
            x = self._resnet(x, resnet)
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x = self._resnet(x, resnet)
            if block.upsamplers is not None:
                x = self._upsample(x, block.upsamplers[0])
        if isinstance(x, Source):
            x = torch.cat([x.rows(r0, r1) for r0, r1 in self._bands(x.shape, z.dtype)], dim=3)
        src = Source.of(x)
        ab = self._stats(src, dec.conv_norm_out, x.dtype)
        b, _, t, h, w = x.shape
        out = torch.empty((b, dec.conv_out.conv.out_channels, t, h, w), dtype=x.dtype, device=x.device)
        self._norm_conv_into(src, ab, dec.conv_out, out)
        return out


def tiled_decode(vae, z: torch.Tensor, tile_latents: int, stride_latents: int,
                 decode_tile: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """diffusers' temporal tiling (tiles of tile+1 latents, seams blended linearly), any tile decoder.

    With tile 4 and stride 3 (diffusers' defaults) this is exactly what `vae.decode` does.
    """
    ratio = vae.temporal_compression_ratio
    num_frames = z.shape[2]
    if num_frames <= tile_latents:
        return decode_tile(z)
    blend = (tile_latents - stride_latents) * ratio
    keep = stride_latents * ratio
    parts, prev = [], None
    for i in range(0, num_frames, stride_latents):
        pix = decode_tile(z[:, :, i: i + tile_latents + 1])
        if i > 0:
            pix = vae.blend_t(prev, pix[:, :, 1:], blend)
            parts.append(pix[:, :, :keep])
        else:
            parts.append(pix[:, :, : keep + 1])
        prev = pix
    return torch.cat(parts, dim=2)[:, :, : (num_frames - 1) * ratio + 1]


def stock_tiling(vae) -> tuple[int, int]:
    """(tile, stride) in latent frames as `vae.decode` uses them."""
    ratio = vae.temporal_compression_ratio
    if not vae.use_framewise_decoding:
        return 10**9, 10**9
    return vae.tile_sample_min_num_frames // ratio, vae.tile_sample_stride_num_frames // ratio


def decode_exact(vae, z: torch.Tensor, chunk_budget_bytes: int = 512 * 1024**2,
                 tile_latents: int | None = None, max_attention_tokens: int = 8192) -> torch.Tensor:
    """Pixels equal to `vae.decode(z).sample` when tile_latents is None; a longer tile (Quality Mode)
    decodes more frames with one set of GroupNorm statistics and leaves fewer seams."""
    dec = LayerwiseDecoder(vae, chunk_budget_bytes, max_attention_tokens)
    tile, stride = stock_tiling(vae)
    if tile_latents is not None and tile_latents > tile:
        tile, stride = tile_latents, max(1, tile_latents - 1)
    return tiled_decode(vae, z, tile, stride, dec.decode_tile)
