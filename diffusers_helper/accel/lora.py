"""LoRAs on the FramePack transformer, switched between jobs without reloading it.

Files in the formats users have:
- diffusers / PEFT: `transformer.<module>.lora_A.weight` / `lora_B.weight` (prefix optional, `.alpha` optional);
- kohya / musubi-tuner: `lora_unet_<module with _ for .>.lora_down.weight` / `lora_up.weight` / `alpha`;
- the original HunyuanVideo layout (`diffusion_model.double_blocks.0.img_attn_qkv...`), which diffusers' own
  converter turns into the diffusers names.

Mechanism: the LoRA stays unfused. Each targeted linear is wrapped in a `LoraLinear` that adds
`(x @ A^T) @ B^T` (every active LoRA's A and B concatenated, scale and weight folded into B) to its output. It
works the same on bf16 and FP8 linears, with every placement (A and B are small and stay on the compute device
while the streamer moves block weights), and switching a LoRA or its weight only replaces those two tensors, so
frames without a LoRA are exactly the frames of the bare model. Fusing into the weights would save the two thin
matmuls but needs a copy of every touched weight to undo exactly, and a new FP8 conversion per switch.

A file whose keys do not all match a linear of this model, or whose shapes differ, is refused with its name and
a few of the keys: a job never runs with a LoRA half applied.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.loras import LoraError

log = logging.getLogger("framepack.lora")



@dataclass(frozen=True)
class LoraPair:
    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    scale: float  # alpha / rank, or 1


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear layers (bf16 or FP8) by their diffusers name; a layer wrapped with LoRAs by its own name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "FP8Linear":
            owner = name.removesuffix(".base")
            if owner != name and isinstance(model.get_submodule(owner), LoraLinear):
                name = owner
            out[name] = m
    return out


def _shape(module) -> tuple[int, int]:
    return module.out_features, module.in_features


def _pairs_of(name: str, groups: dict[str, dict[str, torch.Tensor]], modules: dict[str, str],
              parts: tuple[str, str]) -> dict[str, LoraPair]:
    """Grouped tensors {key: {down part, up part, "alpha"}} -> {module: pair}, every key matching a layer
    (`modules`: key -> module name) and holding both weights; alpha defaults to the rank (scale 1)."""
    unmatched = [k for k in groups if k not in modules]
    if unmatched:
        raise LoraError(f"{name} does not fit this model: {len(unmatched)} of {len(groups)} modules match no layer "
                        f"(for example {', '.join(unmatched[:3])})")
    down_part, up_part = parts
    pairs = {}
    for key, tensors in groups.items():
        if down_part not in tensors or up_part not in tensors:
            raise LoraError(f"{name}: {key} lacks its {down_part.split('.')[0]} or {up_part.split('.')[0]} weight")
        down, up = tensors[down_part], tensors[up_part]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        pairs[modules[key]] = LoraPair(down, up, alpha / down.shape[0])
    return pairs


def parse_lora(path: Path, state: dict[str, torch.Tensor], linears: dict[str, torch.nn.Module]) -> dict[str, LoraPair]:
    """{module name: pair} for a LoRA state dict, in diffusers' module names."""
    name = Path(path).name
    groups: dict[str, dict[str, torch.Tensor]] = {}
    if any(k.startswith("lora_unet_") for k in state):
        for key, value in state.items():
            match = re.match(r"(lora_unet_.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
            if match is None:
                raise LoraError(f"{name}: key {key!r} is not a kohya LoRA key")
            groups.setdefault(match.group(1), {})[match.group(2)] = value
        modules = {"lora_unet_" + n.replace(".", "_"): n for n in linears}
        return _pairs_of(name, groups, modules, ("lora_down.weight", "lora_up.weight"))
    if any("img_attn_qkv" in k or "txt_attn_qkv" in k for k in state):
        from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

        state = _convert_hunyuan_video_lora_to_diffusers(dict(state))
    for key, value in state.items():
        match = re.match(r"(?:transformer\.|diffusion_model\.|base_model\.model\.)?(.+?)\.(lora_A|lora_B)"
                         r"(?:\.default)?\.weight$|(?:transformer\.|diffusion_model\.)?(.+?)\.(alpha)$", key)
        if match is None:
            raise LoraError(f"{name}: key {key!r} is not a LoRA key (expected <module>.lora_A.weight / "
                            "lora_B.weight or kohya's lora_unet_...)")
        module, part = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        groups.setdefault(module, {})[part] = value
    return _pairs_of(name, groups, {n: n for n in linears}, ("lora_A", "lora_B"))


def check_shapes(path: Path, pairs: dict[str, LoraPair], linears: dict[str, torch.nn.Module]) -> None:
    for module, pair in pairs.items():
        out_f, in_f = _shape(linears[module])
        rank = pair.down.shape[0]
        if pair.down.ndim != 2 or pair.up.ndim != 2 or pair.down.shape[1] != in_f or pair.up.shape != (out_f, rank):
            raise LoraError(f"{Path(path).name} does not fit this model: {module} is {in_f} -> {out_f}, the LoRA has "
                            f"{tuple(pair.down.shape)} and {tuple(pair.up.shape)} (made for another model?)")


class LoraLinear(torch.nn.Module):
    """A linear layer with its LoRAs: base(x) + (x @ down^T) @ up^T, every active LoRA in one pair of matmuls.

    One class for every wrapped layer, with A and B as buffers: torch.compile sees the same code in every block
    and new tensors of the same shapes are new inputs, not new graphs (a per-layer hook function was a guard per
    layer, and the blocks recompiled until dynamo gave up)."""

    def __init__(self, base: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def forward(self, x):
        down = self.down.to(device=x.device, dtype=x.dtype)
        up = self.up.to(device=x.device, dtype=x.dtype)
        return self.base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)


def _set_child(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class LoraManager:
    """The LoRAs active on one transformer. `apply([(path, weight), ...])` makes exactly those active."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device | None = None):
        self.transformer = transformer
        self.device = device
        self._files: dict[str, tuple[float, dict[str, LoraPair]]] = {}  # path -> (mtime, pairs), parsed once
        self.active: list[tuple[str, float]] = []
        self._wrapped: dict[str, LoraLinear] = {}

    def _pairs(self, path: str, linears) -> dict[str, LoraPair]:
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            raise LoraError(f"LoRA file not found: {Path(path).name}") from None
        cached = self._files.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoraError(f"{Path(path).name} is not a readable .safetensors file ({exc.__class__.__name__})") \
                from None
        pairs = parse_lora(Path(path), state, linears)
        check_shapes(Path(path), pairs, linears)
        self._files[path] = (mtime, pairs)
        return pairs

    def apply(self, loras: list[tuple[str, float]]) -> str:
        """Activate these LoRAs (weight 0 or an empty list: none); returns what the log should say."""
        loras = [(str(p), float(w)) for p, w in loras if float(w) != 0.0]
        if loras == self.active:
            return self.describe()
        linears = _linears(self.transformer)
        per_module: dict[str, list[tuple[LoraPair, float]]] = {}
        for path, weight in loras:  # every file is checked before anything changes
            for module, pair in self._pairs(path, linears).items():
                per_module.setdefault(module, []).append((pair, weight))
        for name in set(self._wrapped) - set(per_module):
            _set_child(self.transformer, name, self._wrapped.pop(name).base)
        for name, items in per_module.items():
            base = linears[name]
            ref = next(base.parameters())
            device = self.device or ref.device
            # the layer's compute dtype: FP8 linears take bf16 activations, so their LoRA is bf16 too
            dtype = ref.dtype if ref.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
            down = torch.cat([p.down.float() for p, _ in items]).to(device=device, dtype=dtype)
            up = torch.cat([p.up.float() * (p.scale * w) for p, w in items], dim=1).to(device=device, dtype=dtype)
            wrapper = self._wrapped.get(name)
            if wrapper is None:
                self._wrapped[name] = LoraLinear(base, down, up)
                _set_child(self.transformer, name, self._wrapped[name])
            else:
                wrapper.down, wrapper.up = down, up
        self.active = loras
        return self.describe()

    def describe(self) -> str:
        if not self.active:
            return "LoRAs: none"
        return "LoRAs: " + ", ".join(f"{Path(p).stem} x {w:g}" for p, w in self.active) + \
            f" ({len(self._wrapped)} layers, unfused)"
