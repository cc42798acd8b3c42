"""Training data: documents from files or datasets -> token ids packed into fixed-length sequences.

Sources (`read_source`): local `.jsonl`/`.json` (one record per line), `.parquet`, `.arrow`, plain
text (documents separated by two blank lines), a directory written by `Dataset.save_to_disk`, any
other directory or a Hugging Face dataset name `NAME[:CONFIG]` (through `datasets.load_dataset`,
optionally streaming). A record's `field` holds text, a chat (`[{"role", "content"}, ...]`, rendered
with the tokenizer's chat template) or a `{"prompt", "completion"}` pair (their concatenation).

What counts for the loss (`loss_on`): "all" = every token. "completion" = for a chat, the assistant
turns (their content and the template's end-of-turn marker, not the `<|im_start|>assistant` header
`add_generation_prompt` writes); system, user and tool turns do not; for a `{"prompt", "completion"}`
record the completion; plain text counts whole. Each piece is tokenized on its own and the ids
joined. The EOS after a document counts when its last piece does.

Documents are tokenized, joined with EOS after each and cut into `seq_len` chunks (the tail
shorter than seq_len is dropped). Batches are drawn from a seeded permutation per epoch, so a run is
reproducible and resumable at any batch (`batches(..., start=n)`), and each rank of a distributed
run takes its rows of every global batch. `MixedDataset` draws each row from one of several packed
sources with given weights.

Next to the ids every token carries flags (`DOC_START`: first token of a document, `LOSS`: counts
for the loss). A batch is the [B, S] id tensor, or a `Batch` with the rows' document numbers (for
`doc_attention`) and loss mask (for loss_on="completion") when either is asked for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from ..errors import UserError

DOC_START, LOSS = 1, 2  # token flags
LOSS_ON = ("all", "completion")
Document = Union[str, list]  # text, or (text, counts-for-loss) pieces (loss_on="completion")

def read_texts(files: Sequence[str | Path], field: str = "text", tokenizer=None, *, split: str = "train",
               streaming: bool = False, max_docs: int = 0, loss_on: str = "all") -> list[Document]:
    """Documents of all `files` (each any source `read_source` takes), in order."""
    texts = [t for f in files for t in read_source(f, field, tokenizer, split=split, streaming=streaming,
                                                   max_docs=max_docs, loss_on=loss_on)]
    if not texts:
        raise UserError("the training corpus is empty")
    return texts


def read_source(src: str | Path, field: str = "text", tokenizer=None, *, split: str = "train",
                streaming: bool = False, max_docs: int = 0, loss_on: str = "all") -> list[Document]:
    """Documents of one source (see the module docstring); empty documents are skipped.
    `max_docs` > 0 keeps the first max_docs records (with `streaming`, only those are read).
    loss_on="completion": each document is its (text, counts) pieces (`pieces`)."""
    return list(iter_documents(src, field, tokenizer, split=split, streaming=streaming, max_docs=max_docs,
                               loss_on=loss_on))


def iter_documents(src: str | Path, field: str = "text", tokenizer=None, *, split: str = "train",
                   streaming: bool = False, max_docs: int = 0, loss_on: str = "all") -> Iterator[Document]:
    """`read_source` one document at a time (`tokenize` streams sources bigger than memory)."""
    if loss_on not in LOSS_ON:
        raise UserError(f"unknown --loss-on {loss_on!r}; use {' or '.join(LOSS_ON)}")
    for value in iter_records(src, field, split=split, streaming=streaming, max_docs=max_docs):
        doc = pieces(value, tokenizer, src) if loss_on == "completion" else render(value, tokenizer, src)
        if (doc if isinstance(doc, str) else "".join(t for t, _ in doc)).strip():
            yield doc


def iter_records(src: str | Path, field: str = "text", *, split: str = "train", streaming: bool = False,
                 max_docs: int = 0) -> Iterator:
    """The raw `field` value of each record of one source (text, or a chat for `render`)."""
    p = Path(src)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        records = _jsonl_records(p, field)
    elif p.is_file() and p.suffix in (".parquet", ".arrow"):
        records = _dataset_records(str(p), _load_dataset(str(p), p.suffix[1:], data_files=str(p), split="train"),
                                   field)
    elif p.is_file():
        records = (t for t in _read(p).split("\n\n\n") if t.strip())
    elif p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = _split(ds, split, str(p))
        records = _dataset_records(str(p), ds, field)
    elif p.is_dir():
        records = _dataset_records(str(p), _load_dataset(str(p), str(p), split=split, streaming=streaming), field)
    elif p.suffix in (".jsonl", ".json", ".parquet", ".arrow", ".txt", ".md") or str(src).startswith((".", "/", "~")):
        raise UserError(f"training data file not found: {src}")
    else:  # a Hub dataset NAME[:CONFIG]
        name, _, config = str(src).partition(":")
        records = _dataset_records(str(src), _load_dataset(str(src), name, config or None, split=split,
                                                           streaming=streaming), field)
    for i, r in enumerate(records):
        if max_docs and i >= max_docs:
            return
        yield r


def read_jsonl(p: Path, field: str) -> Iterator[dict]:
    """The records (JSON objects) of a .jsonl file, each checked to have `field`; a bad line is a
    one-line UserError naming file and line."""
    for i, line in enumerate(_read(p).splitlines()):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{p}:{i + 1}: not valid JSON")
        if not isinstance(doc, dict) or field not in doc:
            raise UserError(f"{p}:{i + 1}: no field {field!r}")
        yield doc


def _jsonl_records(p: Path, field: str) -> Iterator:
    return (doc[field] for doc in read_jsonl(p, field))


def _load_dataset(what: str, *args, **kw):
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its cache-building bars would bury a one-line error
    try:
        return datasets.load_dataset(*args, **kw)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot load dataset {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _split(ds, split: str, what: str):
    if split not in ds:
        raise UserError(f"{what} has no split {split!r} (splits: {', '.join(ds)})")
    return ds[split]


def _dataset_records(what: str, ds, field: str) -> Iterator:
    names = ds.column_names
    if names is not None and field not in names:
        raise UserError(f"{what}: no field {field!r} (fields: {', '.join(names)}); pick one with --text-field")
    for rec in ds:
        if field not in rec:
            raise UserError(f"{what}: no field {field!r} (fields: {', '.join(rec)}); pick one with --text-field")
        yield rec[field]


def render(value, tokenizer, src) -> str:
    """A text field as it is; a chat (list of {role, content}) through the tokenizer's chat template;
    a {"prompt", "completion"} record as prompt + completion."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("prompt"), str) and isinstance(value.get("completion"), str):
        return value["prompt"] + value["completion"]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{src}: chat messages need a tokenizer with a chat template; this one has none")
        return tokenizer.apply_chat_template(value, tokenize=False)
    raise UserError(f"{src}: the text field holds {type(value).__name__}, not text or chat messages")


def pieces(value, tokenizer, src) -> list[tuple[str, bool]]:
    """(text, counts for the loss) pieces of one record for loss_on="completion" (module docstring).
    A chat is rendered prefix by prefix: before each assistant turn the template with
    add_generation_prompt (its header does not count), then through the turn (it counts); a
    template whose renderings are not prefixes of each other (e.g. one that rewrites earlier turns)
    cannot be split and is a UserError."""
    if isinstance(value, str):
        return [(value, True)]
    if isinstance(value, dict) and isinstance(value.get("prompt"), str) and isinstance(value.get("completion"), str):
        return [(value["prompt"], False), (value["completion"], True)]
    whole = render(value, tokenizer, src)  # checks the chat and the template
    out, done = [], ""
    for i, m in enumerate(value):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(value[:i], tokenize=False, add_generation_prompt=True) if i else ""
        full = tokenizer.apply_chat_template(value[: i + 1], tokenize=False)
        if not (head.startswith(done) and full.startswith(head) and whole.startswith(full)):
            raise UserError(f"{src}: the chat template does not render a chat as a growing prefix, so the "
                            "assistant turns cannot be told apart for --loss-on completion")
        out += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    out.append((whole[len(done):], False))
    return [(t, c) for t, c in out if t]


def encode_document(doc: Document, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, flags) of one document followed by EOS; flags: DOC_START on the first token, LOSS on
    the tokens that count (the EOS counts when the document's last piece does)."""
    ids: list[int] = []
    flags: list[int] = []
    for text, counts in [(doc, True)] if isinstance(doc, str) else doc:
        new = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(new)
        flags.extend([LOSS if counts else 0] * len(new))
    ids.append(tokenizer.eos_token_id)
    flags.append(flags[-1] if flags else LOSS)
    flags[0] |= DOC_START
    return ids, flags


@dataclass
class Batch:
    """Packed rows with their structure: `doc` [B, S] each token's document number in its row
    (None: no document attention), `keep` [B, S] bool, the tokens that count for the loss (None: all)."""

    ids: torch.Tensor
    doc: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in (self.ids, self.doc, self.keep)))


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(ids, doc, keep) of a batch (a plain id tensor has neither)."""
    return (batch.ids, batch.doc, batch.keep) if isinstance(batch, Batch) else (batch, None, None)


def make_batch(ids: torch.Tensor, flags: torch.Tensor, doc_attention: bool, loss_on: str):
    """Rows ids [B, S] + flags [B, S] -> what the objectives take (see `Batch`)."""
    if not doc_attention and loss_on == "all":
        return ids
    doc = ((flags & DOC_START) != 0).long().cumsum(-1) if doc_attention else None
    keep = (flags & LOSS) != 0 if loss_on == "completion" else None
    return Batch(ids, doc, keep)


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"training data file {p} is not UTF-8 text: {e}")


class PackedDataset:
    """Documents tokenized in memory (`tokenize` + `ShardDataset` for corpora bigger than that).
    `doc_attention` / `loss_on` choose what the batches carry (`make_batch`)."""

    def __init__(self, texts: Sequence[Document], tokenizer, seq_len: int, seed: int = 0, *,
                 doc_attention: bool = False, loss_on: str = "all"):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token to separate documents")
        ids: list[int] = []
        flags: list[int] = []
        for t in texts:
            i, f = encode_document(t, tokenizer)
            ids.extend(i)
            flags.extend(f)
        n = len(ids) // seq_len
        if n == 0:
            raise UserError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {seq_len}")
        self.data = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        self.flags = torch.tensor(flags[: n * seq_len], dtype=torch.uint8).view(n, seq_len)
        self.seq_len = seq_len
        self.seed = seed
        self.doc_attention, self.loss_on = doc_attention, loss_on

    def raw(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, flags) of rows `idx` [n] -> [n, S] each."""
        return self.data[idx], self.flags[idx]

    def rows(self, idx: torch.Tensor):
        """The batch of rows `idx`."""
        return make_batch(*self.raw(idx), self.doc_attention, self.loss_on)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.data.numel()

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless global batches of `batch_size` rows, from global batch number `start` on (a
        resumed run continues where it stopped); this rank's rows are rank::world_size."""
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by {world_size} processes")
        per_epoch = len(self) // batch_size
        if per_epoch == 0:
            raise UserError(f"the corpus has {len(self)} sequences, fewer than one batch of {batch_size}")
        epoch, i = divmod(start, per_epoch)
        while True:
            perm = self._perm(epoch)
            for b in range(i, per_epoch):
                yield self.rows(perm[b * batch_size : (b + 1) * batch_size][rank::world_size])
            epoch, i = epoch + 1, 0


class MixedDataset:
    """Several packed sources of one seq_len; each row of a global batch comes from source s with
    probability weights[s] (seeded per batch), each source read in its own shuffled epochs."""

    def __init__(self, sources: Sequence[PackedDataset], weights: Sequence[float], seed: int = 0):
        if len(sources) != len(weights):
            raise UserError(f"{len(weights)} data weights for {len(sources)} data sources")
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise UserError(f"data weights must be >= 0 with a positive sum, got {list(weights)}")
        self.sources = list(sources)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.double)
        self.seq_len = sources[0].seq_len
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.sources)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[torch.Tensor]:
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by {world_size} processes")
        used = [0] * len(self.sources)  # rows taken from each source so far
        perms: dict[tuple[int, int], torch.Tensor] = {}
        b = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + 7919 * b)
            choice = torch.multinomial(self.weights, batch_size, replacement=True, generator=g).tolist()
            rows, flags = [], []
            for s in choice:
                src = self.sources[s]
                epoch, j = divmod(used[s], len(src))
                used[s] += 1
                if b >= start:
                    if (s, epoch) not in perms:
                        perms = {k: v for k, v in perms.items() if k[0] != s}
                        perms[(s, epoch)] = src._perm(epoch)
                    r, f = src.raw(perms[(s, epoch)][j : j + 1])
                    rows.append(r)
                    flags.append(f)
            if b >= start:
                yield make_batch(torch.cat(rows)[rank::world_size], torch.cat(flags)[rank::world_size],
                                 self.sources[0].doc_attention, self.sources[0].loss_on)
            b += 1


def add_mask_token(model, tokenizer, token: str = "[MASK]") -> int:
    """The tokenizer's mask token id, adding `token` to the tokenizer if it has none.

    When the id has no row in the model (id >= vocab_size), the embedding and the untied LM head
    grow to id + 1 rows (a tied head stays tied) and config.vocab_size / config.json follow. A row
    for a newly added token (grown, or an unused padding row of a padded vocabulary) starts as the
    mean of the rows before it, so the new token begins as an "average" input."""
    added = tokenizer.mask_token_id is None
    if added:
        tokenizer.add_special_tokens({"mask_token": token})
    mid = tokenizer.mask_token_id
    cfg = model.config
    old = cfg.vocab_size
    if mid >= old:
        model.model.embed_tokens = _grown(model.model.embed_tokens, mid + 1)
        if cfg.tie_word_embeddings:
            model.lm_head = nn.Linear(cfg.hidden_size, mid + 1, bias=False, device=model.lm_head.weight.device,
                                      dtype=model.lm_head.weight.dtype)
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head = _grown(model.lm_head, mid + 1)
        cfg.vocab_size = mid + 1
        cfg.extra["vocab_size"] = mid + 1
    if added or mid >= old:
        first = min(mid, old)  # rows [first, mid] are new
        with torch.no_grad():
            for w in {id(t): t for t in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
                w[first : mid + 1] = w[:first].mean(0)
    return mid


def _grown(layer: nn.Embedding | nn.Linear, rows: int) -> nn.Module:
    """A copy of an embedding / bias-free linear layer with `rows` output rows (extra rows zero,
    set by the caller)."""
    w = layer.weight
    new = (nn.Embedding(rows, w.shape[1], device=w.device, dtype=w.dtype) if isinstance(layer, nn.Embedding)
           else nn.Linear(w.shape[1], rows, bias=False, device=w.device, dtype=w.dtype))
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: w.shape[0]] = w
    new.weight.requires_grad_(w.requires_grad)
    return new
