"""Class names and prompt templates for zero-shot classification.

Templates are chosen by an explicit precedence, recorded in every result:

1. ``user``: a template file given by the caller (one template per line, ``{c}`` or ``{}`` marks the class);
2. ``dataset``: the dataset's own templates: the ``zeroshot_classification_templates.txt`` of a
   CLIP_benchmark WebDataset folder, else CLIP's published ``prompts.json`` entry for the dataset;
3. ``builtin``: :data:`BUILTIN_TEMPLATES` (for datasets CLIP did not publish templates for).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

__all__ = [
    "BUILTIN_CLASSNAMES",
    "BUILTIN_TEMPLATES",
    "DATASET_ALIASES",
    "PromptSet",
    "bundled_prompts_path",
    "load_classnames",
    "read_templates",
    "resolve_prompts",
]

logger = logging.getLogger(__name__)

# Dataset names used by this package (and CLIP_benchmark) mapped to the keys of CLIP's prompts.json.
DATASET_ALIASES = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "stl10": "STL10",
    "gtsrb": "GTSRB",
    "flowers102": "Flowers102",
    "flowers": "Flowers102",
    "dtd": "DescribableTextures",
    "fgvc_aircraft": "FGVCAircraft",
    "aircraft": "FGVCAircraft",
    "cars": "StanfordCars",
    "stanford_cars": "StanfordCars",
    "food101": "Food101",
    "pets": "OxfordPets",
    "mnist": "MNIST",
    "eurosat": "EuroSAT",
    "sun397": "SUN397",
    "caltech101": "Caltech101",
    "country211": "Country211",
    "imagenet": "ImageNet",
    "imagenet1k": "ImageNet",
    "imagenetv2": "ImageNet",
    "imagenet-v2": "ImageNet",
    "imagenet_sketch": "ImageNet",
    "imagenet-sketch": "ImageNet",
    "imagenet-r": "ImageNet",
    "imagenet-a": "ImageNet",
    "objectnet": "ImageNet",
    "birdsnap": "Birdsnap",
}

# Datasets without templates in CLIP's prompts.json use a related set, stated here:
# CUB-200 uses Birdsnap's bird template; SVHN uses CLIP_benchmark's digit template.
BUILTIN_TEMPLATES = {
    "cub200": ["a photo of a {c}, a type of bird."],
    "cub": ["a photo of a {c}, a type of bird."],
    "svhn": ['a photo of the number: "{c}".'],
    "default": ["a photo of a {c}.", "a blurry photo of a {c}.", "a photo of the {c}.", "a good photo of a {c}.",
                "a close-up photo of a {c}.", "a low resolution photo of a {c}."],
}


# Class names for datasets that CLIP's prompts.json lacks, by label index (SVHN: label i is digit i, as
# torchvision's SVHN reader maps the source's label 10 to 0).
BUILTIN_CLASSNAMES = {"svhn": [str(digit) for digit in range(10)]}


def bundled_prompts_path() -> Path:
    """Path of CLIP's prompts.json shipped with the package."""
    return Path(str(resources.files("dinorankclip") / "sample_data" / "clip_prompts" / "prompts.json"))


@lru_cache(maxsize=4)
def _load_prompts(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_classnames(path: str | Path) -> list[str]:
    """Read one class name per line; line i names label i."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"class-name file {path} is empty")
    return names


def _normalise_template(template: str) -> str:
    """Accept ``{}`` (CLIP's notebooks) or ``{c}`` (CLIP_benchmark) as the class placeholder."""
    if "{c}" in template:
        return template
    if "{}" in template:
        return template.replace("{}", "{c}")
    raise ValueError(f"prompt template {template!r} has no class placeholder; write {{c}} where the class goes")


def _check_template(template: str, where: str) -> str:
    """Normalise ``template`` and check that it formats with a class name alone.

    Raises:
        ValueError: naming ``where`` (file and line), the template and the allowed placeholders.
    """
    try:
        normalised = _normalise_template(template)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    try:
        normalised.format(c="class name")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        reason = f"unknown placeholder {{{err.args[0]}}}" if isinstance(err, KeyError) else str(err)
        raise ValueError(
            f"{where}: template {template!r} is invalid ({reason}); the only placeholder allowed is {{c}} "
            "(or {}) for the class name, and a literal brace is written {{ or }}"
        ) from None
    return normalised


def read_templates(path: str | Path, *, option: str) -> list[str]:
    """Read one template per line, skipping blank lines, and check each one (see :func:`_check_template`).

    Args:
        path: the template file.
        option: the option or setting that gave ``path``, named in errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read as UTF-8, has no templates, or contains an invalid template.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {str(path)!r}: template file not found; give a text file with one "
                                "template per line, {c} marking the class name") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{option} {str(path)!r}: failed to read the template file ({err})") from None
    templates = [_check_template(line.strip(), f"{option} {path}, line {number}")
                 for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not templates:
        raise ValueError(f"{option} {str(path)!r}: template file has no templates; write one per line, {{c}} "
                         "marking the class name")
    return templates


@dataclass
class PromptSet:
    """Class names (index = label) and templates, with where each came from."""

    classnames: list[str]
    templates: list[str]
    template_source: str  # "user", "dataset" or "builtin"
    classnames_source: str
    template_origin: str = ""  # the template file, or prompts.json:<key>, or "builtin"

    def prompts_for(self, label: int) -> list[str]:
        return [t.format(c=self.classnames[label]) for t in self.templates]

    def duplicate_names(self) -> dict[str, list[int]]:
        counts = Counter(self.classnames)
        return {n: [i for i, c in enumerate(self.classnames) if c == n] for n, k in counts.items() if k > 1}


def resolve_prompts(
    dataset: str,
    *,
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    prompts_json: str | Path | None = None,
    classnames: list[str] | None = None,
    classnames_source: str | None = None,
    dataset_templates_file: str | Path | None = None,
    templates_option: str = "--templates (eval.templates)",
) -> PromptSet:
    """Pick class names and templates for ``dataset``.

    Class names come from ``classnames`` (given by the dataset reader), else ``classnames_file`` (the
    dataset's own ``classnames.txt``), else CLIP's list, else :data:`BUILTIN_CLASSNAMES`. Templates follow
    the precedence in the module docstring; the dataset's own templates are ``dataset_templates_file``
    (CLIP_benchmark's WebDataset layout) when given, else CLIP's templates for ``dataset``.

    ``templates_option`` names the option that gave ``templates_file`` in error messages.

    Raises:
        ValueError: no class names can be found for ``dataset``, or a template file contains an invalid template.
        FileNotFoundError: a template file does not exist.
    """
    prompts_path = str(prompts_json or bundled_prompts_path())
    clip = _load_prompts(prompts_path)
    key = DATASET_ALIASES.get(dataset.lower(), dataset)
    entry = clip.get(key)

    if classnames is not None:
        classnames, names_source = list(classnames), classnames_source or "dataset reader"
    elif classnames_file is not None and Path(classnames_file).is_file():
        classnames, names_source = load_classnames(classnames_file), str(classnames_file)
    elif dataset.lower() in BUILTIN_CLASSNAMES:
        classnames, names_source = BUILTIN_CLASSNAMES[dataset.lower()], "builtin"
    elif entry is not None:
        classnames = [c if isinstance(c, str) else c[0] for c in entry["classes"]]
        names_source = f"{Path(prompts_path).name}:{key}"
    else:
        raise ValueError(
            f"no class names for dataset {dataset!r}: put a classnames.txt next to its labels file, or use a "
            f"dataset from CLIP's list ({', '.join(sorted(DATASET_ALIASES))})"
        )

    if templates_file is not None:
        templates = read_templates(templates_file, option=templates_option)
        source, origin = "user", str(templates_file)
    elif dataset_templates_file is not None:
        templates = read_templates(dataset_templates_file, option=f"dataset {dataset!r} template file")
        source, origin = "dataset", str(dataset_templates_file)
    elif entry is not None:
        origin = f"{Path(prompts_path).name}:{key}"
        templates = [_check_template(t, f"{prompts_path}, {key} template {i}")
                     for i, t in enumerate(entry["templates"])]
        source = "dataset"
    else:
        templates, source = BUILTIN_TEMPLATES.get(dataset.lower(), BUILTIN_TEMPLATES["default"]), "builtin"
        origin = "builtin"

    prompt_set = PromptSet(classnames, templates, source, names_source, origin)
    for name, labels in prompt_set.duplicate_names().items():
        logger.warning("Dataset %s: class name %r is shared by labels %s; they stay separate classes",
                       dataset, name, labels)
    return prompt_set
