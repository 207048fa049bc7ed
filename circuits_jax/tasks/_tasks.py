"""Tasks in one shape: aligned clean/corrupt prompt batches, answers and their metric.

A `Task` is what every circuit method consumes (ACDC, EAP, faithfulness): clean and corrupt
token batches of equal shape, an optional attention mask and scored positions, the answer
tokens and the task metric (higher = more of the behaviour). Generators for SmolLM2's tokenizer
and the ground-truth toy models both return it.

Generators (any `Tokenizer`; word lists are hand-written here and checked against SmolLM2-135M):

    ioi_task             Wang et al. (2022) indirect object identification, ABC or flip corruption
    induction_task       repeated random tokens; corrupt: the first occurrence resampled
    greater_than_task    Hanna et al. (2023) "from the year 1732 to the year 17", on digit tokens
    factual_recall_task  "The capital of France is" -> " Paris"; corrupt: another subject
    task(name, tok)      any of them by name
    task_from_prompts    a Task from your own strings, with the same checks

Every answer must be one token, so the metric can read it at one position: `single_token_ids`
refuses the others, naming each and its split. Clean and corrupt prompts of one row must
tokenize to the same length; rows of different lengths are right-padded, with `attention_mask`
and per-row `answer_pos` (the built-in generators keep rows equal where they can).
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from ..core import AnswerProb, LogitDiff, ProbMassDiff, Task, cast
from . import known

# ---------------------------------------------------------------------------------------------
# Checks and assembly shared by every generator


def single_token_ids(tok, strings: Sequence[str], what: str = "answers") -> np.ndarray:
    """int32 ids of strings that must each be one token; a ValueError names every one that is not.

    A metric reads one logit per answer at one position, so a split answer would silently score
    only its first piece: refuse it instead, showing the split (`' Mary Ann' splits into [' Mary', ' Ann']`).
    """
    ids, bad = [], {}
    for s in strings:
        row = tok.encode(s, prepend_bos=False)
        if len(row) != 1:
            bad[s] = [tok.decode([i]) for i in row]
        ids.append(row[0] if row else -1)
    if bad:
        splits = "; ".join(f"{s!r} splits into {pieces}" for s, pieces in bad.items())
        raise ValueError(f"{len(bad)} {what} are not single tokens, so no metric can read them at one position: "
                         f"{splits}")
    return np.asarray(ids, np.int32)


def _single_token_words(tok, words: Sequence[str], prefix: str = " ") -> list[str]:
    """The words of a hand-written pool that are one token after `prefix` (names, places, nouns)."""
    return [w for w in words if len(tok.encode(prefix + w, prepend_bos=False)) == 1]


def _batch(tok, prompts, corrupt_prompts, prepend_bos):
    """`(clean, corrupt, attention_mask, answer_pos)`; mask and positions are None when no row needs padding."""
    clean = [tok.encode(p, prepend_bos) for p in prompts]
    corrupt = [tok.encode(p, prepend_bos) for p in corrupt_prompts]
    unequal = [(i, p, q, len(a), len(b)) for i, (p, q, a, b) in enumerate(zip(prompts, corrupt_prompts, clean, corrupt))
               if len(a) != len(b)]  # fmt: skip
    if unequal:
        pairs = "; ".join(f"row {i}: {p!r} ({n} tokens) vs {q!r} ({m} tokens)" for i, p, q, n, m in unequal)
        raise ValueError(f"clean and corrupt prompts must tokenize to the same length, pair by pair, so positions "
                         f"align: {pairs}")
    lengths = np.array([len(r) for r in clean])
    if len(set(lengths.tolist())) == 1:
        return np.asarray(clean, np.int32), np.asarray(corrupt, np.int32), None, None
    T = int(lengths.max())
    pad = lambda rows: np.asarray([r + [tok.pad_token_id] * (T - len(r)) for r in rows], np.int32)  # noqa: E731
    mask = np.arange(T)[None, :] < lengths[:, None]
    return pad(clean), pad(corrupt), mask, (lengths - 1).astype(np.int32)


def _text_task(tok, name, prompts, corrupt_prompts, answers, wrong, *, prepend_bos=None, notes="") -> Task:
    """A Task from aligned strings: `LogitDiff(answer, wrong)`, or `AnswerProb(answer)` when `wrong` is None."""
    rows = lambda x: [x] if isinstance(x, str) else list(x)  # noqa: E731
    prompts, corrupt_prompts, answers = rows(prompts), rows(corrupt_prompts), rows(answers)
    wrong = None if wrong is None else rows(wrong)
    sizes = {"prompts": len(prompts), "corrupt_prompts": len(corrupt_prompts), "answers": len(answers)}
    if wrong is not None:
        sizes["wrong"] = len(wrong)
    if len(set(sizes.values())) != 1 or not prompts:
        raise ValueError(f"need one prompt, corrupt prompt and answer (and wrong answer) per row, got {sizes}")
    answer_ids = single_token_ids(tok, answers, "answers")
    wrong_ids = None if wrong is None else single_token_ids(tok, wrong, "wrong answers")
    clean, corrupt, mask, pos = _batch(tok, prompts, corrupt_prompts, prepend_bos)
    answer = jnp.asarray(answer_ids)
    metric = AnswerProb(answer) if wrong_ids is None else LogitDiff(answer, jnp.asarray(wrong_ids))
    return Task(name, clean, corrupt, metric, answers=answer_ids, wrong=wrong_ids, attention_mask=mask, answer_pos=pos,
                prompts=prompts, corrupt_prompts=corrupt_prompts, notes=notes)  # fmt: skip


def task_from_prompts(tok, prompts: Sequence[str], corrupt_prompts: Sequence[str], answers: Sequence[str],
                      wrong: Sequence[str] | None = None, name: str = "custom", *,
                      prepend_bos: bool | None = None) -> Task:  # fmt: skip
    """A Task from your own strings, checked like the built-in ones.

    Each answer (and wrong answer) must be one token, leading space included (" Paris"); each
    clean prompt must tokenize to the same length as its corrupt prompt (the error names the
    pair). Rows of different lengths are right-padded, with `attention_mask` and `answer_pos`.
    Metric: `LogitDiff(answer, wrong)`, or `AnswerProb(answer)` without `wrong`.
    """
    return _text_task(tok, name, prompts, corrupt_prompts, answers, wrong, prepend_bos=prepend_bos)


# ---------------------------------------------------------------------------------------------
# IOI (Wang et al. 2022)

# Templates after Wang et al.'s, all 15 tokens long with SmolLM2 so no batch needs padding.
# {A} {B}: the two names, in either order; {S}: the second mention of the subject (S2).
IOI_TEMPLATES = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were commuting to the {PLACE}, {S} gave a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
)
NAMES = (
    "Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Lisa", "Michael", "Emma", "Daniel", "Laura", "Paul",
    "Kate", "Mark", "Alice", "Peter", "Jane", "Robert", "Susan", "Steven", "Linda", "Chris", "Amy", "Kevin", "Emily",
    "Brian", "Rachel", "Jason", "Helen", "George", "Grace", "Eric", "Lucy", "Frank", "Rose", "Adam", "Claire", "Ben",
    "Ruth", "Jack", "Sophie", "Ryan", "Nancy",
)  # fmt: skip
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "beach",
          "market", "library", "church", "museum", "airport")  # fmt: skip
OBJECTS = ("drink", "ring", "bone", "basketball", "computer", "necklace", "snack", "book", "ball", "letter", "gift",
           "cake", "flower", "hat", "watch", "bag", "pen", "card")  # fmt: skip


def ioi_task(tok, n: int = 16, seed: int = 0, *, corruption: str = "abc", prepend_bos: bool | None = None,
             templates: Sequence[int] | None = None) -> Task:  # fmt: skip
    """IOI: "Then, Mary and John went to the store. John gave a drink to" -> " Mary", metric `LogitDiff(IO, S)`.

    Each row draws a template, place, object and three distinct single-token names (IO, S, C),
    with IO first (ABBA) or second (BABA) at random. corruption="abc" (default) replaces S2 by
    the third name C, so both IO and S stay in context but nothing marks which one repeats:
    the model's IO-S preference should vanish (metric near 0). corruption="flip" makes S2 the
    IO name instead, so the other name becomes the right answer (metric negative). (Wang et
    al.'s own pABC replaces all three names; ours keeps IO and S so their logits stay comparable.)
    templates: indices into `IOI_TEMPLATES` to draw from (default all); one template keeps every
    position's role the same across rows (for `[layer, pos]` results).
    """
    if corruption not in ("abc", "flip"):
        raise ValueError(f"corruption must be 'abc' or 'flip', got {corruption!r}")
    pool = list(range(len(IOI_TEMPLATES))) if templates is None else [int(t) for t in templates]
    if not pool or min(pool) < 0 or max(pool) >= len(IOI_TEMPLATES):
        raise ValueError(f"templates {pool} out of range: there are {len(IOI_TEMPLATES)} IOI templates (0..{len(IOI_TEMPLATES) - 1})")
    names = _single_token_words(tok, NAMES)
    places, objects = _single_token_words(tok, PLACES), _single_token_words(tok, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise ValueError(f"this tokenizer keeps too few single-token words: {len(names)} names, {len(places)} places, "
                         f"{len(objects)} objects")
    rng = np.random.default_rng(seed)
    prompts, corrupt, io, s = [], [], [], []
    for _ in range(n):
        template = IOI_TEMPLATES[pool[rng.integers(len(pool))]]
        a, b, c = (names[i] for i in rng.choice(len(names), 3, replace=False))  # a: IO, b: S, c: the third name
        first, second = (a, b) if rng.integers(2) else (b, a)
        place, thing = places[rng.integers(len(places))], objects[rng.integers(len(objects))]
        fill = dict(A=first, B=second, PLACE=place, OBJECT=thing)
        prompts.append(template.format(S=b, **fill))
        corrupt.append(template.format(S=c if corruption == "abc" else a, **fill))
        io.append(" " + a)
        s.append(" " + b)
    how = "S2 replaced by a third name" if corruption == "abc" else "S2 set to the IO name"
    notes = f"IOI, {corruption} corruption ({how})"
    return _text_task(tok, "ioi", prompts, corrupt, io, s, prepend_bos=prepend_bos, notes=notes)


# ---------------------------------------------------------------------------------------------
# Induction


def ordinary_tokens(tok, token_range: tuple[int, int] = (1000, 10000)) -> np.ndarray:
    """Ids in `token_range` that are a space and a lowercase word of 3+ letters, and encode back to themselves.

    Frequent whole words: random sequences of them are plain text to the model, and any
    sequence of them re-tokenizes to itself.
    """
    lo, hi = max(0, token_range[0]), min(tok.vocab_size, token_range[1])
    texts = {i: tok.decode([i]) for i in range(lo, hi)}
    ids = [i for i, s in texts.items() if re.fullmatch(r" [a-z]{3,}", s) and tok.encode(s, prepend_bos=False) == [i]]
    return np.asarray(ids, np.int32)


def induction_task(tok, n: int = 16, seed: int = 0, length: int = 12, *, token_range: tuple[int, int] = (1000, 10000),
                   prepend_bos: bool | None = None) -> Task:  # fmt: skip
    """Induction: `r_1..r_L r_1..r_{L-1}` -> `r_L`; corrupt: the first occurrence resampled, `s_1..s_L r_1..r_{L-1}`.

    The 2L tokens of a row are distinct draws from `ordinary_tokens`, so only induction (copying
    what followed the previous occurrence of the current token) predicts `r_L`. Metric:
    `LogitDiff(r_L, s_L)`, the correct token against the corrupt prompt's token in its place.
    Every row is `2L - 1` tokens (plus BOS if prepended).
    """
    if length < 2:
        raise ValueError(f"length must be at least 2 (a token to repeat and one to predict), got {length}")
    pool = ordinary_tokens(tok, token_range)
    if len(pool) < 2 * length:
        raise ValueError(f"only {len(pool)} ordinary tokens in ids {token_range}; need {2 * length} distinct per row")
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(pool, 2 * length, replace=False) for _ in range(n)])
    r, s = draws[:, :length], draws[:, length:]
    bos = np.asarray([tok.encode("", prepend_bos)] * n, np.int32).reshape(n, -1)
    clean = np.concatenate([bos, r, r[:, :-1]], axis=1)
    corrupt = np.concatenate([bos, s, r[:, :-1]], axis=1)
    answers = single_token_ids(tok, [tok.decode([i]) for i in r[:, -1]])
    wrong = single_token_ids(tok, [tok.decode([i]) for i in s[:, -1]], "wrong answers")
    metric = LogitDiff(jnp.asarray(answers), jnp.asarray(wrong))
    return Task("induction", clean, corrupt, metric, answers=answers, wrong=wrong,  # fmt: skip
                prompts=[tok.decode(row) for row in clean], corrupt_prompts=[tok.decode(row) for row in corrupt],
                notes=f"induction over {length} random ordinary tokens; corrupt: the first occurrence resampled")


# ---------------------------------------------------------------------------------------------
# Greater-than (Hanna et al. 2023)

# Nouns from Hanna et al.'s list (single tokens for GPT-2 and SmolLM2).
YEAR_NOUNS = (
    "war", "reign", "siege", "journey", "expedition", "campaign", "dynasty", "treaty", "trial", "tour", "voyage",
    "marriage", "rivalry", "plague", "project", "study", "program", "invasion", "occupation", "conflict", "dispute",
    "alliance", "epidemic", "outbreak", "quest", "pilgrimage", "kingdom", "friendship", "partnership", "investigation",
    "construction", "negotiations", "cooperation", "captivity", "therapy", "contract", "agreement", "relationship",
)  # fmt: skip


def _check_year_split(tok, century: int, digits: np.ndarray) -> None:
    """Refuse tokenizers whose years do not split into the century's own tokens, then one token per digit."""
    prefix = tok.encode(f" {century}", prepend_bos=False)
    got = tok.encode(f" {century}32", prepend_bos=False)
    if got != prefix + [int(digits[3]), int(digits[2])]:
        raise ValueError(
            f"greater_than_task needs years that split into the century's tokens then one token per digit; this "
            f"tokenizer splits {f' {century}32'!r} into {[tok.decode([i]) for i in got]} (two-digit tokens would need "
            "Hanna et al.'s original next-token form)"
        )


def greater_than_task(tok, n: int = 16, seed: int = 0, *, prepend_bos: bool | None = None) -> Task:
    """Greater-than on digit tokens: "The war lasted from the year 1732 to the year 17" -> tens digit > 3.

    Adapted from Hanna et al., where GPT-2 predicts the two-digit token "YY" after "17": SmolLM2
    writes every digit as its own token, so the next token is the end year's tens digit. A tens
    digit above the start year's (d > 3 for 1732) makes a later year, one below an earlier year;
    the equal digit (173x) could be either and counts for neither side. Metric
    `ProbMassDiff`: p(d > Y1) - p(d < Y1), per-row masks over the ten digit tokens. Start years
    have tens digit 1..8, so both sides are non-empty; centuries 11..17 as in the paper.
    Corrupt: the start year is "C01" ("from the year 1701"), the earliest one, read with the
    clean row's masks. `answers` holds the ten digit tokens `[B, 10]` the metric reads.
    """
    nouns = _single_token_words(tok, YEAR_NOUNS)
    if not nouns:
        raise ValueError("no noun of YEAR_NOUNS is a single token for this tokenizer")
    rng = np.random.default_rng(seed)
    centuries = rng.integers(11, 18, n)
    years = rng.integers(10, 90, n)
    digits = single_token_ids(tok, [str(d) for d in range(10)], "digits")
    for c in np.unique(centuries):
        _check_year_split(tok, int(c), digits)
    template = "The {noun} lasted from the year {c}{yy} to the year {c}"
    picks = [nouns[i] for i in rng.integers(len(nouns), size=n)]
    prompts = [template.format(noun=w, c=c, yy=f"{y:02d}") for w, c, y in zip(picks, centuries, years)]
    corrupt = [template.format(noun=w, c=c, yy="01") for w, c in zip(picks, centuries)]
    clean_t, corrupt_t, mask, pos = _batch(tok, prompts, corrupt, prepend_bos)
    tens = years // 10
    up = np.zeros((n, tok.vocab_size), bool)
    down = np.zeros((n, tok.vocab_size), bool)
    for i, t in enumerate(tens):
        up[i, digits[t + 1 :]] = True
        down[i, digits[:t]] = True
    metric = ProbMassDiff(jnp.asarray(up), jnp.asarray(down))
    return Task("greater-than", clean_t, corrupt_t, metric, answers=np.tile(digits, (n, 1)), attention_mask=mask,
                answer_pos=pos, prompts=prompts, corrupt_prompts=corrupt,
                notes="greater-than on the tens digit: p(d > Y1) - p(d < Y1); corrupt start year C01")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Factual recall

# Facts SmolLM2-135M(-Instruct, Q4_1) gets right: the answer is its top-1 next token, and one
# token. Checked with the model; those it got wrong or that split are listed in the docstring below.
FACTS = {
    "The capital of {} is": (
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Russia", "Moscow"), ("England", "London"), ("China", "Beijing"), ("Greece", "Athens"), ("Austria", "Vienna"),
        ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
        ("Canada", "Ottawa"),
        ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
        ("Syria", "Damascus"), ("Scotland", "Edinburgh"), ("Chile", "Santiago"), ("the Philippines", "Manila"),
        ("South Korea", "Seoul"),
    ),
    "{} is in the city of": (
        ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("The Brandenburg Gate", "Berlin"),
        ("The Kremlin", "Moscow"), ("The Acropolis", "Athens"), ("The Sagrada Familia", "Barcelona"),
        ("The Louvre", "Paris"), ("The Sydney Opera House", "Sydney"), ("Tower Bridge", "London"),
        ("The Trevi Fountain", "Rome"), ("The Parthenon", "Athens"), ("The Vatican", "Rome"),
        ("The Prado Museum", "Madrid"), ("The Hagia Sophia", "Istanbul"), ("The Rialto Bridge", "Venice"),
        ("Westminster Abbey", "London"), ("The Arc de Triomphe", "Paris"), ("The Pantheon", "Rome"),
        ("The British Museum", "London"), ("The Uffizi Gallery", "Florence"), ("The Sistine Chapel", "Rome"),
    ),
    "The official language of {} is": (
        ("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"), ("Russia", "Russian"),
        ("Poland", "Polish"), ("Turkey", "Turkish"), ("Egypt", "Arabic"), ("Mexico", "Spanish"), ("Israel", "Hebrew"),
        ("Australia", "English"), ("Argentina", "Spanish"), ("Austria", "German"), ("Vietnam", "Vietnamese"),
        ("Thailand", "Thai"), ("Morocco", "Arabic"), ("Syria", "Arabic"), ("Jordan", "Arabic"), ("Canada", "English"),
        ("Romania", "Romanian"), ("the Netherlands", "Dutch"), ("Saudi Arabia", "Arabic"), ("New Zealand", "English"),
    ),
    "{} is a country in the continent of": (
        ("France", "Europe"), ("Germany", "Europe"), ("Kenya", "Africa"), ("Ghana", "Africa"), ("Poland", "Europe"),
        ("Nigeria", "Africa"), ("Ethiopia", "Africa"), ("Sudan", "Africa"), ("Greece", "Europe"), ("Sweden", "Europe"),
        ("Norway", "Europe"), ("Portugal", "Europe"), ("Uganda", "Africa"), ("Austria", "Europe"),
        ("Tanzania", "Africa"), ("Zambia", "Africa"), ("Belgium", "Europe"), ("Denmark", "Europe"),
        ("Ireland", "Europe"), ("Cameroon", "Africa"), ("Mali", "Africa"), ("Libya", "Africa"), ("Angola", "Africa"),
        ("Romania", "Europe"), ("Bangladesh", "Asia"),
    ),
}  # fmt: skip


def _fact_pairs(tok, prepend_bos) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Every usable fact `(prompt, answer, partners)`: partners are same-template facts of equal token
    length and a different answer, as `(prompt, answer)`; facts whose answer splits are left out."""
    out = []
    for template, facts in FACTS.items():
        kept = [(template.format(s), a) for s, a in facts if len(tok.encode(" " + a, prepend_bos=False)) == 1]
        lengths = {p: len(tok.encode(p, prepend_bos)) for p, _ in kept}
        for p, a in kept:
            partners = [(q, b) for q, b in kept if b != a and lengths[q] == lengths[p]]
            if partners:
                out.append((p, a, partners))
    return out


def factual_recall_task(tok, n: int = 16, seed: int = 0, *, prepend_bos: bool | None = None) -> Task:
    """Factual recall: "The capital of France is" -> " Paris"; corrupt: "The capital of Spain is" (" Madrid").

    Rows are n distinct facts drawn from `FACTS` (four templates: capitals, landmarks' cities,
    official languages, continents); each corrupt prompt is another subject of the same template
    with the same token length and a different answer. Metric `LogitDiff(answer, corrupt answer)`.
    Rows of different templates differ in length: right-padded, with `attention_mask`/`answer_pos`.

    Left out of `FACTS` because SmolLM2-135M did not rank the answer first: capitals of Egypt,
    Poland, Peru, Finland, Australia (Sydney), Belgium, Iran, Iraq; Big Ben, the Space Needle,
    the Forbidden City, Red Square, Buckingham Palace, the Alhambra, the Blue Mosque, Notre Dame,
    Checkpoint Charlie, the Atomium, the Little Mermaid, the Spanish Steps, Trafalgar Square, the
    Charles Bridge; the languages of Japan, China, Brazil, Portugal, Greece, Sweden, South Korea,
    Iran, Finland, Ukraine, Norway, Denmark, Hungary, Indonesia, Ireland, Czechia; the continents
    of Japan, China, India, Vietnam, Thailand, Pakistan, Malaysia, Cambodia, Korea, Mongolia,
    Nepal (Asia), Egypt, Morocco, Senegal, Somalia (Africa), Ukraine, Australia, Canada, Mexico,
    Chile, Peru, Brazil; every "played the sport of" and most "currency of" facts. Left out because
    the answer is several tokens: Bangkok, Jakarta, Ankara, Beirut, Bogota, Caracas, Agra, Pisa,
    Granada, yen, rupee, ruble, yuan, peso, baht, zloty, and answers that are a first piece only
    (" San" Francisco, " New" York, " South" America, " Saint" Petersburg).
    """
    facts = _fact_pairs(tok, prepend_bos)
    if n > len(facts):
        raise ValueError(f"factual_recall_task has {len(facts)} facts with a same-length partner for this tokenizer; "
                         f"asked for n={n}")
    rng = np.random.default_rng(seed)
    rows = [facts[i] for i in rng.choice(len(facts), n, replace=False)]
    corrupt = [partners[rng.integers(len(partners))] for _, _, partners in rows]
    return _text_task(tok, "factual-recall", [p for p, _, _ in rows], [q for q, _ in corrupt],
                      [" " + a for _, a, _ in rows], [" " + b for _, b in corrupt], prepend_bos=prepend_bos,
                      notes="factual recall; corrupt: another subject of the same template and length")  # fmt: skip


# ---------------------------------------------------------------------------------------------

TASKS = {
    "ioi": ioi_task,
    "induction": induction_task,
    "greater-than": greater_than_task,
    "factual-recall": factual_recall_task,
}


def task(name: str, tok, **kw) -> Task:
    """The task generator `TASKS[name]` called with `tok` and `kw` (`n`, `seed`, ...); "greater_than" works too."""
    key = name.strip().lower().replace("_", "-")
    if key not in TASKS:
        near = difflib.get_close_matches(key, list(TASKS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key](tok, **kw)


KNOWN_TASKS = ("trained-induction", "constructed-induction", "marker-lookup", "modular-sum")


def load_task(name: str, model: str = "smollm2", *, n: int = 16, seed: int = 0, dtype=None):
    """`(model, task)` by name: a text task (`TASKS`) on a loaded model (`load(model, dtype=dtype)`), or one of
    the `KNOWN_TASKS`, small models whose circuit is known and which bring their own weights (trained or
    built on the spot; `model` is then ignored, and the weights are cast to `dtype` if one is given)."""
    key = name.strip().lower().replace("_", "-")
    if key in KNOWN_TASKS:
        if key == "trained-induction":
            m, info = known.induction_model(seed)
            t = known.induction_task(m, info, batch=n, seed=seed)
        else:
            build = {"constructed-induction": known.constructed_induction, "marker-lookup": known.marker_lookup,
                     "modular-sum": known.modular_sum}[key]  # fmt: skip
            m, t = build(batch=n, seed=seed)
        return (m if dtype is None else cast(m, dtype)), t
    if key not in TASKS:
        valid = list(TASKS) + list(KNOWN_TASKS)
        near = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(valid)}")
    from ..models import load

    m, tok = load(model, dtype=dtype)
    if tok is None:
        raise ValueError(f"model {model!r} has no tokenizer, so text tasks cannot be built for it")
    return m, task(key, tok, n=n, seed=seed)
