"""State entries kept as views of stacked tensors (SOAP's buckets, Shampoo's arenas): the
per-step check that none was replaced from outside."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from operator import is_, itemgetter
from typing import Any

from torch import Tensor


class StateViews:
    """The ``(state, key, view)`` entries that a stacked layout wrote into parameters' state
    dicts. :meth:`held_by` tells whether the current state dicts are still those and every
    entry is still its view: a checkpoint loaded since, or an entry the user replaced or
    removed, makes it False (the caller then restacks from the entries, which are the
    truth). The check runs every step, so it is one C-level pass per state dict."""

    def __init__(self, entries: Iterable[tuple[dict, str, Tensor]]) -> None:
        grouped: dict[int, tuple[dict, list[str], list[Tensor]]] = {}
        for state, key, view in entries:
            _, keys, views = grouped.setdefault(id(state), (state, [], []))
            keys.append(key)
            views.append(view)
        self.states = tuple(state for state, _, _ in grouped.values())
        self._checks = tuple(
            (itemgetter(*keys) if len(keys) > 1 else _one(keys[0]), tuple(views))
            for _, keys, views in grouped.values()
        )

    def held_by(self, states: Sequence[Mapping[str, Any]]) -> bool:
        """Whether ``states`` are the state dicts the views were written into (the same
        objects, in order) and each still holds every view."""
        if len(states) != len(self.states) or not all(map(is_, self.states, states)):
            return False
        for (entries, views), state in zip(self._checks, states):
            try:
                found = entries(state)
            except KeyError:
                return False
            if not all(map(is_, found, views)):
                return False
        return True


def _one(key: str):
    def get(state: Mapping[str, Any]) -> tuple[Any]:
        return (state[key],)

    return get
