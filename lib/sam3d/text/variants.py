"""Label names as people type them: dataset names -> words, and the phrasings a text prompt is trained with.

Datasets name structures in their own codes (TotalSegmentator `kidney_left`, AAL `Frontal_Sup_Orb_L`, FreeSurfer
`Left-Cerebral-White-Matter`); an annotator types "left kidney" or "the liver". `name_to_words` turns the codes
into plain words (side first, abbreviations spelled out) so that training prompts and typed prompts meet in the
same words, and `random_prompt` draws the phrasings training samples (RefSAM3D-style templates, synonyms).
"""

import re

import numpy as np

# templates a prompt is rendered through in training; "{name}" is the structure in words
TEMPLATES = (
    "{name}",
    "the {name}",
    "{Name}",
    "A computed tomography of the {name}.",
    "A magnetic resonance image of the {name}.",
    "segment the {name}",
    "perform {name} segmentation",
    "{name} segmentation",
    "where is the {name}?",
)

# AAL and FreeSurfer abbreviations, spelled out
_ABBREVIATIONS = {
    "sup": "superior",
    "inf": "inferior",
    "mid": "middle",
    "med": "medial",
    "ant": "anterior",
    "post": "posterior",
    "orb": "orbital",
    "oper": "opercular",
    "tri": "triangular",
    "supp": "supplementary",
    "lat": "lateral",
    "vent": "ventricle",
    "dc": "diencephalon",
    "cc": "corpus callosum",
    "csf": "cerebrospinal fluid",
    "wm": "white matter",
    "vena": "vein",
    "ventraldc": "ventral diencephalon",
}
_SIDES = {"l": "left", "r": "right", "left": "left", "right": "right", "lh": "left", "rh": "right"}

# a few common synonyms (training draws them, so typed synonyms land near the training names)
SYNONYMS = {
    "liver": ("hepatic parenchyma", "hepar"),
    "kidney": ("renal parenchyma",),
    "spleen": ("splenic parenchyma",),
    "urinary bladder": ("bladder",),
    "esophagus": ("oesophagus",),
    "small bowel": ("small intestine",),
    "colon": ("large intestine", "large bowel"),
    "clavicula": ("clavicle", "collarbone"),
    "femur": ("thigh bone",),
    "heart": ("cardiac muscle",),
    "brain stem": ("brainstem",),
    "autochthon": ("autochthonous back muscle",),
    "hip": ("hip bone",),
}

# FreeSurfer aseg values (FreeSurferColorLUT): for label maps that come without a names file
FREESURFER_ASEG = {
    2: "Left-Cerebral-White-Matter",
    3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent",
    7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus",
    11: "Left-Caudate",
    12: "Left-Putamen",
    13: "Left-Pallidum",
    14: "3rd-Ventricle",
    15: "4th-Ventricle",
    16: "Brain-Stem",
    17: "Left-Hippocampus",
    18: "Left-Amygdala",
    24: "CSF",
    26: "Left-Accumbens-area",
    28: "Left-VentralDC",
    30: "Left-vessel",
    31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent",
    46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus",
    50: "Right-Caudate",
    51: "Right-Putamen",
    52: "Right-Pallidum",
    53: "Right-Hippocampus",
    54: "Right-Amygdala",
    58: "Right-Accumbens-area",
    60: "Right-VentralDC",
    62: "Right-vessel",
    63: "Right-choroid-plexus",
    72: "5th-Ventricle",
    77: "WM-hypointensities",
    80: "non-WM-hypointensities",
    85: "Optic-Chiasm",
    251: "CC_Posterior",
    252: "CC_Mid_Posterior",
    253: "CC_Central",
    254: "CC_Mid_Anterior",
    255: "CC_Anterior",
}
NAME_TABLES = {"freesurfer_aseg": FREESURFER_ASEG}


def name_to_words(name: str) -> str:
    """`kidney_left` -> "left kidney", `Frontal_Sup_Orb_L` -> "left frontal superior orbital", `vertebrae_L1` ->
    "vertebrae L1", `Left-Cerebral-White-Matter` -> "left cerebral white matter"."""
    tokens = [t for t in re.split(r"[_\-\s]+", str(name).strip()) if t]
    side, words = None, []
    for t in tokens:
        low = t.lower()
        if low in _SIDES and side is None:
            side = _SIDES[low]
        elif any(c.isdigit() for c in t) and any(c.isalpha() for c in t) and t[0].isalpha():
            words.append(t.upper())  # vertebra codes (L1, T12) stay codes
        else:
            words.append(_ABBREVIATIONS.get(low, low))
    return " ".join(([side] if side else []) + words)


def normalize_prompt(text: str) -> str:
    """A typed prompt in the training names' words: dataset codes become words, spacing is tidied."""
    text = " ".join(str(text).split())
    if re.fullmatch(r"[A-Za-z0-9]+([_\-][A-Za-z0-9]+)+", text):  # a dataset code such as kidney_left
        return name_to_words(text)
    return text


def _synonyms(words: str) -> list[str]:
    out = []
    for base, alts in SYNONYMS.items():
        if re.search(rf"\b{re.escape(base)}\b", words):
            out += [re.sub(rf"\b{re.escape(base)}\b", a, words) for a in alts]
    return out


def prompt_variants(name: str) -> list[str]:
    """Every phrasing of one label name: its words (and synonyms) through every template."""
    words = name_to_words(name)
    out = []
    for w in [words, *_synonyms(words)]:
        out += [t.format(name=w, Name=w[:1].upper() + w[1:]) for t in TEMPLATES]
    return list(dict.fromkeys(out))


def random_prompt(names: list[str] | str, rng: np.random.Generator, synonym_prob: float = 0.2) -> str:
    """One training prompt for a target made of `names` (several when neighbours were merged): a random template."""
    if isinstance(names, str):
        names = [names]
    parts = []
    for n in names:
        words = name_to_words(n)
        syn = _synonyms(words)
        parts.append(str(rng.choice(syn)) if syn and rng.random() < synonym_prob else words)
    joined = " and ".join(parts)
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(name=joined, Name=joined[:1].upper() + joined[1:])
