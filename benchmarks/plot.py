"""Plots for docs/benchmarks.md, from the JSON the benchmark scripts wrote.

    python benchmarks/plot.py [--results benchmarks/results] [--out docs/benchmarks]

Needs matplotlib (``pip install -e '.[bench]'``). Draws what a table shows less well: how the
server's CPU grows with viewers, MediaStream beside Janus, for each camera measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import ROOT

SERVERS = {"mediastream": "MediaStream (passthrough)", "janus": "Janus 1.1 (C)"}


def load(path: Path) -> list[dict[str, Any]] | None:
    if not path.exists():
        return None
    rows: list[dict[str, Any]] = json.loads(path.read_text())["results"]
    return [row for row in rows if row["viewers"] > 0]


def plot_fanout(results: Path, out: Path, suffix: str, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: load(results / f"fanout-{name}{suffix}.json") for name in SERVERS}
    if not any(series.values()):
        return None
    figure, (cpu, per_packet) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in series.items():
        if not rows:
            continue
        viewers = [row["viewers"] for row in rows]
        cpu.plot(viewers, [row["cpu_percent"] for row in rows], marker="o", label=SERVERS[name])
        per_packet.plot(
            viewers, [row["us_per_packet"] for row in rows], marker="o", label=SERVERS[name]
        )
    cpu.set(xlabel="viewers", ylabel="server CPU, % of one core", title=title)
    per_packet.set(
        xlabel="viewers", ylabel="µs of server CPU per RTP packet delivered", ylim=(0, None)
    )
    per_packet.axhline(25, color="grey", linestyle=":", label="target: 25 µs")
    for axes in (cpu, per_packet):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    path = out / f"fanout{suffix or '-sd'}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, title in (
        ("", "one camera, 640x360 25 fps ~800 kbps"),
        ("-hd", "one camera, 1920x1080 25 fps ~4 Mbps"),
    ):
        path = plot_fanout(args.results, args.out, suffix, title)
        if path is not None:
            print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
