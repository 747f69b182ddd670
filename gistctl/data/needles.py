"""Needle values and sentences: varied kinds (codes, numbers, names, places, dates) so no one format is learned.

Every draw takes a `random.Random`; nothing here touches the global RNG.
"""

from __future__ import annotations

import random
import string

ADJECTIVES = ["amber", "silver", "crimson", "quiet", "northern", "hollow", "iron", "painted", "sunken", "copper",
              "narrow", "golden", "eastern", "frozen", "broken", "velvet", "ancient", "western", "scarlet", "little",
              "marble", "distant", "cobalt", "wooden", "ivory", "bright", "granite", "lonely", "southern", "emerald"]
NOUNS = ["lighthouse", "archive", "observatory", "bridge", "orchard", "foundry", "chapel", "mill", "harbour", "tower",
         "garden", "library", "station", "vault", "theatre", "market", "quarry", "workshop", "granary", "ferry",
         "museum", "cellar", "greenhouse", "schoolhouse", "boathouse", "bakery", "forge", "pavilion", "tavern", "canal"]
FIRST_NAMES = ["Ada", "Bertrand", "Celia", "Dmitri", "Elowen", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Keziah",
               "Lorcan", "Maren", "Nadia", "Osric", "Priya", "Quentin", "Rosalind", "Soren", "Tamsin", "Ulla", "Viktor",
               "Wren", "Xavier", "Yara", "Zeno"]
LAST_NAMES = ["Abernethy", "Blackwood", "Castellan", "Drummond", "Eskildsen", "Fairweather", "Galloway", "Hartigan",
              "Ingram", "Jessop", "Kowalczyk", "Lindqvist", "Marchetti", "Nakamura", "Okonkwo", "Pemberton", "Quarrie",
              "Rasmussen", "Sandoval", "Thistlewood", "Underhill", "Vasquez", "Whitlock", "Yardley", "Zabala"]
PLACE_HEADS = ["Ash", "Bram", "Caer", "Dun", "Elm", "Fen", "Glen", "Hart", "Ivy", "Kel", "Lark", "Mor", "Nor", "Oak",
               "Pen", "Rook", "Sel", "Thorn", "Wen", "Yew"]
PLACE_TAILS = ["bridge", "combe", "dale", "ford", "gate", "haven", "holm", "mere", "minster", "moor", "stead", "thorpe",
               "wick", "worth"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

KINDS = ("code", "number", "name", "place", "date")

# kind -> (statement, question); {s} is the subject ("the amber lighthouse" without "the"), {v} the value.
TEMPLATES = {
    "code": ("The access code for the {s} is {v}.", "What is the access code for the {s}?"),
    "number": ("The registry number of the {s} is {v}.", "What is the registry number of the {s}?"),
    "name": ("The {s} is looked after by {v}.", "Who looks after the {s}?"),
    "place": ("The bell of the {s} was cast in {v}.", "Where was the bell of the {s} cast?"),
    "date": ("The {s} was first opened on {v}.", "On what date was the {s} first opened?"),
}


def draw_value(rng: random.Random, kind: str) -> str:
    if kind == "code":
        return "".join(rng.choices(string.ascii_uppercase, k=2)) + "-" + "".join(rng.choices(string.digits, k=4))
    if kind == "number":
        return str(rng.randint(100_000, 9_999_999))
    if kind == "name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if kind == "place":
        return rng.choice(PLACE_HEADS) + rng.choice(PLACE_TAILS)
    if kind == "date":
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1800, 2020)}"
    raise ValueError(f"unknown needle kind {kind!r}")


def draw_subjects(rng: random.Random, k: int) -> list[str]:
    """`k` distinct subjects such as "amber lighthouse"."""
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), k)
    return [f"{ADJECTIVES[p // len(NOUNS)]} {NOUNS[p % len(NOUNS)]}" for p in pairs]


def draw_passkey(rng: random.Random, key_format: str) -> str:
    if key_format == "digits5":
        return "".join(rng.choices(string.digits, k=5))
    if key_format == "alnum6":
        return "".join(rng.choices(string.ascii_uppercase + string.digits, k=6))
    raise ValueError(f"unknown key format {key_format!r}")


# The aggregate question types and how each is scored: a list answer item by item, a count or total as a number.
AGGREGATE_SCORING = {"list": "list", "count": "count", "total": "count"}
AGGREGATE_QUESTIONS = tuple(AGGREGATE_SCORING)

# Aggregate families: one statement per planted item, a distinct id per item, a value from a small set.
AGGREGATE_FAMILIES = {
    "doors": {
        "statement": "The door of house number {id} is painted {v}.",
        "ids": lambda rng, k: [str(n) for n in rng.sample(range(2, 400), k)],
        "values": ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown"],
        "list": "Which colours are mentioned as door colours? List each colour once, in alphabetical order, separated by commas.",
        "count": "How many doors are painted {v}?",
        "total": "How many house doors are described?",
    },
    "ships": {
        "statement": "The ship {id} arrived in port carrying {v}.",
        "ids": lambda rng, k: rng.sample([f"{a.capitalize()} {n}" for a in ADJECTIVES[:12]
                                          for n in ("Star", "Gull", "Heron", "Comet", "Wave", "Lantern")], k),
        "values": ["timber", "salt", "wool", "copper", "tea", "grain", "wine", "coal", "spices", "cotton"],
        "list": "Which cargoes did the ships arrive carrying? List each cargo once, in alphabetical order, separated by commas.",
        "count": "How many ships arrived carrying {v}?",
        "total": "How many ship arrivals are described?",
    },
    "birds": {
        "statement": "On day {id} of the survey the observer counted a {v}.",
        "ids": lambda rng, k: [str(n) for n in rng.sample(range(1, 366), k)],
        "values": ["heron", "kestrel", "wren", "curlew", "magpie", "swift", "plover", "nightjar", "finch", "lapwing"],
        "list": "Which birds did the observer count during the survey? List each bird once, in alphabetical order, separated by commas.",
        "count": "On how many days did the observer count a {v}?",
        "total": "On how many days of the survey was a bird counted?",
    },
}
