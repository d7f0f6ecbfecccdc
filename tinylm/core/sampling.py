"""Turn the last position's logits into the next token: temperature, top-k, top-p."""
import numpy as np

from tinylm.errors import TinyLMError


class NonFiniteLogits(TinyLMError):
    """The logits hold NaN or +inf: the model's arithmetic overflowed, so there is no distribution to draw from."""

    def __init__(self):
        super().__init__("the model's logits are not finite (NaN or inf): its arithmetic overflowed, so "
                         "there is nothing to sample from")


def check_sampling_args(temperature, top_k, top_p):
    """Refuse settings that cannot work, naming the flag."""
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise TinyLMError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise TinyLMError(f"--top_k must be a positive integer (or left out), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise TinyLMError(f"--top_p must be in (0, 1], got {top_p}")


def next_token_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """p = softmax(logits / temperature), restricted to the top_k largest and then to the smallest
    set whose mass reaches top_p, renormalized.   logits (V,) -> p (V,) float64"""
    z = np.divide(logits, temperature, dtype=np.float64)
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf
    top = np.maximum.reduce(z)                     # ufunc reductions: no Python-level wrapper per call
    if not np.isfinite(top):                       # NaN propagates to the maximum, and so does +inf
        if np.isfinite(logits).all():
            raise TinyLMError(f"--temperature {temperature:g} is so small that logits / temperature overflow; "
                              "use --temperature 0 for the most likely token")
        raise NonFiniteLogits()
    z -= top
    p = np.exp(z, out=z)
    p /= np.add.reduce(p)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        drop = order[mass_before >= top_p]         # already reached top_p without them
        p[drop] = 0.0
        p /= p.sum()
    return p


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None):
    """Draw one token id from the logits (V,); temperature 0 means the most likely token."""
    if temperature == 0:
        i = int(np.argmax(logits))                 # the first NaN, if there is one
        if not np.isfinite(logits[i]):
            raise NonFiniteLogits()
        return i
    p = next_token_distribution(logits, temperature, top_k, top_p)
    return draw(p, rng or np.random.default_rng())


def draw(p, rng):
    """An index i with probability p[i]: the first i whose cumulative sum exceeds u ~ U[0, 1).

    The same draw as rng.choice(p.size, p=p) for the same generator state (that is how it
    computes it), without choice's checks of p, which cost more than the draw at V = 65.
    """
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))
