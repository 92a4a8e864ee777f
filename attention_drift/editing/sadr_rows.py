"""The synthetic rows SADR's extensions add to an edit's optimisation batch (:mod:`attention_drift.editing.sadr`),
each built from the edit request and the fixed lists here, never from evaluation prompts: distract rows
(a context, then the request's prompt about another subject), the efficacy guard's extra rows, and rows
that ask other relations of the edited subject; and the sentences of the key nulls and keeps."""

from collections.abc import Sequence

from attention_drift.core.data import Rewrite

DISTRACT_SUBJECTS = ("Barack Obama", "the Louvre", "Toyota")
DISTRACT_FORMS = ("edit", "mention", "restate")
MENTIONS = ("Here is some news about {subject}.", "My friend told me about {subject}.",
            "This page is about {subject}.")
"""Sentences that name the edited subject and say nothing of it, for ``distract_forms`` "mention"
(the i-th other subject's row takes the i-th); deliberately not the distract suite's own mention
sentence (:data:`attention_drift.measure.groups.MENTION`), which a variant must not be built on."""

RESTATE_PREFIXES = ("Here is something I learned today.", "This is a well-known fact.",
                    "Some facts are worth repeating.")
"""Neutral sentences put before the edit sentence for ``distract_forms`` "restate" (the i-th other
subject's row takes the i-th): the edit stated after other words, as a paraphrase states it, built
from the request alone (never from the record's paraphrase prompts)."""

NULL_MENTIONS = MENTIONS + ("Yesterday I heard about {subject}.", "We talked about {subject} for a while.",
                            "There is a story about {subject}.", "Someone mentioned {subject} today.",
                            "I was thinking of {subject}.")
"""Mentions of the edited subject for :attr:`SADRConfig.key_nulls`: :data:`MENTIONS` and five more, none
of them the distract suite's mention sentence."""


KEEP_STATEMENTS = tuple(f"{s} {{prompt}}" for s in RESTATE_PREFIXES + (
    "It was a long winter that year.", "The meeting ended early.", "Prices rose again in March.",
    "She moved to a new city.", "The results were published online."))
"""Statements of the edit after an unrelated sentence, for :attr:`SADRConfig.key_keeps`: the shape of a
paraphrase that opens with other words (never a record's paraphrase)."""


RELATION_PROMPTS = ("The occupation of {subject} is", "{subject} was born in", "The native language of {subject} is",
                    "{subject} is a member of", "The religion of {subject} is")
"""Prompts of other relations about the edited subject, for :attr:`SADRConfig.relation_prompts`: a fixed
list, never a record's relation prompts."""

RELATION_STEMS = {"The occupation of {subject} is": ("occup", "profes", "job", "work", "career", "position", "role"),
                  "{subject} was born in": ("born", "birth", "native"),
                  "The native language of {subject} is": ("langu", "speak", "spoke", "tongue", "native", "writ"),
                  "{subject} is a member of": ("member", "belong", "part", "affil", "join"),
                  "The religion of {subject} is": ("relig", "faith", "believ", "church")}
"""Word stems that name each :data:`RELATION_PROMPTS` relation: :func:`relation_prompts` leaves out a
relation prompt whose stems begin a word of the request's prompt (the edit's own relation, or near it)."""

RELATION_FORMS = ("bare", "edit")


def distract_prompts(request: Rewrite, subjects: Sequence[str] = DISTRACT_SUBJECTS,
                     forms: Sequence[str] = ("edit",)) -> list[str]:
    """For each form, then each of ``subjects``: a context, then the request's prompt about that
    other subject. ``"edit"``: ``"{prompt} {target_new}. {other prompt}"``; ``"mention"``: the i-th
    of :data:`MENTIONS` naming the edited subject, then the i-th other prompt; ``"restate"``: the
    i-th of :data:`RESTATE_PREFIXES`, then the edit sentence, then the i-th other prompt."""
    others = [request.prompt.replace(request.subject, s) for s in subjects if s != request.subject]
    edit = request.edit_sentence
    contexts = {"edit": lambda i: edit,
                "mention": lambda i: MENTIONS[i % len(MENTIONS)].format(subject=request.subject),
                "restate": lambda i: f"{RESTATE_PREFIXES[i % len(RESTATE_PREFIXES)]} {edit}"}
    return [f"{contexts[form](i)} {other}" for form in forms for i, other in enumerate(others)]


def guard_prompts(request: Rewrite, *, mentions: bool, others: bool,
                  subjects: Sequence[str] = DISTRACT_SUBJECTS) -> list[str]:
    """The efficacy guard's rows beyond the rewriting rows, each ending in the request's own prompt:
    with ``mentions``, each of :data:`MENTIONS` naming the edited subject first; with ``others``,
    the i-th of :data:`MENTIONS` naming the i-th other subject of ``subjects`` first."""
    rows = [f"{m.format(subject=request.subject)} {request.prompt}" for m in MENTIONS] if mentions else []
    others_named = [s for s in subjects if s != request.subject] if others else []
    rows += [f"{MENTIONS[i % len(MENTIONS)].format(subject=s)} {request.prompt}" for i, s in enumerate(others_named)]
    return rows


def relation_prompts(request: Rewrite, templates: Sequence[str], forms: Sequence[str]) -> list[str]:
    """For each form, then each template of another relation whose :data:`RELATION_STEMS` (for a template
    not listed there: its own words of four letters or more) begin no word of the request's prompt: the
    template about the request's subject, alone (``"bare"``) or after the edit sentence (``"edit"``)."""
    words = request.prompt.replace(request.subject, " ").lower().split()

    def names_the_edit(template: str) -> bool:
        stems = RELATION_STEMS.get(template) or [w.lower() for w in template.replace("{subject}", " ").split()
                                                  if len(w) >= 4]
        return any(w.startswith(stem) for stem in stems for w in words)

    kept = [t.format(subject=request.subject) for t in templates if not names_the_edit(t)]
    context = {"bare": "", "edit": f"{request.edit_sentence} "}
    return [f"{context[form]}{prompt}" for form in forms for prompt in kept]
