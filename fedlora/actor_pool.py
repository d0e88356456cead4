"""Simulated clients survive a worker process that dies (killed for memory, crashed).

Flower 1.41's simulation engine runs virtual clients on a pool of Ray actors. When an
actor's process dies mid-message, the message comes back as an error reply (the server
counts that client as dropped, with the reason) but the dead actor is put back into the
pool. Every later message it is handed then fails at once, so after one death most
clients drop out of every later round. :func:`replace_dead_actors` makes the pool put a
fresh actor in the dead one's place; the engine and its message flow are otherwise
unchanged. It is installed by the ServerApp and ClientApp modules, which load in the
process that runs the simulation engine, and does nothing where Ray is not installed.
"""

from __future__ import annotations

import logging

__all__ = ["replace_dead_actors", "DIED_MARKERS"]

log = logging.getLogger(__name__)

#: Error texts (Ray's exception classes, as the engine names them in an error reply) that
#: mean the client's process died, not that its code raised.
DIED_MARKERS = ("ray.exceptions.ActorDiedError", "ray.exceptions.RayActorError",
                "ray.exceptions.OutOfMemoryError", "ray.exceptions.ActorUnavailableError")


def replace_dead_actors() -> bool:
    """Patch Flower's simulation actor pool once; True if the patch is in place."""
    try:  # deferred: Ray is there only where Flower simulates
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:
        return False
    if getattr(BasicActorPool, "_fedlora_replaces_dead_actors", False):
        return True
    if not hasattr(BasicActorPool, "fetch_result_and_return_actor_to_pool"):
        log.warning("this Flower version's actor pool is not the one fedlora knows; a "
                    "simulated client whose process dies is not replaced")
        return False
    died = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)
    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool

    def fetch_or_replace(self, future):
        try:
            return fetch(self, future)
        except died:
            # The engine puts the future's actor back into the pool before it re-raises:
            # let that be a fresh actor (Ray frees the dead one's resources).
            if future in self._future_to_actor:
                self._future_to_actor[future] = self.create_actor_fn()
                log.warning("a simulated client's worker process died; started a fresh one")
            raise

    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_replace
    BasicActorPool._fedlora_replaces_dead_actors = True
    return True
