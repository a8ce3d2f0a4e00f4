"""The figures' common ground: PNGs that carry their provenance, one label size, the order of classes in a
heatmap, and the class similarity heatmap (fig. 6) that `alignclip similarity` draws and the report shows."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURE_DPI = 110
LABEL_SIZE = 9  # every title, tick label and legend of the figures: readable at the page's width


def save_figure(fig, path: str | Path, provenance: dict) -> None:
    """Save a PNG whose metadata names what it was drawn from (``Description``: JSON with the runs used)."""
    fig.savefig(path, dpi=FIGURE_DPI, metadata={"Title": provenance.get("figure", ""), "Description": json.dumps(provenance)})
    plt.close(fig)


def figure_provenance(path: str | Path) -> dict:
    """The provenance ``save_figure`` wrote into a PNG (empty if none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get("Description")
    return json.loads(text) if text else {}


def class_order(meta: dict, cosine: np.ndarray | None = None) -> tuple[list[int], str]:
    """Order of the classes in the heatmap, and how it was chosen.

    RotatedDigits: zero..nine. DomainBed folder datasets list classes alphabetically (ImageFolder), which means
    nothing, so their classes are ordered by average-linkage clustering of the text features (similar classes
    side by side). Other datasets keep their own label order."""
    classes = meta["classes"]
    if meta.get("dataset") == "rotated_digits":
        from alignclip.data.digits import CLASS_NAMES

        if sorted(classes) == sorted(CLASS_NAMES):
            return [classes.index(name) for name in CLASS_NAMES], "digit order"
    if meta.get("protocol") in ("domainbed", "wild") and cosine is not None and len(classes) > 2:
        from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
        from scipy.spatial.distance import squareform

        distance = np.clip(1.0 - (cosine + cosine.T) / 2.0, 0.0, None)
        np.fill_diagonal(distance, 0.0)
        condensed = squareform(distance, checks=False)
        tree = optimal_leaf_ordering(linkage(condensed, "average"), condensed)
        return [int(i) for i in leaves_list(tree)], "clustered (average linkage on text cosine)"
    return list(range(len(classes))), "dataset label order"


def plot_similarity(matrix: np.ndarray, classes: list[str], path: str | Path, meta: dict | None = None,
                    cosine: np.ndarray | None = None, provenance: dict | None = None) -> None:
    """Fig. 6: the row-softmaxed class similarity matrix, classes in a meaningful order (``class_order``)."""
    order, how = class_order(meta, cosine) if meta else (list(range(len(classes))), "label order")
    matrix = np.asarray(matrix)[np.ix_(order, order)]
    names = [classes[i] for i in order]
    n = len(names)
    size = min(max(5.0, 0.35 * n + 2.5), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="viridis")
    if n <= 60:
        ax.set_xticks(range(n), names, rotation=90, fontsize=LABEL_SIZE)
        ax.set_yticks(range(n), names, fontsize=LABEL_SIZE)
    ax.set_xlabel("class c", fontsize=LABEL_SIZE)
    ax.set_ylabel("class y", fontsize=LABEL_SIZE)
    ax.set_title(f"class similarity: row softmax of text cosine\nclasses: {how}", fontsize=LABEL_SIZE + 1)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label("similarity (rows sum to 1)", fontsize=LABEL_SIZE)
    fig.tight_layout()
    save_figure(fig, path, {"figure": "class similarity (fig. 6)", "class_order": how, "classes": names, **(provenance or {})})
