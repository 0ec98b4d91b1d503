"""The built-in calibration sample: a deterministic, diverse English sample generated here (no
download), for `quantization_config.calib_dataset: null`, and held-out texts (never calibration
texts) for measuring a quantized engine's accuracy."""

from __future__ import annotations

import random
from collections.abc import Iterable

_TOPICS: dict[str, dict[str, list[str]]] = {
    "science": {
        "subjects": [
            "the telescope",
            "a team of physicists",
            "the new vaccine",
            "this enzyme",
            "the Mars rover",
            "a quantum computer",
            "the research group",
            "the climate model",
            "a biologist",
            "the satellite",
        ],
        "verbs": [
            "measured",
            "discovered",
            "predicts",
            "explains",
            "detected",
            "simulates",
            "confirmed",
            "analyzed",
            "observed",
            "reduced",
        ],
        "objects": [
            "the spectrum of a distant star",
            "a protein that folds in milliseconds",
            "the rate of ocean warming",
            "signals from deep space",
            "the structure of the cell membrane",
            "the mass of the neutrino",
            "a new species of frog",
            "carbon levels in the atmosphere",
            "the error rate of the qubits",
            "traces of water ice",
        ],
    },
    "cooking": {
        "subjects": [
            "the chef",
            "my grandmother",
            "this recipe",
            "the bakery on the corner",
            "a good cook",
            "the restaurant",
            "our neighbour",
            "the cookbook",
            "the pastry team",
            "a street vendor",
        ],
        "verbs": ["prepares", "bakes", "recommends", "serves", "roasts", "seasons", "slices", "simmers", "mixes", "grills"],
        "objects": [
            "fresh bread with olive oil",
            "a spicy tomato soup",
            "the vegetables for twenty minutes",
            "a lemon tart with almond crust",
            "rice with saffron and peas",
            "the dough overnight",
            "garlic, onions and a pinch of salt",
            "chicken with rosemary",
            "a bowl of ramen",
            "chocolate cake for the party",
        ],
    },
    "finance": {
        "subjects": [
            "the central bank",
            "investors",
            "the company",
            "the quarterly report",
            "the startup",
            "the pension fund",
            "analysts",
            "the market",
            "the board",
            "a small business",
        ],
        "verbs": ["raised", "expects", "reported", "cut", "announced", "forecasts", "reviewed", "lost", "doubled", "invested in"],
        "objects": [
            "interest rates by a quarter point",
            "revenue growth of 12 percent",
            "its annual dividend",
            "a loss of 3.5 million dollars",
            "new bonds worth 400 million euros",
            "the price of oil",
            "inflation near two percent",
            "the merger with its rival",
            "costs in the second quarter",
            "renewable energy projects",
        ],
    },
    "technology": {
        "subjects": [
            "the search engine",
            "the new phone",
            "our database",
            "the compiler",
            "this library",
            "the cloud service",
            "the operating system",
            "a language model",
            "the router",
            "the app",
        ],
        "verbs": ["indexes", "supports", "stores", "optimizes", "crashed on", "encrypts", "downloads", "updates", "ranks", "caches"],
        "objects": [
            "millions of documents per day",
            "the user's settings",
            "queries in under ten milliseconds",
            "large files over a slow network",
            "embeddings for semantic search",
            "every security patch",
            "images in the background",
            "the results by relevance",
            "requests from mobile devices",
            "the configuration file",
        ],
    },
    "sports": {
        "subjects": [
            "the home team",
            "the goalkeeper",
            "the coach",
            "a young sprinter",
            "the champion",
            "the referee",
            "both teams",
            "the captain",
            "the tennis player",
            "the cyclist",
        ],
        "verbs": ["won", "lost", "scored", "trained for", "defended", "finished", "celebrated", "missed", "broke", "prepared for"],
        "objects": [
            "the final by two goals",
            "a penalty in the last minute",
            "the world record",
            "the marathon in under three hours",
            "the title for the third time",
            "the second set",
            "a difficult mountain stage",
            "the match on Sunday",
            "the season opener",
            "a free kick",
        ],
    },
    "travel": {
        "subjects": [
            "the train",
            "our flight",
            "the hotel",
            "a tourist",
            "the museum",
            "the ferry",
            "the tour guide",
            "the old town",
            "the airport",
            "the campsite",
        ],
        "verbs": [
            "leaves",
            "arrives at",
            "offers",
            "closes",
            "welcomes",
            "connects",
            "shows",
            "overlooks",
            "was delayed by",
            "is close to",
        ],
        "objects": [
            "the station at 7:45",
            "a view of the harbour",
            "visitors from all over the world",
            "the islands twice a day",
            "the lake and the mountains",
            "two hours because of the storm",
            "a collection of medieval maps",
            "free breakfast and parking",
            "the cathedral",
            "the beach",
        ],
    },
    "health": {
        "subjects": [
            "the doctor",
            "regular exercise",
            "the hospital",
            "a balanced diet",
            "the nurse",
            "the study",
            "good sleep",
            "the clinic",
            "the patient",
            "the pharmacist",
        ],
        "verbs": ["recommends", "improves", "treated", "lowers", "monitors", "suggests", "reduces", "helps", "explained", "prescribed"],
        "objects": [
            "blood pressure in older adults",
            "the risk of heart disease",
            "a short walk after dinner",
            "the symptoms of the flu",
            "two tablets a day",
            "stress and anxiety",
            "the results of the test",
            "more vegetables and less sugar",
            "a follow-up visit next week",
            "memory and concentration",
        ],
    },
}
_TIMES = [
    "yesterday",
    "last week",
    "on Monday",
    "this morning",
    "in 2023",
    "next year",
    "every summer",
    "after the meeting",
    "before noon",
    "in the evening",
    "during the holidays",
    "twice a month",
]
_PLACES = [
    "in Paris",
    "in Tokyo",
    "in a small village",
    "near the river",
    "in New York",
    "at the university",
    "in the north of Italy",
    "on the coast",
    "in Berlin",
    "in the city centre",
    "in Nairobi",
    "in Toronto",
]
_QUESTIONS = ["Why", "How", "When", "Where", "How often", "Under which conditions"]
_INSTRUCTIONS = [
    "Explain how",
    "Describe why",
    "Summarize the report in which",
    "Find documents where",
    "Write a short note saying that",
    "Check whether",
]
_CONNECTORS = ["because", "although", "while", "after", "so", "and"]


def _sentence(rng: random.Random, topic: dict[str, list[str]]) -> str:
    return f"{rng.choice(topic['subjects'])} {rng.choice(topic['verbs'])} {rng.choice(topic['objects'])}"


def _text(rng: random.Random, kind: int) -> str:
    topic = _TOPICS[rng.choice(sorted(_TOPICS))]
    other = _TOPICS[rng.choice(sorted(_TOPICS))]
    s = _sentence(rng, topic)
    if kind == 0:
        return f"{s[0].upper()}{s[1:]} {rng.choice(_PLACES)}."
    if kind == 1:
        q = rng.choice(_QUESTIONS)
        return f"{q} {s.replace(' ', ' really ', 1) if rng.random() < 0.2 else s} {rng.choice(_TIMES)}?"
    if kind == 2:
        return f"{rng.choice(_INSTRUCTIONS)} {s}."
    if kind == 3:
        t = rng.choice(_TIMES)
        return (
            f"{t[0].upper()}{t[1:]}, {s} {rng.choice(_CONNECTORS)} {_sentence(rng, other)}; about {rng.randint(2, 98)}% of readers agreed."
        )
    if kind == 4:  # a short paragraph
        parts = [_sentence(rng, rng.choice([topic, other])) for _ in range(rng.randint(3, 6))]
        return " ".join(f"{p[0].upper()}{p[1:]}." for p in parts)
    if kind == 5:  # search-style query
        content = [w for w in s.split() if len(w) > 3]
        keep = sorted(rng.sample(range(len(content)), k=min(len(content), rng.randint(2, 5))))
        return " ".join(content[i] for i in keep) + " " + rng.choice(_PLACES).split(" ", 1)[1]
    # a quote with numbers and punctuation
    return (
        f'"{s[0].upper()}{s[1:]}," said {rng.choice(["Dr. Lee", "Maria", "the spokesperson", "Ahmed", "Ms. Novak"])} '
        f"on {rng.choice(['3 May', '12 June', '1 October', '24 December'])} -- "
        f"{rng.randint(1, 999)} people, {rng.randint(1, 60)} minutes."
    )


def _generate(seed: int, count: int, exclude: set[str] | None = None) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude or ())
    attempts = 0
    while len(out) < count and attempts < count * 50:
        attempts += 1
        text = _text(rng, len(out) % 7)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


BUILTIN_SEED = 20240611
HELDOUT_SEED = 777


def builtin_texts(size: int = 512) -> list[str]:
    """`size` distinct English texts (sentences, questions, queries, short paragraphs) over seven topics;
    the same on every call and machine."""
    return _generate(BUILTIN_SEED, size)


def heldout_texts(n: int = 32, exclude: Iterable[str] = ()) -> list[str]:
    """`n` texts for accuracy measurement, none of them in `exclude` (the calibration texts)."""
    return _generate(HELDOUT_SEED, n, set(exclude) | set(builtin_texts(2048)))


SHORT_SEED = 4242
# first, the queries int8 rounded worst on all-MiniLM-L6-v2 (docs/benchmarks.md): a token or two
# besides [CLS] and [SEP]
_SHORTEST = ["no no", "ok", "no", "?", "I like it.", "yes", "hi"]
_SHORT_WORDS = ["yes", "no", "ok", "hello", "thanks", "why", "how", "price", "help", "today", "login", "refund", "weather", "?", "!"]


def short_texts(n: int = 32) -> list[str]:
    """`n` distinct queries of one to three words (search boxes, chat replies), the shortest first: a
    row of so few tokens is mostly its [CLS] and [SEP], which quantization treats worst, and the
    held-out sentences have none that short."""
    rng = random.Random(SHORT_SEED)
    words = {w.strip(".,?") for topic in _TOPICS.values() for part in topic.values() for phrase in part for w in phrase.split()}
    vocabulary = sorted(w for w in words | set(_SHORT_WORDS) if w)
    out: list[str] = _SHORTEST[:n]
    while len(out) < n:
        text = " ".join(rng.sample(vocabulary, rng.randint(1, 3)))
        if text not in out:
            out.append(text)
    return out
