"""SVHN (Netzer et al., 2011), cropped digits: house-number digits 0-9.

Class names and prompt templates as CLIP (Radford et al., 2021) and FusionBench use them."""

classnames = [
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
]

templates = [
    'a photo of the number: "{}".',
]
