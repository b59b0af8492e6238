"""PNG charts of a run: one figure per workload, one bar panel per metric."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from benchmarks.results import Result

SHAREDICT_COLOR = "#d62728"
PEER_COLOR = "#7f7f7f"
PANEL_COLUMNS = 3


def write_charts(results: Sequence[Result], directory: str, titles: dict[str, str]) -> list[str]:
    """Write ``<workload>.png`` for each workload in ``results``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    os.makedirs(directory, exist_ok=True)
    written = []
    workloads = sorted({result.workload for result in results}, key=lambda name: int(name[1:]))
    for workload in workloads:
        rows = [result for result in results if result.workload == workload]
        metrics: list[tuple[str, str, bool]] = []
        for result in rows:
            if (result.metric, result.unit, result.higher_is_better) not in metrics:
                metrics.append((result.metric, result.unit, result.higher_is_better))

        columns = min(PANEL_COLUMNS, len(metrics))
        panel_rows = math.ceil(len(metrics) / columns)
        systems = list(dict.fromkeys(result.system for result in rows))
        height = 0.45 * len(systems) + 1.2
        figure, axes = pyplot.subplots(
            panel_rows, columns, figsize=(4.2 * columns, height * panel_rows), squeeze=False
        )
        for panel, (metric, unit, higher_is_better) in zip(axes.flat, metrics):
            by_system = {r.system: r for r in rows if r.metric == metric and r.unit == unit}
            names = [system for system in systems if system in by_system]
            values = [by_system[name].value for name in names]
            colors = [SHAREDICT_COLOR if name == "sharedict" else PEER_COLOR for name in names]
            labels = [name if by_system[name].durable else f"{name} *" for name in names]
            panel.barh(labels, values, color=colors)
            panel.invert_yaxis()
            better = "higher is better" if higher_is_better else "lower is better"
            panel.set_title(f"{metric} ({unit}), {better}", fontsize=9)
            panel.tick_params(labelsize=8)
            for position, value in enumerate(values):
                panel.annotate(
                    f"{value:,.3g}" if value < 1000 else f"{value:,.0f}",
                    (value, position),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
            panel.margins(x=0.25)
        for panel in list(axes.flat)[len(metrics) :]:
            panel.set_visible(False)

        figure.suptitle(f"{workload}: {titles.get(workload, '')}", fontsize=10)
        if not all(result.durable for result in rows):
            figure.text(0.01, 0.005, "* not durable: the write can still be lost when the call returns", fontsize=7)
        figure.tight_layout(rect=(0, 0.02, 1, 1))
        path = os.path.join(directory, f"{workload.lower()}.png")
        figure.savefig(path, dpi=110)
        pyplot.close(figure)
        written.append(path)
    return written
