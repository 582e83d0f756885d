"""Generate the training benchmark's bundled chat dataset: bench/data/chat_{train,valid}.jsonl.

`python -m bench.make_chat_data` rewrites both files byte for byte the same (fixed seed,
standard library only). Conversations are templated tasks with a consistent answer
structure (arithmetic, capitals, word games, lists, JSON extraction, product copy, ticket
summaries, how-tos, some multi-turn), so a model can learn them and its eval loss falls.

Lengths are what makes the benchmark: each conversation is picked to land near a length
drawn from a log-normal distribution (median ~135 bytes rendered through the default chat
template, long tail to ~480), the way real chat data mixes one-liners with long answers.
On tiny-random-llama's byte-level tokenizer a byte is a token (`</s>` is one token), so
nothing comes near 512 tokens and the recipe's padding to 512 truncates nothing.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SEED = 20261123
N_TRAIN = 512
N_VALID = 64
MEDIAN_BYTES = 135
SIGMA = 0.6  # of log(length): 90% of conversations between ~50 and ~360 bytes
MAX_BYTES = 480

Messages = list[dict[str, str]]

SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are Lathe's demo bot."]
CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Norway": "Oslo",
    "Chile": "Santiago",
}
WORDS = ["table", "river", "lamp", "garden", "window", "pencil", "orange", "rocket", "cloud"]
CATEGORIES = {
    "fruits": ["apple", "pear", "plum", "cherry", "banana", "mango", "grape", "lemon", "kiwi"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray"],
    "animals": ["cat", "dog", "horse", "rabbit", "tiger", "eagle", "otter", "sheep", "fox"],
    "tools": ["hammer", "saw", "wrench", "drill", "chisel", "pliers", "level", "file", "clamp"],
}
NAMES = ["Maria", "John", "Aiko", "Omar", "Lena", "Tom", "Priya", "Carlos", "Nina", "Ivan"]
CITIES = list(CAPITALS.values())
ITEMS = ["backpack", "kettle", "desk lamp", "water bottle", "chair", "notebook", "jacket"]
MATERIALS = ["steel", "bamboo", "recycled plastic", "oak", "wool", "glass", "aluminium"]
FEATURES = [
    "It is light and easy to carry.",
    "It is built to last for years.",
    "It is simple to clean.",
    "It comes in three sizes.",
    "It ships in plastic-free packaging.",
    "It has a two-year warranty.",
    "It fits in any small space.",
    "It is made in a small workshop.",
]
PROBLEMS = [
    ("cannot log in after the update", "high", "accounts"),
    ("was charged twice this month", "high", "billing"),
    ("wants to change the delivery address", "low", "shipping"),
    ("sees a blank page on the dashboard", "medium", "web"),
    ("did not receive the reset email", "medium", "accounts"),
    ("asks for an invoice in PDF", "low", "billing"),
]
FILLER = [
    "I tried again this morning.",
    "This has happened before.",
    "My order number is in the previous email.",
    "I am using the mobile app.",
    "Please help as soon as you can.",
    "I already restarted my phone.",
    "My colleague has the same issue.",
    "Thanks in advance.",
]
HOWTOS = {
    "make tea": ["Boil water", "Warm the pot", "Add the tea", "Pour the water", "Wait 4 min"],
    "plant a tree": ["Dig a hole", "Loosen the roots", "Set the tree", "Fill with soil", "Water"],
    "fix a flat tire": ["Remove the wheel", "Find the hole", "Patch it", "Inflate", "Refit"],
    "back up a laptop": ["Plug in a drive", "Open settings", "Pick the drive", "Start backup"],
    "clean a keyboard": ["Unplug it", "Shake it out", "Wipe the keys", "Let it dry"],
}


def arithmetic(rng: random.Random, size: int) -> Messages:
    a, b = rng.randint(1, 10 * size), rng.randint(1, 10 * size)
    if rng.random() < 0.5:
        return [user(f"{a} + {b}?"), assistant(f"{a + b}")]
    return [user(f"What is {a} + {b}?"), assistant(f"{a} + {b} = {a + b}.")]


def capital(rng: random.Random, size: int) -> Messages:
    country = rng.choice(list(CAPITALS))
    if size == 1:
        return [user(f"Capital of {country}?"), assistant(CAPITALS[country])]
    return [
        user(f"What is the capital of {country}?"),
        assistant(f"The capital of {country} is {CAPITALS[country]}."),
    ]


def word_game(rng: random.Random, size: int) -> Messages:
    words = " ".join(rng.choice(WORDS) for _ in range(size))
    if rng.random() < 0.5:
        return [user(f"Reverse: {words}"), assistant(words[::-1])]
    return [user(f"Uppercase: {words}"), assistant(words.upper())]


def listing(rng: random.Random, size: int) -> Messages:
    category = rng.choice(list(CATEGORIES))
    n = min(size, len(CATEGORIES[category]))
    picked = rng.sample(CATEGORIES[category], n)
    lines = "\n".join(f"{i}. {item}" for i, item in enumerate(picked, 1))
    return [user(f"List {n} {category}."), assistant(f"Here are {n} {category}:\n{lines}")]


def extraction(rng: random.Random, size: int) -> Messages:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 80)
    text = f"{name} is {age} years old and lives in {city}."
    fields = {"name": name, "age": age, "city": city}
    if size > 1:
        job = rng.choice(["teacher", "nurse", "engineer", "baker", "pilot"])
        text += f" {name} works as a {job}."
        fields["job"] = job
    return [
        user(f"Extract the fields as JSON: {text}"),
        assistant(json.dumps(fields)),
    ]


def product(rng: random.Random, size: int) -> Messages:
    item, material = rng.choice(ITEMS), rng.choice(MATERIALS)
    features = " ".join(rng.sample(FEATURES, min(size, len(FEATURES))))
    return [
        user(f"Write a product description for a {material} {item}."),
        assistant(f"Meet our {material} {item}. {features} Order yours today."),
    ]


def ticket(rng: random.Random, size: int) -> Messages:
    problem, priority, team = rng.choice(PROBLEMS)
    name = rng.choice(NAMES)
    body = " ".join([f"Hi, this is {name} and I {problem}."] + rng.sample(FILLER, size - 1))
    return [
        user(f"Summarise this ticket.\n{body}"),
        assistant(f"Summary: {name} {problem}.\nPriority: {priority}\nTeam: {team}"),
    ]


def howto(rng: random.Random, size: int) -> Messages:
    task = rng.choice(list(HOWTOS))
    steps = HOWTOS[task][: max(2, size)]
    lines = "\n".join(f"Step {i}: {step}." for i, step in enumerate(steps, 1))
    return [user(f"How do I {task}?"), assistant(f"To {task}:\n{lines}")]


def multi_turn(rng: random.Random, size: int) -> Messages:
    messages: Messages = []
    for _ in range(size):
        messages += rng.choice([arithmetic, capital, word_game])(rng, 2)
    return messages


# Each task with the sizes it comes in (a list's items, a ticket's sentences, turns, ...).
TASKS: list[tuple[Callable[[random.Random, int], Messages], range]] = [
    (arithmetic, range(1, 4)),
    (capital, range(1, 3)),
    (word_game, range(1, 5)),
    (listing, range(1, 10)),
    (extraction, range(1, 3)),
    (product, range(1, 9)),
    (ticket, range(1, 9)),
    (howto, range(2, 6)),
    (multi_turn, range(2, 7)),
]


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def rendered_bytes(messages: Messages) -> int:
    """Length through app.config.DEFAULT_CHAT_TEMPLATE, with `</s>` as tiny-llama's eos."""
    text = ""
    for m in messages:
        text += f"<|{m['role']}|>\n{m['content']}" + ("</s>" if m["role"] == "assistant" else "")
        text += "\n"
    return len(text.encode())


def conversation(rng: random.Random) -> Messages:
    """The candidate, out of a few random ones, nearest a log-normally drawn length."""
    target = min(MAX_BYTES, MEDIAN_BYTES * math.exp(rng.gauss(0, SIGMA)))
    best: Messages | None = None
    for _ in range(16):
        task, sizes = rng.choice(TASKS)
        messages = task(rng, rng.choice(sizes))
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}, *messages]
        length = rendered_bytes(messages)
        if length <= MAX_BYTES and (
            best is None or abs(length - target) < abs(rendered_bytes(best) - target)
        ):
            best = messages
    assert best is not None
    return best


def write(path: Path, rows: list[Messages]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    DATA.mkdir(exist_ok=True)
    splits = {"chat_train.jsonl": N_TRAIN, "chat_valid.jsonl": N_VALID}
    for name, n in splits.items():
        rows = [conversation(rng) for _ in range(n)]
        write(DATA / name, rows)
        lengths = sorted(rendered_bytes(m) for m in rows)
        print(
            f"{name}: {n} conversations, rendered bytes min {lengths[0]}, "
            f"median {lengths[n // 2]}, p90 {lengths[n * 9 // 10]}, max {lengths[-1]}, "
            f"total {sum(lengths)}"
        )


if __name__ == "__main__":
    main()
