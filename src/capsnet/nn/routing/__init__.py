"""Capsule routing algorithms, one class each, behind one interface (:class:`Router`).

A router takes the votes of I child capsules for J parent capsules and returns the
parents.  It is chosen by config (``routing=<name>``, ``conf/routing/<name>.yaml`` with a
``_target_``); the layer that owns it builds it with the shapes it routes between.
"""

from capsnet.nn.routing.base import Routed, Router

__all__ = ["Routed", "Router"]
