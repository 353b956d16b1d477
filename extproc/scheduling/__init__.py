"""The scheduling core: pure policy, no I/O and no asyncio.

Data flows one way: a RoutingRequest and the endpoints' latest states go in; filters narrow the
candidates, weighted scorers rank them, a picker orders them; a Decision (pick plus fallbacks, or a
refusal with its HTTP status) comes out. ``framework`` holds the plugin interfaces, the registry and
the factory; ``filters``, ``scorers`` (load) and ``pickers`` the built-in plugins; ``prefix/`` the prefix
affinity plugin with its index; ``scheduler`` runs them.
"""

from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling.framework import (
    OnEmpty,
    PluginError,
    SchedulingContext,
    known_plugins,
    register_filter,
    register_picker,
    register_scorer,
)
from extproc.scheduling.scheduler import Scheduler
from extproc.scheduling.types import Decision, RoutingRequest

__all__ = [
    "Decision",
    "EndpointState",
    "OnEmpty",
    "PluginError",
    "RoutingRequest",
    "Scheduler",
    "SchedulingContext",
    "known_plugins",
    "register_filter",
    "register_picker",
    "register_scorer",
]
