"""Context parallelism: every transformer forward of one video split across the GPUs of one host.

Built on diffusers' own context parallelism (`enable_parallelism`, Ulysses and ring attention), with the plan
diffusers 0.42 lacks for `HunyuanVideoFramepackTransformer3DModel`. FramePack packs the history latents and
concatenates their rotary embeddings inside `forward`, so the split happens at the first dual-stream block:

- `transformer_blocks.0`: `hidden_states` and `encoder_hidden_states` split on the sequence dimension;
- every block: the rotary tables (cos, sin) split on its sequence dimension (the forward keeps the full tables
  in a local variable, so each block takes its own slice; slicing is a view);
- the last single-stream block: both streams gathered, before the output slice and projection.

Attention is permutation-invariant without a mask (FramePack runs batch 1 without one), so each rank's
`[image part, text part]` layout needs no reordering. The text part (729 image-projection tokens plus the
prompt's) rarely divides by the rank count; diffusers' "anything" Ulysses / ring handles uneven parts, and it is
switched on per forward only when a part does not divide, because it costs a small all-gather per attention call.

Step caches see whole tensors: their hooks are registered after these (so outside them), and the first-block
cache, whose rule reads a split block output, agrees on its decision across ranks (`caches.base.agree`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..caches import base as caches_base

log = logging.getLogger("framepack.parallel")

CP_BACKENDS = ("native", "_native_cudnn", "_native_flash", "flash", "sage")  # diffusers' CP-capable kernels


@dataclass(frozen=True)
class ContextParallel:
    """How many ranks share each forward, and how they share attention."""

    degree: int = 1
    attention: str = "ulysses"  # "ulysses" (all-to-all of heads) or "ring" (keys/values passed around)

    @property
    def enabled(self) -> bool:
        return self.degree > 1


def framepack_cp_plan(transformer) -> dict:
    """diffusers `_cp_plan` for the FramePack transformer (module name -> split inputs or gathered outputs)."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    def rope(name: str) -> dict:  # the dual blocks call it freqs_cis, the single blocks image_rotary_emb
        return {name: [ContextParallelInput(split_dim=0, expected_dims=2),
                       ContextParallelInput(split_dim=0, expected_dims=2)]}

    return {
        "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
                                 "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "transformer_blocks.*": rope("freqs_cis"),
        "single_transformer_blocks.*": rope("image_rotary_emb"),
    }


class _UnevenSwitch:
    """A pre-forward hook on the first block: notes both streams' lengths (the gather needs them) and turns on
    diffusers' "anything" mode for this forward when a stream does not divide by the rank count."""

    def __init__(self, config, world: int, switch: bool):
        self.config, self.world, self.switch = config, world, switch
        self.lengths = (0, 0)
        self.uneven_seen = False

    def __call__(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.lengths = (hidden.shape[1], text.shape[1])
        uneven = any(n % self.world for n in self.lengths)
        if not self.switch:
            return
        if uneven and not self.uneven_seen:
            log.info("Context parallel: %s image and %s text tokens do not divide by %d ranks; using uneven parts",
                     hidden.shape[1], text.shape[1] if text is not None else 0, self.world)
            self.uneven_seen = True
        if self.config.ring_degree > 1:
            self.config.ring_anything = uneven
        else:
            self.config.ulysses_anything = uneven


def _gather_hook(lengths: _UnevenSwitch, world: int):
    """After the last block: each stream's parts gathered back in order. diffusers' own uneven gather sends
    parts of different sizes, which gloo refuses; here every part is padded to the largest first (the sizes are
    known from the lengths the first block saw), so one plain all-gather serves even and uneven parts alike on
    NCCL and gloo (the functional all-gather crashes on gloo with CUDA tensors in torch 2.11). It runs once per
    forward, outside the compiled blocks."""
    import torch.distributed as dist
    from diffusers.hooks import ModelHook

    def gather(part: torch.Tensor, total: int) -> torch.Tensor:
        sizes = [len(c) for c in torch.arange(total).tensor_split(world)]
        size = sizes[0]
        if part.shape[1] < size:
            part = torch.nn.functional.pad(part, (0, 0, 0, size - part.shape[1]))
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    class Gather(ModelHook):
        def post_forward(self, module, output):
            hidden, text = output
            return gather(hidden, lengths.lengths[0]), gather(text, lengths.lengths[1])

    return Gather()


def _agreement(group):
    """Every rank computes a step when any rank's cache rule says so: a collective per decision, not per block."""
    import torch.distributed as dist

    def agree(compute: bool) -> bool:
        flag = torch.tensor([1 if compute else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    return agree


def _attention_outside_graphs() -> None:
    """Compiled blocks call the split attention eagerly: diffusers' uneven ("anything") Ulysses all-gathers the
    part sizes inside it, which dynamo cannot trace (torch 2.13: "FakeScriptObject ... allgather"). The graph
    breaks there; the norms, projections and MLP around it stay compiled."""
    from diffusers.models import attention_dispatch as dispatch

    fn = dispatch._templated_context_parallel_attention
    if not getattr(fn, "_framepack_eager", False):
        eager = torch.compiler.disable(fn)
        eager._framepack_eager = True
        dispatch._templated_context_parallel_attention = eager


@contextlib.contextmanager
def _cpu_ranks():
    """diffusers 0.42 takes `rank % torch.accelerator.device_count()` even on CPU ranks (the gloo test run),
    where the count is 0; count one device there while the config is resolved."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def apply_context_parallel(transformer, cp: ContextParallel) -> str:
    """Register diffusers' split / gather hooks with our plan. `torch.distributed` must be initialized with
    `cp.degree` ranks and a gloo backend for CPU tensors ("cpu:gloo,cuda:nccl", or "gloo" on CPUs): the step
    caches' decisions and diffusers' uneven-part sizes travel on it without a GPU sync."""
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig

    if not cp.enabled:
        return "off"
    world = dist.get_world_size()
    if world != cp.degree:
        raise ValueError(f"context parallel over {cp.degree} GPUs needs {cp.degree} ranks, found {world}")
    heads = transformer.config.num_attention_heads
    if cp.attention == "ring" and transformer.device.type != "cuda":
        # ring attention merges partial results by their log-sum-exp, which PyTorch's kernels return only on CUDA
        raise ValueError("ring attention across ranks needs a CUDA attention kernel; use ulysses on CPUs")
    if cp.attention == "ulysses" and heads < world:
        raise ValueError(f"Ulysses attention gives each rank whole heads: {heads} heads cannot be shared by {world} "
                         "ranks; use ring attention (--cp-attention ring) or fewer GPUs")
    if cp.attention == "ulysses":
        config = ContextParallelConfig(ulysses_degree=world)
        if heads % world:
            config.ulysses_anything = True  # pads the heads; the per-forward switch keeps it on
    elif cp.attention == "ring":
        config = ContextParallelConfig(ring_degree=world)
    else:
        raise ValueError(f"context parallel attention must be ulysses or ring, got {cp.attention!r}")
    with _cpu_ranks():
        transformer.enable_parallelism(config=config, cp_plan=framepack_cp_plan(transformer))
    _attention_outside_graphs()
    from diffusers.hooks import HookRegistry

    lengths = _UnevenSwitch(config, world, switch=not (cp.attention == "ulysses" and heads % world))
    transformer.transformer_blocks[0].register_forward_pre_hook(lengths, with_kwargs=True)
    last = transformer.single_transformer_blocks[-1]
    HookRegistry.check_if_exists_or_initialize(last).register_hook(_gather_hook(lengths, world), "cp_gather")
    caches_base.set_agreement(_agreement(None))
    summary = f"{cp.attention} over {world} ranks ({heads} heads)"
    log.info("Context parallel: %s; rank %d computes 1/%d of each forward", summary, dist.get_rank(), world)
    return summary
