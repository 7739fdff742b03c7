"""Demo data, written for this project (nothing copied from elsewhere).

Two tasks: jokes by topic (open-ended, rated by people) and support-ticket
routing (a checkable answer, so the loop's improvement can be measured).
Tickets are built from hand-written templates with a seeded generator, so
every machine gets the same rows.
"""

from __future__ import annotations

import random
from typing import Literal

JOKES: list[tuple[str, str]] = [
    ("cat", "My cat sits on my keyboard because it wants to keep an eye on the mouse."),
    ("dog", "My dog learned to fetch the newspaper; now he wants a subscription."),
    ("coffee", "Decaf is just coffee that gave up on its dreams."),
    ("programming", "I would tell you a UDP joke, but you might not get it."),
    ("math", "Parallel lines have so much in common; it's a shame they'll never meet."),
    ("weather", "The forecast said 90% chance of rain, so I brought 90% of an umbrella."),
    ("pizza", "I ordered a pizza with everything; it arrived with my old homework too."),
    ("music", "My piano teacher says I'm flat, which is the nicest thing she's said about me."),
    ("space", "Astronauts never throw parties in space; there's no atmosphere."),
    ("bicycle", "A bicycle can't stand on its own because it's two-tired."),
    ("computer", "My laptop is so slow it buffers its own startup sound."),
    ("cooking", "I tried cooking with wine; after three glasses I forgot what I was making."),
    ("gym", "I joined a gym for a year; I'm told the treadmill misses me."),
    ("ocean", "The ocean waved at me, so I waved back; we've been close ever since."),
    ("library", "The library's Wi-Fi password is 'shhh', and nobody dares to say it."),
    ("birds", "Owls stay up late because they have a lot of whooo-mework."),
]

CATEGORIES = ("billing", "technical", "account", "shipping")
Category = Literal["billing", "technical", "account", "shipping"]

_TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "Please refund the {amount} charge on my credit card",
        "My invoice shows the wrong amount for the {plan} plan",
        "Why did my payment of {amount} fail when my card is valid",
        "Can I get a receipt for my last payment of {amount}",
        "The discount code was not applied and I paid {amount}",
        "How do I switch my billing from monthly to yearly on {plan}",
        "I cancelled but still got billed {amount}",
    ],
    "technical": [
        "The {app} app crashes every time I open the settings page",
        "I get error {code} when I try to upload a file",
        "The website is very slow and pages time out in {browser}",
        "Sync stopped working on my {device} after the last update",
        "The export button does nothing in {browser}",
        "Notifications are not showing on my {device}",
        "The {app} app freezes when I play a video",
        "Login page shows error {code} and a blank screen",
    ],
    "account": [
        "I forgot my password and the reset email never arrives",
        "How do I change the email address on my profile",
        "Please delete my account and all my personal data",
        "I want to add a second user to my {plan} account",
        "My account was locked after too many sign in attempts",
        "How can I enable two factor authentication on my profile",
        "I need to change the username on my account",
        "Someone else signed in to my account from {city}",
    ],
    "shipping": [
        "My package to {city} has not arrived after {days} days",
        "The tracking number for my order does not work",
        "Can you ship my order to {city} instead",
        "The parcel arrived damaged and the box was open",
        "When will my order ship, it has been {days} days",
        "The courier left my package at the wrong address in {city}",
        "I received the wrong item in my delivery",
        "How much does express delivery to {city} cost",
    ],
}

_SLOTS: dict[str, list[str]] = {
    "plan": ["Basic", "Pro", "Team", "Enterprise"],
    "amount": ["$9.99", "$49", "$120", "$15.50"],
    "app": ["iPhone", "Android", "desktop", "tablet"],
    "code": ["500", "E42", "403", "0x80070005"],
    "browser": ["Chrome", "Firefox", "Safari", "Edge"],
    "device": ["phone", "laptop", "tablet", "watch"],
    "city": ["Lisbon", "Denver", "Osaka", "Nairobi", "Leeds"],
    "days": ["five", "ten", "twelve", "three"],
}


def tickets(seed: int = 7, per_template: int = 3) -> list[dict[str, str]]:
    """Every generated ticket as {"ticket": ..., "category": ...}, deduplicated, in a fixed order."""
    rng = random.Random(seed)
    rows: dict[str, str] = {}
    for category, templates in _TEMPLATES.items():
        for template in templates:
            for _ in range(per_template):
                text = template.format(**{k: rng.choice(v) for k, v in _SLOTS.items()})
                rows.setdefault(text, category)
    return [{"ticket": t, "category": c} for t, c in rows.items()]


def ticket_splits(seed: int = 7) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(pool, heldout): the pool feeds the loop (simulated traffic); held-out rows are never trained on."""
    rows = tickets(seed)
    random.Random(seed).shuffle(rows)
    cut = len(rows) * 2 // 3
    return rows[:cut], rows[cut:]
