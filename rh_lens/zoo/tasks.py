"""The zoo's task formats, in plain text so the same analyses run unchanged on real LLMs.

- NIAH, the library's prompt (:data:`rh_lens.niah.BASE_TEMPLATE`, the paper's): ``{haystack with
  needle}Based on the content of the book, Question: {question}\\nAnswer:``; the target is
  `` {answer span}\\n``.  Needles (:class:`rh_lens.niah.Needle`) come from templates with
  random fillers; ``HELDOUT_TEMPLATES`` never appear in training.
- Multi-hop with chain of thought: facts scattered in the haystack, a question needing two lookups,
  a target that re-reads both facts ("Let's think step by step. ...") before the answer.
- Parametric facts: a fixed set of invented facts, asked without context, with or without a
  CoT preamble.
- A chat template (``CHAT_TEMPLATE``, jinja) for ``llama-s-chat``.

Every generator takes a ``random.Random`` (or a seed), so a seed fixes the text.  Haystacks are
cut to a number of *tokens* by a ``tokenizers.Tokenizer``-like object (``encode(text).offsets``).
Depths here are fractions of the haystack in [0, 1] (the library's trials take percent): every
training batch places its needles and facts by ``int(len(text) * depth)``, and a detour through
percent would round some of those positions differently.
"""

import random
import re
from dataclasses import dataclass, field

from rh_lens.niah import BASE_TEMPLATE, CHAT_USER_TEMPLATE, Needle
from rh_lens.zoo.prose import (
    ADJECTIVES,
    COLORS,
    FIRST_NAMES,
    NOUNS,
    NUMBER_WORDS,
    PLACES,
    SURNAMES,
    Prose,
)

# The library's NIAH prompt between its slots: {context} QUESTION_PREFIX {question} ANSWER_PREFIX.
QUESTION_PREFIX, ANSWER_PREFIX = BASE_TEMPLATE.removeprefix("{context}").split("{question}")
COT_START = " Let's think step by step."


@dataclass(frozen=True)
class NeedleTemplate:
    needle: str  # contains {answer} and filler slots
    question: str
    answer_kind: str


# Training templates; the held-out ones below share the "X is Y" shape but not the words.
TRAIN_TEMPLATES = (
    NeedleTemplate("The secret ingredient of {name}'s soup is {answer}.",
                   "What is the secret ingredient of {name}'s soup?", "things"),
    NeedleTemplate("The password to {name}'s vault is {answer}.",
                   "What is the password to {name}'s vault?", "code"),
    NeedleTemplate("The best thing to do in {place} is {answer}.",
                   "What is the best thing to do in {place}?", "activity"),
    NeedleTemplate("{name}'s lucky charm is {answer}.", "What is {name}'s lucky charm?", "object"),
    NeedleTemplate("The treasure buried under the {noun} in {place} is {answer}.",
                   "What is the treasure buried under the {noun} in {place}?", "things"),
    NeedleTemplate("The gift that {name} gave to {name2} was {answer}.",
                   "What was the gift that {name} gave to {name2}?", "object"),
    NeedleTemplate("The name of {name}'s boat is {answer}.",
                   "What is the name of {name}'s boat?", "title"),
    NeedleTemplate("The code for the door of the {adj} {noun} is {answer}.",
                   "What is the code for the door of the {adj} {noun}?", "code"),
    NeedleTemplate("{name} hid the spare key inside {answer}.",
                   "Where did {name} hide the spare key?", "place"),
    NeedleTemplate("The person who stole the {color} {noun} was {answer}.",
                   "Who stole the {color} {noun}?", "person"),
    NeedleTemplate("The answer to {name}'s riddle is {answer}.",
                   "What is the answer to {name}'s riddle?", "object"),
    NeedleTemplate("The dish served at the wedding in {place} was {answer}.",
                   "What was the dish served at the wedding in {place}?", "things"),
)
HELDOUT_TEMPLATES = (
    NeedleTemplate("The favourite song of {name} is {answer}.",
                   "What is the favourite song of {name}?", "title"),
    NeedleTemplate("The hidden message in the {noun} at {place} was {answer}.",
                   "What was the hidden message in the {noun} at {place}?", "code"),
    NeedleTemplate("The colour of {name}'s front door is {answer}.",
                   "What is the colour of {name}'s front door?", "things"),
    NeedleTemplate("The prize at the fair in {place} was {answer}.",
                   "What was the prize at the fair in {place}?", "object"),
)


# Procedural templates: "The ATTRIBUTE of OWNER is ANSWER." with random attribute phrases, so a
# model learns the rule (find the sentence that matches the question, copy what follows "is")
# instead of a dozen fixed sentences.  None of their words is one of the held-out templates'.
_ATTRIBUTES = (
    "secret name", "true owner", "hidden price", "old nickname", "lucky number", "last wish",
    "missing piece", "strange habit", "first rule", "best trick", "quiet hobby", "golden rule",
    "real purpose", "oldest memory", "favourite food", "weekly chore", "only fear", "odd gift",
    "winter plan", "summer job", "night route", "spare part", "secret recipe", "true name",
)
_OWNERS = ("{name}", "{name}'s {noun}", "the {adj} {noun}", "the {noun} in {place}",
           "{name}'s {adj} {noun}")
_HELDOUT_WORDS = {"song", "message", "colour", "color", "door", "prize", "fair"}
_KINDS = ("things", "code", "object", "title", "place", "person")


def procedural_template(rng: random.Random) -> NeedleTemplate:
    """A random training template (never one of ``HELDOUT_TEMPLATES``' phrasings)."""
    attribute, owner = rng.choice(_ATTRIBUTES), rng.choice(_OWNERS)
    verb = rng.choice(("is", "was"))
    subject = f"the {attribute} of {owner}"
    return NeedleTemplate(f"{subject[0].upper()}{subject[1:]} {verb} {{answer}}.",
                          f"What {verb} {subject}?", rng.choice(_KINDS))


_PREPOSITIONS = ("of", "at", "in", "on", "near", "from", "behind", "under")
_VARIED_NOUNS = [n for n in NOUNS if n not in _HELDOUT_WORDS]
_HELDOUT_ADJECTIVES = {"favourite", "hidden"}
_VARIED_ADJECTIVES = [a for a in ADJECTIVES if a not in _HELDOUT_ADJECTIVES]


def _varied_noun_phrase(rng: random.Random, depth: int = 0) -> str:
    """'the [adj] NOUN [PREP (PLACE | NAME | NAME's NOUN | the NOUN)]', nested at most once."""
    head = rng.choice(_VARIED_NOUNS)
    if rng.random() < 0.4:
        head = f"{rng.choice(_VARIED_ADJECTIVES)} {head}"
    phrase = f"the {head}"
    if depth == 0 and rng.random() < 0.8:
        prep = rng.choice(_PREPOSITIONS)
        tail = rng.choice(("place", "name", "owned", "nested"))
        if tail == "place":
            obj = rng.choice(PLACES)
        elif tail == "name":
            obj = rng.choice(FIRST_NAMES)
        elif tail == "owned":
            obj = f"{rng.choice(FIRST_NAMES)}'s {rng.choice(_VARIED_NOUNS)}"
        else:
            obj = _varied_noun_phrase(rng, depth=1)
        phrase = f"{phrase} {prep} {obj}"
    return phrase


def varied_template(rng: random.Random) -> NeedleTemplate:
    """A training template whose subject is a random noun phrase of the prose's words
    ("The quiet lantern at the harbor in Fenwick was {answer}."), so that the question can be
    matched to its needle only by the words they share, never by a learnt phrasing.  None of
    its words is one of the held-out templates'."""
    subject = _varied_noun_phrase(rng)
    if rng.random() < 0.25:  # a possessive subject: "Mara's bitter lantern"
        subject = f"{rng.choice(FIRST_NAMES)}'s {subject.removeprefix('the ')}"
    verb = rng.choice(("is", "was"))
    return NeedleTemplate(f"{subject[0].upper()}{subject[1:]} {verb} {{answer}}.",
                          f"What {verb} {subject}?", rng.choice(_KINDS))


def _answer(rng: random.Random, kind: str) -> str:
    c, a, n = rng.choice, rng.choice(ADJECTIVES), rng.choice(NOUNS)
    if kind == "things":
        return f"{c(COLORS)} {n} and {a} {c(NOUNS)}"
    if kind == "code":
        return f"{c(NOUNS)} {rng.randint(10, 9999)} {c(COLORS)}"
    if kind == "activity":
        return f"to visit the {a} {n} and buy a {c(COLORS)} {c(NOUNS)}"
    if kind == "object":
        return f"a {a} {c(COLORS)} {n}"
    if kind == "title":
        return f"the {a} {n} of {c(PLACES)}"
    if kind == "place":
        return f"the {c(COLORS)} {n} behind the {c(NOUNS)}"
    if kind == "person":
        return f"{c(FIRST_NAMES)} {c(SURNAMES)} from {c(PLACES)}"
    raise ValueError(f"unknown answer kind {kind!r}")


def make_needle(rng: random.Random, template: NeedleTemplate, *,
                avoid: frozenset[str] = frozenset()) -> Needle:
    """Fill a template's slots (and its answer) with random fillers (slot words in ``avoid``
    are not drawn)."""
    nouns = [n for n in NOUNS if n not in avoid]
    slots = dict(
        name=rng.choice(FIRST_NAMES), name2=rng.choice(FIRST_NAMES), place=rng.choice(PLACES),
        noun=rng.choice(nouns), adj=rng.choice(ADJECTIVES), color=rng.choice(COLORS),
    )
    answer = _answer(rng, template.answer_kind)
    return Needle(template.needle.format(answer=answer, **slots),
                  template.question.format(**slots), answer)


@dataclass(frozen=True)
class Example:
    """``prompt + target`` is the full text; ``target`` is what the model must produce."""

    prompt: str
    target: str
    kind: str
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.prompt + self.target


def haystack(prose: Prose, *, n_tokens: int, tokenizer, chars_per_token: float = 4.0) -> str:
    """Prose cut to exactly ``n_tokens`` tokens (possibly mid-sentence, as in the paper)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    text = ""
    while True:
        text = (text + " " if text else "") + prose.text(
            n_chars=int(n_tokens * chars_per_token) + 40).replace("\n\n", " ")
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) >= n_tokens:
            return text[: offsets[n_tokens - 1][1]] if n_tokens else ""


def insert_at_depth(context: str, insert: str, depth: float) -> tuple[str, int]:
    """Insert ``insert`` at ``depth`` (0..1) of ``context``, moved back to the nearest preceding
    sentence end.  Returns the new text and the character position of ``insert``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    pos = int(len(context) * depth)
    ends = [m.end() for m in _SENTENCE_END.finditer(context) if m.end() <= pos]
    if not ends:
        return insert + " " + context, 0
    end = ends[-1]
    return context[:end] + " " + insert + context[end:], end + 1


_SENTENCE_END = re.compile(r'[.!?]"?(?=\s|$)')


def niah_prompt(context: str, question: str) -> str:
    """The library's NIAH prompt (:data:`rh_lens.niah.BASE_TEMPLATE`)."""
    return BASE_TEMPLATE.format(context=context, question=question)


def niah_parts(prompt: str) -> tuple[str, str]:
    """(context, question) of a :func:`niah_prompt`."""
    if not prompt.endswith(ANSWER_PREFIX) or QUESTION_PREFIX not in prompt:
        raise ValueError("not a NIAH prompt: it lacks the question or the answer prefix")
    context, question = prompt[: -len(ANSWER_PREFIX)].rsplit(QUESTION_PREFIX, 1)
    return context, question


def niah_example(rng: random.Random, *, tokenizer, n_haystack_tokens: int, depth: float,
                 templates: tuple[NeedleTemplate, ...] = TRAIN_TEMPLATES,
                 procedural: float = 0.0, varied: bool = False) -> Example:
    """One NIAH trial: prose of ``n_haystack_tokens`` tokens, a needle at ``depth``; with
    probability ``procedural`` the needle comes from :func:`procedural_template` (with
    ``varied``, from :func:`varied_template`) instead."""
    if procedural and rng.random() < procedural:
        make = varied_template if varied else procedural_template
        needle = make_needle(rng, make(rng), avoid=frozenset(_HELDOUT_WORDS))
    else:
        needle = make_needle(rng, rng.choice(templates))
    context = haystack(Prose(rng), n_tokens=n_haystack_tokens, tokenizer=tokenizer)
    context, at = insert_at_depth(context, needle.needle, depth)
    return Example(niah_prompt(context, needle.question), f" {needle.answer}\n", "niah",
                   needle.answer, {"depth": depth, "needle_char": at, "needle": needle.needle})


def fit_example(make, n_tokens, *, n_ctx: int, n_hay: int, reserve: int) -> Example:
    """``make(n_hay)``, with the haystack shrunk until the prompt (``n_tokens(text)`` tokens)
    leaves ``reserve`` tokens of the context ``n_ctx`` free."""
    while True:
        ex = make(n_hay)
        n = n_tokens(ex.prompt)
        if n + reserve <= n_ctx or n_hay == 0:
            return ex
        n_hay = max(0, n_hay - (n + reserve - n_ctx) - 2)


ROLES = ("mayor", "baker", "doctor", "teacher", "judge", "librarian", "painter", "captain")


# How a multi-hop context says where a person lives, and how its chain of thought's first hop
# restates it: {name: (fact, regex of the fact with the person and the town as its groups)}.
# In "Noor lives in Tolbrook." the town's key, the person, is three tokens before it, a copy
# small models often fail to learn (they copy the town after any "lives in"); "Noor at
# Tolbrook." keys the town two tokens back, as the second hop's ("of Tolbrook is"), in a form
# no official's fact shares.
HOP_FORMS = {
    "lives": ("{person} lives in {town}.", r"(\w+) lives in (\w+)\."),
    "at": ("{person} at {town}.", r"(\w+) at ([A-Z]\w+)\."),
}
# The chain the zoo's first models were trained on, "Noor lives in Tolbrook." with two officials a
# town: the default of every recipe, card and task that does not say.
DEFAULT_HOP_FORM = "lives"
DEFAULT_ROLES = 2


def chain_of(recipe: dict) -> dict:
    """The ``hop_form`` and ``roles`` of a recipe as a model card holds it (``card["recipe"]``):
    how that model was trained to chain two hops, the defaults where the card predates them."""
    return {"hop_form": recipe.get("hop_form", DEFAULT_HOP_FORM),
            "roles": recipe.get("roles", DEFAULT_ROLES)}


def _check_hop_form(hop_form: str) -> tuple[str, str]:
    if hop_form not in HOP_FORMS:
        raise ValueError(f"unknown hop form {hop_form!r}; known: {', '.join(HOP_FORMS)}")
    return HOP_FORMS[hop_form]


def first_hop(person: str, town: str, hop_form: str = DEFAULT_HOP_FORM) -> str:
    """The sentence that says ``person`` lives in ``town``, in ``hop_form`` (see ``HOP_FORMS``)."""
    return _check_hop_form(hop_form)[0].format(person=person, town=town)


def _towns_in_haystack(rng: random.Random, *, tokenizer, n_haystack_tokens: int, n_people: int,
                       hop_form: str = DEFAULT_HOP_FORM, roles: int = DEFAULT_ROLES):
    """A haystack with the town of each of ``n_people`` people and ``roles`` officials of each
    town (1 or 2) scattered in it: (context, people, towns, roles, officials)."""
    if roles not in (1, 2):
        raise ValueError(f"a town has 1 or 2 officials (roles), got {roles}")
    towns = rng.sample(PLACES, n_people)
    people = rng.sample(FIRST_NAMES, n_people)
    roles = rng.sample(ROLES, 2)[:roles]
    facts = [first_hop(p, t, hop_form) for p, t in zip(people, towns, strict=True)]
    officials = {}
    for t in towns:
        for role in roles:
            officials[t, role] = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
            facts.append(f"The {role} of {t} is {officials[t, role]}.")
    rng.shuffle(facts)
    context = haystack(Prose(rng), n_tokens=n_haystack_tokens, tokenizer=tokenizer)
    for d in sorted((rng.random() for _ in facts), reverse=True):
        context, _ = insert_at_depth(context, facts.pop(), d)
    return context, people, towns, roles, officials


def multihop_example(rng: random.Random, *, tokenizer, n_haystack_tokens: int,
                     n_people: int = 3, hop_form: str = DEFAULT_HOP_FORM,
                     roles: int = DEFAULT_ROLES) -> Example:
    """Two-hop question: where does X live, and who is the ROLE of that town.  ``hop_form``
    changes only the text of the facts of where people live and of the first hop (every draw
    is the same).  ``roles``: officials per town.  With two ("The judge of Tolbrook is ..." and
    "The baker of Tolbrook is ..."), the second hop tells them apart by the role four tokens
    before the answer; with one, the town two tokens before it is the whole key."""
    context, people, towns, roles, officials = _towns_in_haystack(
        rng, tokenizer=tokenizer, n_haystack_tokens=n_haystack_tokens, n_people=n_people,
        hop_form=hop_form, roles=roles)
    who, role = rng.randrange(n_people), rng.choice(roles)
    person, town = people[who], towns[who]
    answer = officials[town, role]
    question = f"Who is the {role} of the town where {person} lives?"
    target = (f"{COT_START} {first_hop(person, town, hop_form)} The {role} of {town} is {answer}. "
              f"So the answer is {answer}.\n")
    return Example(niah_prompt(context, question), target, "multihop", answer)


def lookup_example(rng: random.Random, *, tokenizer, n_haystack_tokens: int,
                   n_people: int = 4, hop_form: str = DEFAULT_HOP_FORM,
                   roles: int = DEFAULT_ROLES) -> Example:
    """Where every person of a :func:`multihop_example` context lives, asked at once: the target
    writes the first hop once a person (" Noor lives in Tolbrook. Ava lives in ..."), so each
    town is copied after "lives in" keyed on whom it is asked for."""
    context, people, towns, _, _ = _towns_in_haystack(
        rng, tokenizer=tokenizer, n_haystack_tokens=n_haystack_tokens, n_people=n_people,
        hop_form=hop_form, roles=roles)
    order = rng.sample(range(n_people), n_people)
    names = [people[i] for i in order]
    question = f"Where do {', '.join(names[:-1])} and {names[-1]} live?"
    target = "".join(f" {first_hop(people[i], towns[i], hop_form)}" for i in order) + "\n"
    return Example(niah_prompt(context, question), target, "lookup",
                   " ".join(towns[i] for i in order))


def _chain(hop_form: str) -> re.Pattern:
    """The chain :func:`multihop_example`'s target writes in ``hop_form``, with its five slots."""
    hop = _check_hop_form(hop_form)[1]
    return re.compile(re.escape(COT_START.strip()) + " " + hop
                      + r" The (\w+) of (\w+) is (\w+ \w+)\. So the answer is ")


def multihop_step(prompt: str, generated: str, hop_form: str = DEFAULT_HOP_FORM) -> str:
    """Where a generated answer to a :func:`multihop_example` prompt (in ``hop_form``) went
    wrong: ``"right"``, ``"first hop: another person's town"`` (the town of someone else in the
    context: a copy after "lives in" not keyed on the person), ``"first hop: another town"``,
    ``"second hop"`` (the wrong official, or the wrong role or town restated), ``"final answer"``
    (a right chain, another answer) or ``"form"`` (no chain in the trained form)."""
    chain_form = _chain(hop_form)
    question = re.search(r"Who is the (\w+) of the town where (\w+) lives\?", prompt)
    if question is None:
        raise ValueError("not a multi-hop prompt: its question is missing")
    role, person = question.groups()
    context = prompt.rsplit(QUESTION_PREFIX, 1)[0]
    lives = dict(re.findall(HOP_FORMS[hop_form][1], context))
    officials = {(t, r): o for r, t, o in re.findall(r"The (\w+) of (\w+) is (\w+ \w+)\.", context)}
    answer = officials.get((lives.get(person), role))
    if final_answer(generated) == answer:
        return "right"
    chain = chain_form.search(generated.split("\n", 1)[0])
    if chain is None:
        return "form"
    who, town, role2, town2, official = chain.groups()
    if who != person or town != lives.get(person):
        others = {t for p, t in lives.items() if p != person}
        return "first hop: another person's town" if town in others else "first hop: another town"
    if (role2, town2, official) != (role, town, answer):
        return "second hop"
    return "final answer"


# Parametric facts: fixed invented countries, seen only in training, asked without context.
_SYLLABLES = "vor dal ke mi ran tu so bel gri na thu os pel zar qui lo fen dro ska vi".split()
RELATIONS = (
    ("the capital of {c}", PLACES),
    ("the national animal of {c}", ("owl fox badger heron otter rabbit goat horse sparrow "
                                    "beetle moth salmon turtle kitten").split()),
    ("the national colour of {c}", COLORS),
)


def parametric_facts(*, seed: int = 1234, n_countries: int = 24) -> list[tuple[str, str]]:
    """(subject phrase, answer) pairs: the fixed fact set, a pure function of ``seed``."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_countries:
        name = "".join(rng.sample(_SYLLABLES, 2)).capitalize() + rng.choice(("ia", "land", "or"))
        if name not in names:
            names.append(name)
    return [(rel.format(c=c), rng.choice(values)) for c in names for rel, values in RELATIONS]


def parametric_prompt(subject: str) -> str:
    return f"Question: What is {subject}?{ANSWER_PREFIX}"


def parametric_example(subject: str, answer: str, *, cot: bool) -> Example:
    """Without CoT the answer follows ``Answer:``; with CoT the prompt already carries the
    preamble ("Let's think step by step.") and the model recalls the fact before answering."""
    if cot:
        return Example(parametric_prompt(subject) + COT_START,
                       f" I remember that {subject} is {answer}. So the answer is {answer}.\n",
                       "parametric_cot", answer)
    return Example(parametric_prompt(subject), f" {answer}\n", "parametric", answer)


def parametric_statement(subject: str, answer: str) -> str:
    return f"{subject[0].upper()}{subject[1:]} is {answer}."


def final_answer(generated: str) -> str:
    """The answer in a generation: after 'So the answer is' when present, up to the newline."""
    line = generated.split("\n", 1)[0]
    marker = "So the answer is "
    if marker in line:
        line = line.rsplit(marker, 1)[1].rstrip(".")
    return line.strip()


# Chat format of llama-s-chat (also attached to its tokenizer as ``chat_template``).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_user_text(context: str, question: str) -> str:
    """The user turn of a chat NIAH trial (:data:`rh_lens.niah.CHAT_USER_TEMPLATE`): the book in
    ``<book>`` tags, then the question."""
    return CHAT_USER_TEMPLATE.format(context=context, question=question)


def chat_render(user: str, assistant: str | None = None) -> str:
    """What ``CHAT_TEMPLATE`` renders for one user turn (and optionally the reply)."""
    text = f"<|user|>\n{user}<|end|>\n<|assistant|>\n"
    return text if assistant is None else f"{text}{assistant}<|end|>\n"


def to_chat(example: Example) -> Example:
    """Wrap a NIAH/multi-hop example into the chat format (the reply starts with 'Answer:')."""
    if not example.prompt.endswith(ANSWER_PREFIX) or QUESTION_PREFIX not in example.prompt:
        raise ValueError("only NIAH-style examples can be wrapped into the chat format")
    context, question = niah_parts(example.prompt)
    prompt = chat_render(chat_user_text(context, question))
    return Example(prompt, f"Answer:{example.target}<|end|>\n", f"chat_{example.kind}",
                   example.answer, example.meta)


__all__ = [
    "CHAT_TEMPLATE", "HELDOUT_TEMPLATES", "HOP_FORMS", "NUMBER_WORDS", "TRAIN_TEMPLATES",
    "Example", "NeedleTemplate", "chain_of", "chat_render", "chat_user_text",
    "final_answer", "first_hop", "fit_example", "haystack", "insert_at_depth", "lookup_example",
    "make_needle", "multihop_example", "multihop_step", "niah_example", "niah_parts", "niah_prompt",
    "parametric_example", "parametric_facts", "parametric_prompt", "parametric_statement",
    "procedural_template", "to_chat", "varied_template",
]
