"""Number formatting shared by the reports' markdown."""

import math


def fmt(x: float | None, spec: str = ".3f") -> str:
    """``x`` formatted with ``spec``; None and NaN as ``"nan"``."""
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def interval(entry: dict, low: str = "ci_low", high: str = "ci_high") -> str:
    """``[low, high]`` of an estimate's interval, two decimals."""
    return f"[{fmt(entry[low], '.2f')}, {fmt(entry[high], '.2f')}]"
