"""A seeded generator of English-like prose: the zoo's haystacks and language-modelling corpus.

Every word list lives here, so the tokenizer, the haystacks and the task fillers share one
vocabulary.  ``Prose(seed).paragraph(...)`` is a pure function of the seed and the call sequence;
no external text is used or committed.
"""

import random

FIRST_NAMES = (
    "Mara Tomas Elin Jonah Ravi Ines Oskar Lena Pavel Nadia Hugo Amira Felix Sanne Idris Greta "
    "Milo Yara Bruno Cleo Dario Freya Ivo Juno Kasper Lior Mina Nils Orla Pia Quentin Rosa Soren "
    "Talia Umar Vera Wendel Xena Yusuf Zora Anton Bea Cyrus Dagny Emil Fatima Gideon Hana Ilse "
    "Jasper Kira Luca Maren Noor Otto Petra Rafael Sina Theo Ulla Viktor Wren Aldo Brit Cosmo Dina"
).split()
SURNAMES = (
    "Holm Varga Okafor Lindqvist Moreau Tanaka Brandt Castillo Novak Reyes Fischer Sato Quinn "
    "Abbott Kowalski Duarte Ferris Galloway Hartley Ivers Jansen Kemp Lowell Mercer Nakamura "
    "Oduya Pryce Rasmussen Sterling Thorne"
).split()
PLACES = (
    "Tolbrook Ashford Kelmar Dunmore Veyra Halden Brisk Corrin Marlow Pellam Stavro Ondra "
    "Riverside Westfall Greyhaven Lunmoor Fenwick Caldera Maplewood Saltmarsh Irongate Brightwater "
    "Oakridge Thornbury Willowby Ravensholm Eastmere Copperfield Silverlake Northwick"
).split()
NOUNS = (
    "lamp river garden window bridge letter basket candle mirror ladder kettle blanket violin "
    "compass lantern harbor orchard meadow tower cottage wagon barrel chest feather ribbon coin "
    "map key book clock bell boat cart shell stone rope drum flute hat coat scarf boot glove cup "
    "bowl plate spoon knife jar bottle box bag net sail anchor oar nest egg apple pear plum "
    "cherry lemon onion carrot potato bean walnut acorn pebble crystal marble pearl ruby anchor "
    "owl fox badger heron otter rabbit goat horse sparrow beetle moth salmon turtle kitten song "
    "message prize door fair poem riddle"
).split()
ADJECTIVES = (
    "old new small large quiet loud bright dark warm cold soft hard gentle rough tiny heavy "
    "light narrow wide ancient fresh dusty shiny broken wooden golden silver crooked round "
    "square sleepy clever brave shy proud curious careful hidden distant lonely busy strange "
    "sweet bitter salty smoky velvet frozen sunny misty rusty polished painted favourite secret"
).split()
COLORS = (
    "red blue green yellow purple orange black white grey brown pink violet amber crimson teal "
    "scarlet indigo ivory"
).split()
VERBS_PAST = (
    "found carried painted opened closed lost mended borrowed cleaned hid sold bought watched "
    "followed visited counted polished wrapped dropped lifted noticed remembered carved"
).split()
VERBS_INTR = (
    "walked ran waited laughed sang slept worked danced wandered rested listened shouted smiled "
    "whispered travelled"
).split()
TIMES = (
    "in the morning|at noon|in the evening|at night|on Monday|on Tuesday|on Friday|in spring|"
    "in winter|after the storm|before dawn|during the fair|last summer|every Sunday"
).split("|")
FEELINGS = "happy tired hungry worried calm excited puzzled grateful nervous cheerful".split()
CONNECTIVES = ("Then", "Later", "Meanwhile", "Afterwards", "Soon", "Still", "However", "Suddenly")
NUMBER_WORDS = "two three four five six seven eight nine ten twelve twenty".split()

_TEMPLATES = (
    "{name} {vpast} the {adj} {noun} {time}.",
    "{time_cap}, {name} {vintr} to the {noun} near {place}.",
    "The {noun} in {place} was {adj} and {color}.",
    "{name} {surname} kept {numw} {noun}s in a {adj} {noun2}.",
    "\"Where is my {noun}?\" asked {name}.",
    "{connective}, {name} and {name2} {vintr} along the road to {place}.",
    "Nobody in {place} had seen such a {adj} {noun} before.",
    "{name} felt {feeling} because the {noun} was {adj}.",
    "It cost {num} coins, which was a lot for a {noun}.",
    "{name} wrote a letter to {name2} about the {color} {noun}.",
    "The market of {place} sold {adj} {noun}s, {color} {noun2}s and fresh bread.",
    "On day {num}, {name} {vpast} a {noun} and {vintr} home.",
    "Was the {noun} {adj}? {name} could not tell.",
    "{name} said that the {noun} of {place} is {adj}.",
    "The road from {place} to {place2} is {num} miles long.",
    "{name} {surname}, who lived in {place}, {vpast} the {noun2}.",
    "There were {numw} {color} {noun}s on the {noun2}; {name} {vpast} them all.",
    "{connective}, the {adj} {noun} {vintr} (or so {name} claimed).",
    "By {time_short}, {name} was {feeling} again!",
    "\"{feeling_cap} days,\" said {name}, \"come after {adj} nights.\"",
    "The colour of the {noun} was {color}, and its {noun2} was {adj}.",
    "{name} gave {name2} a {adj} {noun} as a gift.",
)


class Prose:
    """Seeded English-like text; the same seed always gives the same text.

    Each instance draws a small *cast* (people with fixed surnames, places, objects) that its
    sentences keep returning to, as a story does; repeated names are what lets a model learn
    in-context copying (induction) from plain prose.
    """

    def __init__(self, seed: int | str | random.Random, *, cast_share: float = 0.7) -> None:
        self.rng = r = seed if isinstance(seed, random.Random) else random.Random(seed)
        self.cast_share = cast_share
        self.cast = {
            "name": r.sample(FIRST_NAMES, 5), "place": r.sample(PLACES, 3),
            "noun": r.sample(NOUNS, 8), "adj": r.sample(ADJECTIVES, 6),
        }
        self.surname = {n: r.choice(SURNAMES) for n in self.cast["name"]}

    def _pick(self, kind: str, pool: tuple[str, ...] | list[str]) -> str:
        if self.rng.random() < self.cast_share:
            return self.rng.choice(self.cast[kind])
        return self.rng.choice(pool)

    def _fill(self, template: str) -> str:
        r = self.rng
        time = r.choice(TIMES)
        feeling = r.choice(FEELINGS)
        name = self._pick("name", FIRST_NAMES)
        return template.format(
            name=name, name2=self._pick("name", FIRST_NAMES),
            surname=self.surname.get(name) or r.choice(SURNAMES),
            place=self._pick("place", PLACES), place2=self._pick("place", PLACES),
            noun=self._pick("noun", NOUNS), noun2=self._pick("noun", NOUNS),
            adj=self._pick("adj", ADJECTIVES), color=r.choice(COLORS),
            vpast=r.choice(VERBS_PAST), vintr=r.choice(VERBS_INTR), time=time,
            time_cap=time[0].upper() + time[1:], time_short=time.split()[-1],
            feeling=feeling, feeling_cap=feeling.capitalize(), numw=r.choice(NUMBER_WORDS),
            num=r.randint(2, 999), connective=r.choice(CONNECTIVES),
        )

    def sentence(self) -> str:
        """One sentence, ending with punctuation, no surrounding space."""
        return self._fill(self.rng.choice(_TEMPLATES))

    def sentences(self, n: int) -> list[str]:
        return [self.sentence() for _ in range(n)]

    def paragraph(self, *, n_sentences: int = 6) -> str:
        return " ".join(self.sentences(n_sentences))

    def text(self, *, n_chars: int) -> str:
        """Paragraphs (separated by blank lines) until at least ``n_chars`` characters."""
        if n_chars < 0:
            raise ValueError(f"n_chars must be >= 0, got {n_chars}")
        parts: list[str] = []
        size = 0
        while size < n_chars:
            p = self.paragraph(n_sentences=self.rng.randint(3, 8))
            parts.append(p)
            size += len(p) + 2
        return "\n\n".join(parts)


def corpus(*, seed: int, n_chars: int) -> str:
    """A block of prose of at least ``n_chars`` characters (the tokenizer's and LM's corpus)."""
    return Prose(seed).text(n_chars=n_chars)
