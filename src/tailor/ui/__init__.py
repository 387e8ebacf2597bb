"""`tailor ui`: a web page over the `tailor serve` app for runs, comparisons, adapters, a side-by-side
playground and the planner (plain HTML, one script, one style sheet; no network assets)."""

from tailor.ui.app import add_ui
from tailor.ui.runs import RunIndex, UnknownRunError

__all__ = ["RunIndex", "UnknownRunError", "add_ui"]
