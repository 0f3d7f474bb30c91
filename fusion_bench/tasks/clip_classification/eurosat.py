"""EuroSAT (Helber et al., 2019): 10 land-use classes of Sentinel-2 satellite images.

Class names and prompt templates as CLIP (Radford et al., 2021) and FusionBench use them."""

classnames = [
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
]

templates = [
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
]
