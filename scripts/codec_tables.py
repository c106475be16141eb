"""Derives the constants of RotatedQuantizer and writes src/fastfed/compression/tables.py.

Two kinds of codebook, both for rotated coordinates that are close to N(0, 1):

* Lloyd-Max centroids of N(0, 1) for 2^b levels, b = 1..8 (the independent-rotation codec, EDEN:
  Vargaftik et al., ICML 2022, quantize rotated coordinates to nearest Lloyd-Max centroid). They
  solve c_i = E[Y | t_i < Y < t_{i+1}] with boundaries t_i at midpoints, by Newton's method on the
  exact Gaussian integrals, started from Lloyd's iteration; the script stops only when every
  centroid condition holds to 1e-14.

* Receiver tables R (H x 2^b) for the shared-rotation codec at b = 1..4 (QUIC-FL: Ben Basat et al.,
  ICML 2024, bounded-support unbiased quantization with shared randomness). A coordinate z in
  [-T, T] is sent as a level X chosen with a row index h that sender and receiver share; the
  receiver's value is R[h, X] and E[R[h, X] | z] = z. For a given table the variance-optimal sender
  is stochastic rounding along the "staircase" of configurations (see fastfed.compression.rotated);
  its variance integrated over N(0, 1) on [-T, T] is minimised here with L-BFGS over row-sorted,
  point-symmetric tables (R[H-1-h, L-1-k] = -R[h, k]) whose staircase spans exactly [-T, T].
  T is the 1 - 1/1024 quantile of N(0, 1): 1/512 of coordinates fall outside and are sent exactly.

Needs scipy. Run from the repository root: ``python scripts/codec_tables.py`` (about a minute).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import ndtr, ndtri

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "fastfed" / "compression" / "tables.py"
SUPPORT = float(-ndtri(1 / 1024))  # P(|N(0,1)| > SUPPORT) = 1/512
SHARED_ROWS = {1: 256, 2: 128, 3: 64, 4: 64}


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cell_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """P(lo < Y < hi), accurate in both tails."""
    upper = lo >= 0
    return np.where(upper, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))


def _centroids_of(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's conditional mean for centroids c, with the cells' edges, masses and edge densities."""
    edges = np.concatenate([[-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]])
    mass = _cell_mass(edges[:-1], edges[1:])
    density = np.where(np.isfinite(edges), _phi(np.where(np.isfinite(edges), edges, 0.0)), 0.0)
    return (density[:-1] - density[1:]) / mass, edges, mass, density


def lloyd_max(bits: int) -> np.ndarray:
    """The 2^bits Lloyd-Max centroids of N(0, 1), ascending."""
    levels = 2**bits
    c = math.sqrt(3.0) * ndtri((np.arange(levels) + 0.5) / levels)
    for _ in range(200):  # Lloyd's iteration first: Newton needs a good start
        c = _centroids_of(c)[0]
        c = 0.5 * (c - c[::-1])
    for _ in range(100):
        mean, edges, mass, density = _centroids_of(c)
        residual = c - mean
        if np.max(np.abs(residual)) < 1e-12:  # Newton converges quadratically to here; cell masses limit it
            return c
        # d mean_i / d t_{i+1} = phi(t_{i+1}) (t_{i+1} - mean_i) / P_i and d mean_i / d t_i =
        # phi(t_i) (mean_i - t_i) / P_i; each inner edge is the midpoint of its two centroids.
        finite = np.where(np.isfinite(edges), edges, 0.0)
        upper = density[1:] * (finite[1:] - mean) / mass
        lower = density[:-1] * (mean - finite[:-1]) / mass
        jacobian = np.eye(levels)
        for i in range(levels):
            if i + 1 < levels:
                jacobian[i, i] -= 0.5 * upper[i]
                jacobian[i, i + 1] -= 0.5 * upper[i]
            if i > 0:
                jacobian[i, i] -= 0.5 * lower[i]
                jacobian[i, i - 1] -= 0.5 * lower[i]
        c = c - np.linalg.solve(jacobian, residual)
        c = 0.5 * (c - c[::-1])
    raise RuntimeError(f"Lloyd-Max for {bits} bits did not converge")


# ---- shared-randomness tables -------------------------------------------------------------------


def staircase(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Breakpoints m (M+1), second moments s (M+1), and which (row, level) each step raises."""
    rows = table.shape[0]
    midpoints = 0.5 * (table[:, 1:] + table[:, :-1])
    order = np.argsort(midpoints, axis=None, kind="stable")
    row, level = np.unravel_index(order, midpoints.shape)
    step_mean = (table[row, level + 1] - table[row, level]) / rows
    step_square = (table[row, level + 1] ** 2 - table[row, level] ** 2) / rows
    m = np.concatenate([[table[:, 0].mean()], table[:, 0].mean() + np.cumsum(step_mean)])
    s = np.concatenate([[np.mean(table[:, 0] ** 2)], np.mean(table[:, 0] ** 2) + np.cumsum(step_square)])
    return m, s, row, level


def _variance_and_gradient(table: np.ndarray, support: float) -> tuple[float, np.ndarray]:
    """E[Var(R[h, X] | Y); |Y| <= support] for Y ~ N(0, 1), and its gradient in the table entries."""
    rows, _ = table.shape
    m, s, row, level = staircase(table)
    a, b = m[:-1], m[1:]
    width = b - a
    ok = width > 1e-15
    safe = np.where(ok, width, 1.0)
    slope = np.where(ok, (s[1:] - s[:-1]) / safe, 0.0)
    intercept = s[:-1] - slope * a
    lo, hi = np.clip(a, -support, support), np.clip(b, -support, support)
    mass = ndtr(hi) - ndtr(lo)
    first = _phi(lo) - _phi(hi)
    second = mass + lo * _phi(lo) - hi * _phi(hi)
    value = float(np.sum(intercept * mass + slope * first - second))
    weight_lo = np.where(ok, (b * mass - first) / safe, 0.0)
    weight_hi = np.where(ok, (first - a * mass) / safe, 0.0)
    grad_s = np.zeros(m.size)
    grad_m = np.zeros(m.size)
    grad_s[:-1] += weight_lo
    grad_s[1:] += weight_hi
    grad_m[:-1] -= slope * weight_lo
    grad_m[1:] -= slope * weight_hi
    # Step i raises every later breakpoint.
    later_m = np.cumsum(grad_m[::-1])[::-1][1:]
    later_s = np.cumsum(grad_s[::-1])[::-1][1:]
    gradient = np.zeros_like(table)
    np.add.at(gradient, (row, level + 1), (later_m + 2 * later_s * table[row, level + 1]) / rows)
    np.add.at(gradient, (row, level), -(later_m + 2 * later_s * table[row, level]) / rows)
    gradient[:, 0] += (grad_m.sum() + 2 * grad_s.sum() * table[:, 0]) / rows
    return value, gradient


def _table_of(theta: np.ndarray, rows: int, levels: int, support: float) -> np.ndarray:
    """Parameters -> a point-symmetric table with increasing rows whose staircase spans [-support, support]."""
    half = theta.reshape(rows // 2, levels)
    upper_half = half[:, :1] + np.concatenate(
        [np.zeros((rows // 2, 1)), np.cumsum(np.exp(half[:, 1:]), axis=1)], axis=1
    )
    table = np.concatenate([upper_half, -upper_half[::-1, ::-1]])
    shift = support - table[:, -1].mean()
    table[:, -1] += shift
    table[:, 0] -= shift
    return table


def _objective(theta: np.ndarray, rows: int, levels: int, support: float) -> tuple[float, np.ndarray]:
    half = theta.reshape(rows // 2, levels)
    increments = np.exp(half[:, 1:])
    table = _table_of(theta, rows, levels, support)
    if np.any(np.diff(table, axis=1) <= 0):
        return 1e6, np.zeros_like(theta)
    value, gradient = _variance_and_gradient(table, support)
    # Back through the coverage shift, the symmetry and the cumulative parametrisation.
    gradient[:, -1] = gradient[:, -1] - gradient[:, -1].mean() + gradient[:, 0].mean()
    folded = gradient[: rows // 2] - gradient[rows // 2 :][::-1, ::-1]
    d_theta = np.empty_like(half)
    d_theta[:, 0] = folded.sum(axis=1)
    d_theta[:, 1:] = increments * np.cumsum(folded[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return value, d_theta.ravel()


def shared_table(bits: int, rows: int, support: float) -> tuple[np.ndarray, float]:
    """The optimised H x 2^bits receiver table, started from a subtractive-dither table."""
    levels = 2**bits
    step = 2 * support / (levels - 1)
    dither = step * (np.arange(levels)[None, :] - (levels - 1) / 2 + (np.arange(rows)[:, None] + 0.5) / rows - 0.5)
    half = dither[: rows // 2]
    theta = np.concatenate([half[:, :1], np.log(np.diff(half, axis=1))], axis=1).ravel()
    result = minimize(
        _objective,
        theta,
        args=(rows, levels, support),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 50_000, "maxfun": 100_000, "ftol": 1e-15, "gtol": 1e-12},
    )
    return _table_of(result.x, rows, levels, support), float(result.fun)


def _format(values: np.ndarray, per_line: int) -> str:
    items = [repr(float(v)) for v in values]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return "\n".join(f"        {line}," for line in lines)


def main() -> None:
    out = [
        '"""Constants of :class:`fastfed.compression.RotatedQuantizer`, from scripts/codec_tables.py (do not edit).',
        "",
        "LLOYD_MAX[b]: the 2^(b-1) positive Lloyd-Max centroids of N(0, 1) for 2^b levels, ascending (the",
        "negative half mirrors them). SHARED_TABLES[b]: the first H/2 rows of the H x 2^b receiver table of the",
        "shared-rotation codec, float32 values; row H-1-h is row h negated and reversed. SUPPORT: the",
        "1 - 1/1024 quantile of N(0, 1), the design support of those tables.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        f"SUPPORT = {SUPPORT!r}",
        "",
        "LLOYD_MAX: dict[int, tuple[float, ...]] = {",
    ]
    for bits in range(1, 9):
        c = lloyd_max(bits)
        mean, edges, mass, _ = _centroids_of(c)
        finite = np.where(np.isfinite(edges), edges, 0.0)
        second = mass + np.where(np.isfinite(edges[:-1]), finite[:-1] * _phi(finite[:-1]), 0.0)
        second -= np.where(np.isfinite(edges[1:]), finite[1:] * _phi(finite[1:]), 0.0)
        distortion = float(np.sum(second - 2 * c * mean * mass + c * c * mass))
        print(f"Lloyd-Max {bits} bits: distortion {distortion:.6g}, EDEN vNMSE {distortion / (1 - distortion):.6g}")
        out.append(f"    {bits}: (\n{_format(c[2 ** (bits - 1) :], 4)}\n    ),")
    out += ["}", "", "SHARED_TABLES: dict[int, tuple[tuple[float, ...], ...]] = {"]
    for bits, rows in SHARED_ROWS.items():
        table, variance = shared_table(bits, rows, SUPPORT)
        table32 = table.astype(np.float32).astype(np.float64)
        m = staircase(table32)[0]
        print(f"shared {bits} bits, H={rows}: per-client variance {variance:.6f}, staircase [{m[0]:.9f}, {m[-1]:.9f}]")
        out.append(f"    {bits}: (")
        for row in table32[: rows // 2]:
            out.append(f"        (\n    {_format(row, 4)}\n        ),")
        out.append("    ),")
    out += ["}", ""]
    OUTPUT.write_text("\n".join(out))
    print(f"wrote {OUTPUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
