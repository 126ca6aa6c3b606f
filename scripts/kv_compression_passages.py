"""Long prompts for scripts/kv_compression_quality.py, generated deterministically.

Each passage is a plain chronicle of an invented town (public domain: written here), about
1,500 tokens of natural sentences from templates, with three facts planted at its start,
middle and end; the user then asks about all three. No downloads, same text every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOWNS = [
    "Elmsworth",
    "Harrowgate",
    "Brindle Cove",
    "Ostrava Bay",
    "Kettering Hollow",
    "Marlow Ford",
]
NAMES = ["Agnes", "Tobias", "Mira", "Henrik", "Lena", "Osric", "Clara", "Joachim", "Ida", "Silas"]
TRADES = ["baker", "blacksmith", "ferryman", "schoolteacher", "clockmaker", "weaver", "miller"]
PLACES = ["the harbour", "the market square", "the old mill", "the chapel", "the north road"]
THINGS = [
    "a lantern",
    "a wooden cart",
    "a bolt of blue cloth",
    "a basket of apples",
    "a brass bell",
]
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["a cold wind came down from the hills", "the rain fell for three days",
           "the river rose over its banks", "the fog sat on the water until noon",
           "the sun was warm and the fields turned gold"]  # fmt: skip

SENTENCES = [
    "In the {season} of that year, {weather}, and {name} the {trade} kept to {place}.",
    "{name} the {trade} carried {thing} from {place} to {place2} every morning.",
    "Most evenings the people of {town} gathered at {place} to trade news and stories.",
    "Nobody in {town} could remember a {season} when {weather}.",
    "{name} said that {thing} had belonged to a {trade} who left {town} long ago.",
    "The children of {town} liked to watch {name} the {trade} at work near {place}.",
    "When {weather}, the road past {place} turned to mud and the carts moved slowly.",
    "{name} and {name2} argued for a whole afternoon about the price of {thing}.",
    "Travellers who reached {town} in the {season} often stayed a week at {place}.",
    "The council of {town} met at {place} and talked about the harvest and the roads.",
    "{name2} the {trade2} once found {thing} hidden under the floor near {place}.",
    "It was said in {town} that {weather} whenever the bells rang out of turn.",
]


@dataclass
class Passage:
    prompt: str  # the user's message: passage, then the questions
    answers: tuple[str, str, str]  # what the start, middle and end facts say


def passage(seed: int, num_sentences: int = 64) -> Passage:
    rng = random.Random(seed)
    town = rng.choice(TOWNS)
    keeper = f"{rng.choice(NAMES)} {rng.choice(['Olsen', 'Varga', 'Pell', 'Harker', 'Quill'])}"
    year = rng.randint(1820, 1899)
    spice = rng.choice(["cardamom", "star anise", "black pepper", "saffron", "juniper"])
    start = f"The first keeper of the {town} lighthouse was named {keeper}."
    middle = f"The stone bridge over the river at {town} was finished in the year {year}."
    end = f"The bakery on the market square of {town} put {spice} in its famous bread."

    def sentence() -> str:
        names = rng.sample(NAMES, 2)
        trades = rng.sample(TRADES, 2)
        places = rng.sample(PLACES, 2)
        return rng.choice(SENTENCES).format(
            town=town, name=names[0], name2=names[1], trade=trades[0], trade2=trades[1],
            place=places[0], place2=places[1], thing=rng.choice(THINGS),
            season=rng.choice(SEASONS), weather=rng.choice(WEATHER),
        )  # fmt: skip

    body = [sentence() for _ in range(num_sentences)]
    body.insert(2, start)
    body.insert(len(body) // 2, middle)
    body.insert(len(body) - 2, end)
    paragraphs = [" ".join(body[i : i + 6]) for i in range(0, len(body), 6)]
    text = "\n\n".join(paragraphs)
    questions = (
        "Answer three questions about the chronicle above, one line each.\n"
        f"1. What was the name of the first keeper of the {town} lighthouse?\n"
        "2. In what year was the stone bridge finished?\n"
        "3. What did the bakery put in its famous bread?"
    )
    return Passage(f"A chronicle of {town}:\n\n{text}\n\n{questions}", (keeper, str(year), spice))
