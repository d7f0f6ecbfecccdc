"""core/layers.py's layers made fast, plus dropout: each a forward/backward pair, the same functions as core's.

Every `*_forward` returns `(out, cache)`; every `*_backward(dout, cache)` returns the
gradient with respect to the input(s) and, for layers with weights, a dict of
parameter gradients. Shapes: B batch, T time, C channels, V vocabulary, H heads,
D = C / H head size. All functions work in whatever float dtype they are given.

Written for speed without hiding the math: matrix products are `np.matmul` on views
(no copies; attention and GELU work through the batch a piece at a time to stay in
cache), element-wise passes are done in place where the algebra allows, and caches keep
only what the backward cannot cheaply recompute (docs/performance.md says what each
choice buys; git log says how it was measured). tests/test_core_model.py holds the model built on
them equal to core's in float64.
"""
import functools
import math

import numpy as np

from tinylm.core.layers import GELU_CUBIC, GELU_SCALE, split_heads  # the same constants and view as core's

# ----------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe):
    """x[b,t] = wte[idx[b,t]] + wpe[t].   idx (B,T) ints, wte (V,C), wpe (block,C) -> x (B,T,C)"""
    T = idx.shape[1]
    x = wte[idx]
    x += wpe[:T]
    return x, (idx, wte.shape, wpe.shape)


def scatter_add_rows(idx, rows, n):
    """out[v] = Σ_{i: idx[i]=v} rows[i].   idx (N,) ints, rows (N,C) -> out (n,C)

    The same as np.add.at(out, idx, rows), computed by sorting idx once and summing each
    run of equal indices with np.add.reduceat, which is several times faster.
    """
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_idx[1:] != sorted_idx[:-1])))
    out = np.zeros((n, rows.shape[1]), dtype=rows.dtype)
    out[sorted_idx[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def embedding_backward(dx, cache):
    """dwte[v] = Σ_{b,t: idx[b,t]=v} dx[b,t];  dwpe[t] = Σ_b dx[b,t]."""
    idx, wte_shape, wpe_shape = cache
    C = dx.shape[-1]
    dwte = scatter_add_rows(idx.reshape(-1), dx.reshape(-1, C), wte_shape[0])   # a token may repeat
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[: idx.shape[1]] = dx.sum(axis=0)
    return {"wte": dwte, "wpe": dwpe}


# ----------------------------------------------------------------------------- linear


def linear_forward(x, W, b=None):
    """y = x Wᵀ + b.   x (..., in), W (out, in), b (out,) or None -> y (..., out)"""
    x2 = x.reshape(-1, x.shape[-1])          # one 2-D matmul: BLAS is fastest on it (Wᵀ is a view)
    y = x2 @ W.T
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[0]), (x, W, b is not None)


def linear_backward(dy, cache):
    """dx = dy W;  dW = dyᵀ x summed over every leading axis;  db = Σ dy."""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = (dy2 @ W).reshape(x.shape)
    grads = {"W": dy2.T @ x2}
    if has_bias:
        grads["b"] = dy2.sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------- layer norm


def rowdot(a, b):
    """Σ_c a[..., c] b[..., c], kept as a trailing axis of length 1: (..., C), (..., C) -> (..., 1)"""
    return np.einsum("...c,...c->...", a, b)[..., None]   # a plain reduction: no temporary a ⊙ b


@functools.lru_cache(maxsize=16)
def _averaging_vector(n, dtype):
    v = np.full(n, 1.0 / n, dtype=dtype)
    v.flags.writeable = False
    return v


def row_mean(x):
    """mean over the last axis, kept as a trailing axis of length 1: (..., C) -> (..., 1)

    Computed as the matrix-vector product x · (1/C, …, 1/C): BLAS does it several times faster
    than x.mean(axis=-1) on these shapes.
    """
    return (x @ _averaging_vector(x.shape[-1], x.dtype))[..., None]


def layernorm_output(cache):
    """y = x̂ ⊙ w + b from layernorm_forward's cache (also how the forward computes y, so a backward that
    did not keep y gets the same numbers again)."""
    xhat, _, w, b = cache
    y = xhat * w
    if b is not None:
        y += b
    return y


def layernorm_forward(x, w, b=None, eps=1e-5):
    """y = (x − μ)/√(σ² + ε) ⊙ w + b, μ and σ² over the last axis.   x (..., C), w (C,), b (C,) -> y (..., C)"""
    C = x.shape[-1]
    xhat = x - row_mean(x)
    rstd = rowdot(xhat, xhat)
    rstd /= C
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    xhat *= rstd                                # now x̂, normalized in place
    cache = (xhat, rstd, w, b)
    return layernorm_output(cache), cache


def layernorm_backward(dy, cache):
    """dx = rstd (g − mean(g) − x̂ mean(g ⊙ x̂)) with g = dy ⊙ w;  dw = Σ dy ⊙ x̂;  db = Σ dy."""
    xhat, rstd, w, b = cache
    C = dy.shape[-1]
    g = dy * w
    dx = xhat * (rowdot(g, xhat) / C)
    np.subtract(g, dx, out=dx)
    dx -= row_mean(g)
    dx *= rstd
    grads = {"w": np.einsum("nc,nc->c", dy.reshape(-1, C), xhat.reshape(-1, C))}
    if b is not None:
        grads["b"] = dy.reshape(-1, C).sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------- GELU



# GELU's passes are done GELU_CHUNK numbers (1 MB in float32) at a time, so that its temporaries are
# chunk-sized scratch reused chunk after chunk and the only full-size arrays are inputs and outputs
# (baby GPT: 1-2 fewer fresh 50 MB arrays a call, each page faulted in). Measured best of 2^14…2^18.
GELU_CHUNK = 1 << 18


def flat_chunks(*arrays):
    """Matching GELU_CHUNK-long pieces of the flattened arrays (views for contiguous arrays)."""
    flat = [a.reshape(-1) for a in arrays]
    for i in range(0, flat[0].size, GELU_CHUNK):
        yield [f[i:i + GELU_CHUNK] for f in flat]


def gelu_one_plus_exp_(x, out):
    """out = 1 + e^{−2u} = 1/σ(2u), u = √(2/π) (x + 0.044715 x³), for x and out of one shape; returns out.

    e^{−2u} overflows to +inf for very negative x, on purpose (see gelu_forward).
    """
    np.multiply(x, x, out=out)
    out *= -2.0 * GELU_SCALE * GELU_CUBIC
    out -= 2.0 * GELU_SCALE
    out *= x                    # −2u, built in one buffer
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1.0
    return out


def gelu_forward(x):
    """y = ½ x (1 + tanh(u)), u = √(2/π) (x + 0.044715 x³): GPT-2's tanh approximation.   any shape

    Computed as y = x σ(2u) = x / (1 + e^{−2u}), the same function (½(1 + tanh u) = σ(2u)), because
    np.exp is much cheaper than np.tanh in float32. For very negative x, e^{−2u} overflows to +inf
    and y = x/inf = −0, the right limit: the overflow is expected and not warned about.
    The layer's cache keeps the slope dy/dx itself (gelu_slope_), worked out here while x and σ(2u)
    are still in the CPU's caches, so the backward is one multiply. Done in chunks (flat_chunks).
    """
    y, slope = np.empty_like(x), np.empty_like(x)
    g, t = (np.empty(min(GELU_CHUNK, x.size), dtype=x.dtype) for _ in range(2))
    for xc, yc, sc in flat_chunks(x, y, slope):
        n = xc.size
        gelu_one_plus_exp_(xc, sc)
        np.divide(xc, sc, out=yc)
        np.reciprocal(sc, out=sc)           # σ(2u)
        gelu_slope_(xc, sc, g[:n], t[:n])
    return y, (slope,)


def gelu_values_forward(x):
    """y = gelu(x) alone, the same numbers as gelu_forward(x)[0], without the slope (no cache)."""
    y = np.empty_like(x)
    e = np.empty(min(GELU_CHUNK, x.size), dtype=x.dtype)
    for xc, yc in flat_chunks(x, y):
        ec = gelu_one_plus_exp_(xc, e[:xc.size])
        np.divide(xc, ec, out=yc)
    return y


def gelu_slope_(x, s, g, t):
    """s ← s (1 + 2 x u' (1 − s)) = dy/dx, in place, given s = σ(2u), for 1-D pieces; g and t are scratch
    of the same size.  (dy/dx = ½(1 + tanh u) + ½ x (1 − tanh² u) u' with σ(2u) = ½(1 + tanh u).)"""
    np.multiply(x, x, out=g)
    g *= 6.0 * GELU_CUBIC * GELU_SCALE
    g += 2.0 * GELU_SCALE
    g *= x                               # 2 x u',  u' = √(2/π)(1 + 3·0.044715 x²)
    np.subtract(1.0, s, out=t)
    g *= t
    g += 1.0
    s *= g


def gelu_backward(dy, cache):
    """dx = dy ⊙ gelu'(x),  gelu'(x) = s + 2 x s (1 − s) u',  s = σ(2u) = ½(1 + tanh u),  u' = √(2/π)(1 + 3·0.044715 x²).

    The slope was worked out by the forward (gelu_slope_) and kept in the cache.
    """
    (slope,) = cache
    return np.multiply(dy, slope, dtype=np.result_type(dy, slope))


def gelu_backward_(dy, cache):
    """gelu_backward computed in place: dy (an array of the slope's shape and dtype that the caller no longer
    needs) is overwritten with dx and returned, which saves a full-size array."""
    (slope,) = cache
    dy *= slope
    return dy


# ----------------------------------------------------------------------------- dropout


# bit generators whose random_raw gives 64 random bits a draw (MT19937 gives 32 in a 64-bit slot)
SIXTY_FOUR_BIT_GENERATORS = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)


def bernoulli_mask(shape, p, rng):
    """(m, q): m ~ Bernoulli(q) as booleans of the given shape, q = 1 − t/2¹⁶ with t = round(p·2¹⁶).

    Each entry compares 16 random bits u (uniform on 0 … 65535) with t: m = (u ≥ t), so P(m) = q
    exactly, within 2⁻¹⁷ of 1 − p. (t is at most 65535, so q ≥ 2⁻¹⁶ even for p within 2⁻¹⁷ of 1;
    p < 2⁻¹⁷ gives t = 0, nothing dropped.) With a 64-bit generator (NumPy's default, PCG64) the bits
    come four entries to a draw: about 4× cheaper than a float per entry (rng.random), which was ~3%
    of a baby-GPT step. Other generators draw 16-bit integers.
    """
    n = math.prod(shape)
    threshold = min(round(p * 65536), 65535)
    if isinstance(rng.bit_generator, SIXTY_FOUR_BIT_GENERATORS):
        bits = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
    else:
        bits = rng.integers(0, 65536, size=n, dtype=np.uint16)
    return (bits >= threshold).reshape(shape), 1.0 - threshold / 65536


def dropout_forward(x, p, rng=None):
    """y = x ⊙ m / q, m ~ Bernoulli(q), q = 1 − p to 2⁻¹⁷ (bernoulli_mask).   any shape; the identity when p = 0 or rng is None

    Dividing by the keep probability q makes E[y] = x exactly.
    """
    if p == 0.0 or rng is None:
        return x, None
    keep, q = bernoulli_mask(x.shape, p, rng)             # a boolean mask: 1 byte an entry
    scale = 1.0 / q
    y = x * keep
    y *= scale
    return y, (keep, scale)


def dropout_backward(dy, cache):
    """dx = dy ⊙ m / q."""
    if cache is None:
        return dy
    keep, scale = cache
    dx = dy * keep
    dx *= scale
    return dx


# ----------------------------------------------------------------------------- residual


def residual_forward(x, fx):
    """y = x + f(x).   x, fx (B,T,C) -> y (B,T,C)"""
    return x + fx, None


def residual_backward(dy, cache):
    """dx = dy and dfx = dy: the sum passes its gradient unchanged to both branches."""
    return dy, dy


# ----------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=64)
def causal_bias(Tq, Tk, offset, dtype):
    """(Tq, Tk) additive mask: 0 where query i may see key j (j ≤ i + offset), −∞ elsewhere."""
    future = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + offset
    bias = np.where(future, -np.inf, 0.0).astype(dtype)
    bias.flags.writeable = False
    return bias


def causal_softmax_(scores, offset=0):
    """softmax over the last axis of scores + causal mask, computed in place; returns scores.

    The same numbers as causal_softmax, in five passes over the (…, Tq, Tk) array and
    no temporary of its size: add the mask, subtract the row max, exp, sum, scale.
    """
    scores += causal_bias(*scores.shape[-2:], offset, scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)   # exp never overflows
    np.exp(scores, out=scores)
    scores /= (scores @ np.ones(scores.shape[-1], scores.dtype))[..., None]   # row sums as a product: BLAS
    return scores


def causal_softmax(scores, offset=0):
    """Row-wise softmax of scores (..., Tq, Tk) where query i may see keys j ≤ i + offset."""
    return causal_softmax_(np.array(scores, copy=True), offset)


def qkv_heads(qkv, n_head):
    """(B,T,3C) -> q, k, v, each (B,H,T,D): views into qkv, no copy."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)


# Attention's element-wise passes (mask, max, exp, sum, scale, dropout; and their backward) go over
# the (B,H,T,T) scores several times each. They are done a few sequences at a time, so that each
# group's scores (at most about this many bytes) stay in cache between passes.
ATTENTION_CHUNK_BYTES = 2 << 20

# Queries are taken this many rows at a time: rows [r0, r1) see keys [0, r1) only, so the blocks above
# the diagonal, where the causal mask would zero everything, are never computed. At T = 256 (baby GPT)
# that is 3 of 4 blocks, 75% of the square; at T ≤ 128 (the CPU recipe) one block, the whole square.
# Smaller blocks skip more but make smaller products: with two threads at once, 128 was faster
# than 64 and level with 96 on baby GPT's shapes (row 21 of the optimization log in
# `git show 8dbd490:docs/performance.md`).
ATTENTION_ROW_BLOCK = 128


def sequence_chunks(B, H, T, itemsize):
    """Slices of the batch axis, each holding at most ATTENTION_CHUNK_BYTES of (H,T,T) scores (one sequence at least)."""
    n = max(1, ATTENTION_CHUNK_BYTES // (H * T * T * itemsize))
    return [slice(a, min(a + n, B)) for a in range(0, B, n)]


def row_blocks(T, rows):
    """[(r0, r1), ...]: the query rows in blocks of `rows`; block (r0, r1) needs keys [0, r1) only."""
    return [(r0, min(r0 + rows, T)) for r0 in range(0, T, rows)]


def attention_forward(qkv, n_head, dropout=0.0, rng=None, row_block=None):
    """y = softmax(Q Kᵀ/√D + causal mask) V per head.   qkv (B,T,3C) -> y (B,T,C)

    The scale 1/√D is applied to Q (B·T·C numbers) rather than to the scores (B·H·T·T numbers).
    Sequences are taken a few at a time (sequence_chunks), every head of a group in one batched
    matmul, so that the group's scores stay in cache through the softmax and dropout; queries are
    taken `row_block` rows at a time (default ATTENTION_ROW_BLOCK), each block against the keys up
    to its last row only: the weights above those blocks are set to 0, not computed.
    """
    B, T, C3 = qkv.shape
    q, k, v = qkv_heads(qkv, n_head)
    scale = 1.0 / math.sqrt(C3 // (3 * n_head))
    blocks = row_blocks(T, row_block or ATTENTION_ROW_BLOCK)
    qs = q * scale                                                   # (B,H,T,D), contiguous
    att = np.empty((B, n_head, T, T), dtype=qkv.dtype)               # rows sum to 1
    keep = None
    y = np.empty((B, T, C3 // 3), dtype=qkv.dtype)
    y_heads = split_heads(y, n_head)                                 # written straight into (B,T,C)
    for s in sequence_chunks(B, n_head, T, qkv.dtype.itemsize):
        for r0, r1 in blocks:
            a = att[s, :, r0:r1, :r1]                                # a view: rows r0..r1, keys 0..r1
            att[s, :, r0:r1, r1:] = 0.0                              # the skipped keys: weight 0
            np.matmul(qs[s, :, r0:r1], k[s, :, :r1].transpose(0, 1, 3, 2), out=a)
            causal_softmax_(a, offset=r0)
            a_dropped, drop_cache = dropout_forward(a, dropout, rng)
            if drop_cache is not None:
                if keep is None:
                    keep = np.empty(att.shape, dtype=bool)           # read only inside the blocks
                keep[s, :, r0:r1, :r1] = drop_cache[0]
                p_scale = drop_cache[1]
            np.matmul(a_dropped, v[s, :, :r1], out=y_heads[s, :, r0:r1])
            del a_dropped
    # the dropped weights are not kept: the backward rebuilds them from att and the mask
    drop_cache = None if keep is None else (keep, p_scale)
    return y, (qs, k, v, att, drop_cache, scale, blocks)


def attention_backward(dy, cache):
    """dV = Aᵀ dY;  dA = dY Vᵀ;  dS = A ⊙ (dA − Σ_j dA ⊙ A);  dQ = dS K/√D;  dK = dSᵀ Q/√D.

    Block by block as in the forward (A here is the dropped A ⊙ m/q in dV, and dA passes through
    dropout's backward before the softmax's). A row block touches the keys up to its last row, so dK
    and dV are sums over the blocks: the last block (which sees every key) writes them, the others add.
    """
    qs, k, v, att, drop_cache, scale, blocks = cache
    B, H, T, D = qs.shape
    dy = split_heads(dy, H)
    dqkv = np.empty((B, T, 3 * H * D), dtype=dy.dtype)
    dq, dk, dv = qkv_heads(dqkv, H)                                  # views: results land in place
    for s in sequence_chunks(B, H, T, qs.dtype.itemsize):
        for r0, r1 in reversed(blocks):
            a = att[s, :, r0:r1, :r1]
            dy_b = dy[s, :, r0:r1]
            if drop_cache is None:
                a_dropped = a
            else:
                keep, p_scale = drop_cache
                a_dropped = dropout_backward(a, (keep[s, :, r0:r1, :r1], p_scale))   # A ⊙ m/q
            if r1 == T:
                np.matmul(a_dropped.transpose(0, 1, 3, 2), dy_b, out=dv[s])
            else:
                dv[s, :, :r1] += a_dropped.transpose(0, 1, 3, 2) @ dy_b
            del a_dropped
            datt = dy_b @ v[s, :, :r1].transpose(0, 1, 3, 2)
            if drop_cache is not None:                               # dropout's backward, in place
                datt *= keep[s, :, r0:r1, :r1]
                datt *= p_scale
            dscores = datt
            dscores -= np.einsum("...ij,...ij->...i", datt, a)[..., None]
            dscores *= a                                             # masked entries have att = 0
            np.matmul(dscores, k[s, :, :r1], out=dq[s, :, r0:r1])
            if r1 == T:
                np.matmul(dscores.transpose(0, 1, 3, 2), qs[s, :, r0:r1], out=dk[s])   # qs carries the scale
            else:
                dk[s, :, :r1] += dscores.transpose(0, 1, 3, 2) @ qs[s, :, r0:r1]
            del datt, dscores
    dq *= scale
    return dqkv


# ----------------------------------------------------------------------------- loss


def cross_entropy_forward(logits, targets):
    """loss = −mean log softmax(logits)[target].   logits (B,T,V), targets (B,T) ints -> scalar"""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    z = z - z.max(axis=1, keepdims=True)
    t = targets.reshape(-1)
    rows = np.arange(t.size)
    picked = z[rows, t]
    np.exp(z, out=z)
    sum_e = z.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(sum_e[:, 0]) - picked))
    z /= sum_e                                   # z now holds the probabilities
    return loss, (z, t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = (softmax(logits) − onehot(target)) · dloss / N,  N = B·T."""
    probs, t, shape = cache
    dlogits = probs * (dloss / t.size)
    dlogits[np.arange(t.size), t] -= dloss / t.size
    return dlogits.reshape(shape)


# ----------------------------------------------------------------------------- Llama's layers


def rmsnorm_forward(x, w, eps=1e-5):
    """y = x/√(mean x² + ε) ⊙ w over the last axis.   x (..., C), w (C,) -> y (..., C)"""
    rstd = rowdot(x, x)
    rstd /= x.shape[-1]
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    xhat = x * rstd
    return xhat * w, (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """dx = rstd (g − x̂ mean(g ⊙ x̂)), g = dy ⊙ w;  dw = Σ dy ⊙ x̂."""
    xhat, rstd, w = cache
    C = dy.shape[-1]
    g = dy * w
    dx = xhat * (rowdot(g, xhat) / C)
    np.subtract(g, dx, out=dx)
    dx *= rstd
    return dx, {"w": np.einsum("nc,nc->c", dy.reshape(-1, C), xhat.reshape(-1, C))}


def rope_table(T, D, theta, dtype, start=0):
    """(cos, sin), each (T, D/2): the angles (start + t)·θ^(−2j/D) of core's rope_forward, one per pair (j, j + D/2),
    worked out in float64 exactly as core does and cast to dtype."""
    angles = np.outer(np.arange(start, start + T), theta ** (-np.arange(0, D, 2) / D))
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def pairs_side_by_side(n_heads, D):
    """The order of a projection's rows (n_heads·D of them, head after head) that puts each rotary pair side by side.

    Core turns the pairs (j, j + D/2) of a head (Hugging Face's layout). Taking each head's rows in the order
    0, D/2, 1, D/2 + 1, … makes pair j the two neighbours 2j, 2j + 1, so that rope_ can turn all of a position's
    pairs at once as complex numbers. A head's coordinates are only reordered, the same way for q and k, so
    every score q·k is unchanged; the gradient's rows are put back in Hugging Face's order (fast/llama.py)."""
    within = np.stack([np.arange(D // 2), np.arange(D // 2) + D // 2], axis=1).reshape(-1)
    return (np.arange(n_heads)[:, None] * D + within).reshape(-1)


@functools.lru_cache(maxsize=64)
def rope_phases(T, D, n_heads, theta, dtype, start=0):
    """(e^{iθ}, e^{−iθ}), each (T, n_heads·D/2) complex: the turn of every pair of every head at positions start …
    start + T − 1 (rope_table's angles), for rope_ and its backward. Read-only, kept for the next call."""
    cos, sin = rope_table(T, D, theta, dtype, start)
    turn = np.empty((T, n_heads, D // 2), dtype=np.result_type(dtype, np.complex64))
    turn.real, turn.imag = cos[:, None, :], sin[:, None, :]          # the same angle for every head
    turn = turn.reshape(T, -1)
    back = turn.conj()
    turn.flags.writeable = back.flags.writeable = False
    return turn, back


def rope_(x, turn):
    """Turn every pair in place: with z = x_j + i·x_{j+D/2} the pair as a complex number, z <- z·e^{iθ}, which is
    [x₁ x₂] <- [x₁ cos − x₂ sin, x₂ cos + x₁ sin] (core's rope_forward), one complex multiplication a pair.

    x (..., T, n_heads·D), each head's pairs side by side (pairs_side_by_side), its last axis contiguous (a view
    into a projection's output is fine); turn (T, n_heads·D/2) from rope_phases. The backward is the turn by
    −θ: rope_(dy, rope_phases(…)[1]). Returns x."""
    z = x.view(np.result_type(x.dtype, np.complex64))
    z *= turn
    return x


def swiglu_forward(gu):
    """y = silu(g) ⊙ u with [g u] = gu side by side (the gate and up projections made as one product).

    gu (..., 2F) -> y (..., F). σ(g) = 1/(1 + e^(−g)): e^(−g) overflows to +inf for very negative g, and σ = 0,
    the right limit (the overflow is expected). The cache keeps σ(g) and silu(g) = g σ(g) for the backward."""
    F = gu.shape[-1] // 2
    g, u = gu[..., :F], gu[..., F:]
    s = np.negative(g)
    with np.errstate(over="ignore"):
        np.exp(s, out=s)
    s += 1.0
    np.reciprocal(s, out=s)                            # σ(g)
    silu = g * s
    return silu * u, (u, s, silu)


def swiglu_backward(dy, cache):
    """d[g u] side by side (…, 2F): dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), du = dy ⊙ silu(g).

    σ(1 + g(1 − σ)) is computed as σ + silu − silu·σ, from what the forward kept: six passes in all."""
    u, s, silu = cache
    F = u.shape[-1]
    dgu = np.empty(u.shape[:-1] + (2 * F,), dtype=dy.dtype)
    dg, du = dgu[..., :F], dgu[..., F:]
    np.multiply(dy, silu, out=du)
    np.multiply(silu, s, out=dg)
    np.subtract(silu, dg, out=dg)
    dg += s
    dg *= u
    dg *= dy
    return dgu
