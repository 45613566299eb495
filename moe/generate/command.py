"""`moe generate`: a checkpoint and its tokenizer loaded, every option checked before anything
is written, then the text (or the routing view) and the --html / --json files. The generation
itself is moe.generate.generation.generate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from moe.config import ConfigError
from moe.generate.generation import Generation, check_options, generate

# ----------------------------------------------------------------------------- checkpoints


def check_device(device: str, flag: str = "--device") -> str:
    """The torch device `device` names (auto: CUDA when present, else the CPU); one line when it
    is no device of this machine (a typo, `tpu`, `cuda:3` on a one-GPU machine)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    choices = "choose auto, cpu, cuda or cuda:N"
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {device!r}: not a device name; {choices}") from None
    if d.type == "cpu":
        return device
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{flag} {device}: no CUDA device is available")
        if d.index is not None and d.index >= n:
            raise ConfigError(f"{flag} {device}: this machine has {n} CUDA device(s), "
                              f"cuda:0 to cuda:{n - 1}")  # fmt: skip
        return device
    if d.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ConfigError(f"{flag} {device}: not a device this command runs on here; {choices}")


# ----------------------------------------------------------------------------- the command


def _check_out_file(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a directory; give a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {p}: directory {p.parent} does not exist")


def generate_command(
    checkpoint: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    domain: str | None = None,
    show_routing: bool = False,
    layer: int | None = None,
    html: str | None = None,
    json_path: str | None = None,
    color: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    experts: list[str] | None = None,
    expert_top_k: int | None = None,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] | None = None,
) -> Generation:
    """`moe generate`: everything checked before any output is written; then the text (or the
    routing view) through `out`, notes through `err`, and the --html / --json files.
    `experts` / `expert_top_k`: an MoE with only these experts, or another top-k, in memory
    (moe.model.expert_subset)."""
    from moe.generate import routing_view
    from moe.io.checkpoint import atomic_write_text, load_model, write_json
    from moe.io.output import claim

    if err is None:

        def err(s: str) -> None:
            print(s, file=sys.stderr)

    if prompt is not None and prompt_file is not None:
        raise ConfigError("give the prompt as --prompt or --prompt-file, not both")
    check_options(max_new_tokens, temperature, top_k, top_p)
    _check_out_file(html, "--html")
    _check_out_file(json_path, "--json")
    if color not in ("auto", "always", "never"):
        raise ConfigError(f"--color must be auto, always or never, got {color!r}")
    device = check_device(device)
    if prompt_file is not None:
        try:
            text: str | bytes = Path(prompt_file).read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"--prompt-file {prompt_file} not found") from None
        except (IsADirectoryError, PermissionError) as e:
            raise ConfigError(f"--prompt-file {prompt_file}: {e.strerror}") from None
    else:
        # command-line text as the bytes that were typed (os.fsencode undoes the surrogate
        # escapes Python uses for argv bytes that are not UTF-8)
        text = os.fsencode(prompt) if prompt is not None else b""

    # the --html/--json files are claimed (moe/io/output.py) before the model is even loaded
    with claim([html, json_path], [checkpoint, prompt_file, tokenizer]):
        model, _, tok, ckpt_dir = load_model(checkpoint, tokenizer=tokenizer, device=device,
                                             require_tokenizer=True)  # fmt: skip
        model.eval()
        if experts is not None or expert_top_k is not None:
            from moe.model.expert_subset import plan_experts, restrict_experts

            kept, k, notes = plan_experts(model.config, keep=experts, top_k=expert_top_k,
                                          where=str(ckpt_dir), keep_flag="--experts",
                                          k_flag="--expert-top-k")  # fmt: skip
            restrict_experts(model, kept, k)
            for note in notes:
                err(f"note: {note}")
        m = model.config.moe
        if domain is not None and domain not in m.experts:
            what = f"experts: {', '.join(m.experts)}" if m.experts else "it is a dense model"
            raise ConfigError(f"--domain {domain!r} is not an expert of {ckpt_dir} ({what})")
        if (show_routing or html or layer is not None) and not m.experts:
            flag = "--show-routing" if show_routing else "--html" if html else "--layer"
            raise ConfigError(f"{flag}: {ckpt_dir} is a dense model, it has no routing to show")
        if layer is not None and not 0 <= layer < model.config.n_layers:
            last = model.config.n_layers - 1
            raise ConfigError(f"--layer {layer}: the model has layers 0..{last}")
        if domain is not None and m.router != "domain":
            err(f"note: --domain has no effect: the router of {ckpt_dir} is learned, it picks "
                "experts")
        g = generate(
            model, tok, text, max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, domain=domain,
        )  # fmt: skip
        if show_routing:
            use_color = color == "always" or (
                color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            )
            out(routing_view.render_terminal(g, layer=layer, color=use_color, source=str(ckpt_dir)))
        else:
            out(g.prompt + g.text)
        if g.seed is not None:
            err(f"seed {g.seed} (pass --seed {g.seed} to repeat)")
        err(g.note())
        if html:
            atomic_write_text(html, routing_view.render_html(g, source=str(ckpt_dir), layer=layer))
            err(f"wrote {html}")
        if json_path:
            write_json(json_path, {"checkpoint": str(ckpt_dir), **g.to_dict()})
            err(f"wrote {json_path}")
        return g
