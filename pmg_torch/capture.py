"""Collect one layer's embeddings per class from a model's forward passes, with bounded memory.

:class:`EmbeddingCapture` registers a single hook on one module. Before each forward the caller hands it the
batch's labels with :meth:`EmbeddingCapture.set_labels`; the hook then files every row of the hooked tensor under
its label. Each class keeps at most ``max_per_class`` rows, chosen by reservoir sampling, so memory is bounded by
``classes * max_per_class * D * 4`` bytes however many batches pass through.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._validation import check_choice, check_positive_int

#: Maximum number of layer names an error message lists before it summarises the rest as "and N more".
MAX_LISTED_NAMES = 30

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
    one vectorised draw per class. When several rows of a batch pick the same slot, the last one wins, because the
    row-by-row algorithm would overwrite the earlier ones. The draws come from a seeded CPU ``torch.Generator``,
    and only the chosen rows are indexed on the hooked tensor's device. Rows therefore never leave that device, and
    the same seed picks the same rows on CPU and GPU.

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
        self._rows: dict[int, Tensor] = {}
        self._n_seen: dict[int, int] = {}
        self._width: int | None = None
        self._generator = torch.Generator().manual_seed(seed)

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
        self._rows = {}
        self._n_seen = {}
        self._width = None
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def embeddings(self) -> dict[int, Tensor]:
        """Stored rows per class label, sorted by label: ``(m_c, D)`` float32, detached, on the hooked device.

        The tensors are the live buffers, which later forwards overwrite in place; clone them to keep a snapshot.
        """
        return {label: self._rows[label][: self._n_filled(label)] for label in sorted(self._rows)}

    @property
    def n_seen(self) -> dict[int, int]:
        """Rows seen per class label since the last reset, before sampling, sorted by label."""
        return {label: self._n_seen[label] for label in sorted(self._n_seen)}

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
        labels = labels.to("cpu", torch.long)
        if keep is not None:
            rows, labels = rows[keep.to(rows.device)], labels[keep]
        self._add_batch(rows, labels)

    def _add_batch(self, rows: Tensor, labels: Tensor) -> None:
        """File ``rows`` under ``labels`` (a CPU tensor), one reservoir update per class present."""
        order = torch.argsort(labels, stable=True)
        classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
        for label, positions in zip(classes.tolist(), torch.split(order, counts.tolist()), strict=True):
            self._add_class_rows(label, rows, positions)

    def _add_class_rows(self, label: int, rows: Tensor, positions: Tensor) -> None:
        """Update the reservoir of ``label`` with ``rows[positions]``; ``positions`` are CPU indices in batch order."""
        n_seen = self._n_seen.get(label, 0)
        n_append, slots, sources = reservoir_update(n_seen, positions.numel(), self.max_per_class, self._generator)
        self._n_seen[label] = n_seen + positions.numel()
        if n_append:
            # Indexing copies, so the buffer never keeps the activation (or its autograd graph) alive.
            new_rows = rows[positions[:n_append].to(rows.device)].float()
            stored = self._reserve(label, n_seen, n_seen + n_append, new_rows)
            stored[n_seen : n_seen + n_append] = new_rows.to(stored.device)
        if slots.numel():
            # Slots are drawn only once the reservoir is full, so the buffer exists by now.
            stored = self._rows[label]
            chosen = rows[positions[sources].to(rows.device)].float()
            stored[slots.to(stored.device)] = chosen.to(stored.device)

    def _n_filled(self, label: int) -> int:
        return min(self._n_seen.get(label, 0), self.max_per_class)

    def _reserve(self, label: int, n_filled: int, n_needed: int, like: Tensor) -> Tensor:
        """Return the buffer of ``label`` with room for ``n_needed`` rows, of which the first ``n_filled`` are set.

        The buffer doubles when it grows, up to ``max_per_class`` rows, so filling a class copies each row a
        bounded number of times instead of once per batch, and memory never exceeds ``max_per_class`` rows.
        """
        stored = self._rows.get(label)
        if stored is not None and stored.shape[0] >= n_needed:
            return stored
        previous = 0 if stored is None else stored.shape[0]
        capacity = min(self.max_per_class, max(n_needed, 2 * previous))
        device = like.device if stored is None else stored.device
        grown = torch.empty((capacity, like.shape[1]), dtype=torch.float32, device=device)
        if stored is not None:
            grown[:n_filled] = stored[:n_filled]
        self._rows[label] = grown
        return grown


def reservoir_update(n_seen: int, n_new: int, capacity: int, generator: torch.Generator) -> tuple[int, Tensor, Tensor]:
    """Run Algorithm R on ``n_new`` rows arriving after ``n_seen``, for a reservoir of ``capacity`` rows.

    The first ``n_append`` new rows fill free slots. Each later new row, the ``t``-th overall (0-based), draws
    ``j`` uniformly from ``0..t`` and goes to slot ``j`` when ``j < capacity``. When several rows pick one slot
    the last of them is returned, because the row-by-row algorithm would overwrite the earlier ones.

    Args:
        n_seen: rows already offered to the reservoir.
        n_new: rows offered now.
        capacity: the reservoir's size.
        generator: a CPU generator for the draws.

    Returns:
        ``(n_append, slots, sources)``: rows ``0 .. n_append - 1`` are appended in order, then new row
        ``sources[i]`` overwrites slot ``slots[i]``. ``slots`` and ``sources`` are CPU int64 tensors without
        repeated slots.
    """
    n_append = max(0, min(n_new, capacity - n_seen))
    n_drawn = n_new - n_append
    if n_drawn == 0:
        empty = torch.empty(0, dtype=torch.long)
        return n_append, empty, empty
    counts_so_far = torch.arange(n_seen + n_append + 1, n_seen + n_new + 1, dtype=torch.float64)
    draws = torch.floor(torch.rand(n_drawn, generator=generator, dtype=torch.float64) * counts_so_far)
    draws = torch.minimum(draws, counts_so_far - 1).long()
    replacing = torch.nonzero(draws < capacity).flatten()
    slots, slot_of_replacing = torch.unique(draws[replacing], return_inverse=True)
    last_writer = torch.full_like(slots, -1).scatter_reduce_(0, slot_of_replacing, replacing, reduce="amax")
    return n_append, slots, last_writer + n_append


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
