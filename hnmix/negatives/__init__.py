"""Hard-negative strategies: pure functions (q, queue, l_neg, ...) -> extra logits for each query."""

from hnmix.negatives.mochi import MochiDraws, draw_mochi, mochi, mochi_from_draws

__all__ = ["MochiDraws", "draw_mochi", "mochi", "mochi_from_draws"]
