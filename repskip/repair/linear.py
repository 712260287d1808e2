"""The linear repair of one run of removed layers, and folding it into a weight.

Layer i, kept, is followed by the removed run a..b (a = i + 1). Layer i computes
h_i = r + m with r the residual stream after its attention and m its MLP's output. The model
without the run passes h_i on where layer b's output y used to be. The repair replaces m by
m T, with T the ridge least-squares solution of  m T ~ y - r  over calibration tokens, each
token's error weighted by w = 1 / mean(y^2), the inverse mean square of its target:

    T = (M^T W M + lam I)^-1 (M^T W (Y - R) + lam I)

shrunk towards I (no repair) as lam grows; lam is ``ridge`` times the mean diagonal of
M^T W M. The weights make the fit relative per token, as the next layer sees the state
(through an RMSNorm, blind to its scale): without them the few tokens with massive
activations (norms a hundred times the median in SmolLM2) decide the fit, and a map that
halves the squared error can still turn every other token's state away from its target and
raise the loss. M^T W M and M^T W (Y - R) are summed in float64 as batches stream past, so
memory is two hidden x hidden matrices whatever the number of tokens. Since m = z W^T + c for the
projection's weight W [hidden, intermediate] and bias c, m T = z (T^T W)^T + T^T c: the fold
W' = T^T W, c' = T^T c is exact and adds no parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RepskipError


@dataclass(frozen=True)
class Run:
    """A maximal run of removed layers ``first..last`` and the kept layer ``anchor`` in front
    of it, whose MLP output projection takes the repair (original layer indices)."""

    anchor: int
    first: int
    last: int


def token_weights(target: np.ndarray) -> np.ndarray:
    """1 / mean square of each target state [tokens, hidden] -> [tokens]."""
    return 1.0 / np.maximum((np.asarray(target, dtype=np.float64) ** 2).mean(1), 1e-12)


def removed_runs(removed: Sequence[int], num_layers: int) -> list[Run]:
    """The maximal runs of ``removed``, in order; refuses a run with no kept layer in front."""
    runs: list[Run] = []
    for j in sorted(set(removed)):
        if runs and runs[-1].last == j - 1:
            runs[-1] = Run(runs[-1].anchor, runs[-1].first, j)
        else:
            runs.append(Run(j - 1, j, j))
    if runs and runs[0].anchor < 0:
        raise RepskipError(
            "linear repair folds each map into the layer in front of a removed run, and layer 0 has none: "
            "keep layer 0 (the default protection) or drop --repair"
        )
    if runs and runs[-1].last >= num_layers:
        raise RepskipError(f"layer {runs[-1].last} is out of range for a {num_layers}-layer model")
    return runs


class LeastSquares:
    """Streaming sums for one map: M^T W M and M^T W D over the tokens seen, in float64."""

    def __init__(self, hidden: int):
        self.mtm = np.zeros((hidden, hidden))
        self.mtd = np.zeros((hidden, hidden))
        self.tokens = 0
        self.target_sq = 0.0  # |D|^2 and |D - M|^2: how far plain removal is from the target
        self.plain_sq = 0.0

    def add(self, m: np.ndarray, d: np.ndarray, w: np.ndarray | None = None) -> None:
        """``m``: MLP outputs [tokens, hidden]; ``d``: what they should be (target minus the
        residual), same shape; ``w``: each token's weight [tokens] (1 if not given)."""
        m = np.asarray(m, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        w = np.ones(m.shape[0]) if w is None else np.asarray(w, dtype=np.float64)
        mw = m * w[:, None]
        self.mtm += mw.T @ m
        self.mtd += mw.T @ d
        self.tokens += m.shape[0]
        self.target_sq += float((w * (d * d).sum(1)).sum())
        self.plain_sq += float((w * ((d - m) ** 2).sum(1)).sum())

    def solve(self, ridge: float) -> np.ndarray:
        if self.tokens == 0:
            raise RepskipError("no calibration token reached the repair fit; use more calibration text")
        hidden = self.mtm.shape[0]
        lam = ridge * float(np.trace(self.mtm)) / hidden
        eye = np.eye(hidden)
        return np.linalg.solve(self.mtm + lam * eye, self.mtd + lam * eye)

    def residual(self, t: np.ndarray) -> float:
        """|M T - D|^2 / |D - M|^2 over the fitted tokens (weighted): 1 is plain removal, 0 a
        perfect fit. Computed from the sums alone (|D|^2 is kept too)."""
        # |MT - D|^2 = tr(T^T M^T M T) - 2 tr(T^T M^T D) + |D|^2
        fitted = float(np.einsum("ij,ij->", t, self.mtm @ t) - 2 * np.einsum("ij,ij->", t, self.mtd) + self.target_sq)
        return max(fitted, 0.0) / self.plain_sq if self.plain_sq > 0 else 0.0


# --- folding into weights, without torch (compress works on files) ------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16, ties to even (as torch does), as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    out[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)  # keep NaN a NaN
    return out


_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def fold_bytes(raw: bytes, dtype: str, shape: Sequence[int], t: np.ndarray, axis: int = 0) -> bytes:
    """``T^T @ X`` along ``axis`` (the hidden-sized output axis) for a safetensors tensor X
    given as raw little-endian bytes, returned as bytes of the same dtype and shape: computed
    in float64, rounded once to float32 and then to the stored dtype, as torch's ``.to()``
    rounds."""
    if dtype == "BF16":
        x = bf16_to_f32(np.frombuffer(raw, dtype="<u2")).reshape(shape)
    elif dtype in _NUMPY:
        x = np.frombuffer(raw, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).reshape(shape)
    else:
        raise RepskipError(f"cannot fold a linear repair into a {dtype} tensor; repair needs float weights")
    if not -len(shape) <= axis < len(shape) or x.shape[axis] != t.shape[0]:
        raise RepskipError(f"a repair map of size {t.shape[0]} does not fit axis {axis} of a tensor of shape {list(shape)}")
    moved = np.moveaxis(x.astype(np.float64), axis, 0)
    y = np.moveaxis((t.T @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape), 0, axis)
    if dtype == "F64":
        return y.astype("<f8").tobytes()
    y32 = y.astype(np.float32)
    if dtype == "BF16":
        return f32_to_bf16(y32).astype("<u2").tobytes()
    return y32.astype(np.dtype(_NUMPY[dtype]).newbyteorder("<")).tobytes()
