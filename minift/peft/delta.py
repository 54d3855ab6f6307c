"""What full fine-tuning did to each weight matrix, and how much of it LoRA could express.

LoRA's premise (Hu et al. 2022; lecture 004): the change ΔW = W' - W that full fine-tuning
makes has low effective rank. We can check it on our own runs: take the singular values
s_1 >= s_2 >= ... of ΔW. By the Eckart-Young theorem the best rank-r approximation of ΔW keeps
exactly the energy s_1^2 + ... + s_r^2 out of ||ΔW||_F^2 — so

    captured(r) = sum_{i<=r} s_i^2 / sum_i s_i^2

is the largest share of the full fine-tuning update that a rank-r LoRA update could reproduce.
"""

from __future__ import annotations

import re

import numpy

from minift.backend import to_numpy


def singular_values(delta) -> numpy.ndarray:
    return numpy.linalg.svd(numpy.asarray(to_numpy(delta), dtype=numpy.float64), compute_uv=False)


def captured_energy(s: numpy.ndarray, r: int) -> float:
    """Share of ||ΔW||_F^2 kept by the best rank-r approximation (1.0 when ΔW = 0)."""
    total = float((s**2).sum())
    return 1.0 if total == 0 else float((s[:r] ** 2).sum() / total)


def effective_rank(s: numpy.ndarray, energy: float = 0.9) -> int:
    """Smallest r whose best rank-r approximation keeps ``energy`` of ΔW's squared norm."""
    total = float((s**2).sum())
    if total == 0:
        return 0
    return int(numpy.searchsorted(numpy.cumsum(s**2) / total, energy - 1e-12) + 1)


def delta_report(before: dict, model, pattern: str = r"_proj\.weight$", ranks=(1, 2, 4, 8, 16)) -> list[dict]:
    """For every 2-D weight matching ``pattern``: size of ΔW, its effective rank, and the share
    a rank-r LoRA could capture, for each r in ``ranks``."""
    rows = []
    for name, p in model.named_parameters():
        if p.ndim != 2 or not re.search(pattern, name) or name not in before:
            continue
        s = singular_values(to_numpy(p.data) - to_numpy(before[name]))
        rows.append({"name": name, "shape": tuple(p.shape), "frobenius": float(numpy.sqrt((s**2).sum())),
                     "effective_rank_90": effective_rank(s, 0.9), "full_rank": min(p.shape),
                     "captured": {r: captured_energy(s, r) for r in ranks}, "singular_values": s})
    return rows
