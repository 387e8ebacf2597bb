"""The voice task: rewrite a plain customer-service notice in the Northwind brand voice, whose rules a
program checks (`voice_violations`):

- it starts with GREETING and ends with SIGN_OFF;
- no exclamation marks, no words in capitals (ids such as ORD-12345 aside);
- it speaks to the customer ("you", "your"), never of them ("the customer");
- at most MAX_WORDS words.
The rewrite must also keep the notice's facts: its order id, date and amount, written as given.
The metric, voice_pass_rate, is the share of answers that keep every rule and every fact.
"""

from __future__ import annotations

import random
import re
from typing import Any

from tailor.data.example import Example
from tailor.data.splits import SPLIT_SIZES, build_split
from tailor.data.tasks import BuiltinTask

GREETING = "Hello from Northwind."
SIGN_OFF = "Warm regards, the Northwind team."
MAX_WORDS = 60
SYSTEM_PROMPT = (f"Rewrite the notice in the Northwind voice: start with \"{GREETING}\", "
                 f"end with \"{SIGN_OFF}\", "
                 "speak to the customer as you, no exclamation marks, no capitals for emphasis, at most "
                 f"{MAX_WORDS} words, keep the order id, date and amount exactly.")

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_ORDER_ID = re.compile(r"\bORD-\d{5}\b")
_DATE = re.compile(r"\b\d{1,2} (?:" + "|".join(_MONTHS) + r")\b")
_AMOUNT = re.compile(r"\$\d+\.\d{2}")
_SECOND_PERSON = re.compile(r"\b(?:you|your|yours)\b", re.I)
_THIRD_PERSON = re.compile(r"\b(?:the customer|the client|customer's|client's)\b", re.I)
_CAPITALS = re.compile(r"\b[A-Z]{2,}\b")

# Per event: the plain notices (third person, terse) and the one rewrite in the voice. Slots {ord} {date}
# {amount}.
EVENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "shipped": (("Order {ord} shipped. Delivery expected {date}.",
                 "The customer's order {ord} has shipped and will arrive on {date}.",
                 "Shipment notice: {ord} left the warehouse, ETA {date}."),
                "Your order {ord} is on its way and should reach you on {date}."),
    "delayed": (("Order {ord} is delayed. New delivery date: {date}.",
                 "Delay on {ord}. The customer will now receive it on {date}.",
                 "{ord} is late due to carrier problems, now due {date}."),
                "We are sorry: your order {ord} is running late and should now reach you on {date}."),
    "refund": (("Refund of {amount} for {ord} issued on {date}.",
                "The customer was refunded {amount} for order {ord} on {date}.",
                "{amount} returned to the card used for {ord}, processed {date}."),
               "We refunded {amount} for your order {ord} on {date}. It may take a few days to show."),
    "cancelled": (("Order {ord} cancelled on {date} as requested.",
                   "Per the customer's request, {ord} was cancelled on {date}.",
                   "Cancellation confirmed for {ord}, effective {date}."),
                  "As you asked, we cancelled your order {ord} on {date}."),
    "return_received": (("Return for {ord} received on {date}. Refund of {amount} pending.",
                         "Warehouse got the customer's return of {ord} on {date}; {amount} to be refunded.",
                         "Returned item from {ord} arrived {date}. Refund {amount} in progress."),
                        "We received your return for order {ord} on {date}, and your refund of {amount} is "
                        "on its way."),
    "payment_failed": (("Payment of {amount} for {ord} failed on {date}.",
                        "The customer's card was declined for {ord} ({amount}) on {date}.",
                        "Charge of {amount} on {ord} did not go through, {date}."),
                       "Your payment of {amount} for order {ord} did not go through on {date}. Please check "
                       "your card details."),
    "ready_for_pickup": (("Order {ord} ready for pickup from {date}.",
                          "The customer can collect {ord} at the store starting {date}.",
                          "Pickup available for {ord} from {date}."),
                         "Your order {ord} is ready for you to collect from {date}."),
}
_SHOUTS = ("URGENT: ", "NOTICE: ", "UPDATE: ", "", "", "")
_TAILS = ("", "", " Inform the customer!", " Please tell the customer ASAP!", " No action needed!",
          " Contact the customer TODAY.")


def _facts(rng: random.Random) -> dict[str, str]:
    return {"ord": f"ORD-{rng.randint(10000, 99999)}",
            "date": f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}",
            "amount": f"${rng.randint(5, 400)}.{rng.choice(('00', '50', '99', '25'))}"}


def _one(rng: random.Random) -> tuple[str, str]:
    notices, rewrite = EVENTS[rng.choice(list(EVENTS))]
    facts = _facts(rng)
    notice = rng.choice(_SHOUTS) + rng.choice(notices).format(**facts) + rng.choice(_TAILS)
    if rng.random() < 0.25:
        notice = notice.replace(".", "!", 1)
    return notice, f"{GREETING} {rewrite.format(**facts)} {SIGN_OFF}"


def build(split: str, n: int | None = None) -> list[Example]:
    """The first n examples (default 4000 / 200 / 200) of a split, [system: the voice's rules, user: the
    notice, assistant: the rewrite]; deterministic, splits disjoint."""
    return build_split("voice", SYSTEM_PROMPT, _one, split, n)


def voice_violations(text: str) -> list[str]:
    """The voice's rules `text` breaks, one line each (an empty list: it keeps them all)."""
    text = text.strip()
    problems = []
    if not text.startswith(GREETING):
        problems.append(f"does not start with {GREETING!r}")
    if not text.endswith(SIGN_OFF):
        problems.append(f"does not end with {SIGN_OFF!r}")
    if "!" in text:
        problems.append("has an exclamation mark")
    shouted = _CAPITALS.findall(_ORDER_ID.sub("", text))
    if shouted:
        problems.append(f"has words in capitals: {', '.join(dict.fromkeys(shouted))}")
    if not _SECOND_PERSON.search(text):
        problems.append("does not speak to the customer (no 'you' or 'your')")
    third = _THIRD_PERSON.search(text)
    if third:
        problems.append(f"speaks of the customer in the third person ({third.group(0)!r})")
    words = len(text.split())
    if words > MAX_WORDS:
        problems.append(f"has {words} words, more than {MAX_WORDS}")
    return problems


def missing_facts(notice: str, text: str) -> list[str]:
    """The order ids, dates and amounts of `notice` that `text` does not repeat exactly."""
    facts = [*_ORDER_ID.findall(notice), *_DATE.findall(notice), *_AMOUNT.findall(notice)]
    return [fact for fact in facts if fact not in text]


def score(predictions: list[str], examples: list[Example]) -> dict[str, Any]:
    """{"score": voice_pass_rate (every rule and fact kept), "voice_pass_rate", "rules_kept" (answers with
    no rule broken), "facts_kept" (answers with every fact), "n", "violations": {rule: count}}."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions but {len(examples)} examples; need one each.")
    passed = rules_kept = facts_kept = 0
    violations: dict[str, int] = {}
    for prediction, example in zip(predictions, examples, strict=True):
        broken = voice_violations(prediction)
        missing = missing_facts(example.prompt[-1]["content"], prediction)
        for problem in broken:
            rule = problem.split(":")[0].split(" (")[0]
            violations[rule] = violations.get(rule, 0) + 1
        rules_kept += not broken
        facts_kept += not missing
        passed += not broken and not missing
    n = len(examples)
    rate = passed / n if n else 0.0
    return {"score": rate, "voice_pass_rate": rate, "rules_kept": rules_kept / n if n else 0.0,
            "facts_kept": facts_kept / n if n else 0.0, "n": n, "violations": violations}


TASK = BuiltinTask(
    name="voice", kind="rewriting", metric="voice_pass_rate",
    description="Rewrite a terse customer-service notice in the Northwind brand voice (fixed greeting and "
                "sign-off, you, no exclamation marks or capitals, at most 60 words), keeping its facts.",
    split_sizes=dict(SPLIT_SIZES), build=build, score=score)

__all__ = ["GREETING", "MAX_WORDS", "SIGN_OFF", "SYSTEM_PROMPT", "TASK", "build", "missing_facts", "score",
           "voice_violations"]
