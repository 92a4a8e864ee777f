"""The evaluation groups: what each scores and which continuation counts as right.

:data:`GROUPS` holds the paper's groups (ES, PS, NS, RS, DNS, ...; ROME's CounterFact protocol)
and the distract suite (:data:`SUITE_GROUPS`): the neighbourhood and relation prompts behind
other contexts than the paper's edit sentence, built from the record's own fields only (no
other record, no new data), scored only when asked for (:data:`BASE_GROUPS` is the default).
:func:`record_pairs` gives every group's prompt pairs of one record.
"""

from dataclasses import dataclass

from attention_drift.core.data import Record, distract_prompt


@dataclass(frozen=True)
class Group:
    """One evaluation group: what is scored, and which continuation counts as right.

    Args:
        name: key used in results and JSON (``"efficacy"``, ``"distract_neighborhood"``...).
        abbrev: the paper's abbreviation (ES, PS, NS, RS, DNS) or the suite's (DNS-R, DNS-M, DNS-D,
            DNS-2, RS-M), "" where there is none.
        description: exactly how the group is computed.
    """

    name: str
    abbrev: str
    description: str


_RULE = (
    "Each prompt is scored as f'{prompt} {target}' by the geometric-mean probability of the "
    "target tokens; correct when P(right) > P(wrong) (strict). Pairs with right == wrong are skipped."
)
EFFICACY = Group("efficacy", "ES", (
    "Efficacy score (paper/ROME CounterFact protocol): the record's rewrite prompts, right = the "
    f"edit's target_new, wrong = its target_true. {_RULE}"))
PARAPHRASE = Group("paraphrase", "PS", (
    "Paraphrase score (generalisation): the p-paraphrase prompts, right = target_new, wrong = "
    f"target_true. {_RULE}"))
REASONING = Group("reasoning", "", (
    "Reasoning score (multi-hop generalisation, WikiData-type records): the p-reasoning prompts, "
    f"right = each prompt's own target, wrong = the edit's target_true. {_RULE}"))
SUBJECT_ALIAS = Group("subject_alias", "", (
    "Subject-alias score (generalisation): the p-subject_alias prompts (the rewrite with an alias "
    f"of the subject), right = target_new, wrong = target_true. {_RULE}"))
NEIGHBORHOOD = Group("neighborhood", "NS", (
    "Neighbourhood score (specificity): the l-neighbor prompts about other subjects, right = each "
    f"prompt's own (true) answer, wrong = the edit's target_new. {_RULE}"))
DISTRACT_NEIGHBORHOOD = Group("distract_neighborhood", "DNS", (
    "Distract neighbourhood score (the paper's specificity under distraction): the neighbourhood "
    "pairs with the edit sentence in front, prompt = f'{rewrite prompt} {target_new}. {prompt}' "
    f"(data.distract_prompt); right = own answer, wrong = target_new. {_RULE}"))
RELATION = Group("relation", "RS", (
    "Relation score (specificity on other facts about the edited subject, WikiData-type "
    f"records): the l-relation prompts, right = each prompt's own answer, wrong = target_new. {_RULE}"))
DISTRACT_RELATION = Group("distract_relation", "", (
    "Distract relation score: the relation pairs with the edit sentence in front "
    f"(data.distract_prompt); right = own answer, wrong = target_new. {_RULE}"))
COMMONSENSE = Group("commonsense", "", (
    "Commonsense score (o-commonsense): the record's commonsense prompt, right / wrong as given "
    f"in the data (not related to the edit's targets). {_RULE}"))
DISTRACT_COMMONSENSE = Group("distract_commonsense", "", (
    "Distract commonsense score: the commonsense prompt with the edit sentence in front "
    f"(data.distract_prompt); right / wrong as given. {_RULE}"))

MENTION = "I read an article about {subject}."
"""The suite's mention sentence: names the edited subject, states nothing about it."""
FILLER = "It was a quiet day. Nothing much happened in the morning. Later, everyone went back to work."
"""The suite's three neutral sentences, naming no entity, that put the edit sentence several sentences back."""
_OWN = f"right = own answer, wrong = target_new. {_RULE}"
RESTATED_NEIGHBORHOOD = Group("restated_neighborhood", "DNS-R", (
    "Restated distract neighbourhood score (suite): the neighbourhood pairs with the edit restated in "
    "front through the record's own paraphrase prompts, prompt = f'{paraphrase} {target_new}. {prompt}' "
    "(neighbour prompt i takes paraphrase i mod the number of paraphrases; none for a record without "
    f"paraphrase prompts); {_OWN}"))
MENTION_NEIGHBORHOOD = Group("mention_neighborhood", "DNS-M", (
    "Mention neighbourhood score (suite): the neighbourhood pairs after a sentence that names the edited "
    f"subject without the new target, prompt = f'{MENTION} {{prompt}}' (groups.MENTION); {_OWN}"))
DISTANT_NEIGHBORHOOD = Group("distant_neighborhood", "DNS-D", (
    "Distant distract neighbourhood score (suite): the edit sentence, then three neutral sentences that name "
    f"no entity (groups.FILLER), then the neighbour prompt: prompt = f'{{rewrite prompt}} {{target_new}}. "
    f"{FILLER} {{prompt}}'; {_OWN}"))
DOUBLE_NEIGHBORHOOD = Group("double_neighborhood", "DNS-2", (
    "Double distract neighbourhood score (suite): two edited-style facts in front, the edit sentence and the "
    "edit restated through a paraphrase prompt, prompt = f'{rewrite prompt} {target_new}. {paraphrase} "
    "{target_new}. {prompt}' (paraphrase i mod their number for neighbour prompt i, as DNS-R; none for a "
    f"record without paraphrase prompts); {_OWN}"))
MENTION_RELATION = Group("mention_relation", "RS-M", (
    "Mention relation score (suite): the relation pairs after the mention sentence, prompt = "
    f"f'{MENTION} {{prompt}}' (groups.MENTION); {_OWN}"))
SUITE = (RESTATED_NEIGHBORHOOD, MENTION_NEIGHBORHOOD, DISTANT_NEIGHBORHOOD, DOUBLE_NEIGHBORHOOD, MENTION_RELATION)

GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        EFFICACY, PARAPHRASE, REASONING, SUBJECT_ALIAS, NEIGHBORHOOD, DISTRACT_NEIGHBORHOOD,
        RELATION, DISTRACT_RELATION, COMMONSENSE, DISTRACT_COMMONSENSE, *SUITE,
    )
}
SUITE_GROUPS = tuple(g.name for g in SUITE)
"""The distract suite: specificity in other contexts built from the record's own fields (opt-in:
they add about as many prompts as the distract groups)."""
BASE_GROUPS = tuple(name for name in GROUPS if name not in SUITE_GROUPS)
"""What an evaluation scores unless told otherwise: every group but the suite."""
AVG_S_GROUPS = ("efficacy", "paraphrase", "neighborhood", "relation", "distract_neighborhood")
"""The groups whose accuracies Avg.S combines (harmonic mean), as in the paper's Table 3."""


@dataclass(frozen=True)
class Pair:
    """One scored prompt: its text and the right / wrong continuations."""

    prompt: str
    right: str
    wrong: str


def record_pairs(record: Record) -> tuple[dict[str, list[Pair]], dict[str, int]]:
    """The prompt pairs of every group of ``record`` (see each :class:`Group`'s description),
    and how many pairs per group were skipped because right == wrong after stripping."""
    rw = record.rewrite
    raw: dict[str, list[Pair]] = {name: [] for name in GROUPS}
    for prompt in record.efficacy.prompts:
        raw["efficacy"].append(Pair(prompt, rw.target_new, rw.target_true))
    for name, group in (("paraphrase", record.paraphrase), ("subject_alias", record.subject_alias)):
        raw[name] += [Pair(p, rw.target_new, rw.target_true) for p in group.prompts]
    raw["reasoning"] += [Pair(p, t, rw.target_true) for p, t in zip(record.reasoning.prompts, record.reasoning.targets)]
    for name, group in (("neighborhood", record.neighborhood), ("relation", record.relation)):
        pairs = [Pair(p, t, rw.target_new) for p, t in zip(group.prompts, group.targets)]
        raw[name] += pairs
        raw[f"distract_{name}"] += [Pair(distract_prompt(rw, p.prompt), p.right, p.wrong) for p in pairs]
    if record.commonsense is not None:
        cs = record.commonsense
        raw["commonsense"].append(Pair(cs.prompt, cs.right, cs.wrong))
        raw["distract_commonsense"].append(Pair(distract_prompt(rw, cs.prompt), cs.right, cs.wrong))
    raw |= _suite_pairs(record, raw["neighborhood"], raw["relation"])
    pairs = {name: [p for p in ps if p.right.strip() != p.wrong.strip()] for name, ps in raw.items()}
    skipped = {name: len(raw[name]) - len(pairs[name]) for name in raw}
    return pairs, skipped


def _suite_pairs(record: Record, neighbours: list[Pair], relations: list[Pair]) -> dict[str, list[Pair]]:
    """The suite's pairs: the neighbourhood / relation pairs (right == wrong ones not yet skipped)
    behind the contexts of :data:`SUITE`, every string taken from ``record`` itself."""
    rw = record.rewrite
    restated = [f"{p} {rw.target_new}." for p in record.paraphrase.prompts]
    mention = MENTION.format(subject=rw.subject)

    def after(context, pairs: list[Pair]) -> list[Pair]:
        return [Pair(f"{context(i)} {p.prompt}", p.right, p.wrong) for i, p in enumerate(pairs)]

    def restate(i: int) -> str:
        return restated[i % len(restated)]

    return {
        "restated_neighborhood": after(restate, neighbours) if restated else [],
        "mention_neighborhood": after(lambda i: mention, neighbours),
        "distant_neighborhood": after(lambda i: f"{rw.edit_sentence} {FILLER}", neighbours),
        "double_neighborhood": after(lambda i: f"{rw.edit_sentence} {restate(i)}", neighbours) if restated else [],
        "mention_relation": after(lambda i: mention, relations),
    }
