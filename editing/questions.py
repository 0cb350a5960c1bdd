"""Natural chat questions from relation templates: "{} is located in" -> "Where is {}?".

Rule-based on the relation's wording, not on any record: each rule is a regular expression over
the template's words (the subject written ``{}``), tried in order, most specific first. A template
that is already a question (zsRE's ``src``, "What is the twin city of {}? It is") keeps its question.
Templates of the form "The <thing> of {} is" and "{}'s <thing> is" become "What is the <thing> of {}?";
anything else falls back to "Complete this sentence: <prompt>".
"""
from __future__ import annotations

import re

SLOT = "{}"
# (pattern over the lower-cased template, question with {} for the subject); first match wins.
RULES: tuple[tuple[str, str], ...] = (
    (r"twin city", "What is the twin city of {}?"),
    (r"capital", "What is the capital of {}?"),
    (r"religion|follower of", "What religion does {} follow?"),
    (r"record label|music label|record company|label\b|represented by|recorded for|released by", "Which record label is {} signed to?"),
    (r"genre", "What genre of music does {} play?"),
    (r"continent", "Which continent is {} on?"),
    (r"in the country of|created in the country", "Which country is {} in?"),
    (r"citizen", "Which country is {} a citizen of?"),
    (r"^in {}, |law in {}|language spoken|official language", "What language is spoken in {}?"),
    (r"mother tongue|native language|native speaker|language used by", "What language does {} speak?"),
    (r"\bwritten in|language of {} (?:is|was)|original language", "What language is {} in?"),
    (r"\bspeak|spoke|speaker of|writes in|language", "What language does {} speak?"),
    (r"position|plays as|plays in the", "What position does {} play?"),
    (r"\bsport\b|is a professional", "What sport does {} play?"),
    (r"instrument|performs on|performing on|playing the|plays the$", "What instrument does {} play?"),
    (r"named (?:after|for)|called after", "Who is {} named after?"),
    (r"headquarter|based in", "Where is {} headquartered?"),
    (r"\bowner|owned by", "Who owns {}?"),
    (r"employed by|works for", "Who does {} work for?"),
    (r"worked in|work in|employment in|employed in", "Which city did {} work in?"),
    (r"profession|occupation|works as", "What is {}'s job?"),
    (r"domain|expertise|area of|field of|specializes", "What field does {} work in?"),
    (r"title of", "What title does {} hold?"),
    (r"debut|premier|aired on|released on", "Which network did {} first air on?"),
    (r"born in", "Where was {} born?"),
    (r"died|passed away|expired|lost their life|life ended|succumbed", "Where did {} die?"),
    (r"developed by", "Who developed {}?"),
    (r"produced by|manufactured by|product of|created by|product (?:created|developed)", "Which company makes {}?"),
    (r"founded|formed in|started in", "Where was {} founded?"),
    (r"created in|developed in|formulated in|originated in|that was from", "Where was {} created?"),
    (r"originat|native|\bfrom$", "Where is {} from?"),
    (r"member of|organization|affiliated with|part of the$", "Which organization is {} part of?"),
    (r"located|location|\bis in$|can be found|\bwithin$|, in$|, of$", "Where is {}?"),
    (r"performs|performing", "What kind of music does {} perform?"),
    (r"\bplays?$|\bplays\b", "What does {} play?"),
)
_OF_FORM = re.compile(r"^(?:the )?(?P<thing>[\w' -]+?) of {} (?:is|was|are|were)$")
_POSSESSIVE = re.compile(r"^{}'s (?P<thing>[\w' -]+?)(?: is| are| was)?(?: an?)?[,:]?$")


def _clean(template: str) -> str:
    if template.count(SLOT) != 1:
        raise ValueError(f"a relation template needs exactly one {SLOT} for the subject, got {template!r}")
    return " ".join(template.strip().split())


def question_template(template: str) -> str:
    """The question for a relation template, with ``{}`` for the subject."""
    text = _clean(template)
    if "?" in text and text.index("?") > text.index(SLOT):
        return text[: text.index("?") + 1]  # already a question (zsRE, "What is the twin city of {}? It is")
    low = text.lower().rstrip(" :,.")
    for pattern, question in RULES:
        if re.search(pattern.replace("{}", re.escape(SLOT)), low):
            return question
    for form in (_OF_FORM, _POSSESSIVE):
        match = form.match(low.replace(SLOT, "{}"))
        if match:
            return f"What is the {match.group('thing').strip()} of {{}}?"
    return "Complete this sentence: " + text.rstrip() + " ..."


def question_for(template: str, subject: str) -> str:
    """The natural question about ``subject`` for this relation, e.g. ("{} is located in", "Rome") -> "Where is Rome?"."""
    if not subject.strip():
        raise ValueError("the subject is empty")
    question = question_template(template)
    return question.replace(SLOT, mid_sentence(subject.strip()) if not question.startswith(SLOT) else subject.strip())


def mid_sentence(subject: str) -> str:
    """``subject`` as written inside a sentence: a leading article in lower case ("The Louvre" -> "the Louvre").

    Only "The", "A" and "An" followed by a capitalised word change; the rest of the name is kept as given.
    """
    head, _, rest = subject.partition(" ")
    if head in ("The", "A", "An") and rest[:1].isupper():
        return f"{head.lower()} {rest}"
    return subject


# Leading structures that name the subject in a prompt whose subject is not given (neighbour prompts).
_PREFIXES = (
    re.compile(r"^(?:the )?[\w' -]+? of (?P<s>.+?) (?:is|was|are|were|declares.*)$", re.I),
    re.compile(r"^in (?P<s>.+?), .+$", re.I),
    re.compile(r"^(?:what|which|where|who) [\w ]+? (?:of |does |is )(?P<s>.+?)\?.*$", re.I),
    re.compile(r"^(?P<s>.+?)'s .+$", re.I),
)
_SPLIT = re.compile(
    r"(?:,| (?:is|was|has|holds|plays|performs|speaks|spoke|writes|works|worked|died|passed|lost|expired|"
    r"succumbed|originated|originates|premiered|premieres|debuted|belongs|follows|can|used|found|took|"
    r"professionally|specializes|from|that|who|which|recorded|label|owner|formed|started|started)\b)",
    re.I,
)


def split_prompt(prompt: str) -> tuple[str, str] | None:
    """Guess ``(subject, template)`` of a full prompt such as "John Lennon performs on the"; ``None`` if unsure."""
    text = " ".join(prompt.split())
    for form in _PREFIXES:
        match = form.match(text)
        if match and match.group("s").strip():
            s = match.group("s").strip()
            return s, text[: match.start("s")] + SLOT + text[match.end("s") :]
    match = _SPLIT.search(text)
    if match and match.start() > 0:
        return text[: match.start()].strip(), SLOT + text[match.start() :]
    return None


def question_for_prompt(prompt: str) -> str:
    """A natural question for a full prompt (subject not given); "Complete this sentence: ..." when unsure."""
    split = split_prompt(prompt)
    if split is None:
        return "Complete this sentence: " + " ".join(prompt.split()) + " ..."
    subject, template = split
    return question_for(template, subject)


# The relation the form suggests for each question (the reverse of ``RULES``; "Correct this" on a chat reply).
RELATION_FOR_QUESTION: dict[str, str] = {
    "Where is {}?": "{} is located in", "Which country is {} in?": "{} is located in the country of",
    "Which country is {} a citizen of?": "{} is a citizen of", "What language does {} speak?": "{} speaks the language",
    "What language is spoken in {}?": "The official language of {} is", "What language is {} in?": "The language of {} is",
    "What is the capital of {}?": "The capital of {} is", "What is the twin city of {}?": "The twin city of {} is",
    "Where was {} born?": "{} was born in", "Where did {} die?": "{} died in", "Where is {} from?": "{} is from",
    "Who owns {}?": "{} is owned by", "Who does {} work for?": "{} works for", "What is {}'s job?": "{} works as",
    "What sport does {} play?": "{} professionally plays the sport", "What position does {} play?": "{} plays as",
    "What instrument does {} play?": "{} plays the instrument", "Which company makes {}?": "{} is produced by",
    "Who developed {}?": "{} is developed by", "Where is {} headquartered?": "The headquarters of {} is in",
    "What religion does {} follow?": "{} follows the religion of", "Which continent is {} on?": "{} is located in the continent",
}  # fmt: skip


def fact_from_question(question: str) -> tuple[str, str | None]:
    """``(subject, relation or None)`` guessed from a chat question: "Where is the Eiffel Tower?" ->
    ("the Eiffel Tower", "{} is located in"). The subject is the whole question when nothing matches."""
    text = " ".join(question.split()).rstrip()
    for asked, relation in RELATION_FOR_QUESTION.items():
        head, tail = asked.split(SLOT)
        match = re.fullmatch(re.escape(head) + r"(?P<s>.+?)" + re.escape(tail.rstrip("?")) + r"\??", text, re.I)
        if match:
            return match.group("s").strip(), relation
    about = re.fullmatch(r"(?:tell me about|who is|who was|what is) (?P<s>.+?)[.?!]?", text, re.I)
    if about:
        return about.group("s").strip(), None
    split = split_prompt(text.rstrip("?"))
    return (split[0], None) if split else (text, None)
