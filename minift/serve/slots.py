"""The adapter cache: a fixed number of device slots, filled from host memory, evicted LRU.

S-LoRA (Sheng et al. 2023; lecture 004, "Unified Paging") keeps every adapter in host memory
and only the ones the running batches need in GPU memory, moving them in on demand and evicting
the least recently used when room runs out. Here the device side is ``n_slots`` slots per
adapted layer: ``A_stack`` (S, R, d_in) and ``B_stack`` (S, d_out, R), plus one scale per slot.
With ``backend=cupy`` these are GPU arrays and a load is a host-to-device copy; with NumPy
both sides are host memory, but the bookkeeping and the copies are the same.

Eviction moves nothing back: adapters are read-only while serving, so the host copy in the
library is always current and an evicted slot is simply overwritten by the next load.

Unloading (``forget``) frees a slot, but not under rows still running with it: until no running
row pins the name, its slot is *retired* (kept as it is, given to nobody), so those rows finish
with the weights they started with and a newly loaded adapter never lands under them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

from minift.backend import xp
from minift.serve.library import Adapter, AdapterError, AdapterLibrary
from minift.serve.multi_lora import NO_ADAPTER, MultiLoraLinear


class SlotBudgetError(ValueError):
    """One batch asked for more distinct adapters than there are device slots."""


@dataclass
class CacheStats:
    """Counted per distinct adapter per batch: a hit found it in a slot, a miss loaded it."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_moved: int = 0  # host -> device bytes of A and B (the padding is zero-filled on the device)

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterSlots:
    """``n_slots`` device slots shared by all wrapped layers, managed least-recently-used."""

    def __init__(self, library: AdapterLibrary, layers: dict[str, MultiLoraLinear], n_slots: int,
                 max_rank: int | None = None):
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")
        self.library, self.layers, self.n_slots = library, layers, n_slots
        self.rank = max_rank or library.max_rank()
        for adapter in library.adapters.values():
            self.check_fits(adapter)
        dtype = library.model.dtype
        self.scales = xp.zeros(n_slots, dtype=dtype)  # (S,), shared by every layer
        for layer in layers.values():
            d_out, d_in = layer.shape
            layer.A_stack = xp.zeros((n_slots, self.rank, d_in), dtype=dtype)
            layer.B_stack = xp.zeros((n_slots, d_out, self.rank), dtype=dtype)
            layer.scales = self.scales
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self.retired: dict[str, int] = {}  # name -> slot of an unloaded adapter rows may still use
        self.stats = CacheStats()

    @property
    def slot_bytes(self) -> int:
        """Device bytes the slots take, whatever they hold (the fixed budget)."""
        return sum(layer.A_stack.nbytes + layer.B_stack.nbytes for layer in self.layers.values())

    def acquire(self, names, pinned=()) -> list[int]:
        """Slot index per entry of ``names`` (None -> ``NO_ADAPTER``), loading what is missing.

        Adapters needed by this batch are never evicted to make room for each other, nor are the
        ``pinned`` ones (those of rows already running, under continuous batching), so a batch
        with more distinct adapters than slots cannot run: the engine splits it first.
        """
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        held = set(wanted) | (set(pinned) - {None})
        self.retired = {n: slot for n, slot in self.retired.items() if n in held}  # no row uses the rest
        needed = len(set(wanted) | (held & set(self.resident))) + len(self.retired)
        if needed > self.n_slots:
            raise SlotBudgetError(f"a batch needs {needed} distinct adapter slots but there are only "
                                  f"{self.n_slots}; split the batch")
        for name in wanted:
            self.check_fits(self.library[name])  # before any slot changes hands
        for name in wanted:
            if name in self.resident:
                self.stats.hits += 1
                self.resident.move_to_end(name)
            else:
                self.stats.misses += 1
                self.resident[name] = self._free_slot(keep=held)
                self._load(self.library[name], self.resident[name])
        return [NO_ADAPTER if n is None else self.resident[n] for n in names]

    def forget(self, name: str) -> None:
        """``name`` was unloaded: its slot is free once no running row pins it (see the module's
        docstring); an adapter loaded later under the same name is loaded afresh."""
        if name in self.resident:
            self.retired[name] = self.resident.pop(name)

    def _free_slot(self, keep: set[str]) -> int:
        """An empty slot, or the slot of the least recently used adapter not in ``keep``."""
        used = set(self.resident.values()) | set(self.retired.values())
        for slot in range(self.n_slots):
            if slot not in used:
                return slot
        victim = next(n for n in self.resident if n not in keep)
        self.stats.evictions += 1
        return self.resident.pop(victim)

    def check_fits(self, adapter: Adapter) -> None:
        """Rank at most the slot rank, and only layers that were wrapped: true of every adapter
        present when the slots were made, checked again for one added later (at runtime)."""
        if adapter.rank > self.rank:
            raise AdapterError(f"adapter {adapter.name!r} does not fit the slots: rank {adapter.rank} is over the "
                               f"slot rank {self.rank} of this server; restart it with --max-lora-rank "
                               f"{adapter.rank} or more")
        unwrapped = sorted(set(adapter.weights) - set(self.layers))
        if unwrapped:
            raise AdapterError(f"adapter {adapter.name!r} does not fit the slots: it adapts {unwrapped[0]!r} "
                               f"(and {len(unwrapped) - 1} more), which was not wrapped for serving at start-up; "
                               "restart the server with it, or with --allow-runtime-lora (which wraps every "
                               "projection)")

    def _load(self, adapter: Adapter, slot: int) -> None:
        """Copy ``adapter`` into ``slot`` of every layer; layers it does not adapt get zeros."""
        self.scales[slot] = adapter.scale
        for module, layer in self.layers.items():
            layer.A_stack[slot] = 0
            layer.B_stack[slot] = 0
            if module in adapter.weights:
                a, b = adapter.weights[module]
                layer.A_stack[slot, : adapter.rank] = xp.asarray(a)  # rows beyond the rank stay 0
                layer.B_stack[slot, :, : adapter.rank] = xp.asarray(b)  # columns beyond it stay 0
        self.stats.bytes_moved += adapter.nbytes
