"""CLIPood's domain shift in the wild (paper table 4): one held-out domain, and classes unseen in training.

The classes are split into base and new (open) halves; training sees the base classes of every other domain.
The held-out domain is scored on its base classes, its new classes and all of them, always against every class.
"""

from __future__ import annotations

from alignclip.protocols.base import Protocol, View, ordered_labels, paper_value, table_row


class InTheWild(Protocol):
    name = "wild"
    description = "CLIPood in the wild: held-out domain and unseen (new) classes"
    held_out_domain = True
    group_key = "domain"
    headline_metric = "all_acc"
    table_prefix = "wild"
    paper_section = "wild"
    layouts = ("domainbed",)
    recipe = "wild/{dataset}"

    def training_set(self, manifest, meta, test_domain, seed, shots=None):  # no few-shot subsets: shots unused
        train = manifest[manifest["split"] == "train"]
        rows = train[(train["domain"] != test_domain) & (train["subset"] == "base")]
        return rows, list(meta["base_classes"])

    def evaluation_views(self, manifest, meta, test_domain, test_split):
        everything = list(range(len(meta["classes"])))
        target = manifest[manifest["domain"] == test_domain]
        # target base and open classes, in and out splits, against all classes (base then new)
        return [
            View("base", target[target["subset"] == "base"], everything),
            View("new", target[target["subset"] == "new"], everything),
            View("all", target, everything),
        ]

    def table_rows(self, dataset, part):
        """All classes of the held-out domain (base and new), plus base / new separately."""
        pub = self.paper(dataset)
        rows = []
        for label in ordered_labels(part["label"].unique()):
            mine = part[part["label"] == label]
            method = mine["method"].iloc[0]
            for domain in sorted(mine["test_domain"].unique()):
                for view in ("all", "base", "new"):
                    r = mine[(mine["test_domain"] == domain) & (mine["view"] == view)]
                    if r.empty:
                        continue
                    published = paper_value(pub.get(method, {}).get(domain)) if view == "all" else None
                    rows.append(table_row(label, f"{domain} ({view})", r["mean"].iloc[0], r["std"].iloc[0], published, r["seeds"].iloc[0]))
        return rows
