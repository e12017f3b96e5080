"""Jetson power rails: which INA3221 rails make up the board total (shared by jtop, tegrastats, ina3221).

- Jetson Nano (L4T 32): `POM_5V_IN` is the module input; `POM_5V_GPU` and `POM_5V_CPU` are fed by it.
- Xavier NX, Orin NX, Orin Nano, TX2: `VDD_IN` is the module input; `VDD_CPU_GPU_CV`, `VDD_SOC`... are
  fed by it.
- AGX Orin has no input rail. Its two INA3221s (0x40: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0; 0x41: NC,
  VDDQ_VDD2_1V8AO, NC) measure separate supplies taken from the module input, so the total is their sum:
  VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 + VDDQ_VDD2_1V8AO (module power, without the carrier board and
  without the input regulator's loss). jtop sums the same four, so the two backends agree.
- Any other board without an input rail: the sum of all rails, logged as such.

An input rail, when present, is the total on its own: adding the rails it feeds would count them twice.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

logger = logging.getLogger(__name__)

INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")  # the module input, in order of preference
AGX_ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")


def is_unconnected(label: str) -> bool:
    """INA3221 channels labelled NC (no connection) or the hwmon 'sum of shunt voltages' carry no rail."""
    return label.strip().upper() == "NC" or "sum of shunt" in label.lower()


def total_rails(rails: Sequence[str], override: Optional[Sequence[str]] = None) -> List[str]:
    """The rails whose sum is the board's power (see the module docstring); `override` picks them by hand."""
    if override:
        missing = [r for r in override if r not in rails]
        if missing:
            raise ValueError(f"total rails {missing} are not among the rails found: {list(rails)}")
        return list(override)
    for name in INPUT_RAILS:
        if name in rails:
            return [name]
    if all(r in rails for r in AGX_ORIN_RAILS):
        return list(AGX_ORIN_RAILS)
    logger.info("no input rail among %s: the total is the sum of all of them", list(rails))
    return list(rails)
