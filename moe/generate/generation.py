"""Text generation from any checkpoint, with a record of which experts the router chose per token.

    from moe.generate import generate
    g = generate(model, tokenizer, "def main(", max_new_tokens=64)
    g.text          # the continuation
    g.ids           # prompt + new token ids
    g.routing       # RoutingRecord (MoE models): expert ids and weights, per layer and token

Decoding runs with a KV cache (`Transformer.new_cache`): the prompt is one forward pass, then
every new token is one position. Greedy unless a sampling option (temperature, top_k, top_p,
seed) is given; sampling draws from a generator seeded with `seed` (a fresh seed, recorded in the
result, when none is given), so a seed repeats its text. Generation stops at the tokenizer's EOS,
after `max_new_tokens`, or when the model's context is full (`Generation.stop` says which).

Routing record: for every token, prompt and generated, and every MoE layer, the top-k expert ids
(largest weight first) and their weights, exactly what the router chose when the token was fed
to the model. The last generated token is fed once more than decoding needs, so that it has a
record too. Views of the record: `moe.generate.routing_view`.

Legend: L MoE layers, T tokens (prompt + generated), K experts per token, V vocabulary.
"""

from __future__ import annotations

import codecs
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.config import ConfigError

STOPS = ("eos", "max_new_tokens", "context")
# how special tokens look in views of the text (they decode to nothing)
SPECIAL_MARKS = {"bos": "\u2402", "eos": "\u2403", "pad": "\u2400"}  # ␂ ␃ ␀


# ----------------------------------------------------------------------------- records


@dataclass
class RoutingRecord:
    """The router's choices for every token: expert_ids/weights (L, T, K), largest weight first."""

    experts: list[str]  # expert names, by index
    router: str  # learned | domain
    top_k: int
    layers: list[int]  # model layer index of each recorded (MoE) layer
    expert_ids: torch.Tensor  # (L, T, K) int64
    weights: torch.Tensor  # (L, T, K) float32

    @property
    def top(self) -> torch.Tensor:
        """(L, T): the expert with the largest weight for each token in each layer."""
        return self.expert_ids[..., 0]

    def share(self, tokens: slice = slice(None)) -> torch.Tensor:
        """(L, E): fraction of the tokens (default: all) whose largest weight went to expert e."""
        top = self.top[:, tokens]
        E = len(self.experts)
        counts = torch.stack([torch.bincount(row, minlength=E) for row in top]).double()
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experts": list(self.experts),
            "router": self.router,
            "top_k": self.top_k,
            "layers": [
                {
                    "layer": li,
                    "expert_ids": self.expert_ids[i].tolist(),
                    "weights": [[round(w, 6) for w in row] for row in self.weights[i].tolist()],
                }
                for i, li in enumerate(self.layers)
            ],
        }


@dataclass
class Generation:
    """What `generate` returns."""

    ids: list[int]  # prompt + generated token ids
    prompt_len: int  # how many of `ids` are the prompt
    prompt: str  # the prompt, decoded
    text: str  # the generated continuation, decoded (special tokens dropped)
    pieces: list[str]  # display text of every token ("" for a byte inside a character)
    specials: list[str | None]  # "bos" / "eos" / "pad" for special tokens, else None
    stop: str  # eos | max_new_tokens | context
    max_seq_len: int
    routing: RoutingRecord | None = None  # None for a dense model
    sampling: dict[str, Any] = field(default_factory=dict)  # {"greedy": True} or the options
    seed: int | None = None  # the sampling seed used (None when greedy)
    domain: str | None = None  # the domain given to a domain router
    seconds: float = 0.0  # wall time of the decoding loop (prefill included)

    @property
    def new_ids(self) -> list[int]:
        return self.ids[self.prompt_len :]

    def note(self) -> str:
        """One line: how generation ended."""
        n = len(self.new_ids)
        if self.stop == "eos":
            why = "stopped at EOS"
        elif self.stop == "context":
            why = f"stopped: the model's context ({self.max_seq_len} tokens) is full"
        else:
            why = "reached --max-new-tokens"
        rate = f", {n / self.seconds:.1f} tokens/s" if self.seconds > 0 else ""
        return f"{why} after {n} new token{'s' if n != 1 else ''}{rate}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "ids": list(self.ids),
            "prompt_tokens": self.prompt_len,
            "tokens": list(self.pieces),
            "specials": list(self.specials),
            "stop": self.stop,
            "sampling": dict(self.sampling),
            "seed": self.seed,
            "domain": self.domain,
            "routing": self.routing.to_dict() if self.routing is not None else None,
        }


# ----------------------------------------------------------------------------- tokenizers


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    return str(x).encode("utf-8", errors="surrogateescape")


def _as_text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _is_byte_tokenizer(tok: Any) -> bool:
    from moe.data.tokenizer import ByteTokenizer

    return isinstance(tok, ByteTokenizer)


def _is_own_tokenizer(tok: Any) -> bool:
    """moe-forge's tokenizers (byte, or a Hugging Face one run through `tokenizers`): their
    encode adds no specials, and training documents all start with BOS."""
    from moe.data.tokenizer import ByteTokenizer, HFTokenizer

    return isinstance(tok, (ByteTokenizer, HFTokenizer))


def special_id(tok: Any, name: str) -> int | None:
    """bos / eos / pad / unk id of our tokenizers (`eos_id`), a transformers tokenizer
    (`eos_token_id`) or our HFTokenizer wrapper around one; None when it has none."""
    for obj in (tok, getattr(tok, "_tok", None)):
        if obj is None:
            continue
        for attr in (f"{name}_id", f"{name}_token_id"):
            v = getattr(obj, attr, None)
            if isinstance(v, int):
                return v
    return None


def encode_prompt(
    tokenizer: Any, prompt: str | bytes | Sequence[int] | torch.Tensor, add_bos: bool
) -> list[int]:
    """Token ids of the prompt: text through the tokenizer, or ids given as they are."""
    if isinstance(prompt, torch.Tensor):
        ids = [int(i) for i in prompt.reshape(-1).tolist()]
    elif isinstance(prompt, (str, bytes)):
        if isinstance(prompt, bytes) and not _is_byte_tokenizer(tokenizer):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"the prompt is not UTF-8 text ({e.reason} at byte {e.start}); the "
                    "checkpoint's tokenizer reads text (only the byte tokenizer takes any bytes)"
                ) from None
        try:
            ids = [int(i) for i in tokenizer.encode(prompt)]
        except Exception as e:  # tokenizers raise many types (UnicodeEncodeError, TypeError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"the tokenizer cannot encode the prompt: {first}") from None
        unk = special_id(tokenizer, "unk")
        if unk is not None and unk in ids:
            raise ConfigError(
                f"the tokenizer cannot encode the prompt: {ids.count(unk)} piece(s) of it are "
                "unknown to its vocabulary (they would all read as the unknown token)"
            )
    else:
        ids = [int(i) for i in prompt]
    bos = special_id(tokenizer, "bos")
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> tuple[list[str], list[str | None]]:
    """Display text of each token and which tokens are specials.

    Each token's bytes are found by decoding it after a few tokens of context (so tokenizers that
    treat a word's first piece differently still give the right text), then fed to an incremental
    UTF-8 decoder: a character made of several byte tokens appears at its last byte, the earlier
    ones get "". Special tokens decode to nothing and are marked in `specials` instead.
    """
    names = {}
    for name in ("pad", "eos", "bos"):  # bos last: it wins where ids coincide
        i = special_id(tokenizer, name)
        if i is not None:
            names[i] = name
    if _is_byte_tokenizer(tokenizer):
        raw = [bytes([i]) if 0 <= i < 256 else b"" for i in ids]
    else:
        raw, prev = [], b""
        for i in range(len(ids)):
            lo = max(0, i - 4)
            cur = _as_bytes(tokenizer.decode(list(ids[lo : i + 1])))
            prev = _as_bytes(tokenizer.decode(list(ids[lo:i]))) if i > lo else b""
            if cur.startswith(prev):
                raw.append(cur[len(prev) :])
            else:
                raw.append(_as_bytes(tokenizer.decode([ids[i]])))
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, specials = [], []
    for i, b in zip(ids, raw):
        sp = names.get(i) if not b else None
        specials.append(sp)
        pieces.append(dec.decode(b) if b else "")
    tail = dec.decode(b"", final=True)
    if tail and pieces:
        pieces[-1] += tail
    return pieces, specials


# ----------------------------------------------------------------------------- sampling


def check_options(
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
) -> None:
    """Refuse sampling options that select nothing (one-line ConfigError)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(
            f"temperature must be a positive number when sampling, got {temperature} (for greedy "
            "decoding leave out temperature, top-k, top-p and seed)"
        )
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ConfigError(f"top-p must be in (0, 1], got {top_p}")


class Sampler:
    """Next token from the last position's logits (V,): argmax, or a draw after temperature,
    top-k and top-p (in that order, as transformers applies them)."""

    def __init__(
        self,
        greedy: bool,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ):
        self.greedy, self.temperature, self.top_k, self.top_p = greedy, temperature, top_k, top_p
        self.generator = generator

    def __call__(self, logits_V: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits_V.argmax()
        logits = logits_V.double()
        # shifted so the largest is 0: a tiny temperature then sends the others to -inf (greedy
        # in the limit) instead of overflowing the largest to inf and the softmax to NaN; in
        # float64, where a temperature as small as 1e-320 is not rounded to 0
        logits = (logits - logits.max()) / self.temperature
        if self.top_k is not None and self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            probs, order = logits.softmax(-1).sort(descending=True)
            # drop a token when the more likely ones already reach top_p (the first never is)
            drop_sorted = probs.cumsum(-1) - probs > self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[0]


# ----------------------------------------------------------------------------- generation


def domain_input(model: torch.nn.Module, domain: str | None) -> torch.Tensor | None:
    """The `domain` tensor a domain-routed MoE needs (its expert index); None for other models,
    which route on their own (a domain given to them changes nothing)."""
    m = model.config.moe
    if not m.experts or m.router != "domain":
        return None
    if domain is None:
        raise ConfigError(
            "this MoE routes every token to its domain's expert: give the domain "
            f"(--domain), one of {', '.join(m.experts)}"
        )
    if domain not in m.experts:
        raise ConfigError(
            f"domain {domain!r} is not an expert of this model (experts: {', '.join(m.experts)})"
        )
    device = next(model.parameters()).device
    return torch.tensor([m.experts.index(domain)], device=device)


def _collect(out, rec: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    for layer, st in zip(rec, out.router_stats):
        layer.append((st["expert_ids"], st["weights"]))


def generate(
    model: torch.nn.Module,
    tokenizer: Any = None,
    prompt: str | bytes | Sequence[int] | torch.Tensor = "",
    max_new_tokens: int = 64,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    domain: str | None = None,
    add_bos: bool | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
) -> Generation:
    """Continue `prompt` with `model` (a moe.model.transformer.Transformer).

    tokenizer: anything with encode(text) -> ids and decode(ids) -> bytes or str (our byte
    tokenizer when None). prompt: text, or token ids used as they are. Sampling when any of
    temperature / top_k / top_p / seed is given, else greedy. domain: the expert of a
    domain-routed MoE (required there, ignored by other models). add_bos: put the tokenizer's
    BOS first (default: for moe-forge's own tokenizers, whose training documents all start with
    BOS; a transformers tokenizer's encode adds its specials itself).
    use_cache=False recomputes the whole sequence for every token (the reference the cache is
    tested against). Raises ConfigError for bad options or a prompt that does not fit.
    """
    from moe.data.tokenizer import ByteTokenizer

    if tokenizer is None:
        tokenizer = ByteTokenizer()
    check_options(max_new_tokens, temperature, top_k, top_p)
    sample = any(v is not None for v in (temperature, top_k, top_p, seed))
    cfg = model.config
    dom = domain_input(model, domain)
    if add_bos is None:
        add_bos = _is_own_tokenizer(tokenizer) and isinstance(prompt, (str, bytes))
    ids = encode_prompt(tokenizer, prompt, add_bos)
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer has no BOS token to start from")
    V, ctx = cfg.vocab_size, cfg.max_seq_len
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ConfigError(
            f"the prompt has token id {bad[0]}, outside the model's vocabulary of {V} (the "
            "tokenizer does not belong to this checkpoint)"
        )
    if len(ids) >= ctx:
        raise ConfigError(
            f"the prompt is {len(ids)} tokens, the model's context is {ctx}: it must be shorter "
            "to leave room for a new token"
        )
    eos = special_id(tokenizer, "eos") if stop_at_eos else None
    generator = None
    if sample:
        seed = secrets.randbits(32) if seed is None else int(seed)
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        sampling = {"greedy": False, "temperature": temperature or 1.0}
        sampling.update(top_k=top_k, top_p=top_p)
    else:
        seed, sampling = None, {"greedy": True}
    sampler = Sampler(not sample, temperature or 1.0, top_k, top_p, generator)

    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        new, stop, routing = _decode(model, ids, max_new_tokens, eos, sampler, dom, use_cache)
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    all_ids = ids + new
    pieces, specials = token_pieces(tokenizer, all_ids)
    prompt_b, full_b = _as_bytes(tokenizer.decode(ids)), _as_bytes(tokenizer.decode(all_ids))
    # the continuation as it reads after the prompt (tokenizers that drop a word's leading
    # space at the start of a decode would lose it in decode(new) alone)
    new_b = (
        full_b[len(prompt_b) :] if full_b.startswith(prompt_b) else _as_bytes(tokenizer.decode(new))
    )
    return Generation(
        ids=all_ids,
        prompt_len=len(ids),
        prompt=_as_text(prompt_b),
        text=_as_text(new_b),
        pieces=pieces,
        specials=specials,
        stop=stop,
        max_seq_len=ctx,
        routing=routing,
        sampling=sampling,
        seed=seed,
        domain=domain if dom is not None else None,
        seconds=seconds,
    )


@torch.inference_mode()
def _decode(model, ids, max_new, eos, sampler, dom, use_cache):
    """(new ids, stop reason, RoutingRecord or None)."""
    cfg = model.config
    device = next(model.parameters()).device
    limit = min(len(ids) + max_new, cfg.max_seq_len)  # total tokens we may end with
    moe_layers = [i for i, lay in enumerate(model.layers) if hasattr(lay.ffn, "last_stats")]
    rec: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in moe_layers]
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T0)
    cache = model.new_cache(1, limit) if use_cache else None
    out = model(x, domain=dom, cache=cache, last_logits_only=True)
    if use_cache:
        _collect(out, rec)
    new: list[int] = []
    while True:
        nxt = sampler(out.logits[0, -1])  # () on the model's device
        tok = int(nxt)
        new.append(tok)
        if eos is not None and tok == eos:
            stop = "eos"
        elif len(new) == max_new:
            stop = "max_new_tokens"
        elif len(ids) + len(new) >= limit:
            stop = "context"
        else:
            stop = None
        if use_cache:
            if stop is None or moe_layers:  # the last token is fed only for its routing record
                out = model(nxt.view(1, 1), domain=dom, cache=cache, last_logits_only=True)
                _collect(out, rec)
        else:
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
            if stop is None:
                out = model(x, domain=dom, last_logits_only=True)
        if stop is not None:
            break
    if moe_layers and not use_cache:
        out = model(x, domain=dom, last_logits_only=True)  # every token's routing, one pass
        _collect(out, rec)
    routing = None
    if moe_layers:
        m = cfg.moe
        ffn0 = model.layers[moe_layers[0]].ffn
        routing = RoutingRecord(
            experts=list(m.experts),
            router=m.router,
            top_k=ffn0.top_k,
            layers=moe_layers,
            expert_ids=torch.stack([torch.cat([i for i, _ in r]) for r in rec]).long().cpu(),
            weights=torch.stack([torch.cat([w for _, w in r]) for r in rec]).float().cpu(),
        )
    return new, stop, routing


# ----------------------------------------------------------------------------- report section


def samples_markdown(
    entries: Sequence[tuple[str, torch.nn.Module]],
    prompts: dict[str, str],
    tokenizer: Any = None,
    max_new_tokens: int = 48,
    domain_of: Callable[[str], str | None] | None = None,
    title: str = "Samples",
    level: int = 2,
) -> str:
    """A markdown section: for each domain's prompt, the greedy continuation by every model
    (`entries`: (label, model) in the order to show), and for MoE models a plain-text routing
    view (the expert with the largest weight per token and layer, and the share per expert).

    domain_of maps a prompt's domain to the domain given to domain-routed MoEs (default: the
    domain itself); a domain-routed MoE without an expert for it is noted, not run.
    """
    from moe.generate import routing_view

    domain_of = domain_of or (lambda d: d)
    h = "#" * level
    lines = [
        f"{h} {title}",
        "",
        f"Greedy continuation ({max_new_tokens} new tokens at most) of one fixed prompt per "
        "domain. Under each MoE's text, its routing: for every layer, a letter naming the expert "
        "that got the largest routing weight under each character (legend in the view); `▶` "
        "marks where the generated text starts.",
    ]
    for dom, prompt in prompts.items():
        lines += ["", f"{h}# {dom}", "", "Prompt:", "", _fence(prompt)]
        for label, model in entries:
            m = model.config.moe
            d = domain_of(dom)
            if m.experts and m.router == "domain" and d not in m.experts:
                lines += ["", f"**{label}**: no expert for domain {d!r}"]
                continue
            g = generate(model, tokenizer, prompt, max_new_tokens, domain=d)
            end = {"eos": " (stopped at EOS)", "context": " (context full)"}.get(g.stop, "")
            lines += ["", f"**{label}**{end}:", "", _fence(g.text)]
            if g.routing is not None:
                view = routing_view.render_plain(g, width=80)
                lines += ["", f"Routing of {label}:", "", _fence(view)]
    return "\n".join(lines) + "\n"


def _fence(text: str) -> str:
    """A fenced code block that no run of backticks in `text` can close."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip(chr(10))}\n{fence}"
