"""CelebA: parse ``list_attr_celeba.txt`` / ``list_eval_partition.txt`` and turn 40 attributes into a caption.

The one template (deterministic, attribute order fixed here, not by the file)::

    a [attractive] [young] [chubby] (man|person) with <features, comma-joined, last with "and">, <clauses>

e.g. ``"a young man with black hair, bangs and eyeglasses, smiling"``. Attributes marked -1 are left
out, with one exception: ``No_Beard = -1`` reads as "a beard". A person with no listed feature is
``"a person"``; with only clauses, ``"a person, smiling"``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLITS = {"train": 0, "val": 1, "test": 2}

ADJECTIVES = (("Attractive", "attractive"), ("Young", "young"), ("Chubby", "chubby"))
# "with …" phrases, in caption order: hair, face, facial hair, make-up, accessories.
FEATURES = (
    ("Black_Hair", "black hair"), ("Blond_Hair", "blond hair"), ("Brown_Hair", "brown hair"),
    ("Gray_Hair", "gray hair"), ("Bald", "a bald head"), ("Receding_Hairline", "a receding hairline"),
    ("Straight_Hair", "straight hair"), ("Wavy_Hair", "wavy hair"), ("Bangs", "bangs"),
    ("Arched_Eyebrows", "arched eyebrows"), ("Bushy_Eyebrows", "bushy eyebrows"),
    ("Narrow_Eyes", "narrow eyes"), ("Bags_Under_Eyes", "bags under the eyes"),
    ("High_Cheekbones", "high cheekbones"), ("Rosy_Cheeks", "rosy cheeks"), ("Oval_Face", "an oval face"),
    ("Pale_Skin", "pale skin"), ("Big_Nose", "a big nose"), ("Pointy_Nose", "a pointy nose"),
    ("Big_Lips", "big lips"), ("Double_Chin", "a double chin"),
    ("5_o_Clock_Shadow", "a five o'clock shadow"), ("Goatee", "a goatee"), ("Mustache", "a mustache"),
    ("Sideburns", "sideburns"), ("No_Beard", "a beard"),  # inverted: see module docstring
    ("Heavy_Makeup", "heavy makeup"), ("Wearing_Lipstick", "lipstick"), ("Eyeglasses", "eyeglasses"),
    ("Wearing_Hat", "a hat"), ("Wearing_Earrings", "earrings"), ("Wearing_Necklace", "a necklace"),
    ("Wearing_Necktie", "a necktie"),
)
CLAUSES = (("Smiling", "smiling"), ("Mouth_Slightly_Open", "mouth slightly open"), ("Blurry", "blurry"))
INVERTED = frozenset({"No_Beard"})
ATTRIBUTES = tuple(
    sorted({a for a, _ in ADJECTIVES} | {a for a, _ in FEATURES} | {a for a, _ in CLAUSES} | {"Male"})
)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_from_attributes(attrs: dict[str, int]) -> str:
    """The template caption of one image's attributes (values 1 / -1; missing names count as -1)."""

    def on(name: str) -> bool:
        value = attrs.get(name, -1) == 1
        return not value if name in INVERTED and name in attrs else value

    adjectives = [word for name, word in ADJECTIVES if on(name)]
    subject = " ".join(["a", *adjectives, "man" if on("Male") else "person"])
    if subject.startswith("a attractive"):
        subject = "an" + subject[1:]
    features = [phrase for name, phrase in FEATURES if on(name)]
    clauses = [phrase for name, phrase in CLAUSES if on(name)]
    text = subject + (f" with {_join(features)}" if features else "")
    return ", ".join([text, *clauses])


def read_attributes(path: Path) -> dict[str, dict[str, int]]:
    """Parse ``list_attr_celeba.txt``: count line, 40 names, then ``file v1 … v40`` rows (-1 / 1)."""
    from ..validate import read_regular_file

    lines = read_regular_file(path, "CelebA attribute file", 1 << 30, DataError).decode("utf-8", "replace").splitlines()
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        raise DataError(f"CelebA attribute file '{path}' is empty or has no header",
                        "it must start with a count line and a line of 40 attribute names")
    start = 1 if lines[0].strip().isdigit() else 0
    names = lines[start].split()
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown or not names:
        raise DataError(f"CelebA attribute file '{path}' has unexpected attribute names: {unknown[:5] or names[:5]}",
                        "use the original list_attr_celeba.txt (40 names such as 5_o_Clock_Shadow … Young)")
    table: dict[str, dict[str, int]] = {}
    for line in lines[start + 1 :]:
        parts = line.split()
        if len(parts) != len(names) + 1:
            continue  # malformed row; the image then has no caption and is reported by the source
        try:
            table[parts[0]] = {n: int(v) for n, v in zip(names, parts[1:], strict=True)}
        except ValueError:
            continue
    return table


def read_partition(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` (``file 0|1|2``: train / val / test)."""
    out: dict[str, int] = {}
    from ..validate import read_regular_file

    for line in read_regular_file(path, "CelebA partition file", 1 << 30, DataError).decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def find_celeba(root: Path) -> tuple[Path, Path, Path | None] | None:
    """(attribute file, image folder, partition file or None) when ``root`` holds CelebA, else None.

    Accepts the files at the root or in the ``Anno/`` and ``Eval/`` folders of the original release.
    """
    attr = next((p for p in (root / ATTR_FILE, root / "Anno" / ATTR_FILE) if p.is_file()), None)
    images = next((p for p in (root / IMAGE_DIR, root / "Img" / IMAGE_DIR) if p.is_dir()), None)
    if attr is None or images is None:
        return None
    part = next((p for p in (root / PARTITION_FILE, root / "Eval" / PARTITION_FILE) if p.is_file()), None)
    return attr, images, part
