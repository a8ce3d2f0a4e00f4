"""CoOp/CoCoOp base-to-new generalisation (paper tables 3 and 5): train few-shot on half the classes (base),
test on the base classes and on the other half (new), each against its own label space; H is their harmonic mean.
"""

from __future__ import annotations

from alignclip.protocols.base import Protocol, View, few_shot, ordered_labels, paper_value, table_row


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class BaseToNew(Protocol):
    name = "base2new"
    description = "CoOp base-to-new: 16-shot base classes, tested on base and new classes"
    headline_metric = "H"
    table_prefix = "base2new"
    paper_section = "base2new"
    layouts = ("coop", "imagenet")
    recipe = "base2new/{dataset}"

    def training_set(self, manifest, meta, test_domain, seed, shots=None):
        train = manifest[manifest["split"] == "train"]
        return train[few_shot(train, seed, shots, meta) & (train["subset"] == "base")], list(meta["base_classes"])

    def evaluation_views(self, manifest, meta, test_domain, test_split):
        test = manifest[manifest["split"] == "test"]
        return [
            View("base", test[test["subset"] == "base"], list(meta["base_classes"])),
            View("new", test[test["subset"] == "new"], list(meta["new_classes"])),
        ]

    def derived_metrics(self, views):
        if {"base", "new"} <= set(views):
            return {"H": harmonic_mean(views["base"]["accuracy"], views["new"]["accuracy"])}
        return {}

    def table_rows(self, dataset, part):
        """Base, new and the harmonic mean H of the mean base and mean new accuracies."""
        pub = self.paper(dataset)
        rows = []
        for label in ordered_labels(part["label"].unique()):
            mine = part[part["label"] == label]
            published = pub.get(mine["method"].iloc[0], {})
            means = {}
            for view in ("base", "new"):
                r = mine[mine["view"] == view]
                if not r.empty:
                    means[view] = r["mean"].iloc[0]
                    rows.append(table_row(label, view, means[view], r["std"].iloc[0], paper_value(published.get(view)), r["seeds"].iloc[0]))
            if len(means) == 2:
                h = harmonic_mean(means["base"], means["new"])
                rows.append(table_row(label, "H", h, None, paper_value(published.get("H")), mine["seeds"].iloc[0]))
        return rows
