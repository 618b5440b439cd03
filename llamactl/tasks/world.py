"""The small closed world the suite talks about: a fixed word list, invented people and their facts.

Everything the tasks ask comes from here, so a tokenizer trained on the suite's own text covers it, and
the facts a model must recall exist only in the generated pretraining text (never in any real corpus).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# Words the list tasks copy, reverse, sort and count: short, common, distinct.
WORDS = ("apple", "ball", "bird", "boat", "book", "bread", "cake", "car", "chair", "cloud", "cup", "door",
         "fish", "flower", "hat", "house", "key", "lamp", "milk", "moon", "pen", "rain", "ring", "rock",
         "shoe", "star", "sun", "tree", "water", "wind", "box", "leaf")
# Words whose letters the counting task counts (repeated letters on purpose).
LETTER_WORDS = ("banana", "apple", "cherry", "letter", "window", "garden", "yellow", "summer", "rabbit",
                "pepper", "coffee", "butter", "kitten", "mirror", "orange", "paper", "balloon", "tomato",
                "dinner", "river")

TOWNS = ("Palmtown", "Rivermoor", "Stonebridge", "Ashford", "Hillcrest", "Lakeside", "Redwater", "Oakvale",
         "Frostholm", "Sandport", "Mistwood", "Greenhaven")
HOBBIES = ("chess", "painting", "fishing", "singing", "dancing", "cooking", "hiking", "reading", "swimming",
           "gardening", "knitting", "cycling")
PETS = ("cat", "dog", "owl", "parrot", "rabbit", "turtle", "goat", "frog", "horse", "hamster")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown")
# attribute -> every value it can take (the fact scorer's "options")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"town": TOWNS, "hobby": HOBBIES, "pet": PETS, "colour": COLOURS}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "tr", "sk", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "l", "m", "x", "s", "k")

# vocabulary of the filler prose (shares the task words so the tokenizer sees them in running text)
_PEOPLE = ("farmer", "baker", "teacher", "child", "doctor", "sailor", "painter", "driver", "singer", "cook")
_ADJECTIVES = ("big", "small", "old", "young", "happy", "quiet", "tall", "kind", "busy", "tired")
_VERBS = ("saw", "found", "took", "liked", "painted", "carried", "lost", "bought", "sold", "washed")
_PLACES = ("near the river", "at the market", "on the hill", "in the garden", "by the road", "under the bridge",
           "in the kitchen", "at school")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Entity:
    """An invented person: the facts the `facts` family asks about."""
    name: str
    town: str
    hobby: str
    pet: str
    colour: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


def make_entities(rng: random.Random, n: int) -> tuple[Entity, ...]:
    """`n` people with distinct two-syllable invented names (none a real word of this world)."""
    taken = {w.lower() for vals in ATTRIBUTES.values() for w in vals} | set(WORDS) | set(LETTER_WORDS)
    names: list[str] = []
    while len(names) < n:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(("",) + _CODAS)
                + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS))
        if name not in taken:
            taken.add(name)
            names.append(name.capitalize())
    return tuple(Entity(name, *(rng.choice(ATTRIBUTES[a]) for a in ATTRIBUTES)) for name in names)


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


_FACT_SENTENCES = {
    "town": ("{e} lives in {v}.", "{e} is from {v}.", "{e} has a home in {v}."),
    "hobby": ("{e} likes {v}.", "{e} enjoys {v}.", "The hobby of {e} is {v}."),
    "pet": ("{e} has a pet {v}.", "{e} keeps {av} as a pet.", "The pet of {e} is {av}."),
    "colour": ("The favourite colour of {e} is {v}.", "{e} likes the colour {v} best.", "{e} loves the colour {v}."),
}


def fact_sentence(e: Entity, attribute: str, rng: random.Random) -> str:
    v = e.get(attribute)
    return rng.choice(_FACT_SENTENCES[attribute]).format(e=e.name, v=v, av=with_article(v))


def entity_document(e: Entity, rng: random.Random) -> str:
    """One short biography stating all of a person's facts, in random order and wording."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    if rng.random() < 0.3:  # the joined form: "Zorbin lives in Palmtown and likes chess."
        first = f"{e.name} lives in {e.town} and likes {e.hobby}."
        rest = [fact_sentence(e, a, rng) for a in attrs if a not in ("town", "hobby")]
        return " ".join([first] + rest)
    return " ".join(fact_sentence(e, a, rng) for a in attrs)


def filler_document(rng: random.Random) -> str:
    """A few plain sentences from the world's small vocabulary (tokenizer and language practice)."""
    def sentence() -> str:
        k = rng.randrange(6)
        if k == 0:
            return (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_PEOPLE)} {rng.choice(_VERBS)} "
                    f"{with_article(rng.choice(WORDS))} {rng.choice(_PLACES)}.")
        if k == 1:
            return f"{with_article(rng.choice(WORDS)).capitalize()} and {with_article(rng.choice(WORDS))} are {rng.choice(_PLACES)}."
        if k == 2:
            return f"In {rng.choice(TOWNS)} the {rng.choice(_PEOPLE)} likes {rng.choice(HOBBIES)}."
        if k == 3:
            return f"The {rng.choice(_PEOPLE)} counted {rng.randint(0, 99)} stars and {rng.choice(_NUMBER_WORDS)} clouds."
        if k == 4:
            return (f"A {rng.choice(COLOURS)} {rng.choice(PETS)} sat {rng.choice(_PLACES)} with the "
                    f"{rng.choice(_ADJECTIVES)} {rng.choice(_PEOPLE)}.")
        return f"Every day the {rng.choice(_PEOPLE)} walks to the {rng.choice(WORDS)} {rng.choice(_PLACES)}."

    return " ".join(sentence() for _ in range(rng.randint(3, 7)))
