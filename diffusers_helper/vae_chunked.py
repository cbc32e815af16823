"""Exact low-memory decode for diffusers' HunyuanVideo VAE.

`vae.decode` (what the original FramePack calls) already splits time into tiles of 4+1 latent frames
and blends their seams; inside a tile, its GroupNorms take statistics over every frame, so a tile
cannot simply be cut further. Its peak memory (22.7 GB for one 640x640 section) comes from whole-tile
activations at full resolution, several alive at once.

This module decodes the same tiles with the same modules and weights, but layer by layer: each
GroupNorm's statistics are gathered over the whole tile first, then norm -> SiLU -> causal conv runs
over short time chunks, carrying the last frames each causal conv needs into the next chunk. The
math is the stock decoder's, so the output matches `vae.decode` to float rounding, while at most two
full-resolution activations (plus one chunk of temporaries) are alive. The one 256-channel
full-resolution tensor (the last upsampler's output) is never stored: it is recomputed per pass.

Quality Mode decodes with temporal tiles as long as memory allows (the whole section when it fits),
which removes the tile seams the stock decode blends over.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger("framepack.vae")

Chunks = Callable[[], Iterator[torch.Tensor]]  # a fresh, time-ordered pass over a tensor's frame chunks


@dataclass
class Stream:
    """A (B, C, T, H, W) tensor known by shape, produced chunk by chunk on demand."""

    shape: tuple[int, int, int, int, int]
    chunks: Chunks
    stored: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.shape[1]

    @classmethod
    def of(cls, tensor: torch.Tensor, chunk: int) -> "Stream":
        def chunks():
            for t in range(0, tensor.shape[2], chunk):
                yield tensor[:, :, t: t + chunk]

        return cls(tuple(tensor.shape), chunks, tensor)

    def materialize(self) -> torch.Tensor:
        if self.stored is not None:
            return self.stored
        parts = list(self.chunks())
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


# -- per-chunk building blocks ------------------------------------------------------------------------


class _GroupStats:
    """Mean and variance per (batch, group) over a whole tile, merged chunk by chunk (Chan et al.)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.n = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        g = x.float().reshape(b, self.groups, -1)
        n = g.shape[-1]
        mean = g.mean(-1, dtype=torch.float64)
        m2 = ((g.double() - mean[..., None]) ** 2).sum(-1)
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
        var = self.m2 / self.n
        rstd = torch.rsqrt(var + norm.eps)  # (B, G)
        rep = channels // self.groups
        rstd_c = rstd.repeat_interleave(rep, dim=1).float()
        mean_c = self.mean.repeat_interleave(rep, dim=1).float()
        w = norm.weight.float()[None] if norm.weight is not None else 1.0
        bias = norm.bias.float()[None] if norm.bias is not None else 0.0
        a = rstd_c * w
        b = bias - mean_c * a
        return a[..., None, None, None], b[..., None, None, None]


def _norm_silu(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu((x.float() * a + b).to(x.dtype))


class _CausalConvState:
    """Runs a diffusers HunyuanVideoCausalConv3d over successive chunks, carrying its time context."""

    def __init__(self, causal_conv):
        self.conv = causal_conv.conv
        pad = causal_conv.time_causal_padding  # (w, w, h, h, t_front, 0)
        self.spatial = pad[:4]
        self.mode = causal_conv.pad_mode
        self.context = pad[4]
        self.tail: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.context:
            if self.tail is None:  # first chunk: the causal padding repeats the first frame
                head = x[:, :, :1].expand(-1, -1, self.context, -1, -1)
            else:
                head = self.tail
            x_full = torch.cat([head, x], dim=2)
            self.tail = x_full[:, :, -self.context:]
        else:
            x_full = x
        x_full = F.pad(x_full, self.spatial + (0, 0), mode=self.mode) if any(self.spatial) else x_full
        return self.conv(x_full)


def _upsample_chunk(x: torch.Tensor, factor, first: bool) -> torch.Tensor:
    """Nearest upsampling as HunyuanVideoUpsampleCausal3D does it: the tile's first frame is not
    repeated in time, every later frame is (when the factor asks for time upsampling)."""
    ft, fh, fw = (int(f) for f in factor)
    if ft > 1:
        if first:
            x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(ft, dim=2)], dim=2)
        else:
            x = x.repeat_interleave(ft, dim=2)
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

    def _chunk(self, channels: int, h: int, w: int, dtype) -> int:
        """Frames per chunk so one chunk's temporaries (about 4 copies) stay within the budget."""
        per_frame = 4 * channels * h * w * torch.finfo(dtype).bits // 8
        return max(1, int(self.budget // max(per_frame, 1)))

    def _stream(self, x: torch.Tensor) -> Stream:
        return Stream.of(x, self._chunk(x.shape[1], x.shape[3], x.shape[4], x.dtype))

    def _norm_stats(self, src: Stream, norm, extra: Callable[[torch.Tensor], None] | None = None):
        stats = _GroupStats(norm.num_groups)
        for chunk in src.chunks():
            stats.add(chunk)
            if extra is not None:
                extra(chunk)
        return stats.scale_shift(norm, src.channels)

    def _norm_conv(self, src: Stream, norm, conv, ab, out_channels: int) -> Stream:
        a, b = ab

        def chunks():
            state = _CausalConvState(conv)
            for chunk in src.chunks():
                yield state(_norm_silu(chunk, a, b))

        bsz, _, t, h, w = src.shape
        return Stream((bsz, out_channels, t, h, w), chunks)

    def _resnet(self, x: Stream | torch.Tensor, resnet) -> torch.Tensor:
        """x may be virtual (recomputed per pass); returns the stored output."""
        if isinstance(x, torch.Tensor):
            x = self._stream(x)
        b, _, t, h, w = x.shape
        out_c = resnet.conv1.conv.out_channels
        dtype = next(resnet.parameters()).dtype
        device = next(resnet.parameters()).device
        residual = None
        if resnet.conv_shortcut is not None:
            residual = torch.empty((b, out_c, t, h, w), dtype=dtype, device=device)
            shortcut = _CausalConvState(resnet.conv_shortcut)
            pos = [0]

            def keep_shortcut(chunk):
                n = chunk.shape[2]
                residual[:, :, pos[0]: pos[0] + n] = shortcut(chunk)
                pos[0] += n

            ab1 = self._norm_stats(x, resnet.norm1, keep_shortcut)
        else:
            ab1 = self._norm_stats(x, resnet.norm1)
            residual = x.materialize()
        h1 = self._norm_conv(x, resnet.norm1, resnet.conv1, ab1, out_c).materialize()
        h1_stream = self._stream(h1)
        ab2 = self._norm_stats(h1_stream, resnet.norm2)
        pos = 0
        for chunk in self._norm_conv(h1_stream, resnet.norm2, resnet.conv2, ab2, out_c).chunks():
            n = chunk.shape[2]
            residual[:, :, pos: pos + n] += chunk  # written in place: the residual frames are not read again
            pos += n
        del h1
        return residual

    def _attention(self, x: torch.Tensor, attn) -> torch.Tensor:
        """The mid block's causal frame attention, one query frame at a time (no N x N mask)."""
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

    def _upsample(self, x: torch.Tensor, up) -> Stream:
        """Virtual upsampler output: recomputed each time it is read, never stored."""
        factor = up.upsample_factor
        ft, fh, fw = (int(f) for f in factor)
        b, _, t, h, w = x.shape
        src = self._stream(x)
        out_c = up.conv.conv.out_channels

        def chunks():
            state = _CausalConvState(up.conv)
            for i, chunk in enumerate(src.chunks()):
                upsampled = _upsample_chunk(chunk, factor, first=i == 0)
                # keep chunks of the upsampled size within budget
                step = self._chunk(upsampled.shape[1], upsampled.shape[3], upsampled.shape[4], upsampled.dtype)
                for t0 in range(0, upsampled.shape[2], step):
                    yield state(upsampled[:, :, t0: t0 + step])

        return Stream((b, out_c, 1 + (t - 1) * ft, h * fh, w * fw), chunks)

    @torch.no_grad()
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        dec = self.dec
        x = self.vae.post_quant_conv(z)
        x = _CausalConvState(dec.conv_in)(x)
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
        if isinstance(x, Stream):
            x = x.materialize()
        ab = self._norm_stats(self._stream(x), dec.conv_norm_out)
        out = self._norm_conv(self._stream(x), dec.conv_norm_out, dec.conv_out, ab, dec.conv_out.conv.out_channels)
        return out.materialize()


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
