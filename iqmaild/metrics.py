"""Process-wide counters rendered as Prometheus text for ``GET /metrics``."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += amount

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def render(self) -> str:
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in sorted(self.counters.items()):
            if name not in seen:
                lines.append(f"# TYPE iqmaild_{name} counter")
                seen.add(name)
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(
                f"iqmaild_{name}{{{label_text}}} {value}" if labels else f"iqmaild_{name} {value}"
            )
        for name, value in sorted(self.gauges.items()):
            base = name.split("{", 1)[0]
            if base not in seen:
                lines.append(f"# TYPE iqmaild_{base} gauge")
                seen.add(base)
            lines.append(f"iqmaild_{name} {value:g}")
        return "\n".join(lines) + "\n"
