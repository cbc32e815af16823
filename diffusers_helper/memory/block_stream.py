"""Run a transformer whose blocks do not all fit on the GPU: keep the blocks that fit resident and
stream the rest from pinned RAM, copied ahead of use on a side stream.

diffusers' group offloading moves every block on every forward and waits on the host at each block, so
the GPU idles while Python catches up. Here:
- as many blocks as the budget allows stay on the GPU, the largest first (they need the most transfer
  per unit of compute) and spread over the stack, so each streamed block has more compute to hide behind;
- each streamed block is one contiguous pinned buffer, copied with one memcpy into a ring of
  preallocated GPU slots, `lookahead` blocks ahead, wrapping into the next forward;
- copies and compute are ordered by CUDA events only: the CPU never waits for the GPU;
- a step the step cache skips does not move any weights (the `skip` predicate).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

log = logging.getLogger("framepack.block_stream")

ALIGN = 512  # bytes; keeps every tensor view aligned for any dtype and vectorised kernels
GB = 1024**3


@dataclass
class _Tensor:
    module: torch.nn.Module
    name: str
    is_buffer: bool
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Block:
    index: int
    module: torch.nn.Module
    tensors: list[_Tensor]
    nbytes: int
    cpu: torch.Tensor | None = None  # flat uint8 copy of every weight, pinned where possible
    gpu: torch.Tensor | None = None  # flat copy when resident
    slot: int | None = None  # ring slot holding a streamed copy
    ready: object = None  # event: the copy into `slot` finished
    views: dict = field(default_factory=dict)  # slot -> tensor views, built once


def _layout(block: torch.nn.Module) -> tuple[list[_Tensor], int]:
    tensors, offset = [], 0
    for module in block.modules():
        for is_buffer, table in ((False, module._parameters), (True, module._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                tensors.append(_Tensor(module, name, is_buffer, offset, t.dtype, t.shape))
                offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return tensors, offset


def _views(flat: torch.Tensor, tensors: list[_Tensor]) -> list[torch.Tensor]:
    return [flat[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in tensors]


def _bind(tensors: list[_Tensor], views: list[torch.Tensor]) -> None:
    for t, v in zip(tensors, views):
        if t.is_buffer:
            t.module._buffers[t.name] = v
        else:
            t.module._parameters[t.name].data = v


def _pin(flat: torch.Tensor) -> bool:
    """Page-lock an existing buffer (cudaHostRegister): unlike pin_memory(), no rounding up to a power of
    two, so pinning the 26 GB transformer costs 26 GB of RAM, not up to twice that."""
    err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
    return err == torch.cuda.cudart().cudaError.success


def spread(count: int, total: int) -> list[int]:
    """`count` indices out of `total`, evenly spaced."""
    if count <= 0:
        return []
    return sorted({min(total - 1, (2 * i + 1) * total // (2 * count)) for i in range(count)})


def plan_resident(sizes: list[int], budget: int, slots: int, cap: int | None = None) -> set[int]:
    """The resident set for a budget that must also hold the ring of `slots` slots, each as large as the
    largest streamed block: streaming only small blocks needs a smaller ring, leaving room for more.
    `cap` bounds the resident bytes alone."""
    cap = budget if cap is None else cap
    if sum(sizes) <= min(budget, cap):
        return set(range(len(sizes)))
    best: set[int] = set()
    for slot_size in sorted(set(sizes)):
        chosen = choose_resident(sizes, min(budget - slots * slot_size, cap))
        streamed_max = max((s for i, s in enumerate(sizes) if i not in chosen), default=0)
        if streamed_max <= slot_size and sum(sizes[i] for i in chosen) > sum(sizes[i] for i in best):
            best = chosen
    return best


def choose_resident(sizes: list[int], budget: int) -> set[int]:
    """Which blocks stay on the GPU within `budget` bytes: largest blocks first, evenly spread."""
    chosen: set[int] = set()
    for size in sorted(set(sizes), reverse=True):
        same = [i for i, s in enumerate(sizes) if s == size]
        take = min(len(same), max(0, budget) // size) if size else len(same)
        chosen.update(same[j] for j in spread(take, len(same)))
        budget -= take * size
    return chosen


class BlockStreamer:
    """Owns where the blocks' weights live. `activate(budget)` before running, `release()` to hand the
    GPU to another model, `close()` to give the model back as an ordinary CPU module."""

    def __init__(self, model: torch.nn.Module, block_lists: list[torch.nn.ModuleList], device: torch.device,
                 lookahead: int = 2, pin: bool = True, skip=None, workers: int = 8):
        self.model, self.device = model, torch.device(device)
        self.skip = skip
        self.cuda = self.device.type == "cuda"
        modules = [b for blocks in block_lists for b in blocks]
        self._block_lists = block_lists
        self.blocks: list[_Block] = []
        for i, module in enumerate(modules):
            tensors, nbytes = _layout(module)
            self.blocks.append(_Block(i, module, tensors, nbytes))
        self.slots_n = lookahead + 1
        self.slots: list[torch.Tensor] = []
        self._slot_owner: list[int | None] = []
        self._slot_free: list[object] = []
        self._next_slot = 0
        self._streamed: list[int] = []  # block indices streamed, in execution order
        self._position: dict[int, int] = {}
        self.active = False
        self._bound: _Block | None = None  # the streamed block running now: its tensors point into a slot
        self.pinned = False
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.bytes_copied = 0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:  # copies and page-locking release the GIL
            pinned = list(pool.map(lambda b: self._to_flat_cpu(b, pin and self.cuda), self.blocks))
        self.pinned = bool(pinned) and all(pinned)
        self.setup_s = time.perf_counter() - t0
        self._registered = [b.cpu for b, p in zip(self.blocks, pinned) if p]
        for part in self._other_parts():
            part.to("cpu")
        self._hooks = []
        for block in self.blocks:
            self._hooks.append(block.module.register_forward_pre_hook(lambda m, a, b=block: self._before(b)))
            self._hooks.append(block.module.register_forward_hook(lambda m, a, o, b=block: self._after(b)))
        log.info("Streaming %d transformer blocks (%.1f GB) from %s RAM; set-up %.1f s", len(self.blocks),
                 self.total_bytes / GB, "pinned" if self.pinned else "pageable", self.setup_s)

    # -- set-up --------------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def resident_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if b.gpu is not None)

    @property
    def gpu_bytes(self) -> int:
        """What this model holds on the GPU now."""
        if not self.active:
            return 0
        return self.resident_bytes + sum(s.numel() for s in self.slots) + self.non_block_bytes()

    @property
    def resident_count(self) -> int:
        return sum(b.gpu is not None for b in self.blocks)

    def _to_flat_cpu(self, block: _Block, pin: bool) -> bool:
        flat = torch.empty(block.nbytes, dtype=torch.uint8)
        views = _views(flat, block.tensors)
        for t, v in zip(block.tensors, views):
            src = t.module._buffers[t.name] if t.is_buffer else t.module._parameters[t.name]
            v.copy_(src.detach())
        block.cpu = flat
        _bind(block.tensors, views)
        block.views["cpu"] = views
        return _pin(flat) if pin else False

    def _other_parts(self):
        """Everything outside the block lists (embedders, norms, output projection): small, always moved
        whole."""
        lists = {id(blocks) for blocks in self._block_lists}
        return [child for child in self.model.children() if id(child) not in lists]

    def non_block_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for part in self._other_parts() for p in part.parameters())

    # -- placement -----------------------------------------------------------------------------------

    def activate(self, budget_bytes: int, max_resident: int | None = None) -> int:
        """Put the non-block parts and the ring of slots on the GPU, then keep resident the blocks that fit
        in what is left of `budget_bytes` (and at most `max_resident` bytes of them). Returns the number
        of resident blocks."""
        for part in self._other_parts():
            part.to(self.device)
        self._unbind_current()
        resident = plan_resident([b.nbytes for b in self.blocks], budget_bytes - self.non_block_bytes(),
                                 self.slots_n, max_resident)
        if self.cuda:
            self.copy_stream.synchronize()
        for block in self.blocks:  # drop first, so the copies below have the room
            if block.index not in resident and block.gpu is not None:
                block.gpu = None
                _bind(block.tensors, block.views["cpu"])
        for block in self.blocks:
            if block.index in resident and block.gpu is None:
                block.gpu = block.cpu.to(self.device, non_blocking=self.pinned)
                _bind(block.tensors, _views(block.gpu, block.tensors))
        self._streamed = [b.index for b in self.blocks if b.gpu is None]
        self._position = {i: k for k, i in enumerate(self._streamed)}
        self._make_slots()
        self.active = True
        log.info("Transformer blocks: %d resident on %s (%.1f GB), %d streamed through %d slots (%.1f GB)",
                 self.resident_count, self.device, self.resident_bytes / GB, len(self._streamed),
                 len(self.slots), sum(s.numel() for s in self.slots) / GB)
        return self.resident_count

    def _make_slots(self) -> None:
        need = max((self.blocks[i].nbytes for i in self._streamed), default=0)
        count = self.slots_n if self._streamed else 0
        if len(self.slots) == count and all(s.numel() >= need for s in self.slots):
            return
        self._free_slots()
        self.slots = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(count)]
        self._slot_owner = [None] * count
        self._slot_free = [None] * count
        self._next_slot = 0

    def _free_slots(self) -> None:
        if self.cuda:
            self.copy_stream.synchronize()  # a prefetch may still be writing into a slot
        for block in self.blocks:
            block.slot, block.ready = None, None
            block.views = {"cpu": block.views["cpu"]}
        self.slots, self._slot_owner, self._slot_free = [], [], []

    def release(self) -> None:
        """Give the GPU back: resident copies and slots dropped (the pinned copies stay), the non-block
        parts moved to the CPU."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self._unbind_current()
        for block in self.blocks:
            block.gpu = None
            _bind(block.tensors, block.views["cpu"])
        self._free_slots()
        for part in self._other_parts():
            part.to("cpu")
        self.active = False

    def close(self, keep_usable: bool = True) -> None:
        """Remove the hooks and unpin; the model stays usable as an ordinary CPU module (`keep_usable=False`: the
        model is about to be dropped, so its weights are not copied out of the flat buffers)."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for flat in self._registered:
            torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())
        if keep_usable:
            for block in self.blocks:  # own storage again, so nothing points into unpinned buffers
                _bind(block.tensors, [v.clone() for v in block.views["cpu"]])
        self._registered = []

    # -- running -------------------------------------------------------------------------------------

    def _load(self, block: _Block) -> bool:
        """Queue the copy of `block` into the next ring slot; False if that slot is in use right now."""
        s = self._next_slot
        owner = self._slot_owner[s]
        if owner is not None:
            old = self.blocks[owner]
            if old is self._bound:
                return False
            old.slot, old.ready = None, None
        self._next_slot = (s + 1) % len(self.slots)
        dst = self.slots[s][:block.nbytes]
        if self.cuda:
            if self._slot_free[s] is not None:
                self.copy_stream.wait_event(self._slot_free[s])
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(block.cpu, non_blocking=self.pinned)
                block.ready = torch.cuda.Event()
                block.ready.record(self.copy_stream)
        else:
            dst.copy_(block.cpu)
        self._slot_owner[s] = block.index
        block.slot = s
        self.bytes_copied += block.nbytes
        return True

    def _unbind_current(self) -> None:
        """Point the running block's tensors back at their pinned copies: after its forward, or before
        another block starts when its forward raised (an OOM, say), since blocks run one at a time."""
        block, self._bound = self._bound, None
        if block is not None:
            _bind(block.tensors, block.views["cpu"])

    @torch.compiler.disable  # runs around a compiled block: streams and events stay eager
    def _before(self, block: _Block) -> None:
        if block.gpu is not None:
            return
        if not self.active:
            raise RuntimeError("the transformer's blocks are not placed: call activate() before running it")
        if self.skip is not None and block is not self.blocks[0] and self.skip():
            return  # the step cache reuses cached output: this block's weights are not read
        self._unbind_current()
        if block.slot is None:
            self._load(block)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(block.ready)
        if block.slot not in block.views:
            block.views[block.slot] = _views(self.slots[block.slot], block.tensors)
        _bind(block.tensors, block.views[block.slot])
        self._bound = block
        pos = self._position[block.index]
        for k in range(1, len(self.slots)):
            ahead = self.blocks[self._streamed[(pos + k) % len(self._streamed)]]
            if ahead is block:
                break
            if ahead.slot is None and not self._load(ahead):
                break

    @torch.compiler.disable
    def _after(self, block: _Block) -> None:
        if block is not self._bound:
            return
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._slot_free[block.slot] = event
        self._unbind_current()
