"""DomainBed leave-one-domain-out (paper table 1 and 6): train on every domain but one, test on the held-out one.

Training rows are the other domains' "in" splits (80%); the held-out domain is scored on its 20% "out" split
(``holdout``, CLIPood), its 80% split (``in``, DomainBed's ``env{i}_in_acc``) or all of it (``full``); the
source domains' "out" splits form ``source_val``. Batches hold ``batch_size`` images of each training domain.
"""

from __future__ import annotations


from alignclip.protocols.base import Protocol, View, ordered_labels, paper_results, paper_value, table_row


class DomainBed(Protocol):
    name = "domainbed"
    description = "DomainBed leave-one-domain-out: every class, one held-out domain"
    held_out_domain = True
    group_key = "domain"
    uses_test_split = True
    headline_metric = "test_acc"
    table_prefix = "domain_shift"
    paper_section = "domainbed"
    layouts = ("domainbed",)
    recipe = "domain_shift/{dataset}"

    def training_set(self, manifest, meta, test_domain, seed, shots=None):  # no few-shot subsets: shots unused
        train = manifest[manifest["split"] == "train"]
        return train[train["domain"] != test_domain], list(range(len(meta["classes"])))

    def evaluation_views(self, manifest, meta, test_domain, test_split):
        everything = list(range(len(meta["classes"])))
        target = manifest[manifest["domain"] == test_domain]
        if test_split == "holdout":
            target = target[target["split"] == "val"]
        elif test_split == "in":
            target = target[target["split"] == "train"]
        sources = manifest[(manifest["domain"] != test_domain) & (manifest["split"] == "val")]
        return [View("test", target, everything), View("source_val", sources, everything)]

    def table_rows(self, dataset, part):
        """Accuracy on each held-out domain and the average over domains; ablation variants beside the paper's
        ablation tables (VLCS)."""
        test = part[part["view"] == "test"]
        pub = self.paper(dataset)
        rows = []
        for label in ordered_labels(test["label"].unique()):
            mine = test[test["label"] == label]
            method = mine["method"].iloc[0]
            ablation = _ablation_row(dataset, label)
            # the paper's method numbers stand beside the method under either formulation, not beside ablations
            comparable = label in (method, f"{method}+release")
            for _, r in mine.sort_values("test_domain").iterrows():
                published = paper_value(pub.get("domains", {}).get(r["test_domain"], {}).get(method)) if comparable else None
                if ablation is not None:
                    published = paper_value(ablation.get(r["test_domain"]))
                rows.append(table_row(label, r["test_domain"], r["mean"], r["std"], published, r["seeds"]))
            published = paper_value(pub.get("avg", {}).get(method)) if comparable else None
            if ablation is not None:
                published = paper_value(ablation.get("avg"))
            rows.append(table_row(label, "Avg", mine["mean"].mean(), None, published, int(mine["seeds"].min())))
        return rows


def _ablation_row(dataset: str, label: str) -> dict | None:
    """The paper's ablation numbers (VLCS) for a variant label: table 9 (pooling) and table 10 (D-V vs V-V-V)."""
    if dataset != "vlcs":
        return None
    tables = paper_results()["ablations"]
    return {
        "erm[pooling=avg]": tables["table9_pooling_vlcs"]["avg"],
        "alignclip[branch=vvv]": tables["table10_branch_vlcs"]["vvv"],
    }.get(label)



