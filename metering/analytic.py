"""Analytic energy: MACs and bytes moved x per-operation energies. Deterministic and hardware-independent.

This is how the early-exit / edge-cloud papers report energy, so it is computed beside every measured figure,
never instead of one. The default table is Horowitz, "Computing's energy problem (and what we can do about
it)", ISSCC 2014, 45 nm, 0.9 V:

- one fp32 multiply-accumulate = fp32 multiply 3.7 pJ + fp32 add 0.9 pJ = 4.6 pJ;
- one 32-bit DRAM read = 640 pJ, charged per 4 bytes moved.

    energy_j = macs x (mult_pj + add_pj) x 1e-12 + bytes_moved / 4 x dram_pj x 1e-12

`bytes_moved` is the model card's figure (params x 4 + activations x 4, fp32), i.e. it assumes every weight
and activation crosses DRAM once per image.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

PJ = 1e-12
HOROWITZ_45NM_FP32: Dict[str, float] = {
    "mult_pj": 3.7,  # fp32 multiply
    "add_pj": 0.9,  # fp32 add
    "dram_pj_per_word": 640.0,  # 32-bit DRAM read
    "word_bytes": 4.0,
}
# The same paper's 8-bit integer figures, for a quantised model: int8 multiply 0.2 pJ, int8 add 0.03 pJ.
HOROWITZ_45NM_INT8: Dict[str, float] = dict(HOROWITZ_45NM_FP32, mult_pj=0.2, add_pj=0.03)
TABLES = {"horowitz45nm-fp32": HOROWITZ_45NM_FP32, "horowitz45nm-int8": HOROWITZ_45NM_INT8}


class AnalyticModel:
    """Per-operation energy table; `for_card()` binds it to a model card's blocks."""

    source = "analytic"

    def __init__(self, table: Optional[Mapping[str, float]] = None) -> None:
        merged = dict(HOROWITZ_45NM_FP32)
        if table is not None:
            unknown = sorted(set(table) - set(merged))
            if unknown:
                raise ValueError(f"unknown analytic table keys {unknown}; known: {sorted(merged)}")
            merged.update({k: float(v) for k, v in table.items()})
        bad = [k for k, v in merged.items() if v < 0 or (k == "word_bytes" and v <= 0)]
        if bad:
            raise ValueError(f"analytic table values must be >= 0 (word_bytes > 0): {bad}")
        self.table = merged
        self.blocks: Dict[str, Dict[str, Any]] = {}

    @classmethod
    def for_card(cls, card: Mapping[str, Any], table: Optional[Mapping[str, float]] = None) -> AnalyticModel:
        """A model over `card["blocks"][name]["macs" | "bytes_moved"]` (per single image)."""
        blocks = card.get("blocks")
        if not isinstance(blocks, Mapping) or not blocks:
            raise ValueError("model card has no 'blocks'")
        model = cls(table)
        for name, block in blocks.items():
            missing = [k for k in ("macs", "bytes_moved") if k not in block]
            if missing:
                raise ValueError(f"card block {name!r} lacks {missing}")
            model.blocks[name] = dict(block)
        return model

    @property
    def mac_pj(self) -> float:
        return self.table["mult_pj"] + self.table["add_pj"]

    def compute_j(self, macs: float) -> float:
        """Joules for `macs` multiply-accumulates."""
        _check("macs", macs)
        return macs * self.mac_pj * PJ

    def memory_j(self, bytes_moved: float) -> float:
        """Joules for moving `bytes_moved` bytes from DRAM."""
        _check("bytes_moved", bytes_moved)
        return bytes_moved / self.table["word_bytes"] * self.table["dram_pj_per_word"] * PJ

    def energy_j(self, *, macs: float, bytes_moved: float) -> float:
        """Joules for one pass of `macs` MACs moving `bytes_moved` bytes."""
        return self.compute_j(macs) + self.memory_j(bytes_moved)

    def block_j(self, name: str) -> float:
        """Joules per image for one block of the bound card ("main", "extension", "cloud")."""
        try:
            block = self.blocks[name]
        except KeyError:
            raise KeyError(f"no block {name!r} (blocks: {sorted(self.blocks)}); use for_card()") from None
        return self.energy_j(macs=block["macs"], bytes_moved=block["bytes_moved"])

    def blocks_j(self, names: Iterable[str]) -> float:
        """Joules per image for a path through several blocks, e.g. ["main", "extension"]."""
        return sum(self.block_j(n) for n in names)


def _check(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
