"""GoogLeNet's Table 1 (Szegedy et al., 2014) beside the arithmetic computed from our model.

The paper's conventions, worked out from its own rows: `params` counts weights only (no biases)
in units of K = 1024 (inception 3a: 163,328 weights / 1024 = 159.5K, printed 159K); `ops` are
multiply-accumulates per image in units of M = 10^6 (3a: 163,328 x 28 x 28 = 128.0M).
"""

from __future__ import annotations

from dataclasses import dataclass

from .arithmetic import Table

PARAM_UNIT = 1024  # the paper's "K"
OPS_UNIT = 10**6  # the paper's "M"
TOLERANCE = 0.05  # rows further off than this are marked


@dataclass(frozen=True)
class PaperRow:
    label: str  # the paper's "type" column
    prefix: str  # which of our rows it covers: names equal to it or starting with it + "."
    params_k: float | None  # as printed, in K
    ops_m: float | None  # as printed, in M


# Only the rows that carry parameters or operations; pooling, dropout and softmax have none.
TABLE_1 = [
    PaperRow("convolution 7x7/2", "conv1", 2.7, 34),
    PaperRow("convolution 3x3/1 (with 1x1 reduce)", "conv2", 112, 360),
    PaperRow("inception (3a)", "inception3a", 159, 128),
    PaperRow("inception (3b)", "inception3b", 380, 304),
    PaperRow("inception (4a)", "inception4a", 364, 73),
    PaperRow("inception (4b)", "inception4b", 437, 88),
    PaperRow("inception (4c)", "inception4c", 463, 100),
    PaperRow("inception (4d)", "inception4d", 580, 119),
    PaperRow("inception (4e)", "inception4e", 840, 170),
    PaperRow("inception (5a)", "inception5a", 1072, 54),
    PaperRow("inception (5b)", "inception5b", 1388, 71),
    PaperRow("linear", "fc", 1000, 1),
]


@dataclass
class Comparison:
    label: str
    paper_params_k: float
    computed_params_k: float
    paper_ops_m: float
    computed_ops_m: float

    @property
    def params_off(self) -> float:
        return abs(self.computed_params_k - self.paper_params_k) / self.paper_params_k

    @property
    def ops_off(self) -> float:
        return abs(self.computed_ops_m - self.paper_ops_m) / self.paper_ops_m

    @property
    def marked(self) -> bool:
        return self.params_off > TOLERANCE or self.ops_off > TOLERANCE


def _covers(prefix: str, name: str) -> bool:
    # conv2 also covers conv2_reduce: the paper's row is both layers (depth 2)
    return name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + "_")


def compare(table: Table) -> list[Comparison]:
    """One Comparison per Table 1 row, from an arithmetic table of our googlenet at 3x224x224."""
    rows = []
    for paper in TABLE_1:
        covered = [r for r in table.layers if r.kind in ("conv", "fc") and _covers(paper.prefix, r.name)]
        if not covered:
            raise ValueError(f"no computed rows for the paper's {paper.label!r}")
        rows.append(
            Comparison(
                paper.label,
                paper.params_k,
                sum(r.weights for r in covered) / PARAM_UNIT,
                paper.ops_m,
                sum(r.macs for r in covered) / OPS_UNIT,
            )
        )
    return rows


def format_comparison(rows: list[Comparison]) -> str:
    lines = [
        f"{'GoogLeNet Table 1 row':<38} {'params (K=1024)':>22} {'ops (M MACs)':>22}",
        f"{'':<38} {'paper':>10} {'computed':>11} {'paper':>10} {'computed':>11}",
        "-" * 84,
    ]
    for r in rows:
        mark = "  <- differs > 5%" if r.marked else ""
        lines.append(
            f"{r.label:<38} {r.paper_params_k:>10g} {r.computed_params_k:>11.1f} "
            f"{r.paper_ops_m:>10g} {r.computed_ops_m:>11.1f}{mark}"
        )
    lines.append("-" * 84)
    lines.append("paper: weights only (no biases), K = 1024; ops = multiply-accumulates per image, M = 10^6")
    return "\n".join(lines)
