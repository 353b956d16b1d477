"""The live endpoint table: which endpoints each pool has right now, and what the picker knows of them.

Discovery writes membership, the scraper writes load figures into the same `EndpointState` objects, and the
request path only reads. All of them run on one event loop, so plain dict updates are safe and the table
has no locks and no asyncio. The request path calls `pool_endpoints` per request, so it returns a tuple
that is rebuilt only when membership changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from extproc.datalayer.endpoint import DEFAULT_STALE_AFTER, EndpointState

log = logging.getLogger(__name__)

AddedListener = Callable[[str, str], None]  # (pool, address)
RemovedListener = Callable[[str], None]  # (address)
ChangedListener = Callable[[str, tuple[str, ...]], None]  # (pool, its addresses now)


class EndpointTable:
    """For each pool, ``address ("ip:port") -> EndpointState``, plus change listeners.

    An address may belong to several pools (one server serving several pools' models); each pool then
    has its own `EndpointState`, and `states_for` returns all of them so one scrape updates them all.
    ``on_removed`` fires when an address leaves its *last* pool: only then is what we learned about
    it (prefix index, scrape schedule) worthless.
    """

    def __init__(self, pools: Iterable[str] = (), *, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        self._stale_after = stale_after  # given to every state it creates (see EndpointState)
        self._pools: dict[str, dict[str, EndpointState]] = {name: {} for name in pools}
        self._lists: dict[str, tuple[EndpointState, ...]] = {name: () for name in self._pools}
        self._by_address: dict[str, tuple[EndpointState, ...]] = {}
        self._added: list[AddedListener] = []
        self._removed: list[RemovedListener] = []
        self._changed: list[ChangedListener] = []

    # ----- reads (request path) ---------------------------------------------------------------

    def pool_endpoints(self, pool: str) -> tuple[EndpointState, ...]:
        """The pool's endpoints; a cached tuple, the same object until membership changes."""
        return self._lists.get(pool, ())

    def get(self, pool: str, address: str) -> EndpointState | None:
        members = self._pools.get(pool)
        return None if members is None else members.get(address)

    def states_for(self, address: str) -> tuple[EndpointState, ...]:
        """Every pool's state for this address (usually one); empty once the address is gone."""
        return self._by_address.get(address, ())

    def all_endpoints(self) -> list[EndpointState]:
        return [state for states in self._lists.values() for state in states]

    def addresses(self) -> list[str]:
        """Distinct addresses across all pools."""
        return list(self._by_address)

    def pools(self) -> list[str]:
        return list(self._pools)

    def __contains__(self, address: object) -> bool:
        return address in self._by_address

    # ----- writes (discovery) -----------------------------------------------------------------

    def replace_pool(self, pool: str, addresses: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make ``addresses`` the pool's membership; return ``(added, removed)``.

        States of addresses that stay are kept (with their scraped load and pending count); new
        addresses get fresh states that are not ``scrape_ok`` until their first scrape.
        """
        members = self._pools.setdefault(pool, {})
        wanted = list(dict.fromkeys(addresses))  # de-duplicate, keep order
        wanted_set = set(wanted)
        removed = [address for address in members if address not in wanted_set]
        added = [address for address in wanted if address not in members]
        if not added and not removed and pool in self._lists:
            return [], []
        for address in removed:
            del members[address]
        for address in added:
            members[address] = EndpointState(address=address, pool=pool, stale_after=self._stale_after)
        self._lists[pool] = tuple(members.values())
        gone: list[str] = []
        for address in removed:
            others = tuple(s for s in self._by_address.get(address, ()) if s.pool != pool)
            if others:
                self._by_address[address] = others
            else:
                self._by_address.pop(address, None)
                gone.append(address)
        for address in added:
            self._by_address[address] = (*self._by_address.get(address, ()), members[address])
        # Listeners run once the table is consistent, so they may read it.
        for address in gone:
            for removed_cb in tuple(self._removed):
                self._notify(removed_cb, address)
        for address in added:
            for added_cb in tuple(self._added):
                self._notify(added_cb, pool, address)
        now = tuple(members)
        for changed_cb in tuple(self._changed):
            self._notify(changed_cb, pool, now)
        return added, removed

    # ----- listeners --------------------------------------------------------------------------

    def on_added(self, callback: AddedListener) -> Callable[[], None]:
        """Call ``callback(pool, address)`` whenever an address joins a pool; returns an unsubscribe function."""
        self._added.append(callback)
        return lambda: self._discard(self._added, callback)

    def on_removed(self, callback: RemovedListener) -> Callable[[], None]:
        """Call ``callback(address)`` when an address leaves its last pool; returns an unsubscribe function."""
        self._removed.append(callback)
        return lambda: self._discard(self._removed, callback)

    def on_changed(self, callback: ChangedListener) -> Callable[[], None]:
        """Call ``callback(pool, addresses)`` after a pool's membership changed; returns an unsubscribe function."""
        self._changed.append(callback)
        return lambda: self._discard(self._changed, callback)

    @staticmethod
    def _discard(listeners: list[Any], callback: Any) -> None:
        if callback in listeners:
            listeners.remove(callback)

    @staticmethod
    def _notify(callback: Callable[..., None], *args: Any) -> None:
        # A broken listener must not stop membership updates or the other listeners.
        try:
            callback(*args)
        except Exception:
            log.exception("endpoint listener %r failed for %s", callback, args)
