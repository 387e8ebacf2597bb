"""Built-in dataset: customer-support ticket triage, generated deterministically by our own code.

Input: a customer's message. Output: compact JSON with the keys of SUPPORT_FIELDS, in that order:

    {"intent":"damaged_item","order_id":"ORD-48213","product":"desk lamp","urgency":"high",
     "sentiment":"negative"}   (on one line)

Every label is decided by the message text, so it is learnable:
- intent: which of the INTENTS templates the body came from (10 intents, 9-10 phrasings each);
- order_id: the "ORD-#####" id the ticket is about (a second id may appear as a distractor: "my previous
  order ORD-11111 was fine"); null when the message gives none;
- product: the catalogue product the ticket is about (PRODUCTS, written as in the catalogue); a second product
  may appear as a distractor; null when none is named;
- urgency: "high" / "low" when the message has a cue ("asap", "no rush", a deadline), else "medium";
- sentiment: "negative" / "positive" when the message has a cue (angry words, thanks), else "neutral".
Typos (swapped / dropped / doubled letters) touch only the template words, never ids, products or cues.

Splits are disjoint by construction: a message belongs to the split chosen by a hash of its text
(train 90%, validation 5%, test 5% of the hash space), and each split is generated from its own seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tailor.data.example import Example
from tailor.data.splits import SPLIT_SIZES, SPLITS, build_split
from tailor.files import atomic_write_text

__all__ = ["INTENTS", "PRODUCTS", "SENTIMENTS", "SPLITS", "SPLIT_SIZES", "SUPPORT_FIELDS", "SYSTEM_PROMPT",
           "URGENCIES", "build_support_split", "support_label", "support_schema", "write_support_jsonl"]

SUPPORT_FIELDS = ("intent", "order_id", "product", "urgency", "sentiment")
URGENCIES = ("low", "medium", "high")
SENTIMENTS = ("negative", "neutral", "positive")

PRODUCTS = (
    "wireless earbuds", "yoga mat", "coffee grinder", "desk lamp", "running shoes", "backpack", "phone case",
    "smart watch", "blender", "water bottle", "bluetooth speaker", "office chair", "electric kettle",
    "air fryer", "winter jacket", "hair dryer", "gaming mouse", "throw blanket", "standing desk",
    "travel mug",
)

# Per intent: (P(order id given), P(product named), phrasings). Slots: {ord} the order (id or a generic
# phrase), {item} the product (name or a generic phrase), {other} a different product (wrong item received).
INTENTS: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "refund": (0.75, 0.7, (
        "I would like a refund for {item} from {ord}.",
        "Can I get my money back for {item}? It was in {ord}.",
        "Please refund {item} on {ord}, I changed my mind about it.",
        "How do I get refunded for {item}? I bought it in {ord}.",
        "Requesting a full refund for {item} from {ord}.",
        "I want my money back for {item} ({ord}).",
        "Could you refund the payment for {item}? It was {ord}.",
        "I returned {item} two weeks ago and still have not received my refund for {ord}.",
        "Please process a refund for {ord}, I no longer need {item}.",
        "When will the refund for {item} from {ord} reach my card?",
    )),
    "return": (0.7, 0.75, (
        "I want to return {item} from {ord}.",
        "How do I send back {item}? It came in {ord}.",
        "Can you email me a return label for {item} ({ord})?",
        "The size is off on {item}, so I would like to return it. It was {ord}.",
        "I need to send {item} back. What is the return process for {ord}?",
        "Is it still possible to return {item}? I bought it in {ord}.",
        "I'd like to start a return for {ord}, {item} is not what I expected.",
        "Where do I drop off {item} for a return? It is part of {ord}.",
        "Please set up a return for {item} from {ord}, it does not suit me.",
    )),
    "cancel_order": (0.8, 0.5, (
        "Please cancel {ord}, I ordered {item} by mistake.",
        "I need to cancel {ord} before it ships.",
        "Can you stop {ord}? I don't want {item} anymore.",
        "I'd like to cancel {ord}, I found {item} cheaper elsewhere.",
        "How do I cancel {ord}? I placed it twice by accident.",
        "Cancel {ord} please, I no longer need {item}.",
        "Is it too late to cancel {ord}? It was for {item}.",
        "I changed my mind about {item}, please cancel {ord}.",
        "Could you cancel {ord} and not ship it?",
    )),
    "order_status": (0.8, 0.55, (
        "Where is {ord}? {item} still has not arrived.",
        "Can you tell me when {ord} will be delivered?",
        "The tracking for {ord} has not updated in a week. Where is {item}?",
        "I'm still waiting on {ord}. Has {item} shipped yet?",
        "What is the delivery status of {ord}?",
        "My tracking page says {ord} is in transit, but nothing has come for ages.",
        "Any update on {ord}? I ordered {item} ten days ago.",
        "Has {ord} shipped? I have not received {item}.",
        "Could you check where {item} is? It's in {ord}.",
    )),
    "damaged_item": (0.7, 0.85, (
        "Unfortunately {item} from {ord} arrived broken.",
        "The box for {ord} was crushed and {item} inside is damaged.",
        "I received {item} with a big crack in it ({ord}).",
        "When I opened {ord}, {item} was scratched and dented.",
        "My delivery of {item} came damaged. This was {ord}.",
        "Part of {item} snapped off when I unpacked {ord}.",
        "I got {item} from {ord} but it is smashed.",
        "There is a dent and a tear in {item} that came in {ord}.",
        "Just opened {ord} and {item} is leaking and broken.",
    )),
    "wrong_item": (0.7, 0.85, (
        "I ordered {item} but received a {other} instead. This is {ord}.",
        "My package for {ord} came with a {other}, not {item}.",
        "You sent me the wrong item for {ord}, it is not {item}.",
        "The package for {ord} had someone else's things in it instead of {item}.",
        "I got the wrong color of {item} in {ord}.",
        "Wrong product delivered for {ord}. I was expecting {item}.",
        "Instead of {item} I got a {other} in {ord}.",
        "The item in {ord} is not what I ordered, I wanted {item}.",
        "I received a different size of {item} than I picked, {ord}.",
    )),
    "billing_issue": (0.55, 0.25, (
        "I was charged twice for {ord}.",
        "My card was billed two times for {item}.",
        "There is an extra charge on my statement for {ord}.",
        "The amount I was charged for {ord} is higher than the checkout price.",
        "Why was I billed again for {ord}? I only paid once.",
        "I see a double charge for {item} on my credit card.",
        "My invoice for {ord} shows the wrong total for {item}.",
        "I was charged full price for {item}, the discount code was not applied to {ord}.",
        "There is a payment for {ord} I don't recognize on my bank statement.",
    )),
    "change_address": (0.85, 0.2, (
        "Can I change the shipping address for {ord}?",
        "I moved last week, please update the delivery address on {ord}.",
        "Please ship {ord} to my new address: {address}.",
        "I entered the wrong address for {ord}. Can you fix it before it ships?",
        "Could {item} in {ord} go to my office at {address} instead?",
        "Please change the delivery address for {ord} to {address}.",
        "The street number on {ord} is wrong, it should be {address}.",
        "I need {ord} delivered to my parents' house instead of mine.",
        "Is it possible to redirect {item} from {ord} to a different address?",
    )),
    "account_access": (0.15, 0.0, (
        "I can't log into my account.",
        "My password reset email never arrives.",
        "I'm locked out of my account after too many attempts.",
        "The login page keeps saying my password is wrong.",
        "I can't access my account to check on {ord}.",
        "I forgot which email I used for my account, can you help me get back in?",
        "My account was locked and I can't sign in.",
        "The two-factor code never reaches my phone, so I can't log in.",
        "I changed my email and now I can't sign in to my account to see {ord}.",
        "Someone changed my password and I can't get into my account.",
    )),
    "product_question": (0.1, 0.9, (
        "Does {item} come with a warranty?",
        "Is {item} available in other colors?",
        "What are the dimensions of {item}?",
        "Can {item} be cleaned in the dishwasher?",
        "Is {item} compatible with the older model I bought in {ord}?",
        "How long does the battery on {item} last?",
        "Will {item} be restocked?",
        "Before I buy, is {item} good for travel?",
        "What material is {item} made of?",
        "Do you sell replacement parts for {item}?",
    )),
}

_GENERIC_ORDER = ("my order", "my recent order", "my last order", "the order I placed last week")
_GENERIC_ITEM = ("my purchase", "the item", "my package", "what I bought")
_ORDER_FORMS = ("order {id}", "order {id}", "{id}", "my order {id}", "order number {id}")
_ITEM_FORMS = ("the {p}", "the {p}", "my {p}")

URGENCY_CUES = {
    "high": ("This is urgent.", "Please sort this out ASAP.", "I need this fixed today.",
             "I need it by tomorrow for a trip.", "It's a birthday gift for Friday, so please hurry.",
             "Please respond as soon as possible.", "Urgent, please!", "I need an answer immediately."),
    "low": ("No rush on this.", "Whenever you get a chance is fine.", "It's not urgent at all.",
            "Take your time.", "No hurry, just letting you know.", "Low priority, answer when you can."),
}
SENTIMENT_CUES = {
    "negative": ("I'm really frustrated.", "This is unacceptable.", "Honestly, I'm furious.",
                 "Very disappointed with your service.", "This is the worst experience I've had.",
                 "I'm so annoyed right now.", "Terrible service, honestly."),
    "positive": ("Thanks so much for your help!", "I love your store, by the way.",
                 "You've always been great, thank you!", "Really appreciate the help.",
                 "Your team has been wonderful so far.", "Thanks in advance, you guys are the best!"),
}
_GREETINGS = ("Hi,", "Hello,", "Hi there,", "Hey,", "Good morning,", "Hello support team,",
              "Dear customer service,", "Hi team,")
_SIGN_OFFS = ("Best, {name}", "Regards, {name}", "- {name}", "Cheers, {name}", "{name}", "Sent from my phone",
              "Kind regards, {name}")
_NAMES = ("Sam", "Maria", "J. Chen", "Priya", "Tom", "Aisha", "Lukas", "Emma R.", "Diego", "Olga", "Kenji",
          "Fatima", "Noah", "Grace", "Omar", "Lena")
_FILLERS = ("I placed it through the app.", "I've been a customer for a few years.",
            "My partner placed it with my account.", "I paid with my credit card.",
            "I checked the help pages first.", "This is my first time contacting you.",
            "I'm writing from my work email.")
_ORDER_DISTRACTORS = ("My previous order {x} was fine, no issue there.",
                      "This is not about {x}, that one is sorted.",
                      "Not to be confused with {x}, which was a separate order.",
                      "I already returned {x} last month, this is a different one.")
_PRODUCT_DISTRACTORS = ("The {x} I got before is fine.", "This is not about the {x} I also bought.",
                        "I also have the {x} from you, no problem with that one.")
_STREETS = ("Elm Street", "Oak Avenue", "Maple Road", "Station Road", "Lake Drive", "Hill Lane", "Park Way")

SYSTEM_PROMPT = (
    "Triage this support ticket as JSON: intent (" + ", ".join(INTENTS) + "), order_id (ORD-##### or null), "
    "product (or null), urgency (low/medium/high), sentiment (negative/neutral/positive)."
)


def support_label(intent: str, order_id: str | None, product: str | None, urgency: str,
                  sentiment: str) -> str:
    """The reference answer: compact JSON with keys in SUPPORT_FIELDS order."""
    values = dict(zip(SUPPORT_FIELDS, (intent, order_id, product, urgency, sentiment), strict=True))
    return json.dumps(values, separators=(",", ":"))


def support_schema() -> dict:
    """The JSON Schema every reference answer satisfies (what `tailor eval --constrained` and
    `response_format` enforce): the five SUPPORT_FIELDS, each from its closed set (order_id as ORD-#####),
    order_id and product possibly null, nothing else."""
    order_id = {"anyOf": [{"type": "string", "pattern": "^ORD-[0-9]{5}$"}, {"type": "null"}]}
    product = {"anyOf": [{"type": "string", "enum": list(PRODUCTS)}, {"type": "null"}]}
    properties = {"intent": {"type": "string", "enum": list(INTENTS)}, "order_id": order_id,
                  "product": product, "urgency": {"type": "string", "enum": list(URGENCIES)},
                  "sentiment": {"type": "string", "enum": list(SENTIMENTS)}}
    return {"type": "object", "properties": properties, "required": list(SUPPORT_FIELDS),
            "additionalProperties": False}


def _order_id(rng: random.Random) -> str:
    return f"ORD-{rng.randint(10000, 99999)}"


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double"))
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def _add_typos(template: str, rng: random.Random, n: int) -> str:
    """Misspell n template words (alphabetic, 4+ letters); slots like {item} are left alone."""
    words = template.split(" ")
    candidates = [i for i, w in enumerate(words) if "{" not in w and len(w.strip(".,?!")) >= 4
                  and w.strip(".,?!").isalpha()]
    for i in rng.sample(candidates, min(n, len(candidates))):
        core = words[i].rstrip(".,?!")
        words[i] = _typo(core, rng) + words[i][len(core):]
    return " ".join(words)


def _capitalise_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _one_ticket(rng: random.Random) -> tuple[str, str]:
    """One (message, label) pair."""
    intent = rng.choice(list(INTENTS))
    p_order, p_product, templates = INTENTS[intent]
    has_order, has_product = rng.random() < p_order, rng.random() < p_product
    usable = [t for t in templates if (not has_order or "{ord}" in t) and (not has_product or "{item}" in t)
              and (has_product or "{other}" not in t)]
    template = rng.choice(usable)
    has_order, has_product = has_order and "{ord}" in template, has_product and "{item}" in template
    if rng.random() < 0.3:
        template = _add_typos(template, rng, rng.choice((1, 1, 2)))

    order_id = _order_id(rng) if has_order else None
    product = rng.choice(PRODUCTS) if has_product else None
    others = [p for p in PRODUCTS if p != product]
    body = template.format(
        ord=rng.choice(_ORDER_FORMS).format(id=order_id) if has_order else rng.choice(_GENERIC_ORDER),
        item=rng.choice(_ITEM_FORMS).format(p=product) if has_product else rng.choice(_GENERIC_ITEM),
        other=rng.choice(others),
        address=f"{rng.randint(2, 240)} {rng.choice(_STREETS)}",
    )
    body = _capitalise_first(body)

    urgency = rng.choices(URGENCIES, weights=(0.25, 0.4, 0.35))[0]
    sentiment = rng.choices(SENTIMENTS, weights=(0.35, 0.4, 0.25))[0]
    before, after = [], []  # sentences around the body, each placed before or after it at random
    for sentence in (
        rng.choice(URGENCY_CUES[urgency]) if urgency in URGENCY_CUES else None,
        rng.choice(SENTIMENT_CUES[sentiment]) if sentiment in SENTIMENT_CUES else None,
        rng.choice(_FILLERS) if rng.random() < 0.35 else None,
        rng.choice(_ORDER_DISTRACTORS).format(x=_order_id(rng))
        if has_order and rng.random() < 0.25 else None,
        rng.choice(_PRODUCT_DISTRACTORS).format(x=rng.choice(others))
        if has_product and rng.random() < 0.2 else None,
    ):
        if sentence is not None:
            (before if rng.random() < 0.4 else after).append(sentence)
    rng.shuffle(before)
    rng.shuffle(after)
    greeting = [rng.choice(_GREETINGS)] if rng.random() < 0.7 else []
    sign_off = [rng.choice(_SIGN_OFFS).format(name=rng.choice(_NAMES))] if rng.random() < 0.5 else []
    message = " ".join(greeting + before + [body] + after + sign_off)
    return message, support_label(intent, order_id, product, urgency, sentiment)


def build_support_split(split: str, n: int | None = None) -> list[Example]:
    """The first n examples (default SPLIT_SIZES[split]) of a split; the same call always gives the same data.

    Each Example is [system: SYSTEM_PROMPT, user: message, assistant: label JSON]. No message text occurs in
    two splits (a text's split is fixed by its hash), and none occurs twice within a split.
    """
    return build_split("support", SYSTEM_PROMPT, _one_ticket, split, n)


def write_support_jsonl(path: str | Path, split: str, n: int | None = None, format: str = "chat") -> Path:
    """Write a support split as JSONL (format chat, alpaca or prompt_completion), atomically.

    chat keeps the system prompt as a system message; alpaca puts it in "instruction" and the ticket in
    "input"; prompt_completion puts both in "prompt".
    """
    if format not in ("chat", "alpaca", "prompt_completion"):
        raise ValueError(f"format={format!r}; use one of: chat, alpaca, prompt_completion.")
    path = Path(path)
    lines = []
    for example in build_support_split(split, n):
        system, user, answer = (m["content"] for m in example.messages)
        if format == "chat":
            record = {"messages": example.messages}
        elif format == "alpaca":
            record = {"instruction": system, "input": user, "output": answer}
        else:
            record = {"prompt": f"{system}\n\n{user}", "completion": answer}
        lines.append(json.dumps(record, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")
