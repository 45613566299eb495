"""`MoEForgeLM`: an lm-evaluation-harness model over any moe-forge checkpoint (registered with
lm-eval as "moe-forge"). Import it through `moe.eval.harness` (`harness.MoEForgeLM` or
`harness.register()`), which turns a missing lm-eval into a one-line ConfigError; this module
imports lm-eval at its top.

Protocol: the one lm-eval's own Hugging Face model (`HFLM`) runs, so a checkpoint and its
`moe export` give the same numbers (tests/eval/test_harness.py holds this):
- Tokens: the checkpoint's tokenizer (moe.data.tokenizer), which adds no special tokens; with
  `add_bos_token=True` every context starts with BOS (moe-forge trains documents that start
  with it), as HFLM's `add_bos_token` does for tokenizers that add it.
- loglikelihood: TemplateLM's encoding (a context's trailing spaces move to the continuation; an
  empty context is the prefix token), then context + continuation cut from the left to
  `max_length` + 1 tokens; the continuation's log-probabilities summed, and whether each of its
  tokens is the argmax (`is_greedy`). Requests are sorted by length (longest first) and run
  `batch_size` at a time, right-padded (a causal model never reads the padding); the head runs
  only over the continuation's positions.
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` + `make_disjoint_window` with
  context_len=1 at `max_length`, prefix token = BOS, or EOS when the tokenizer has no BOS of its
  own (HFLM's `prefix_token_id`); a document's log-likelihood is the sum over its windows, all
  documents' windows batched together.
- generate_until: greedy, one request at a time with the model's KV cache; the context cut from
  the left to `max_length` - max_gen_toks; stops at EOS, after max_gen_toks, or once the text
  holds a stop string, and the text is cut before the first one. Sampling options in a task's
  generation_kwargs are not honoured (logged once).

A domain-routed MoE sends every sequence to the expert of `domain` (required for it); other
models route on their own and ignore `domain`, as `moe generate` does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from moe.config import ConfigError
from moe.model.moe_layer import domain_to_expert

log = logging.getLogger(__name__)
NAME = "moe-forge"  # the name lm-eval knows the model by (simple_evaluate(model=NAME))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEN_LENGTH_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens")  # lm-eval's aliases


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise ConfigError(f"{NAME} model: {name} must be a positive integer, got {value!r}")
    return n


@register_model(NAME)
class MoEForgeLM(TemplateLM):
    """lm-eval model over a moe-forge checkpoint (or run directory), or an in-memory
    `Transformer` with its tokenizer.

    Arguments (all usable from lm-eval's `model_args` string, e.g.
    `pretrained=runs/x,domain=code,batch_size=8`):
    pretrained: checkpoint or run directory (moe.io.checkpoint.load_model), or a Transformer.
    tokenizer: for a checkpoint imported without one, a tokenizer spec (as `moe eval
        --tokenizer`); for a Transformer, its tokenizer object (default: the byte tokenizer when
        the vocabulary is the byte vocabulary).
    domain: the expert every sequence goes to in a domain-routed MoE (ignored by other models).
    batch_size: loglikelihood requests per forward pass. device: default cuda when available.
    max_length: the context in tokens (default and at most the model's max_seq_len).
    max_gen_toks: generation length when a task's generation_kwargs give none (as HFLM: 256).
    dtype: float32 | bfloat16 | float16 (default: the weights' own).
    add_bos_token: start every context with BOS (default False, as HFLM over an export).
    max_batch_size: accepted (lm-eval passes it) and unused.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | os.PathLike | torch.nn.Module | None = None,
        domain: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        add_bos_token: bool = False,
        tokenizer: Any = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if pretrained is None or pretrained == "":
            raise ConfigError(f"{NAME} model: give the checkpoint (model_args pretrained=PATH)")
        if dtype not in (None, "", "auto") and dtype not in DTYPES:
            raise ConfigError(f"{NAME} model: dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint: Path | None = None
        if isinstance(pretrained, torch.nn.Module):
            model, tok = pretrained, tokenizer
            if tok is None:
                from moe.data.tokenizer import ByteTokenizer

                if model.config.vocab_size != ByteTokenizer.vocab_size:
                    raise ConfigError(f"{NAME} model: give the model's tokenizer (tokenizer=...)")
                tok = ByteTokenizer()
        else:
            from moe.io.checkpoint import load_model

            spec = None if tokenizer in (None, "") else str(tokenizer)
            loaded = load_model(pretrained, tokenizer=spec, require_tokenizer=True,
                                flag="model_args tokenizer=PATH")  # fmt: skip
            model, tok, self.checkpoint = loaded.model, loaded.tokenizer, loaded.path
        if dtype in DTYPES:
            model = model.to(DTYPES[dtype])
        self.model = model.to(dev).eval()
        self.tokenizer = tok
        self._device = dev
        ctx = int(model.config.max_seq_len)
        self._max_length = ctx if max_length in (None, "") else _positive_int(
            "max_length", max_length)  # fmt: skip
        if self._max_length > ctx:
            raise ConfigError(f"{NAME} model: max_length {self._max_length} is beyond the model's "
                              f"context (max_seq_len {ctx})")  # fmt: skip
        self.add_bos_token = bool(add_bos_token)
        self.domain = domain
        self._expert = self._expert_index(domain)
        self._warned_sampling = False

    def _expert_index(self, domain: str | None) -> int | None:
        """The expert index a domain-routed MoE is given (None for other models)."""
        m = self.model.config.moe
        if not m.experts or m.router != "domain":
            return None
        if domain in (None, ""):
            raise ConfigError(
                "this MoE routes every token to its domain's expert: give the domain "
                f"(model_args domain=NAME), one of {', '.join(m.experts)}"
            )
        idx = int(domain_to_expert([domain], list(m.experts))[0])
        if idx < 0:
            raise ConfigError(f"domain {domain!r} is not an expert of this model (experts: "
                              f"{', '.join(m.experts)})")  # fmt: skip
        return idx

    def _domain(self, batch: int) -> torch.Tensor | None:
        if self._expert is None:
            return None
        return torch.full((batch,), self._expert, dtype=torch.long, device=self._device)

    # ------------------------------------------------------------------ lm-eval's properties

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        # HFTokenizer.bos_id is its EOS when it has no BOS of its own: BOS, else EOS (as HFLM)
        return int(self.tokenizer.bos_id)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name)

    def get_model_info(self) -> dict[str, Any]:
        """What simple_evaluate records in results["config"]."""
        return {
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "domain": self.domain if self._expert is not None else None,
            "model_num_parameters": int(self.model.num_params()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
            "tokenizer": self.tokenizer_name,
        }

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:  # fmt: skip
        ids = [int(i) for i in self.tokenizer.encode(string)]
        if self.add_bos_token and add_special_tokens is not False:
            ids = [self.prefix_token_id] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        raw = self.tokenizer.decode(list(tokens))
        return raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:  # fmt: skip
        """requests: (cache key or None, context ids, continuation ids) -> (log-prob, greedy)."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ConfigError("a loglikelihood request has an empty context or continuation "
                                  "after tokenization")  # fmt: skip
            if len(cont) > self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens is longer than the "
                                  f"context ({self.max_length} tokens)")  # fmt: skip
            rows.append(((list(ctx) + list(cont))[-(self.max_length + 1) :][:-1], list(cont)))
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = self.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        for batch in tqdm(batches, disable=disable_tqdm, desc="moe-forge loglikelihood"):
            for i, res in zip(batch, self._score([rows[i] for i in batch])):
                out[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One batch: (input ids, continuation ids) whose last len(cont) inputs predict cont."""
        B, L = len(rows), max(len(inp) for inp, _ in rows)
        x = torch.zeros(B, L, dtype=torch.long)
        rows_idx, pos, targets = [], [], []
        for b, (inp, cont) in enumerate(rows):
            x[b, : len(inp)] = torch.tensor(inp)
            n = len(cont)
            rows_idx += [b] * n
            pos += range(len(inp) - n, len(inp))
            targets += cont
        x = x.to(self._device)
        hidden = self.model(x, domain=self._domain(B), return_hidden=True).hidden  # (B, L, D)
        h = hidden[torch.tensor(rows_idx), torch.tensor(pos)]  # (N, D)
        logp = F.linear(h, self.model.head_weight).float().log_softmax(-1)  # (N, V)
        tgt = torch.tensor(targets, device=logp.device)
        picked = logp.gather(1, tgt[:, None])[:, 0].double().cpu()
        hit = (logp.argmax(-1) == tgt).cpu()
        res, start = [], 0
        for _, cont in rows:
            n = len(cont)
            res.append((float(picked[start : start + n].sum()), bool(hit[start : start + n].all())))
            start += n
        return res

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):  # fmt: skip
                windows.append((None, ctx, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _gen_options(self, gen_kwargs: dict | None) -> tuple[list[str], int]:
        kw = dict(gen_kwargs or {})
        until = kw.get("until")
        stops = [until] if isinstance(until, str) else [str(s) for s in (until or [])]
        n = next((kw[k] for k in GEN_LENGTH_KEYS if kw.get(k) is not None), self.max_gen_toks)
        n = _positive_int("max_gen_toks", n)
        if n >= self.max_length:
            raise ConfigError(f"max_gen_toks {n} leaves no room for a context in the model's "
                              f"{self.max_length} tokens; lower it (the task's generation_kwargs "
                              "or model_args max_gen_toks=N)")  # fmt: skip
        sampling = kw.get("do_sample") or float(kw.get("temperature") or 0) > 0
        if sampling and not self._warned_sampling:
            log.warning("%s decodes greedily: the task's sampling options are not used", NAME)
            self._warned_sampling = True
        return [s for s in stops if s], n

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        res = []
        for req in tqdm(requests, disable=disable_tqdm, desc="moe-forge generate_until"):
            context, gen_kwargs = req.args
            stops, n = self._gen_options(gen_kwargs)
            ids = self.tok_encode(context, left_truncate_len=self.max_length - n)
            text = self._greedy(ids or [self.prefix_token_id], stops, n)
            res.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return res

    @torch.inference_mode()
    def _greedy(self, ids: list[int], stops: list[str], max_new: int) -> str:
        model, dom = self.model, self._domain(1)
        cache = model.new_cache(1, len(ids) + max_new)
        x = torch.tensor([ids], dtype=torch.long, device=self._device)
        logits = model(x, domain=dom, cache=cache, last_logits_only=True).logits
        new: list[int] = []
        while True:
            tok = int(logits[0, -1].argmax())
            if tok == self.eot_token_id:
                break
            new.append(tok)
            if len(new) >= max_new or (stops and any(s in self.tok_decode(new) for s in stops)):
                break
            step = torch.tensor([[tok]], dtype=torch.long, device=self._device)
            logits = model(step, domain=dom, cache=cache, last_logits_only=True).logits
        text = self.tok_decode(new)
        for s in stops:
            text = text.split(s)[0]
        return text
