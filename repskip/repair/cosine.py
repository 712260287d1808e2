"""The cosine repair: the map fitted to the direction of each token's target, not its size.

ReplaceMe (Shopkhoev et al. 2025) fits the map of a removed run either by least squares or by
minimising the cosine distance between the repaired MLP output and what it should be,

    T = argmin  mean over tokens of  1 - cos(m T, y - r)

with m the MLP output of the layer in front of the run, r the residual stream it joins and y
the full model's state after the run (repskip.repair.linear's notation); they report the
cosine fit ahead of least squares (Llama-3-8B-Instruct at 25% removed: 90.9% against 89.9%
average accuracy). There is no closed form, so the fit here keeps the tokens' rows (a seeded
sample when there are more than MAX_TOKENS) beside the least-squares sums, starts from the
least-squares map and runs L-BFGS for at most STEPS iterations in float64.

The cosine decides T's direction only: T and 2 T score the same. So the whole loss is kept
blind to scale, and the scale is set afterwards, by least squares along that direction.
The ridge pulls towards no repair as in least squares:

- in the loss, ``ridge`` times the angle between T and the identity, 1 - tr(T)^2 / (hidden
  |T|^2), which is also blind to scale (a penalty on |T - I|^2 would shrink T for free);
- in the scale, the scalar a minimising |a M T - D|^2 + lambda |a T - I|^2, with lambda the
  least-squares ridge (repskip.repair.linear), over every fitted token and its weight.

A strong ridge gives the identity, as it does in least squares. Everything else (the runs,
the check, the fold) is the linear repair's.
"""

from __future__ import annotations

import numpy as np

from .linear import LeastSquares

MAX_TOKENS = 32_768  # rows kept for the cosine fit: memory 2 x this x hidden float32
STEPS = 100
SEED = 0


class CosineFit:
    """The least-squares sums of every token, and the rows of up to MAX_TOKENS of them."""

    method = "cosine"

    def __init__(self, hidden: int):
        self.ls = LeastSquares(hidden)
        self._m: list[np.ndarray] = []
        self._d: list[np.ndarray] = []
        self._kept = 0
        self._rng = np.random.default_rng(SEED)

    @property
    def tokens(self) -> int:
        return self.ls.tokens

    @property
    def mtm(self) -> np.ndarray:
        return self.ls.mtm

    def add(self, m: np.ndarray, d: np.ndarray, w: np.ndarray | None = None) -> None:
        self.ls.add(m, d, w)
        m32, d32 = np.asarray(m, dtype=np.float32), np.asarray(d, dtype=np.float32)
        room = MAX_TOKENS - self._kept
        if room < len(m32):  # past the cap: a seeded sample of the rest, so memory stays flat
            take = np.sort(self._rng.choice(len(m32), size=max(room, 0), replace=False))
            m32, d32 = m32[take], d32[take]
        self._m.append(m32)
        self._d.append(d32)
        self._kept += len(m32)

    def solve(self, ridge: float) -> np.ndarray:
        import torch

        start = self.ls.solve(ridge)
        # the fits run under inference mode; the solve needs gradients of tensors of its own
        with torch.inference_mode(False), torch.enable_grad():
            m = torch.from_numpy(np.concatenate(self._m)).double()
            d = torch.from_numpy(np.concatenate(self._d)).double()
            keep = d.norm(dim=1) > 0  # a token with nothing to restore has no direction
            m, d = m[keep], d[keep]
            hidden = start.shape[0]
            t = torch.from_numpy(start.copy()).requires_grad_(True)
            opt = torch.optim.LBFGS([t], max_iter=STEPS, line_search_fn="strong_wolfe")

            def loss() -> torch.Tensor:
                opt.zero_grad()
                value = (1 - torch.nn.functional.cosine_similarity(m @ t, d, dim=1)).mean()
                value = value + ridge * (1 - torch.trace(t) ** 2 / (hidden * (t * t).sum()))
                value.backward()
                return value

            opt.step(loss)
            return self._scaled(t.detach().numpy().copy(), ridge)

    def _scaled(self, t: np.ndarray, ridge: float) -> np.ndarray:
        """``t`` times the scalar of least (ridged) squared error over every fitted token."""
        lam = ridge * float(np.trace(self.mtm)) / t.shape[0]  # the least-squares ridge
        along = float(np.einsum("ij,ij->", t, self.ls.mtd)) + lam * float(np.trace(t))  # tr(T'M'D) + lam tr T
        size = float(np.einsum("ij,ij->", t, self.mtm @ t)) + lam * float((t * t).sum())  # |MT|^2 + lam |T|^2
        return t * (along / size) if size > 0 else t

    def residual(self, t: np.ndarray) -> float:
        return self.ls.residual(t)


def fitter(method: str, hidden: int) -> LeastSquares | CosineFit:
    """The accumulator of a repair ``method`` (linear: least squares; cosine)."""
    return CosineFit(hidden) if method == "cosine" else LeastSquares(hidden)
