"""Draw docs/tidar_masks.png: the TiDAR training mask (k=4, S=8) and one decoding step (k=4,
3 drafts, one pre-draft block per outcome j=0..3), straight from tidar_bench.masks.

    python docs/make_tidar_figure.py [OUT.png]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from tidar_bench.masks import TidarStepLayout, tidar_step, tidar_training  # noqa: E402

K, S, CACHED, DRAFTS = 4, 8, 2, 3


def _draw(ax, mask, row_labels, col_labels, title, splits):
    ax.imshow(mask.int().numpy(), cmap=ListedColormap(["#f4f4f4", "#2b6cb0"]), vmin=0, vmax=1)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(mask.shape[1] + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(mask.shape[0] + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    for x in splits.get("cols", []):
        ax.axvline(x - 0.5, color="#c53030", linewidth=1.2)
    for y in splits.get("rows", []):
        ax.axhline(y - 0.5, color="#c53030", linewidth=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("keys (attended to)", fontsize=8)
    ax.set_ylabel("queries", fontsize=8)


def main(out: str | Path = Path(__file__).with_name("tidar_masks.png")) -> Path:
    out = Path(out)
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 7.2), gridspec_kw={"width_ratios": [1, 1.45]})

    train = tidar_training(S, K)
    labels = [f"x{i}" for i in range(S)] + [f"M@{i}" for i in range(S)]
    _draw(a, train, labels, labels,
          f"training: [clean | mask copy], S={S}, k={K}\nM@i predicts x_i (same position)",
          {"cols": [S, S + K], "rows": [S, S + K]})

    layout = TidarStepLayout(cached=CACHED, n_drafts=DRAFTS, block_size=K, outcomes=tuple(range(DRAFTS + 1)))
    step = tidar_step(layout)
    pos = layout.positions().tolist()
    P = CACHED
    fed = [f"x @{P}"] + [f"d{i} @{P + i}" for i in range(1, DRAFTS + 1)]
    for j in layout.outcomes:
        fed += [f"j={j} M+{o} @{P + j + 1 + o}" for o in range(K)]
    assert len(fed) == len(pos)
    cols = [f"cache @{i}" for i in range(P)] + fed
    blocks = [P + layout.block_start(bi) for bi in range(len(layout.outcomes))]
    _draw(b, step, fed, cols,
          f"decoding step: {CACHED} cached, x + {DRAFTS} drafts (causal), one k={K} block per outcome j\n"
          "block j starts at the kept AR token's position P+j+1; its offsets 1..k-1 are the next drafts",
          {"cols": [P, P + layout.n_causal] + blocks[1:], "rows": [layout.n_causal] + [s - P for s in blocks[1:]]})

    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
