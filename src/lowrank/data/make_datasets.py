"""Builds the small data sets shipped beside this file (run once; the output is committed).

Topic classification (4 classes of customer-support messages) and record-to-sentence generation, both
combinatorial from hand-written templates and slot fillers, with a fixed seed. Run: python make_datasets.py
"""

import json
import random
from pathlib import Path


def build() -> None:
    """Write the four .jsonl files next to this module."""
    rng = random.Random(20261127)
    OUT = Path(__file__).resolve().parent

    # ---- topic classification: customer-support messages, 4 classes -------------------------------
    openers = [
        "",
        "Hi, ",
        "Hello, ",
        "Hey there, ",
        "Good morning, ",
        "Quick question: ",
        "Sorry to bother you, ",
        "Urgent: ",
        "Hi team, ",
        "Help please, ",
    ]
    closers = [
        "",
        " Thanks.",
        " Thank you!",
        " Please advise.",
        " Any help is appreciated.",
        " Can you fix this?",
        " This is frustrating.",
        " Cheers.",
        " Let me know soon.",
    ]
    billing = [
        "I was charged twice for my {plan} subscription this {period}.",
        "my invoice for {month} shows {amount} but I expected much less.",
        "can I get a refund for the {plan} plan I cancelled last {period}?",
        "the payment with my {card} card keeps getting declined.",
        "why did my monthly bill go up to {amount}?",
        "I need a receipt for the {amount} charge from {month}.",
        "please update the billing address on my {plan} account invoice.",
        "there is an unknown charge of {amount} on my {card} statement.",
        "how do I switch from monthly to yearly billing to save money?",
        "my discount code was not applied and I paid full price of {amount}.",
        "the tax on my {month} invoice looks wrong.",
        "I was billed for the {plan} plan after the free trial ended without warning.",
    ]
    shipping = [
        "my package with the {item} has not arrived after {days} days.",
        "the tracking number for my {item} order does not work.",
        "the courier left my {item} at the wrong address.",
        "can I change the delivery address for the {item} I ordered {when}?",
        "my {item} arrived damaged and the box was crushed.",
        "how long does express shipping to {country} take?",
        "the parcel with my {item} has been stuck in customs in {country} for {days} days.",
        "I received someone else's {item} instead of my order.",
        "do you deliver to {country} and how much is postage?",
        "my order of a {item} was marked delivered but nothing is at my door.",
        "the shipment of my {item} is delayed again, when will it be dispatched?",
        "only half of my order arrived, the {item} is missing from the box.",
    ]
    technical = [
        "the {app} app crashes every time I open the {screen} screen.",
        "I get error code {code} when I try to sync my data.",
        "the website is extremely slow and the {screen} page never loads.",
        "after the latest update the {app} app freezes on my {device}.",
        "notifications stopped working on my {device}.",
        "the export to {fmt} produces an empty file.",
        "the {screen} button does nothing when I click it in {browser}.",
        "I cannot upload files larger than {size} megabytes, it times out.",
        "the {app} app shows a blank white screen on my {device}.",
        "the search returns error {code} for every query.",
        "the dark mode setting resets itself after restarting the {app} app.",
        "my {device} loses connection to the server every few minutes.",
    ]
    account = [
        "I forgot my password and the reset email never comes.",
        "how do I change the email address on my profile?",
        "please delete my account and all my personal data.",
        "I am locked out after too many login attempts.",
        "someone else logged into my account from {country}, I think it was hacked.",
        "how can I enable two-factor authentication on my profile?",
        "I want to change my username to something else.",
        "can I merge my two accounts into one?",
        "the verification code sent to my phone is always rejected at login.",
        "how do I add a second user to my family account?",
        "I cannot sign in with my {provider} login anymore.",
        "please update the phone number linked to my account.",
    ]
    slots = dict(
        plan=["premium", "basic", "family", "pro", "student", "business"],
        period=["month", "week", "year", "quarter"],
        month=["January", "March", "May", "July", "September", "November", "April"],
        amount=["$49", "$12.99", "$120", "$7", "$300", "€35", "£18"],
        card=["Visa", "Mastercard", "debit", "credit", "Amex"],
        item=[
            "laptop",
            "headphones",
            "coffee machine",
            "jacket",
            "phone case",
            "desk lamp",
            "running shoes",
            "backpack",
            "monitor",
            "book",
        ],
        days=["five", "ten", "three", "twelve", "seven", "fourteen"],
        when=["yesterday", "this morning", "last week", "two days ago"],
        country=["Canada", "Germany", "Brazil", "Japan", "Spain", "Australia", "Kenya", "Norway"],
        app=["iOS", "Android", "desktop", "mobile", "Windows"],
        screen=["settings", "dashboard", "checkout", "profile", "reports", "login"],
        code=["503", "E42", "404", "0x80070005", "500", "AUTH-17"],
        device=["iPhone", "Android tablet", "Pixel phone", "MacBook", "Chromebook", "Windows laptop"],
        fmt=["CSV", "PDF", "Excel", "JSON"],
        browser=["Firefox", "Chrome", "Safari", "Edge"],
        size=["10", "25", "50", "100"],
        provider=["Google", "Apple", "Facebook", "Microsoft"],
    )

    def fill(t):
        out = t
        for k, v in slots.items():
            while "{" + k + "}" in out:
                out = out.replace("{" + k + "}", rng.choice(v), 1)
        return out

    def make_msg(t):
        body = fill(t)
        op = rng.choice(openers)
        if op:
            body = body[0].lower() + body[1:] if not body.startswith("I ") else body
        else:
            body = body[0].upper() + body[1:]
        return (op + body + rng.choice(closers)).strip()

    rows = []
    for label, tmpls in [("billing", billing), ("shipping", shipping), ("technical", technical), ("account", account)]:
        seen = set()
        while len(seen) < 90:
            seen.add(make_msg(rng.choice(tmpls)))
        rows += [{"text": s, "label": label} for s in sorted(seen)]
    rng.shuffle(rows)
    train, test = rows[:280], rows[280:]
    for name, part in [("topics_train.jsonl", train), ("topics_eval.jsonl", test)]:
        with open(OUT / name, "w") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    # ---- generation: structured record -> one sentence -----------------------------------------------
    names = [
        "anna",
        "ben",
        "carla",
        "david",
        "elena",
        "farid",
        "grace",
        "hugo",
        "ines",
        "jonas",
        "kira",
        "leo",
        "maya",
        "nina",
        "omar",
        "paula",
        "quinn",
        "rosa",
        "sam",
        "tara",
        "umar",
        "vera",
        "will",
        "zoe",
    ]
    cities = [
        "paris",
        "rome",
        "berlin",
        "lisbon",
        "oslo",
        "madrid",
        "vienna",
        "prague",
        "dublin",
        "athens",
        "warsaw",
        "zurich",
    ]
    jobs = [
        "baker",
        "teacher",
        "doctor",
        "pilot",
        "farmer",
        "painter",
        "nurse",
        "chef",
        "lawyer",
        "singer",
        "driver",
        "writer",
    ]
    pets = ["cat", "dog", "parrot", "rabbit", "horse", "fish"]
    gen = set()
    while len(gen) < 300:
        n, c, j, p = rng.choice(names), rng.choice(cities), rng.choice(jobs), rng.choice(pets)
        gen.add((n, c, j, p))
    gen = sorted(gen)
    rng.shuffle(gen)

    def to_row(t):
        n, c, j, p = t
        return {
            "prompt": f"name: {n} ; city: {c} ; job: {j} ; pet: {p}",
            "response": f"{n} is a {j} who lives in {c} with a {p} .",
        }

    for name, part in [("records_train.jsonl", gen[:240]), ("records_eval.jsonl", gen[240:])]:
        with open(OUT / name, "w") as f:
            for t in part:
                f.write(json.dumps(to_row(t)) + "\n")
    print(f"topics: {len(train)} train / {len(test)} eval; records: 240 / 60")


if __name__ == "__main__":
    build()
