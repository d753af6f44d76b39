"""How the fast engine takes one layer's per-example norms and clipped sum: a ``Way``.

A way is a value, not a string: the engine builds it from the planner's choice (or a
forced one) and reads its fields; nothing parses text. ``str(way)`` is the human-readable
form that tests, benchmarks and the plan cache (``plans.py``) show, unchanged from when
ways were strings: ``ghost``, ``ghost, shifted``, ``explicit, grouped``,
``explicit, matmul, kept``.

* ``GHOST``: the squared norm from the Gram matrices of the layer's inputs and output
  gradients (``shifted``: a convolution's input Gram from its input positions' Gram, with
  no unfold); the clipped sum by a second weight-gradient product.
* ``EXPLICIT``: the per-example gradients themselves, by ``product``: ``GROUPED`` (one
  weight-gradient convolution with the examples as groups) or ``MATMUL`` (unfold and a
  batched product; linear layers' only way); ``kept`` for the clipped sum (one product
  over them) or recomputed by a second weight-gradient product.

A forced way (``_Layer.force``, for tests and experiments) may leave ``product`` (the layer
kind's default) and ``kept`` (kept within ``ghost.KEEP_RATIO``) open as None.
"""

from __future__ import annotations

from dataclasses import dataclass

GHOST, EXPLICIT = "ghost", "explicit"
GROUPED, MATMUL = "grouped", "matmul"


@dataclass(frozen=True)
class Way:
    method: str  # GHOST or EXPLICIT
    product: str | None = None  # EXPLICIT: GROUPED or MATMUL (None: the kind's default)
    shifted: bool = False  # GHOST: the input Gram by shifts of the input positions' Gram
    kept: bool | None = None  # EXPLICIT: per-example gradients kept (None: within KEEP_RATIO)

    def __post_init__(self) -> None:
        if self.method not in (GHOST, EXPLICIT):
            raise ValueError(f"a way's method is {GHOST!r} or {EXPLICIT!r}, not {self.method!r}")
        if self.product not in (None, GROUPED, MATMUL):
            raise ValueError(f"an explicit way's product is {GROUPED!r} or {MATMUL!r}")
        if self.method == GHOST:
            if self.product is not None or self.kept:
                raise ValueError("ghost norms make no per-example gradient to keep")
            object.__setattr__(self, "kept", False)
        elif self.shifted:
            raise ValueError("only ghost norms take the input Gram by shifts")

    @property
    def gram(self) -> bool:
        """The norm is a Gram norm (the guard's larger share of the margin)."""
        return self.method == GHOST

    @property
    def explicit(self) -> bool:
        return self.method == EXPLICIT

    def __str__(self) -> str:
        words = [self.method]
        if self.shifted:
            words.append("shifted")
        if self.product is not None:
            words.append(self.product)
        if self.kept:
            words.append("kept")
        return ", ".join(words)
