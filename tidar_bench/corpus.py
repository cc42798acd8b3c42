"""A deterministic synthetic corpus for training tiny models on this project's task formats.

Three families, each rendered in the prompt format of its benchmark:
- `gsm`:  GSM8K-style word problems, step-by-step solutions ending in `#### <answer>`
          ("Question: ...\\nAnswer: ...");
- `code`: small Python functions (signature + docstring + body) with assert tests;
- `math`: MATH-style arithmetic/algebra problems with a `\\boxed{}` answer
          ("Problem:\\n...\\n\\nSolution:\\n...").
Every item is a dict {"family", "prompt", "solution", "answer", "text"} where text = prompt +
solution. `make_splits` returns train and held-out lists that share no prompt.

Quantities are kept small (products up to 30, sums under 80) so that a few-million-parameter model
trained for minutes on a CPU can learn the arithmetic: the suite measures decoders, and a model that
gets most answers right makes quality differences between decoders visible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jude", "Kira", "Liam", "Mona", "Noah",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "books", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "coins", "stamps"]


def _gsm(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    a, b, c = rng.randint(2, 12), rng.randint(2, 5), rng.randint(2, 6)
    if kind == 0:
        q = f"{name} has {a} {item}. {name} buys {b} boxes with {c} {item} in each box. How many {item} does {name} have now?"
        steps = [f"The boxes hold {b} * {c} = {b * c} {item}.", f"{name} has {a} + {b * c} = {a + b * c} {item}."]
        ans = a + b * c
    elif kind == 1:
        total = a * b + c
        q = f"{name} had {total} {item} and gave {b} friends {a} {item} each. How many {item} are left?"
        steps = [f"{name} gave away {b} * {a} = {a * b} {item}.", f"{total} - {a * b} = {c} {item} are left."]
        ans = c
    elif kind == 2:
        price = rng.randint(2, 6)
        q = f"One of the {item} costs {price} dollars. {name} buys {b} of them and pays with {price * b + a} dollars. How much change does {name} get?"
        steps = [f"The {item} cost {b} * {price} = {b * price} dollars.",
                 f"The change is {price * b + a} - {b * price} = {a} dollars."]
        ans = a
    else:
        d = rng.randint(2, 5)
        q = f"{name} reads {a} pages on Monday and {b} times as many pages on Tuesday. Then {name} reads {d} more pages. How many pages did {name} read in total?"
        steps = [f"On Tuesday {name} reads {a} * {b} = {a * b} pages.",
                 f"In total {a} + {a * b} + {d} = {a + a * b + d} pages."]
        ans = a + a * b + d
    prompt = f"Question: {q}\nAnswer:"
    sol = " " + "\n".join(steps) + f"\n#### {ans}"
    return {"family": "gsm", "prompt": prompt, "solution": sol, "answer": str(ans)}


_CODE = [
    ("sum_{n}", "Return the sum of the numbers in {arg}.", "    total = 0\n    for x in {arg}:\n        total += x\n    return total",
     [([1, 2, 3], 6), ([], 0), ([5, -2], 3)]),
    ("max_{n}", "Return the largest number in {arg}.", "    best = {arg}[0]\n    for x in {arg}:\n        if x > best:\n            best = x\n    return best",
     [([1, 5, 3], 5), ([-4, -2], -2), ([7], 7)]),
    ("count_even_{n}", "Return how many numbers in {arg} are even.", "    return sum(1 for x in {arg} if x % 2 == 0)",
     [([1, 2, 4], 2), ([], 0), ([3, 5], 0)]),
    ("reverse_{n}", "Return the list {arg} in reverse order.", "    return {arg}[::-1]",
     [([1, 2, 3], [3, 2, 1]), ([], []), ([4], [4])]),
    ("square_all_{n}", "Return a list with the square of each number in {arg}.", "    return [x * x for x in {arg}]",
     [([1, 2, 3], [1, 4, 9]), ([], []), ([-2], [4])]),
    ("product_{n}", "Return the product of the numbers in {arg}.", "    result = 1\n    for x in {arg}:\n        result *= x\n    return result",
     [([1, 2, 3], 6), ([], 1), ([5, 4], 20)]),
    ("positives_{n}", "Return the positive numbers of {arg}, in order.", "    return [x for x in {arg} if x > 0]",
     [([1, -2, 3], [1, 3]), ([], []), ([-1], [])]),
]
_ARGS = ["nums", "values", "items", "xs", "data", "numbers"]
_SUFFIX = ["list", "values", "items", "of_list", "numbers"]


def _code(rng: random.Random) -> dict:
    name_t, doc_t, body_t, cases = rng.choice(_CODE)
    arg, suffix = rng.choice(_ARGS), rng.choice(_SUFFIX)
    name = name_t.format(n=suffix)
    doc = doc_t.format(arg=arg)
    prompt = f'def {name}({arg}):\n    """{doc}"""\n'
    body = body_t.format(arg=arg)
    tests = [f"assert {name}({inp!r}) == {out!r}" for inp, out in cases]
    return {"family": "code", "prompt": prompt, "solution": body + "\n", "answer": "\n".join(tests), "entry_point": name}


def _math(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    a, b, c = rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 12)
    if kind == 0:
        q = f"What is ${a} \\times {b} + {c}$?"
        sol = f"First, ${a} \\times {b} = {a * b}$. Then ${a * b} + {c} = {a * b + c}$."
        ans = a * b + c
    elif kind == 1:
        x = rng.randint(1, 9)
        q = f"Solve for $x$: ${a}x + {c} = {a * x + c}$."
        sol = f"Subtract {c}: ${a}x = {a * x}$. Divide by {a}: $x = {x}$."
        ans = x
    else:
        q = f"What is the remainder when ${a * b + c}$ is divided by ${b}$?"
        r = (a * b + c) % b
        sol = f"We have ${a * b + c} = {b} \\cdot {(a * b + c) // b} + {r}$, so the remainder is ${r}$."
        ans = r
    prompt = f"Problem:\n{q}\n\nSolution:"
    sol = f" {sol}\nFinal Answer: The final answer is ${ans}$. I hope it is correct. $\\boxed{{{ans}}}$"
    return {"family": "math", "prompt": prompt, "solution": sol, "answer": str(ans)}


FAMILIES = {"gsm": _gsm, "code": _code, "math": _math}


def generate(n: int, seed: int, families=tuple(FAMILIES)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        item = FAMILIES[families[i % len(families)]](rng)
        item["text"] = item["prompt"] + item["solution"]
        out.append(item)
    return out


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Held-out items are drawn first (their own seed) and every train item with the same prompt
    is dropped, so the splits share no problem."""
    held = []
    seen = set()
    for it in generate(n_heldout * 4, seed + 1):
        if it["prompt"] not in seen and len(held) < n_heldout:
            seen.add(it["prompt"])
            held.append(it)
    train = [it for it in generate(n_train, seed) if it["prompt"] not in seen]
    return train, held


def write_jsonl(items: list[dict], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    tmp.replace(path)


SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "mask_token": "[MASK]"}


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path, with_mask: bool = True):
    """Byte-level BPE trained on `texts` with EOS, PAD (and MASK) specials, saved as an HF
    tokenizer in out_dir; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # "\n" is always a token of its own: a prompt ending in a newline (code: signature + docstring)
    # then tokenises exactly as the same text does inside a training document, where BPE would
    # otherwise merge the newline with the next line's indentation.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = {k: v for k, v in SPECIAL_TOKENS.items() if with_mask or k != "mask_token"}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **specials)
    hf.save_pretrained(str(out_dir))
    return hf
