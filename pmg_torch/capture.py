"""Collect one layer's embeddings per class from a model's forward passes, with bounded memory.

:class:`EmbeddingCapture` registers a single hook on one module. Before each forward the caller hands it the
batch's labels with :meth:`EmbeddingCapture.set_labels`; the hook then files every row of the hooked tensor under
its label. Each class keeps at most ``max_per_class`` rows, chosen by reservoir sampling, so memory is bounded by
``classes * max_per_class * D * 4`` bytes however many batches pass through.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._validation import check_choice, check_positive_int

#: Maximum number of layer names an error message lists before it summarises the rest as "and N more".
MAX_LISTED_NAMES = 30

#: Classes that share one storage tensor. A batch's rows go in with one indexed copy per block that it touches, and a
#: new class or a fuller class grows only its own block.
CLASSES_PER_BLOCK = 32

#: Labels in ``[0, LABEL_TABLE_SIZE)`` are mapped to storage indices through a lookup table. Other labels, negative or
#: larger, take a slower path through ``numpy.unique`` on every batch.
LABEL_TABLE_SIZE = 1 << 16

#: Values of the ``on_error`` argument of :class:`EmbeddingCapture`.
ON_ERROR_CHOICES = ("raise", "stop")


class EmbeddingCapture:
    """Record the rows of one layer's tensor per class label, keeping a uniform sample of at most ``max_per_class``.

    Which tensor is recorded:

    * ``layer=None``: the input of the last ``nn.Linear`` in ``model.modules()`` order, through a forward pre-hook.
      For a classifier this is the penultimate representation.
    * ``layer="name"``: the output of the module with that dotted name in ``model.named_modules()``, through a
      forward hook. ``""`` names ``model`` itself.
    * ``layer=module``: the output of that module, which must be inside ``model``.

    A tuple or list output contributes its first tensor, and a mapping output its first tensor value. A tensor of
    more than two dimensions is flattened to ``(B, -1)``, so a ``(B, C, H, W)`` feature map becomes ``(B, C*H*W)``
    rows and a ``(B, T, D)`` sequence becomes ``(B, T*D)`` rows. A 1-D output of shape ``(B,)`` becomes ``(B, 1)``.

    Sampling is Algorithm R per class: the first ``max_per_class`` rows of a class are kept, and the ``t``-th row
    after them (0-based count ``t`` of rows seen) replaces a uniformly chosen kept row with probability
    ``max_per_class / (t + 1)``. Every row seen is then kept with the same probability. A batch is processed with
    one vectorised draw for all its classes, by :func:`reservoir_update`. When several rows of a batch pick the same
    slot, the last one wins, because the row-by-row algorithm would overwrite the earlier ones. The labels move to
    the host once per batch, the draws come from a seeded NumPy generator there, and only the chosen rows are
    indexed on the hooked tensor's device. Rows therefore never leave that device, and the same seed picks the same
    rows on CPU and GPU.

    Rows are stored in blocks of :data:`CLASSES_PER_BLOCK` classes, one float32 tensor of shape
    ``(classes, capacity, D)`` per block, so a batch is written with one indexed copy per block it touches. A
    block's capacity is at least the largest row count of its classes: it doubles as they fill, and jumps to
    ``max_per_class`` once it would pass a quarter of that. A block therefore reserves room that classes smaller
    than ``max_per_class`` never use, but never more than ``max_per_class`` rows per class.

    NOTE: a module that runs more than once per forward, such as a shared block, fires the hook each time. The
    second call finds no labels and fails, so choose a layer that runs once per forward.

    A forward whose rows cannot be recorded (no labels were set, the row count differs from the label count, the
    width changed, or the layer gave no tensor) raises from the hook by default. With ``on_error="stop"`` the hook
    instead keeps the exception in :attr:`error`, removes itself and lets the forward finish, so that a monitor
    never ends the run it watches.

    Args:
        model: the network to watch.
        layer: a dotted module name, a module inside ``model``, or ``None`` for the input of the last ``nn.Linear``.
        max_per_class: most rows kept per class.
        seed: seed of the sampling generator. :meth:`reset` restarts it, so every epoch samples alike.
        on_error: ``"raise"`` or ``"stop"``, what a forward whose rows cannot be recorded does; see above.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``layer`` is neither a name, a module nor ``None``, or
            ``seed`` is not an int.
        ValueError: if ``layer`` names no module of ``model``, the module is not inside ``model``, ``layer`` is
            ``None`` and ``model`` has no ``nn.Linear``, ``max_per_class < 1``, ``seed < 0`` or ``on_error`` is
            unknown.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with EmbeddingCapture(model, max_per_class=10) as capture:
        ...     capture.set_labels(torch.tensor([0, 1, 1]))
        ...     _ = model(torch.randn(3, 4))
        >>> {label: tuple(rows.shape) for label, rows in capture.embeddings.items()}
        {0: (1, 3), 1: (2, 3)}
        >>> capture.layer_name
        '2'
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        max_per_class: int = 1000,
        *,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
        self.max_per_class = check_positive_int(max_per_class, "max_per_class")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an int, got {type(seed).__name__} ({seed!r}).")
        if seed < 0:
            raise ValueError(f"Expected `seed` to be at least 0, got {seed}.")
        self.on_error = check_choice(on_error, "on_error", ON_ERROR_CHOICES)
        self.model = model
        self.seed = seed
        self.layer_name, self.module, self.captures_input = _resolve_layer(model, layer)
        #: Why recording stopped, with ``on_error="stop"`` or after :meth:`stop`; ``None`` while it runs.
        self.error: Exception | None = None
        self._handle: RemovableHandle | None = None
        self._pending_labels: Tensor | None = None
        self._pending_keep: Tensor | None = None
        self._width: int | None = None
        self.reset()

    # -- hook life cycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> EmbeddingCapture:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        """Whether the hook is registered."""
        return self._handle is not None

    def attach(self) -> None:
        """Register the hook on the chosen module. Calling it while attached does nothing."""
        if self._handle is not None:
            return
        if self.captures_input:
            self._handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = self.module.register_forward_hook(self._forward_hook)

    def remove(self) -> None:
        """Remove the hook and drop labels no forward has used yet. Stored rows stay. Safe to call repeatedly."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending_labels = None
        self._pending_keep = None

    def stop(self, error: Exception) -> None:
        """Remove the hook and keep ``error`` in :attr:`error` as the reason recording stopped. Stored rows stay."""
        self.error = error
        self.remove()

    # -- data ------------------------------------------------------------------------------------------------------

    def set_labels(self, labels: Tensor | Sequence[int], keep: Tensor | None = None) -> None:
        """Set the class labels of the next forward's batch, one per row.

        One forward consumes them, so call this before every forward.

        Args:
            labels: ``(B,)`` integer class labels, on any device.
            keep: ``(B,)`` bool, which rows to record; the others are dropped before sampling and not counted in
                :attr:`n_seen`. ``None`` records every row. A distributed sampler's padding is one use.

        Raises:
            TypeError: if ``labels`` are not integers, or ``keep`` is not a bool tensor.
            ValueError: if ``labels`` are not one-dimensional, or ``keep`` does not have their shape.
        """
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"Expected integer class labels, got dtype {labels.dtype}. Convert them with `labels.long()`."
            )
        if labels.ndim != 1:
            hint = " For one-hot or probability targets pass `labels.argmax(dim=1)`." if labels.ndim == 2 else ""
            raise ValueError(f"Expected labels of shape (B,), got shape {tuple(labels.shape)}.{hint}")
        if keep is not None:
            if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
                described = keep.dtype if isinstance(keep, Tensor) else type(keep).__name__
                raise TypeError(f"Expected `keep` to be a bool tensor, got {described}.")
            if keep.shape != labels.shape:
                raise ValueError(
                    f"Expected `keep` of shape {tuple(labels.shape)}, one flag per label, got {tuple(keep.shape)}."
                )
            keep = keep.detach().cpu()
        self._pending_labels = labels.detach()
        self._pending_keep = keep

    def reset(self) -> None:
        """Forget every stored row and count, and restart the sampling generator. The hook stays as it is."""
        self._width = None
        self._class_of_label: dict[int, int] = {}
        self._labels: list[int] = []
        # Storage index of each label below LABEL_TABLE_SIZE that has been seen, -1 for the others.
        self._label_table = np.full(0, -1, dtype=np.int64)
        self._n_seen_counts = np.zeros(0, dtype=np.int64)
        self._blocks: list[Tensor] = []
        # Created at the first draw, because seeding it costs more than a whole batch of a short validation run.
        self._generator: np.random.Generator | None = None

    def _uniforms(self, n: int) -> np.ndarray:
        """Return ``n`` uniform float64 draws in ``[0, 1)`` from the seeded generator."""
        if self._generator is None:
            self._generator = np.random.Generator(np.random.PCG64(self.seed))
        return self._generator.random(n)

    @property
    def embeddings(self) -> dict[int, Tensor]:
        """Stored rows per class label, sorted by label: ``(m_c, D)`` float32, detached, on the hooked device.

        The tensors are views of the live buffers, which later forwards overwrite in place; clone them to keep a
        snapshot.
        """
        stored = {}
        for label in sorted(self._class_of_label):
            index = self._class_of_label[label]
            block, row = divmod(index, CLASSES_PER_BLOCK)
            stored[label] = self._blocks[block][row, : min(int(self._n_seen_counts[index]), self.max_per_class)]
        return stored

    @property
    def n_seen(self) -> dict[int, int]:
        """Rows seen per class label since the last reset, before sampling, sorted by label."""
        return {label: int(self._n_seen_counts[self._class_of_label[label]]) for label in sorted(self._class_of_label)}

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._record_or_stop(args, "input")

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._record_or_stop(output, "output")

    def _record_or_stop(self, hooked: Any, role: str) -> None:
        try:
            self._record(_first_tensor(hooked, f"the {role} of layer {self.layer_name!r}"))
        except (TypeError, ValueError) as error:
            if self.on_error == "raise":
                raise
            # PyTorch iterates over a copy of the module's hooks, so removing this one inside it is safe.
            self.stop(error)

    @torch.no_grad()
    def _record(self, hooked: Tensor) -> None:
        labels, keep = self._pending_labels, self._pending_keep
        self._pending_labels, self._pending_keep = None, None
        if labels is None:
            raise ValueError(
                f"EmbeddingCapture on layer {self.layer_name!r} saw a forward without labels: "
                "call set_labels(y) before each forward."
            )
        rows = _as_rows(hooked.detach(), self.layer_name)
        if rows.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Layer {self.layer_name!r} produced {rows.shape[0]} rows but set_labels got {labels.shape[0]} "
                "labels; they must describe the same batch."
            )
        if self._width is not None and rows.shape[1] != self._width:
            raise ValueError(
                f"Layer {self.layer_name!r} produced rows of width {rows.shape[1]} after rows of width "
                f"{self._width}; every batch must give the same number of features. Call reset() to start over."
            )
        self._width = rows.shape[1]
        # The only transfer of the batch's labels to the host: the sampling decisions are made there.
        host_labels = labels.to("cpu", torch.long).numpy()
        positions = None
        if keep is not None:
            positions = np.flatnonzero(keep.numpy())
            host_labels = host_labels[positions]
        if host_labels.size:
            self._add_batch(rows, host_labels, positions)

    def _add_batch(self, rows: Tensor, labels: np.ndarray, positions: np.ndarray | None) -> None:
        """File ``rows[positions]`` (every row when ``positions`` is ``None``) under ``labels``, one per row."""
        classes, batch_counts = self._storage_indices(labels)
        sources, write_classes, slots = reservoir_update(
            self._n_seen_counts, classes, self.max_per_class, self._uniforms
        )
        self._n_seen_counts += batch_counts
        if sources.size == 0:
            return
        if positions is not None:
            sources = positions[sources]
        if len(self._labels) <= CLASSES_PER_BLOCK:
            # The common case of at most CLASSES_PER_BLOCK classes: one block, one copy, no split of the writes.
            self._fit_blocks(range(1), rows)
            self._write_block(0, rows, sources, write_classes, slots)
            return
        blocks = write_classes // CLASSES_PER_BLOCK
        touched = range(int(blocks[0]), int(blocks[-1]) + 1)
        self._fit_blocks(touched, rows)
        # Writes come sorted by class, so each block's writes are one contiguous run.
        bounds = np.searchsorted(blocks, np.arange(touched.start, touched.stop + 1))
        for block, start, stop in zip(touched, bounds[:-1], bounds[1:], strict=True):
            if stop > start:
                self._write_block(block, rows, sources[start:stop], write_classes[start:stop], slots[start:stop])

    def _write_block(
        self, block: int, rows: Tensor, sources: np.ndarray, classes: np.ndarray, slots: np.ndarray
    ) -> None:
        """Copy ``rows[sources]`` into slots ``slots`` of the storage classes ``classes`` of block ``block``."""
        storage = self._blocks[block]
        targets = (classes - block * CLASSES_PER_BLOCK) * storage.shape[1] + slots
        every_row = sources.size == rows.shape[0]
        if every_row:
            # Every row of the batch is written once, as while the reservoirs fill, so the rows are copied in batch
            # order without first gathering them.
            in_batch_order = np.empty_like(targets)
            in_batch_order[sources] = targets
            targets = in_batch_order
        # Assigning to the storage copies, so it never keeps the activation (or its autograd graph) alive.
        if rows.device.type == "cpu" and rows.dtype == torch.float32 and storage.device.type == "cpu":
            # NumPy copies whole rows where torch's CPU index_copy_ goes element by element, which was 2 to 3 times
            # slower on 256 x 512 float32 batches (torch 2.13, numpy 2.4, a 2-core Xeon VM).
            flat = storage.view(-1, storage.shape[2]).numpy()
            flat[targets] = rows.numpy() if every_row else rows.numpy()[sources]
            return
        chosen = rows
        if not every_row:
            chosen = rows.index_select(0, torch.from_numpy(sources).to(rows.device))
        chosen = chosen.to(storage.device, torch.float32)
        storage.view(-1, storage.shape[2]).index_copy_(0, torch.from_numpy(targets).to(storage.device), chosen)

    def _storage_indices(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the storage index of each label and the row count of each storage index in the batch.

        Labels not seen before get the next free storage indices.
        """
        table = self._label_table
        # Viewed as unsigned, a negative label is huge, so one maximum checks both ends of the table's range.
        if labels.view(np.uint64).max() < table.size:
            indices = table[labels]
            try:
                # An unseen label maps to -1, for which bincount raises.
                return indices, np.bincount(indices, minlength=len(self._labels))
            except ValueError:
                pass
        indices = self._register(labels)
        return indices, np.bincount(indices, minlength=len(self._labels))

    def _register(self, labels: np.ndarray) -> np.ndarray:
        """Give storage indices to the labels not seen before and return the storage index of each label."""
        table = self._label_table
        present, inverse = np.unique(labels, return_inverse=True)
        new = [label for label in present.tolist() if label not in self._class_of_label]
        for label in new:
            self._class_of_label[label] = len(self._labels)
            self._labels.append(label)
        self._n_seen_counts = np.concatenate([self._n_seen_counts, np.zeros(len(new), dtype=np.int64)])
        in_range = [label for label in new if 0 <= label < LABEL_TABLE_SIZE]
        if in_range:
            if max(in_range) >= table.size:
                table = np.concatenate([table, np.full(max(in_range) + 1 - table.size, -1, dtype=np.int64)])
            table[in_range] = [self._class_of_label[label] for label in in_range]
            self._label_table = table
        present_indices = np.array([self._class_of_label[label] for label in present.tolist()], dtype=np.int64)
        return present_indices[inverse.reshape(-1)]

    def _fit_blocks(self, touched: range, like: Tensor) -> None:
        """Grow the blocks in ``touched`` to hold all their classes and the rows those classes have filled.

        A block's capacity at least doubles when it grows, so filling a class copies each row a bounded number of
        times, and never exceeds ``max_per_class``.
        """
        n_classes = len(self._labels)
        for block in touched:
            first = block * CLASSES_PER_BLOCK
            n_block_classes = min(CLASSES_PER_BLOCK, n_classes - first)
            storage = self._blocks[block] if block < len(self._blocks) else None
            if storage is not None and storage.shape[:2] == (n_block_classes, self.max_per_class):
                continue
            needed = min(int(self._n_seen_counts[first : first + n_block_classes].max()), self.max_per_class)
            if storage is not None and storage.shape[0] == n_block_classes and storage.shape[1] >= needed:
                continue
            old_classes, old_capacity = (0, 0) if storage is None else tuple(storage.shape[:2])
            capacity = old_capacity
            if needed > old_capacity:
                capacity = max(needed, 2 * old_capacity)
                if 4 * capacity > self.max_per_class:
                    # Past a quarter of max_per_class, grow straight to it. Growing keeps the old and the new tensor
                    # at once, so the last growth then needs at most 1.25 times the final block, not nearly twice.
                    capacity = self.max_per_class
            device = like.device if storage is None else storage.device
            grown = torch.empty((n_block_classes, capacity, like.shape[1]), dtype=torch.float32, device=device)
            if storage is None:
                self._blocks.append(grown)
                continue
            grown[:old_classes, :old_capacity] = storage
            self._blocks[block] = grown


def reservoir_update(
    n_seen: np.ndarray, classes: np.ndarray, capacity: int, uniforms: Callable[[int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run Algorithm R on one batch whose rows belong to several classes, each with a reservoir of ``capacity`` rows.

    Row ``i`` of the batch is row ``t_i`` (0-based) of its class ``c_i``, counting the ``n_seen[c_i]`` rows of earlier
    batches and the rows of ``c_i`` before it in this batch. It goes to slot ``t_i`` while ``t_i < capacity``.
    After that it draws ``j`` uniformly from ``0 .. t_i`` and goes to slot ``j`` when ``j < capacity``, so every row
    offered stays with probability ``capacity / (rows offered)``. When several rows pick the same slot of a class,
    only the last of them is returned, because the row-by-row algorithm would overwrite the earlier ones.

    Args:
        n_seen: ``(C,)`` int64, rows each class was offered before this batch. It is not changed.
        classes: ``(B,)`` int64 class of each row, an index into ``n_seen``, in batch order.
        capacity: the size of each reservoir.
        uniforms: returns ``n`` uniform float64 draws in ``[0, 1)``, such as ``numpy.random.Generator.random``.
            It is called once, for one draw per row of the batch, unless every row fills a free slot.

    Returns:
        ``(sources, write_classes, slots)``, int64 arrays sorted by class and then by slot: row ``sources[i]`` of the
        batch goes to slot ``slots[i]`` of class ``write_classes[i]``. No ``(class, slot)`` pair repeats.
    """
    n_rows = classes.size
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    # A row's rank among the rows of its class in this batch: its sorted position minus that of its class's first row.
    counts = n_seen[sorted_classes] + (np.arange(n_rows) - np.searchsorted(sorted_classes, sorted_classes))
    if n_rows == 0 or counts.max() < capacity:
        # Every row fills a free slot of its own, already in class and slot order, and no draw is needed.
        return order, sorted_classes, counts
    draws = np.floor(uniforms(n_rows) * (counts + 1)).astype(np.int64)
    # Rounding of the float64 product could give counts + 1, one past the largest allowed draw.
    np.minimum(draws, counts, out=draws)
    slots = np.where(counts < capacity, counts, draws)
    accepted = np.flatnonzero(slots < capacity)
    sources, write_classes, slots = order[accepted], sorted_classes[accepted], slots[accepted]
    keys = write_classes * capacity + slots
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    # The stable sort keeps batch order among equal keys, so the last row of each run of equal keys is the one kept.
    last = np.ones(sorted_keys.size, dtype=bool)
    last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    winners = by_key[last]
    return sources[winners], write_classes[winners], slots[winners]


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module, bool]:
    """Return ``(name, module, captures_input)`` for the ``layer`` argument of :class:`EmbeddingCapture`."""
    named = dict(model.named_modules())
    if layer is None:
        linear_names = [name for name, module in named.items() if isinstance(module, nn.Linear)]
        if not linear_names:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear, so `layer=None` has nothing to hook. Pass `layer` as one "
                f"of its module names: {_list_names(named)}."
            )
        return linear_names[-1], named[linear_names[-1]], True
    if isinstance(layer, str):
        if layer not in named:
            close = difflib.get_close_matches(layer, [name for name in named if name], n=5, cutoff=0.5)
            hint = f" Closest matches: {', '.join(repr(name) for name in close)}." if close else ""
            raise ValueError(
                f"Layer {layer!r} not found in {type(model).__name__}.{hint} Valid layer names: {_list_names(named)}."
            )
        return layer, named[layer], False
    if isinstance(layer, nn.Module):
        for name, module in named.items():
            if module is layer:
                return name, module, False
        raise ValueError(
            f"The {type(layer).__name__} passed as `layer` is not a submodule of {type(model).__name__}; pass a "
            f"module inside the model or one of its names: {_list_names(named)}."
        )
    raise TypeError(f"Expected `layer` to be a module name, an nn.Module or None, got {type(layer).__name__}.")


def _list_names(named: Mapping[str, nn.Module]) -> str:
    names = [repr(name) for name in named if name]
    if not names:
        return "(the model has no submodules; pass layer='' to record its output)"
    listed = ", ".join(names[:MAX_LISTED_NAMES])
    if len(names) > MAX_LISTED_NAMES:
        listed += f" and {len(names) - MAX_LISTED_NAMES} more"
    return listed


def _iter_tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        yield from (item for item in value.values() if isinstance(item, Tensor))
    elif isinstance(value, (tuple, list)):
        yield from (item for item in value if isinstance(item, Tensor))


def _first_tensor(value: Any, what: str) -> Tensor:
    for tensor in _iter_tensors(value):
        return tensor
    raise TypeError(f"Expected {what} to be a tensor or to contain one, got {type(value).__name__}.")


def _as_rows(hooked: Tensor, layer_name: str) -> Tensor:
    """Return ``hooked`` as ``(B, features)`` rows."""
    if hooked.ndim == 0:
        raise ValueError(f"Layer {layer_name!r} produced a 0-d tensor; expected one row per sample of the batch.")
    if hooked.is_complex():
        raise TypeError(f"Layer {layer_name!r} produced a complex tensor; expected real-valued features.")
    if hooked.ndim == 1:
        return hooked[:, None]
    return hooked.reshape(hooked.shape[0], -1)
