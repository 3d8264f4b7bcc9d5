"""The instruction data align.py learns from: task families whose answers a program checks,
the chat template, and the programmatic "gold" labeler that stands in for InstructGPT's
human labelers (Ouyang et al. 2022, arXiv:2203.02155, section 3.4).

    task = make_task("reverse", random.Random(0))   # {"family", "prompt", "answer"}
    render(task["prompt"], task["answer"])          # 'ⓊReverse the word cat.␃Ⓐtac␃'
    gold_score(task, "tac␃")                        # 1.0

FLAN (Wei et al. 2021, arXiv:2109.01652, section 2.2) phrases each task by several templates
and holds whole task clusters out of instruction tuning; so do we (`split_families`).
"""

import keyword

# The chat template, one string per turn. The three markers are single characters of the
# character-level vocabulary, so each is exactly one token; EOT ends every turn:
#     Ⓤ{instruction}␃Ⓐ{response}␃
USER, BOT, EOT = "\u24ca", "\u24b6", "\u2403"  # Ⓤ Ⓐ ␃: user turn, assistant turn, end of turn

WORDS = ("cat dog sun tree book fish bird milk rain star lamp road door king wolf frog cake ship moon "
         "leaf salt rock wind fire gold corn bell rope nest seed").split()
NOT_KEYWORDS = ("print len list dict open range self main data file name type").split()


def _word(r, answer):
    w = r.choice(WORDS)
    return {"w": w}, answer(w)


def _digits(r, answer):
    d = r.sample(range(10), r.randint(3, 4))
    return {"d": " ".join(map(str, d))}, answer(d)


# Each family: three phrasings (FLAN uses ten per task) and a function drawing one
# instance -> (the fields the phrasings use, the answer).
FAMILIES = {
    "reverse": (["Reverse the word {w}.", "Write {w} backwards.", "Spell {w} in reverse."],
                lambda r: _word(r, lambda w: w[::-1])),
    "upper": (["Write {w} in capital letters.", "Uppercase: {w}", "Make {w} upper case."],
              lambda r: _word(r, str.upper)),
    "first": (["What is the first letter of {w}?", "First letter of {w}:", "Which letter does {w} start with?"],
              lambda r: _word(r, lambda w: w[0])),
    "last": (["What is the last letter of {w}?", "Last letter of {w}:", "Which letter does {w} end with?"],
             lambda r: _word(r, lambda w: w[-1])),
    "length": (["How many letters are in {w}?", "Count the letters of {w}.", "Length of {w}:"],
               lambda r: _word(r, lambda w: str(len(w)))),
    "repeat": (["Repeat {w} twice.", "Say {w} two times.", "Write {w} and then {w} again."],
               lambda r: _word(r, lambda w: f"{w} {w}")),
    "add": (["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."],
            lambda r: (lambda a, b: ({"a": a, "b": b}, str(a + b)))(r.randint(0, 9), r.randint(0, 9))),
    "sort": (["Sort the digits {d}.", "Put {d} in increasing order.", "Order from small to large: {d}"],
             lambda r: _digits(r, lambda d: " ".join(map(str, sorted(d))))),
    "max": (["Which is largest: {d}?", "Give the largest of {d}.", "Maximum of {d}:"],
            lambda r: _digits(r, lambda d: str(max(d)))),
    "min": (["Which is smallest: {d}?", "Give the smallest of {d}.", "Minimum of {d}:"],
            lambda r: _digits(r, lambda d: str(min(d)))),
    # a lookup in Python's own documentation: its list of reserved words (keyword.kwlist)
    "keyword": (["Is {w} a Python keyword?", "Python keyword, yes or no: {w}", "Is {w} reserved in Python?"],
                lambda r: (lambda w: ({"w": w}, "yes" if keyword.iskeyword(w) else "no"))(
                    r.choice(keyword.kwlist) if r.random() < 0.5 else r.choice(NOT_KEYWORDS))),
}


def make_task(family, r):
    """One instance: {"family", "prompt", "answer"}, phrased by a randomly chosen template."""
    phrasings, draw = FAMILIES[family]
    values, answer = draw(r)
    return {"family": family, "prompt": r.choice(phrasings).format(**values), "answer": answer}


def split_families(heldout, trained=""):
    """(trained, held out): FLAN holds whole task clusters out of instruction tuning.
    trained: the families to train on (comma-separated; empty: every family not held out)."""
    held = [f for f in heldout.split(",") if f]
    chosen = [f for f in trained.split(",") if f]
    unknown = [f for f in held + chosen if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown} in --heldout or --families; known: {', '.join(FAMILIES)}")
    if set(held) & set(chosen):
        raise ValueError(f"families {sorted(set(held) & set(chosen))} are both trained (--families) and held out "
                         f"(--heldout); a family is one or the other")
    trained_list = [f for f in FAMILIES if (f in chosen if chosen else f not in held)]
    if not trained_list:
        raise ValueError("no task family is left to train on: hold fewer out with --heldout")
    return trained_list, held


def render(prompt, response=None):
    """The chat template: Ⓤ{prompt}␃Ⓐ, then {response}␃ when there is one."""
    return f"{USER}{prompt}{EOT}{BOT}" + ("" if response is None else f"{response}{EOT}")


# ----------------------------------------------------------------------------- the gold labeler
def gold_score(task, response):
    """The programmatic "gold" labeler (stands in for InstructGPT's human labelers).

    response is the decoded text of a sample, EOT included if the model ended its turn.
      1.0                    the right answer, then EOT (the task's checker)
      0.5 * (1 - d / n)      a wrong answer that ended its turn: partial credit by the edit
                             distance d to the right answer (n = the longer length)
      0.0                    a response that never ended its turn
    A preference is chosen = the higher gold score; equal scores are a tie and give no pair.
    """
    if not response.endswith(EOT):
        return 0.0
    text = response[:-1]
    if text == task["answer"]:
        return 1.0
    return 0.5 * (1 - edit_distance(text, task["answer"]) / max(len(text), len(task["answer"]), 1))


def correct(task, response):
    return response == task["answer"] + EOT


def edit_distance(a, b):
    """Levenshtein distance by the textbook dynamic program."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]
