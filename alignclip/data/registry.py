"""One registry of datasets: layout, protocol and prompt template of each (appendix A.2)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    protocol: str  # domainbed | coop | imagenet
    template: str = DEFAULT_TEMPLATE
    image_dir: str = ""  # CoOp: images below root/<image_dir>
    split_file: str = ""  # CoOp: split_zhou_<Dataset>.json in root
    domains: tuple[str, ...] = ()  # DomainBed: expected environment folders (checked when given)


DATASETS: dict[str, DatasetSpec] = {
    # DomainBed (Gulrajani & Lopez-Paz 2021): root/<domain>/<class>/<image>
    "rotated_digits": DatasetSpec("rotated_digits", "domainbed", "a photo of the digit {}."),
    "pacs": DatasetSpec("pacs", "domainbed", domains=("art_painting", "cartoon", "photo", "sketch")),
    "vlcs": DatasetSpec("vlcs", "domainbed", domains=("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "office_home": DatasetSpec("office_home", "domainbed", domains=("Art", "Clipart", "Product", "Real World")),
    "terra_incognita": DatasetSpec(
        "terra_incognita", "domainbed", domains=("location_100", "location_38", "location_43", "location_46")
    ),
    "domain_net": DatasetSpec(
        "domain_net", "domainbed", domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    ),
    # CoOp / CoCoOp base-to-new (Zhou et al. 2022): root/<image_dir>/... + root/split_zhou_<Dataset>.json
    "caltech101": DatasetSpec("caltech101", "coop", image_dir="101_ObjectCategories", split_file="split_zhou_Caltech101.json"),
    "oxford_pets": DatasetSpec(
        "oxford_pets", "coop", "a photo of a {}, a type of pet.", "images", "split_zhou_OxfordPets.json"
    ),
    "stanford_cars": DatasetSpec("stanford_cars", "coop", image_dir="", split_file="split_zhou_StanfordCars.json"),
    "flowers102": DatasetSpec(
        "flowers102", "coop", DEFAULT_TEMPLATE, "jpg", "split_zhou_OxfordFlowers.json"
    ),
    "food101": DatasetSpec("food101", "coop", "a photo of a {}, a type of food.", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": DatasetSpec("fgvc_aircraft", "coop", "a photo of a {}, a type of aircraft.", "images", ""),
    "sun397": DatasetSpec("sun397", "coop", image_dir="SUN397", split_file="split_zhou_SUN397.json"),
    "dtd": DatasetSpec("dtd", "coop", "{} texture.", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": DatasetSpec("eurosat", "coop", "a centered satellite photo of {}.", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": DatasetSpec(
        "ucf101", "coop", "a photo of a person doing {}.", "UCF-101-midframes", "split_zhou_UCF101.json"
    ),
    # ImageNet and its shifted variants; also base-to-new over ImageNet's 1,000 classes
    "imagenet": DatasetSpec("imagenet", "imagenet", image_dir="images"),
}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def clean_class_name(name: str) -> str:
    """Underscores and hyphens become spaces (appendix A.2); DomainBed folder names such as 'Alarm_Clock'."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def prompt(template: str, class_name: str) -> str:
    return template.format(class_name)
