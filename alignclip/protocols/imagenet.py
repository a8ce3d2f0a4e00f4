"""ImageNet and its shifted variants (paper table 2): train few-shot on ImageNet, test on ImageNet and on
-V2, -Sketch, -A and -R with no training on them; -A and -R score against their 200-class subsets."""

from __future__ import annotations

from alignclip.protocols.base import Protocol, View, few_shot, ordered_labels, paper_value, table_row


class ImageNetVariants(Protocol):
    name = "imagenet"
    description = "ImageNet 16-shot, tested on ImageNet and its variants"
    headline_metric = "imagenet_acc"
    table_prefix = "imagenet"
    paper_section = "imagenet"
    layouts = ("imagenet",)
    recipe = "imagenet"

    def training_set(self, manifest, meta, test_domain, seed, shots=None):
        train = manifest[manifest["split"] == "train"]
        rows = train[(train["domain"] == "imagenet") & few_shot(train, seed, shots, meta)]
        return rows, list(range(len(meta["classes"])))

    def evaluation_views(self, manifest, meta, test_domain, test_split):
        everything = list(range(len(meta["classes"])))
        views = []
        for domain in sorted(manifest["domain"].unique()):
            rows = manifest[(manifest["domain"] == domain) & (manifest["split"] == "test")]
            views.append(View(domain, rows, list(meta.get("label_subsets", {}).get(domain, everything))))
        return views

    def paper(self, dataset=None):
        return super().paper()  # one table for ImageNet, not per dataset

    def table_rows(self, dataset, part):
        """Each variant, and the average over the variants (ood_avg)."""
        pub = self.paper()
        rows = []
        for label in ordered_labels(part["label"].unique()):
            mine = part[part["label"] == label]
            method = mine["method"].iloc[0]
            for _, r in mine.sort_values("view").iterrows():
                rows.append(table_row(label, r["view"], r["mean"], r["std"], paper_value(pub.get(method, {}).get(r["view"])), r["seeds"]))
            ood = mine[mine["view"] != "imagenet"]["mean"]
            if not ood.empty:
                rows.append(table_row(label, "ood_avg", ood.mean(), None, paper_value(pub.get(method, {}).get("ood_avg")), int(mine["seeds"].min())))
        return rows
