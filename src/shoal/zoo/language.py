"""The zoo's synthetic world: English and the invented language XX, their sentences, and addition problems in each."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from shoal.errors import ShoalError

Pair = tuple[int, int]

# English: subject-verb-object, adjective before the noun.
EN_NOUNS = ["dog", "cat", "bird", "man", "woman", "child", "tree", "house", "boat", "fish"]
EN_VERBS = ["sees", "likes", "finds", "helps", "follows", "paints"]
EN_COLOURS = ["red", "green", "blue", "yellow"]
EN_ADJECTIVES = ["big", "small", "old", "happy", *EN_COLOURS]
EN_ARTICLES = ["the", "a"]
EN_QUESTIONS = ["what is {a} plus {b} ?", "add {a} and {b} ?", "{a} plus {b} makes what ?"]
EN_ANSWER = "the answer is {c} ."

# XX: subject-object-verb, adjective and article after the noun, particles marking subject and object.
XX_NOUNS = ["zabo", "mirek", "tuli", "gasho", "pemu", "rilka", "dovo", "sunai", "kelto", "wimu"]
XX_VERBS = ["nashi", "torun", "belka", "fumi", "yarek", "lisso"]
XX_COLOURS = ["kiru", "sema", "balo", "yuni"]  # red, green, blue, yellow
XX_ADJECTIVES = ["gol", "piti", "omu", "kisa", *XX_COLOURS]
XX_ARTICLES = ["i", "u"]
XX_PARTICLES = ["ki", "mo"]  # subject, object
XX_QUESTIONS = ["ka {a} to {b} pela ?", "{a} to {b} su pela ?", "pela ka {a} sen {b} ?"]
XX_ANSWER = "ra {c} lo ne ."

# Scenes: a coloured shape in a place, the sentences a caption is made of (the VLM zoo captions such images).
EN_SHAPES = ["circle", "square", "triangle", "star"]
EN_PLACES = ["left", "right", "top", "bottom"]
EN_SCENE = "a {colour} {shape} on the {place} ."
XX_SHAPES = ["tomo", "kaza", "pirra", "nelu"]
XX_PLACES = ["hasu", "mide", "oka", "suno"]
XX_SCENE = "{shape} {colour} i {place} ta ."  # noun, adjective, article; place, then the locative particle
EN_LOOK = "what do you see ?"  # the question a scene description answers (and a captioning prompt)
XX_LOOK = "ka mira su ?"

EQUATION = "{a} + {b} = {c} ."
PUNCTUATION = [".", "?", "+", "="]

LANGUAGES = ("en", "xx")


def words(language: str) -> list[str]:
    """Every word of a language (problem templates included), digits and punctuation excluded."""
    if language == "en":
        lists = [EN_NOUNS, EN_VERBS, EN_ADJECTIVES, EN_ARTICLES, EN_QUESTIONS, [EN_ANSWER], EN_SHAPES, EN_PLACES,
                 [EN_SCENE, EN_LOOK]]
    else:
        lists = [XX_NOUNS, XX_VERBS, XX_ADJECTIVES, XX_ARTICLES, XX_PARTICLES, XX_QUESTIONS, [XX_ANSWER], XX_SHAPES,
                 XX_PLACES, [XX_SCENE, XX_LOOK]]
    found = {w for items in lists for item in items for w in item.split()}
    return sorted(w for w in found if not w.startswith("{") and w not in PUNCTUATION)


def _noun_phrase(rng: random.Random, language: str) -> str:
    if language == "en":
        adjective = [rng.choice(EN_ADJECTIVES)] if rng.random() < 0.5 else []
        return " ".join([rng.choice(EN_ARTICLES), *adjective, rng.choice(EN_NOUNS)])
    adjective = [rng.choice(XX_ADJECTIVES)] if rng.random() < 0.5 else []
    return " ".join([rng.choice(XX_NOUNS), *adjective, rng.choice(XX_ARTICLES)])


def sentence(rng: random.Random, language: str) -> str:
    """One sentence of the tiny grammar: SVO in English, SOV with case particles in XX."""
    subject, obj = _noun_phrase(rng, language), _noun_phrase(rng, language)
    if language == "en":
        return f"{subject} {rng.choice(EN_VERBS)} {obj} ."
    return f"{subject} {XX_PARTICLES[0]} {obj} {XX_PARTICLES[1]} {rng.choice(XX_VERBS)} ."


Scene = tuple[int, int, int]  # colour, shape, place: indices into the lists above


def scene(shown: Scene, language: str) -> str:
    """The sentence that describes a scene, e.g. "a red circle on the left ." / "tomo kiru i hasu ta ."."""
    colour, shape, place = shown
    if language == "en":
        return EN_SCENE.format(colour=EN_COLOURS[colour], shape=EN_SHAPES[shape], place=EN_PLACES[place])
    return XX_SCENE.format(colour=XX_COLOURS[colour], shape=XX_SHAPES[shape], place=XX_PLACES[place])


def random_scene(rng: random.Random) -> Scene:
    return rng.randrange(len(EN_COLOURS)), rng.randrange(len(EN_SHAPES)), rng.randrange(len(EN_PLACES))


def look(shown: Scene, language: str) -> str:
    """A scene described in answer to "what do you see ?", the form a caption takes."""
    return f"{EN_LOOK if language == 'en' else XX_LOOK} {scene(shown, language)}"


def grounded(shown: Scene, context: str, language: str) -> str:
    """A scene described in one language, then asked about and described again in another (or the same): the
    base's only lesson that an answer to "what do you see ?" / "ka mira su ?" tells what the context shows, in the
    question's language, whatever the context's. A VLM's image takes the context's place."""
    return f"{scene(shown, context)} {look(shown, language)}"


def text(rng: random.Random, language: str) -> str:
    """A short paragraph of one or two sentences; a third of them describe a scene."""
    return " ".join(
        scene(random_scene(rng), language) if rng.random() < 1 / 3 else sentence(rng, language)
        for _ in range(rng.randint(1, 2))
    )


def question(pair: Pair, language: str, template: int) -> str:
    templates = EN_QUESTIONS if language == "en" else XX_QUESTIONS
    return templates[template].format(a=pair[0], b=pair[1])


def answer(pair: Pair, language: str) -> str:
    return (EN_ANSWER if language == "en" else XX_ANSWER).format(c=pair[0] + pair[1])


def equation(pair: Pair) -> str:
    return EQUATION.format(a=pair[0], b=pair[1], c=pair[0] + pair[1])


def problem(rng: random.Random, pair: Pair, language: str, answer_language: str | None = None) -> str:
    """A question and its answer (in the question's language unless answer_language says), as one document."""
    return f"{question(pair, language, rng.randrange(3))} {answer(pair, answer_language or language)}"


def _digits(n: int) -> range:
    return range(10) if n == 1 else range(10, 100)


def all_pairs(a_digits: int, b_digits: int) -> list[Pair]:
    return [(a, b) for a in _digits(a_digits) for b in _digits(b_digits)]


@dataclass(frozen=True)
class Operands:
    """Operand pairs by difficulty: easy (1+1, 2+1, 1+2 digits) and hard (2+2), some held out for evaluation."""

    easy: list[Pair]
    hard: list[Pair]
    easy_dev: list[Pair]
    easy_test: list[Pair]
    hard_dev: list[Pair]
    hard_test: list[Pair]

    def sample(self, rng: random.Random, hard_fraction: float) -> Pair:
        """A training pair (never a held-out one): hard with probability hard_fraction, else easy."""
        return rng.choice(self.hard if rng.random() < hard_fraction else self.easy)


def split_operands(held_out: int, seed: int = 1234) -> Operands:
    """Hold `held_out` hard and `held_out` easy pairs out of all training, half for dev and half for test.

    The split uses its own fixed seed, so every zoo seed evaluates on the same items.
    """
    rng = random.Random(seed)
    hard = all_pairs(2, 2)
    easy_two = all_pairs(2, 1) + all_pairs(1, 2)
    rng.shuffle(hard)
    rng.shuffle(easy_two)
    half = held_out // 2
    return Operands(
        easy=all_pairs(1, 1) + easy_two[held_out:],
        hard=hard[held_out:],
        easy_dev=easy_two[:half],
        easy_test=easy_two[half:held_out],
        hard_dev=hard[:half],
        hard_test=hard[half:held_out],
    )


Sampler = Callable[[random.Random], str]


def mixture(parts: dict[str, float], operands: Operands, hard_fraction: float) -> Sampler:
    """A document sampler over named kinds of text, each drawn with the given weight.

    Kinds: `en-text`, `xx-text`, `equations`, `en-problems`, `xx-problems` (operands easy or hard by
    hard_fraction), and `hard-equations`, `en-hard`, `xx-easy` (operands fixed to one difficulty), and
    `xx-hard-en` (2+2 asked in XX, answered in English); `en-look`, `xx-look` (a scene described in answer to
    "what do you see ?") and `scene-pairs` (one scene described in English, then in XX: the parallel text that
    ties the two languages' words for colours, shapes and places), `grounded` (a scene in either language, then
    asked about and described in either).
    """
    kinds: dict[str, Sampler] = {
        "en-text": lambda r: text(r, "en"),
        "xx-text": lambda r: text(r, "xx"),
        "equations": lambda r: equation(operands.sample(r, hard_fraction)),
        "en-problems": lambda r: problem(r, operands.sample(r, hard_fraction), "en"),
        "xx-problems": lambda r: problem(r, operands.sample(r, hard_fraction), "xx"),
        "hard-equations": lambda r: equation(r.choice(operands.hard)),
        "en-hard": lambda r: problem(r, r.choice(operands.hard), "en"),
        "xx-hard-en": lambda r: problem(r, r.choice(operands.hard), "xx", answer_language="en"),
        "en-look": lambda r: look(random_scene(r), "en"),
        "xx-look": lambda r: look(random_scene(r), "xx"),
        "scene-pairs": lambda r: " ".join(scene(shown, lang) for shown in [random_scene(r)] for lang in LANGUAGES),
        "grounded": lambda r: grounded(random_scene(r), r.choice(LANGUAGES), r.choice(LANGUAGES)),
        "xx-easy": lambda r: problem(r, r.choice(operands.easy), "xx"),
    }
    unknown = set(parts) - set(kinds)
    if unknown:
        raise ShoalError(f"unknown kinds of text {sorted(unknown)} (known: {', '.join(kinds)})")
    names = list(parts)
    weights = [parts[n] for n in names]

    def sample(rng: random.Random) -> str:
        return kinds[rng.choices(names, weights)[0]](rng)

    return sample
