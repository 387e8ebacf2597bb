"""A/B routes: one model name that stands for several adapter versions, with weights.

``support=support@2:0.9,support@3:0.1`` sends 90% of the requests for ``support`` to ``support@2``. A
request with a ``user`` always lands on the same version while the weights stay the same (a hash of
route and user picks a point in [0, 1)); without one the version is drawn at random. Rollback is a
weight change (``support=support@2:1``) through the admin API, without a restart.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass


class RouteError(ValueError):
    """A route spec that cannot be parsed (the message shows the expected form)."""


FORM = ("NAME=VERSION:WEIGHT[,VERSION:WEIGHT...], e.g. support=support@2:0.9,support@3:0.1, or a router by "
        "content NAME=auto:ADAPTER,ADAPTER,..., e.g. desk=auto:billing,returns")
AUTO_PREFIX = "auto:"


@dataclass(frozen=True)
class Route:
    name: str
    targets: tuple[tuple[str, float], ...]  # (adapter name, weight), weights summing to 1
    auto: bool = False  # a router by content among the targets (tailor.serve.auto), weights unused

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.targets)

    def choose(self, user: str | None) -> str:
        if user:
            digest = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = random.random()
        total = 0.0
        for target, weight in self.targets:
            total += weight
            if point < total:
                return target
        return self.targets[-1][0]

    def spec(self) -> str:
        if self.auto:
            return AUTO_PREFIX + ",".join(self.adapters)
        return ",".join(f"{t}:{w:g}" for t, w in self.targets)


def parse_targets(name: str, spec: str) -> Route:
    """A route from its versions ``VERSION:WEIGHT,...`` (a version without weight counts 1), or a router
    by content from ``auto:ADAPTER,ADAPTER,...``."""
    if name == "auto":
        raise RouteError("'auto' is the model name that routes among every described adapter; give the route "
                         "another name.")
    if spec.strip().startswith(AUTO_PREFIX):
        names = [p.strip() for p in spec.strip()[len(AUTO_PREFIX):].split(",") if p.strip()]
        if not names or any(":" in n for n in names):
            raise RouteError(f"route {name!r}: {spec!r} needs adapter names after 'auto:' (no weights); "
                             f"{FORM}.")
        return Route(name, tuple((n, 1 / len(names)) for n in dict.fromkeys(names)), auto=True)
    targets = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        target, _, weight = part.rpartition(":") if ":" in part else (part, ":", "1")
        try:
            value = float(weight)
        except ValueError:
            raise RouteError(f"route {name!r}: weight {weight!r} of {target!r} is not a number; "
                             f"{FORM}.") from None
        if not target or value < 0 or value != value:
            raise RouteError(f"route {name!r}: {part!r} needs a version and a weight >= 0; {FORM}.")
        targets.append((target, value))
    total = sum(w for _, w in targets)
    if not targets or total <= 0:
        raise RouteError(f"route {name!r} has no version with a weight above 0; {FORM}.")
    return Route(name, tuple((t, w / total) for t, w in targets))


def parse_route(text: str) -> Route:
    """A route from ``NAME=SPEC`` (the command line's --route)."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip():
        raise RouteError(f"--route {text!r}: expected {FORM}.")

    return parse_targets(name.strip(), spec)


class Routes:
    """The server's routes by name; changed through the admin API while requests run."""

    def __init__(self, routes: list[Route] | None = None) -> None:
        self._lock = threading.Lock()
        self._routes = {r.name: r for r in routes or []}

    def get(self, name: str) -> Route | None:
        with self._lock:
            return self._routes.get(name)

    def set(self, route: Route) -> None:
        with self._lock:
            self._routes[route.name] = route

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._routes.pop(name, None) is not None

    def all(self) -> list[Route]:
        with self._lock:
            return sorted(self._routes.values(), key=lambda r: r.name)
