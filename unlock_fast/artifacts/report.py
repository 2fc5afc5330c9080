"""Held-out diagnostics of an alignment, per target layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AlignmentReport"]


@dataclass
class AlignmentReport:
    """Held-out diagnostics per target layer.

    rel_error[i] = ||H_t - Ĥ_t|| / ||H_t|| (Frobenius, as in the paper: the mean makes it
    look small); r2[i] = 1 - ||H_t - Ĥ_t||² / ||H_t - mean(H_t)||² (centred R², the honest
    one). Ĥ_t = H_s T (or the centred form) for pair layer_map[i].
    """

    layer_map: list[tuple[int, int]]
    rel_error: list[float]
    r2: list[float]
    num_rows: int
    rank: int
    centered: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "layer_map": [list(p) for p in self.layer_map],
            "rel_error": self.rel_error,
            "r2": self.r2,
            "num_rows": self.num_rows,
            "rank": self.rank,
            "centered": self.centered,
        }

    def __str__(self) -> str:
        head = f"alignment rank {self.rank} on {self.num_rows} held-out rows"
        lines = [head, "target  source  rel_error      R2"]
        for (s, t), e, r in zip(self.layer_map, self.rel_error, self.r2, strict=True):
            lines.append(f"{t:6d}  {s:6d}  {e:9.4f}  {r:7.4f}")
        return "\n".join(lines)
