"""Autoregressive decoding over the model core: one token per forward, static KV cache.

The reference every other decoder is measured against: its greedy tokens are the ones lossless
decoders must reproduce, and its tokens/s is the denominator of every speedup. Written over B rows
(`tidar_bench.engine`; batch 1 is B = 1). With `compile=on` (the default where torch.compile works:
`auto`) it is gpt-fast's decode loop: the 1-token step of all B rows is one compiled graph over the
static cache (CUDA graphs on GPU), greedy decoding takes the argmax inside the graph, the positions
live on the device and are advanced there, and on CUDA at batch 1 the next step is launched before
the previous token is read back, so the host never waits for the GPU inside the loop (the one extra
step after a stop is simply never committed)."""

from __future__ import annotations

import torch

from tidar_bench.compiled import steps_for
from tidar_bench.decoding import next_token
from tidar_bench.engine import Row, RowDecoder, Step
from tidar_bench.registry import DecoderContext, register_decoder


class ARDecoder(RowDecoder):
    name = "ar"
    lossless = True

    def __init__(self, model, tokenizer=None, *, compile: str = "off"):
        self.model = model
        self.tokenizer = tokenizer
        self.steps = steps_for(model, model, compile)  # sampling: the step returns logits
        # greedy: the step returns the next tokens themselves (argmax inside the compiled graph, as
        # in gpt-fast's decode_one_token), so the loop runs no eager op per token but the host copy
        self.greedy_steps = steps_for(model, self._greedy_forward, compile)

    def options(self) -> dict:
        return {"compile": self.steps.compiled}

    def runners(self) -> list:
        return [self.steps, self.greedy_steps]

    def _greedy_forward(self, tok, pos, mask=None, cache=None, start=None, kv_len=None):
        return self.model(tok, pos, mask=mask, cache=cache, start=start, kv_len=kv_len).logits[:, -1].argmax(-1).view(-1, 1)

    def begin(self, batch: int, config) -> None:
        dev = self.model.device
        self._sp = config.sampling
        # device state of the B rows: the token each feeds next and its position (== its cache slot)
        self._tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self._ahead = dev.type == "cuda" and batch == 1 and self._sp.greedy  # step i+1 launched before token i is read
        self._host = torch.empty(batch, dtype=torch.long, pin_memory=self._ahead)
        self._copied = torch.cuda.Event() if self._ahead else None

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> Step:
        ids = torch.tensor([prompt], device=self.model.device)
        logits = self.model(ids, cache=caches["target"], logits_index=slice(-1, None)).logits[0, -1]
        tok = next_token(logits, self._sp, row.gen)
        self._tok[row.slot, 0] = tok
        self._pos[row.slot] = len(prompt)
        if self._ahead:
            row.state = "prefill"  # its token is read back by the first step, after that step is launched
            return Step([], fed=len(prompt), advance=len(prompt))
        return Step([int(tok)], fed=len(prompt), advance=len(prompt))

    def step(self, rows: list[Row | None], caches: dict) -> list[Step | None]:
        sp, cache = self._sp, caches["target"]
        starts = [r.length if r is not None else 0 for r in rows]
        if None in rows:  # an empty slot (no prompt left to refill it) stays at slot 0, as its start says:
            self._pos[[s for s, r in enumerate(rows) if r is None]] = 0  # else it drifts past window and cache
        if self._ahead:
            row = rows[0]
            self._host.copy_(self._tok.view(-1), non_blocking=True)
            self._copied.record()
            nxt = self.greedy_steps(self._tok, self._pos.view(-1, 1), cache=cache, start=self._pos, starts=starts)
            self._copied.synchronize()  # waits for the copy only, not for the step just launched
            self._pos += 1
            self._tok = nxt
            # the token read now was made by the previous step's forward (the prefill's: booked there)
            first, row.state = row.state == "prefill", None
            return [Step([int(self._host[0])], fed=1, accepted=1, advance=1, forwards=0 if first else 1)]
        if sp.greedy:
            nxt = self.greedy_steps(self._tok, self._pos.view(-1, 1), cache=cache, start=self._pos, starts=starts)
        else:
            logits = self.steps(self._tok, self._pos.view(-1, 1), cache=cache, start=self._pos, starts=starts).logits[:, -1]
            nxt = torch.stack([next_token(logits[s], sp, r.gen) if r is not None else logits.new_zeros((), dtype=torch.long)
                               for s, r in enumerate(rows)]).view(-1, 1)
        self._pos += 1
        self._tok = nxt
        toks = nxt.view(-1).tolist()
        return [Step([toks[s]], fed=1, accepted=1, advance=1) if row is not None else None
                for s, row in enumerate(rows)]


@register_decoder("ar", help="autoregressive, one token per forward (our model core, static KV cache; "
                             "compile=auto|on|off: gpt-fast style compiled step)")
def build(ctx: DecoderContext, *, compile: str = "auto") -> ARDecoder:
    return ARDecoder(ctx.model, ctx.tokenizer, compile=compile)
