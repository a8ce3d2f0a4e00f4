"""One registry of datasets: layout, protocol and prompt templates of each.

Two prompt conventions, chosen at ``alignclip prepare`` (``--templates``, ``--class-names``) and recorded in
meta.json, so every later stage (similarity, train, evaluate, report) uses the same prompts:

* ``paper`` (default): the templates of the paper's appendix A.2 ("a photo of a [CLASS]." for every dataset it
  does not list, so Flowers102 gets the plain template) and class names with underscores *and hyphens* made
  spaces ("with hyphens substituted by spaces", A.2).
* ``release``: what the authors' released code feeds CLIP. Templates: DomainBed datasets "a photo of a {}."
  (zhyhan/AlignCLIP engine.py:73, :115); CoOp datasets the ``CUSTOM_TEMPLATES`` of converter_dassl.py:25-41,
  identical to CoOp's trainers/zsclip.py. Class names: only ``_`` replaced (engine.py:123
  ``c.replace("_", " ")``), so DomainNet's ``t-shirt`` and FGVCAircraft's ``F-16A/B`` keep their hyphens.

Where the two differ: Flowers102 (A.2: "a photo of a {}."; CoOp: "..., a type of flower."), Food101 (A.2: "a photo
of a {}, a type of food."; CoOp: "a photo of {}, a type of food.") and every class name with a hyphen.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATE_CHOICES = ("paper", "release")
CLASS_NAME_CHOICES = ("paper", "release")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    protocol: str  # domainbed | coop | imagenet
    template: str = DEFAULT_TEMPLATE  # paper appendix A.2
    image_dir: str = ""  # CoOp: images below root/<image_dir>
    split_file: str = ""  # CoOp: split_zhou_<Dataset>.json in root
    domains: tuple[str, ...] = ()  # DomainBed: expected environment folders (checked when given)
    release_template: str | None = None  # the released code's, where it differs from A.2 (None: the same)

    def template_for(self, templates: str) -> str:
        if templates not in TEMPLATE_CHOICES:
            raise ValueError(f"templates={templates!r}: expected one of {TEMPLATE_CHOICES}")
        if templates == "release" and self.release_template is not None:
            return self.release_template
        return self.template


DATASETS: dict[str, DatasetSpec] = {
    # DomainBed (Gulrajani & Lopez-Paz 2021): root/<domain>/<class>/<image>
    # ours (embedded demo), built by `alignclip data digits`: one domain per angle of digits.ANGLES (a test keeps them equal)
    "rotated_digits": DatasetSpec("rotated_digits", "domainbed", "a photo of the digit {}.",
                                  domains=tuple(f"rotated_{angle}" for angle in (0, 15, 30, 45, 60, 75))),
    "pacs": DatasetSpec("pacs", "domainbed", domains=("art_painting", "cartoon", "photo", "sketch")),
    "vlcs": DatasetSpec("vlcs", "domainbed", domains=("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "office_home": DatasetSpec("office_home", "domainbed", domains=("Art", "Clipart", "Product", "Real World")),
    "terra_incognita": DatasetSpec(
        "terra_incognita", "domainbed", domains=("location_100", "location_38", "location_43", "location_46")
    ),
    "domain_net": DatasetSpec(
        "domain_net", "domainbed", domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    ),
    # CoOp / CoCoOp base-to-new (Zhou et al. 2022): root/<image_dir>/... + root/split_zhou_<Dataset>.json.
    # template: A.2; release_template: CoOp's CUSTOM_TEMPLATES where they differ.
    "caltech101": DatasetSpec("caltech101", "coop", image_dir="101_ObjectCategories", split_file="split_zhou_Caltech101.json"),
    "oxford_pets": DatasetSpec(
        "oxford_pets", "coop", "a photo of a {}, a type of pet.", "images", "split_zhou_OxfordPets.json"
    ),
    "stanford_cars": DatasetSpec("stanford_cars", "coop", image_dir="", split_file="split_zhou_StanfordCars.json"),
    "flowers102": DatasetSpec(
        "flowers102", "coop", DEFAULT_TEMPLATE, "jpg", "split_zhou_OxfordFlowers.json",
        release_template="a photo of a {}, a type of flower.",
    ),
    "food101": DatasetSpec(
        "food101", "coop", "a photo of a {}, a type of food.", "images", "split_zhou_Food101.json",
        release_template="a photo of {}, a type of food.",
    ),
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

# Layout-only kinds: your own data in a known layout, named with `alignclip prepare <kind> ROOT OUT --name NAME`.
# They have no paper numbers, so the report shows none beside them.
LAYOUT_KINDS: dict[str, DatasetSpec] = {
    "domainbed": DatasetSpec("domainbed", "domainbed"),
}


# the protocol each layout is evaluated under when none is chosen (a layout's field `protocol` names the layout)
LAYOUT_PROTOCOL = {"domainbed": "domainbed", "coop": "base2new", "imagenet": "imagenet"}


def default_protocol(name: str) -> str:
    """The protocol of a registered dataset or layout kind when none is chosen; any other name: DomainBed's
    (`prepare` then says the name is unknown)."""
    spec = DATASETS.get(name) or LAYOUT_KINDS.get(name)
    return LAYOUT_PROTOCOL[spec.protocol] if spec else "domainbed"


def get_dataset(name: str) -> DatasetSpec:
    if name in LAYOUT_KINDS:
        return LAYOUT_KINDS[name]
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}, or a layout kind "
            f"({', '.join(LAYOUT_KINDS)}) with --name NAME for your own data"
        )
    return DATASETS[name]


def clean_class_name(name: str, cleaning: str = "paper") -> str:
    """A folder or split-file class name as it goes into the prompt.

    ``paper``: underscores and hyphens become spaces, runs of spaces collapse (A.2; DomainBed folder names such as
    'Alarm_Clock'). ``release``: only underscores become spaces, as the released code.
    """
    if cleaning == "release":
        return name.replace("_", " ")
    if cleaning != "paper":
        raise ValueError(f"class_names={cleaning!r}: expected one of {CLASS_NAME_CHOICES}")
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def prompt(template: str, class_name: str) -> str:
    return template.format(class_name)
