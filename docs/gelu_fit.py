"""Fit the coefficients of the float32 GELU kernel (:mod:`nanoopt.float_kernels.gelu`) and check it on every float32.

The kernel computes the lower tail of the normal distribution, ``Q(t) = Phi(-t) = erfc(t / sqrt 2) / 2`` for
``t = |x|`` in [0, 6], as ``Q(t) = 2^w * R(t)`` with ``w = -t^2 / (2 ln 2)`` (so ``2^w = exp(-t^2 / 2)``, the form of
Cody's erfc approximations, Math. Comp. 23 (1969) 631-637) and two fits, both in float64, then rounded to float32:

* ``R(t) = P(t) / D(t) ~ erfcx(t / sqrt 2) / 2``, P and D of degree 3 with ``P(0) = 1/2`` and ``D(0) = 1`` (so that
  Phi(0) = 1/2 exactly), minimising ``max_t (1 + t) Q(t) |P / (D R) - 1|`` on [0, 6]: ``t Q(t)`` is what multiplies
  R's relative error in GELU = x - t Q (x > 0) or t Q (x < 0), ``Q(t)`` what multiplies it in Phi. Loeb's
  linearisation (``P - R D`` weighted by ``1 / (R D_previous)``, Loeb 1957, see Cheney, *Introduction to
  Approximation Theory*, 1966, ch. 2) with Lawson's iterative reweighting towards the minimax solution (Lawson 1961;
  Rice & Usow, Math. Comp. 22 (1968) 118-127) on 4000 Chebyshev points;
* ``2^f ~ 1 + sum c_i f^i`` on [-1/2, 1/2], degree 5, minimax relative error (the same Lawson iteration; the
  reduction ``w = k + f``, ``k = rint(w)``, is exact in float32, Cody & Waite, *Software Manual for the Elementary
  Functions*, 1980, ch. 6; Muller, *Elementary Functions*, 3rd ed. 2016, ch. 11).

``python docs/gelu_fit.py`` prints the coefficients as the kernel holds them (the shortest decimal of each float32).
``python docs/gelu_fit.py --check`` also evaluates the module's NumPy reference and its Numba kernel on every float32
x with 2^-12 <= |x| < 8 (about 2.4e8 values, a few minutes): both must give the same bits, the absolute error of GELU
against ``x (1 + erf(x / sqrt 2)) / 2`` in float64 must stay below 5e-7 and Phi in [0, 1]; it prints the largest
errors of GELU and of Phi. Outside that range: for |x| < 2^-12 GELU(x) = x / 2 + O(x^2) is computed with an error of a
few ulps of x / 2; for |x| >= 6 the kernel returns x or 0 and Phi 1 or 0 (the exact GELU differs by less than 6e-9).
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import special

T = 6.0  # the fit's range of t = |x|; beyond, Phi is 0 or 1 to within 1e-9


def lawson_weights(weights: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Lawson's update: each point's least-squares weight grows with its error, towards the minimax solution."""
    weights = weights * err
    return weights / weights.sum()


def fit_tail(degree: int = 3, points: int = 4000, iterations: int = 80) -> tuple[np.ndarray, np.ndarray, float]:
    """(P, D, weighted error): P(t) / D(t) ~ erfcx(t / sqrt 2) / 2 on [0, T], coefficients lowest first."""
    t = 0.5 * T * (1 - np.cos(np.linspace(0, np.pi, points)))
    r = 0.5 * special.erfcx(t / np.sqrt(2))
    importance = (1 + t) * 0.5 * special.erfc(t / np.sqrt(2))
    powers = np.vander(t, degree + 1, increasing=True)[:, 1:]
    lawson = np.ones_like(t)
    d_previous = np.ones_like(t)
    for _ in range(iterations):  # p_1.. and d_1..: sum p_i t^i - R sum d_j t^j = R - 1/2
        scale = importance * np.sqrt(lawson) / (r * d_previous)
        matrix = np.hstack([powers, -r[:, None] * powers]) * scale[:, None]
        coef, *_ = np.linalg.lstsq(matrix, (r - 0.5) * scale, rcond=None)
        p = np.concatenate([[0.5], coef[:degree]])
        d = np.concatenate([[1.0], coef[degree:]])
        d_previous = np.polynomial.polynomial.polyval(t, d)
        err = importance * np.abs(np.polynomial.polynomial.polyval(t, p) / (d_previous * r) - 1)
        lawson = lawson_weights(lawson, err)
    return p, d, float(err.max())


def fit_exp2(degree: int = 5, points: int = 2000, iterations: int = 80) -> tuple[np.ndarray, float]:
    """(c, relative error): 1 + sum c_i f^i ~ 2^f on [-1/2, 1/2], coefficients lowest first."""
    f = 0.5 * np.cos(np.linspace(0, np.pi, points))
    y = np.exp2(f)
    powers = np.vander(f, degree + 1, increasing=True)[:, 1:]
    lawson = np.ones_like(f)
    for _ in range(iterations):
        scale = np.sqrt(lawson) / y
        coef, *_ = np.linalg.lstsq(powers * scale[:, None], (y - 1) * scale, rcond=None)
        err = np.abs((1 + powers @ coef) / y - 1)
        lawson = lawson_weights(lawson, err)
    return np.concatenate([[1.0], coef]), float(err.max())


def check_every_float32(low: float = 2.0**-12, high: float = 8.0) -> None:
    """Reference and kernel on every float32 with low <= |x| < high: equal bits, GELU error < 5e-7, Phi in [0, 1]."""
    from nanoopt.float_kernels import gelu  # the module under test (imported here: the fit needs only SciPy)

    worst_gelu = worst_phi = (0.0, 0.0)
    first, last = int(np.float32(low).view(np.int32)), int(np.float32(high).view(np.int32))
    for sign in (np.float32(1), np.float32(-1)):
        for start in range(first, last, 1 << 22):
            x = np.arange(start, min(start + (1 << 22), last), dtype=np.int32).view(np.float32) * sign
            out, phi = gelu.gelu_forward(x)
            ref_out, ref_phi = gelu.gelu_forward_reference(x)
            assert np.array_equal(out, ref_out) and np.array_equal(phi, ref_phi), f"kernel != reference near {x[0]}"
            assert phi.min() >= 0 and phi.max() <= 1
            a = x.astype(np.float64)
            exact_phi = 0.5 * special.erfc(-a / np.sqrt(2))
            for err, name in ((np.abs(out - a * exact_phi), "gelu"), (np.abs(phi - exact_phi), "phi")):
                i = int(err.argmax())
                if name == "gelu" and err[i] > worst_gelu[0]:
                    worst_gelu = (float(err[i]), float(x[i]))
                if name == "phi" and err[i] > worst_phi[0]:
                    worst_phi = (float(err[i]), float(x[i]))
    print(f"every float32 with {low:g} <= |x| < {high:g}: kernel == reference; "
          f"max |GELU error| {worst_gelu[0]:.3e} at x = {worst_gelu[1]!r}, "
          f"max |Phi error| {worst_phi[0]:.3e} at x = {worst_phi[1]!r}")
    assert worst_gelu[0] < 5e-7


def main() -> None:
    p, d, tail_err = fit_tail()
    c, exp2_err = fit_exp2()
    print(f"R = P / D, degree 3 / 3: max (1 + t) Q(t) relative error {tail_err:.3g} (float64 coefficients)")
    print(f"2^f, degree 5: max relative error {exp2_err:.3g} (float64 coefficients)")
    for name, coefs in (("P", p), ("D", d), ("E", c)):
        print(f"{name} (t^0 first):", ", ".join(str(np.float32(v)) for v in coefs))
    if "--check" in sys.argv[1:]:
        check_every_float32()


if __name__ == "__main__":
    main()
