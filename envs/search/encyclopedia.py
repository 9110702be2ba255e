"""A seeded fictional encyclopedia: a corpus, and questions only the corpus can answer.

``Encyclopedia.generate(seed)`` invents a small world of rivers, cities, guilds and people
with made-up names, years and relations (a person's birthplace and mentor, a city's river,
a guild's founder and seat), and writes one short article per entity. Questions ask for one
fact (single-hop: "In what year was the city of Orvane founded?") or chain two facts
(multi-hop: "Which river flows through the city where Bela Dravik was born?"). Every
answer is a made-up name or year, so a model cannot answer from memory: it has to search.

``EncyclopediaOracle`` is a scripted searcher for tests and sanity checks: it searches for
the question's subject, reads the bridge entity out of the returned article, searches for
that, and answers. Its score is the ceiling a retriever allows.

What this module does not do: split questions (``questions.py`` does) or paraphrase its
sentence templates; the world's facts are shared by every question about it, so a model
trained on some questions may learn facts that others ask about.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from palaestra.envs.search.retrieval import Document
from palaestra.envs.tasks import stable_hash

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "th",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "th", "k", "sh")
_OCCUPATIONS = ("cartographer", "glassblower", "astronomer", "poet", "shipwright", "herbalist")
_CRAFTS = ("weavers", "masons", "lens grinders", "bookbinders", "bell founders", "dyers")
_GOODS = ("copper", "salt", "blue dye", "tea", "amber", "wool", "paper", "honey")

# Relations: which entity kind has them, the question wording, and how to read them back
# out of an article (the article templates below write exactly these phrases).
_RELATION_PATTERNS = {
    "birth_year": r"born in (\d{4})",
    "birthplace": r"in the city of ([A-Z]\w+)",
    "mentor": r"studied under ([A-Z]\w+ [A-Z]\w+)",
    "founded": r"founded in (\d{3,4})",
    "river": r"on the ([A-Z]\w+) river",
    "seat": r"its seat is in ([A-Z]\w+)",
    "founder": r"founded in \d{3,4} by ([A-Z]\w+ [A-Z]\w+)",
}
_SINGLE_HOP = {
    ("person", "birth_year"): "In what year was {} born?",
    ("person", "birthplace"): "In which city was {} born?",
    ("person", "mentor"): "Who was the mentor of {}?",
    ("city", "founded"): "In what year was the city of {} founded?",
    ("city", "river"): "Which river flows through {}?",
    ("guild", "founded"): "In what year was {} founded?",
    ("guild", "seat"): "In which city does {} have its seat?",
    ("guild", "founder"): "Who founded {}?",
}
_MULTI_HOP = {
    ("person", "birthplace", "founded"): "In what year was the city where {} was born founded?",
    ("person", "birthplace", "river"): "Which river flows through the city where {} was born?",
    ("person", "mentor", "birthplace"): "In which city was the mentor of {} born?",
    ("person", "mentor", "birth_year"): "In what year was the mentor of {} born?",
    ("guild", "founder", "birthplace"): "In which city was the founder of {} born?",
    ("guild", "founder", "birth_year"): "In what year was the founder of {} born?",
    ("guild", "seat", "river"): "Which river flows through the city where {} has its seat?",
    ("guild", "seat", "founded"): "In what year was the city where {} has its seat founded?",
}


@dataclass(frozen=True)
class Question:
    """One generated question with its gold answer and the chain of facts it needs."""

    question: str
    """The question text."""
    answer: str
    """The gold answer (a made-up name or a year)."""
    subject: str
    """The entity the question names."""
    relations: tuple[str, ...]
    """The facts to follow from the subject, in order (one for single-hop, two for multi-hop)."""

    @property
    def hops(self) -> int:
        """How many articles answering takes."""
        return len(self.relations)


@dataclass
class Encyclopedia:
    """A generated world: its articles and every question it supports."""

    seed: int
    documents: list[Document] = field(default_factory=list)
    """One article per entity; ids ``"wiki-<n>"``, titles the entity names."""
    questions: list[Question] = field(default_factory=list)
    """Every single- and multi-hop question, in a fixed order."""

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        num_people: int = 120,
        num_cities: int = 30,
        num_guilds: int = 30,
        num_rivers: int = 12,
    ) -> Encyclopedia:
        """Invent a world from ``seed``; the same arguments always give the same world."""
        rng = np.random.default_rng(stable_hash(f"encyclopedia:{seed}"))
        names = _NameMaker(rng)
        rivers = [names.word() for _ in range(num_rivers)]
        facts: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for _ in range(num_cities):
            city = names.word()
            kinds[city] = "city"
            facts[city] = {
                "founded": str(rng.integers(800, 1500)),
                "river": _pick(rng, rivers),
                "goods": _pick(rng, _GOODS),
            }
        cities = list(facts)
        people: list[str] = []
        family_names = [names.word() for _ in range(max(2, num_people // 3))]
        for _ in range(num_people):
            person = names.person(family_names)
            kinds[person] = "person"
            facts[person] = {
                "birth_year": str(rng.integers(1500, 1900)),
                "birthplace": _pick(rng, cities),
                "occupation": _pick(rng, _OCCUPATIONS),
            }
            if people:  # everyone but the first studied under someone earlier
                facts[person]["mentor"] = _pick(rng, people)
            people.append(person)
        for _ in range(num_guilds):
            guild = f"the {names.word()} Guild"
            kinds[guild] = "guild"
            facts[guild] = {
                "founded": str(rng.integers(1500, 1900)),
                "founder": _pick(rng, people),
                "seat": _pick(rng, cities),
                "craft": _pick(rng, _CRAFTS),
            }
        world = cls(seed)
        for river in rivers:
            on_it = sorted(c for c in cities if facts[c]["river"] == river)
            world._add(river, _river_article(river, on_it))
        for entity, kind in kinds.items():
            world._add(entity, _ARTICLES[kind](entity, facts[entity]))
        world.questions = _questions(kinds, facts)
        return world

    def _add(self, title: str, text: str) -> None:
        doc_title = title[0].upper() + title[1:]
        self.documents.append(
            Document(id=f"wiki-{len(self.documents)}", title=doc_title, text=text)
        )


class _NameMaker:
    """Unique made-up names from syllables."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self) -> str:
        while True:
            syllables = 2 + int(self.rng.integers(2))
            name = "".join(
                _pick(self.rng, _ONSETS) + _pick(self.rng, _VOWELS) for _ in range(syllables)
            )
            name = (name + _pick(self.rng, _CODAS)).capitalize()
            if name not in self.used:
                self.used.add(name)
                return name

    def person(self, family_names: list[str]) -> str:
        while True:
            given = "".join(_pick(self.rng, _ONSETS) + _pick(self.rng, _VOWELS) for _ in range(2))
            name = f"{given.capitalize()} {_pick(self.rng, family_names)}"
            if name not in self.used:
                self.used.add(name)
                return name


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _person_article(name: str, f: dict[str, str]) -> str:
    text = f"{name} was a {f['occupation']} born in {f['birth_year']} in the city of {f['birthplace']}."
    if "mentor" in f:
        text += f" As a young {f['occupation']}, {name.split()[0]} studied under {f['mentor']}."
    return text


def _city_article(name: str, f: dict[str, str]) -> str:
    return (
        f"{name} is a city on the {f['river']} river, founded in {f['founded']}. "
        f"Its markets are known for {f['goods']}."
    )


def _guild_article(name: str, f: dict[str, str]) -> str:
    return (
        f"{name[0].upper() + name[1:]} is a guild of {f['craft']} founded in {f['founded']} by "
        f"{f['founder']}; its seat is in {f['seat']}."
    )


def _river_article(name: str, cities: list[str]) -> str:
    through = ", ".join(cities) if cities else "no city of note"
    return f"The {name} is a river. It flows past {through}."


_ARTICLES = {"person": _person_article, "city": _city_article, "guild": _guild_article}


def _questions(kinds: dict[str, str], facts: dict[str, dict[str, str]]) -> list[Question]:
    questions = []
    for entity, kind in kinds.items():
        for (subject_kind, *relations), template in [*_SINGLE_HOP.items(), *_MULTI_HOP.items()]:
            if subject_kind != kind:
                continue
            value: str | None = entity
            for relation in relations:
                value = facts[value].get(relation) if value is not None else None
            if value is not None:
                questions.append(Question(template.format(entity), value, entity, tuple(relations)))
    return questions


# ------------------------------------------------------------------------------- oracle

_RESULT_HEADER = re.compile(r"^\[(?P<id>[^\]]+)\] (?P<title>.*)$", re.MULTILINE)


class EncyclopediaOracle:
    """A scripted searcher for generated questions: one search per fact, then the answer.

    ``reply(relations, subject, observations)`` returns the next assistant message given
    the tool results so far: a ``search`` call (written by ``call``) while a fact is still
    missing, else ``\\boxed{answer}``. It reads facts only from the search results."""

    def __init__(self, call: Callable[[str], str]) -> None:
        """``call(query) -> str``: how to write a search call in the env's tool format."""
        self.call = call

    def reply(self, subject: str, relations: tuple[str, ...], results: list[str]) -> str:
        entity = subject
        for hop, relation in enumerate(relations):
            if hop == len(results):
                return self.call(entity)
            found = read_fact(results[hop], entity, relation)
            if found is None:
                return "I could not find it. \\boxed{unknown}"
            entity = found
        return f"\\boxed{{{entity}}}"


def read_fact(results: str, entity: str, relation: str) -> str | None:
    """The value of ``relation`` in the article titled ``entity`` within rendered results."""
    title = entity[0].upper() + entity[1:]
    headers = list(_RESULT_HEADER.finditer(results))
    for i, header in enumerate(headers):
        if header["title"].strip() == title:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(results)
            match = re.search(_RELATION_PATTERNS[relation], results[header.end() : end])
            return match.group(1) if match else None
    return None
