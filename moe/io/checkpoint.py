"""Checkpoint directories: `model.safetensors`, `config.json` (model config), `meta.json` (lineage).

A checkpoint is written into a temporary sibling directory and renamed into place when complete,
so a kill at any moment leaves the old checkpoint or the new one, never a half-written one. The
meta records the sha256 of each weights file and loading verifies it. Nothing is ever unpickled.

meta.json fields:
    format        "moe-forge/1"
    id            short unique id of this checkpoint
    parents       ids of the checkpoints it was made from (training init, merge inputs, branches)
    base_id       id of the dense seed model the lineage started from (own id for a seed)
    family        expert family: which expert a fine-tune belongs to (e.g. "code"), or null
    domain        domain the checkpoint was trained on (null for mixed streams)
    kind          dense | moe | branch | merge | ...
    tokens_seen   training tokens over the whole lineage
    train_flops   training FLOPs over the whole lineage
    recipe        the resolved recipe (or merge config) that produced it
    tokenizer     {kind: byte | hf, sha256: content hash, ...}; an hf tokenizer's files are in
                  the checkpoint's tokenizer/ directory
    sha256        {filename: hex digest} of each weights file
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe.config import ConfigError, ModelConfig, model_config_from_dict, to_dict

if TYPE_CHECKING:
    from moe.model.transformer import Transformer

FORMAT = "moe-forge/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated, corrupted or incompatible."""


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """The one way a file is written: the block writes the temporary name it is given (beside
    `path`), which is then fsynced and renamed onto `path`; readers see the old file or the new
    one, never half of one. An error or a signal inside the block removes the temporary file and
    leaves `path` as it was. `suffix` ends the temporary name (np.savez wants `.npz`)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{new_id()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through `staged_file`."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)


def make_meta(**kw: Any) -> dict[str, Any]:
    """A meta dict with every field present (defaults for those not given)."""
    meta = dict(
        format=FORMAT,
        id=new_id(),
        parents=[],
        base_id=None,
        family=None,
        domain=None,
        kind="dense",
        tokens_seen=0,
        train_flops=0.0,
        recipe=None,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    meta.update(kw)
    if meta["base_id"] is None:
        meta["base_id"] = meta["id"]
    return meta


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig | dict,
    meta: dict[str, Any],
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write a checkpoint directory atomically. Refuses an existing one unless `overwrite`.

    `tokenizer` (a tokenizer object, or a directory of tokenizer files carried from another
    checkpoint) is written into `tokenizer/` (none for the byte tokenizer) and recorded in
    meta.json as `tokenizer` (kind and content hash); None records nothing."""
    path = Path(path)
    recover(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"checkpoint {path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{new_id()}")
    tmp.mkdir()
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        cfg = config if isinstance(config, dict) else to_dict(config)
        meta = dict(meta)
        if tokenizer is not None:
            from moe.data.tokenizer import write_tokenizer

            meta["tokenizer"] = write_tokenizer(tokenizer, tmp)
        meta["sha256"] = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        for name, obj in ((CONFIG, cfg), (META, meta)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    _check_dir(path)
    try:
        with open(path / META, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path / META}: corrupted JSON ({e.msg if hasattr(e, 'msg') else e})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / META}: not a moe-forge checkpoint meta (format != {FORMAT})"
        )
    return meta


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    _check_dir(path)
    try:
        with open(path / CONFIG, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG}: corrupted JSON ({e})") from None
    try:
        return model_config_from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {str(e).removeprefix('config.json: ')}") from None


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a fully written directory `tmp` to `path`, replacing what is there.

    A directory cannot be renamed over a non-empty one, so an existing `path` is first moved
    aside to `.NAME.old-PID`; a kill between the two renames leaves that complete old version,
    which `recover` puts back.
    """
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def recover(path: str | os.PathLike) -> None:
    """Finish an overwrite that a kill interrupted between its two renames.

    `save_checkpoint` moves the old checkpoint aside to `.NAME.old-PID`, renames the complete new
    one into place, then deletes the old one. Killed in between, the old version (complete) is
    put back; killed after, the leftover is removed. Temporary directories of killed writes are
    removed too. Either way `path` then holds a complete checkpoint, old or new, or nothing.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    for i, old in enumerate(olds):
        if not path.exists() and i == len(olds) - 1:
            os.replace(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_dir(path: Path) -> None:
    recover(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: a checkpoint is a directory holding {WEIGHTS}, {CONFIG}, {META}"
        )
    for name in (WEIGHTS, CONFIG, META):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint, {name} is missing")


def load_state_dict(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    path = Path(path)
    meta = read_meta(path)
    if verify:
        want = (meta.get("sha256") or {}).get(WEIGHTS)
        if want is None:
            raise CheckpointError(f"{path / META}: no sha256 recorded for {WEIGHTS}")
        got = sha256_file(path / WEIGHTS)
        if got != want:
            raise CheckpointError(
                f"{path / WEIGHTS}: sha256 mismatch (file is corrupted or truncated; "
                f"expected {want[:12]}..., got {got[:12]}...)"
            )
    try:
        return load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path / WEIGHTS}: cannot read weights ({str(e).splitlines()[0]})"
        ) from None


def load_checkpoint(path: str | os.PathLike, verify: bool = True, check: bool = True) -> Checkpoint:
    """Load a checkpoint directory (weights verified against meta.json's sha256, and their names
    and shapes against config.json unless `check` is off: see `check_weights`)."""
    path = Path(path)
    meta = read_meta(path)
    config = read_config(path)
    state_dict = load_state_dict(path, verify)
    if check:
        check_weights(state_dict, config, path / CONFIG)
    return Checkpoint(path=path, state_dict=state_dict, config=config, meta=meta)


class LoadedModel(NamedTuple):
    """What `load_model` returns."""

    model: Transformer  # the checkpoint's weights, in training mode (call .eval() to infer)
    meta: dict  # meta.json: lineage, tokens seen, training FLOPs, recipe
    tokenizer: Any  # the tokenizer it carries (ByteTokenizer | HFTokenizer), or None
    path: Path  # the checkpoint directory (a run directory resolves to its model/)


def load_model(path: str | os.PathLike, verify: bool = True, *, tokenizer: str | None = None,
               require_tokenizer: bool = False, flag: str = "--tokenizer PATH",
               device: str | torch.device | None = None) -> LoadedModel:  # fmt: skip
    """The one way a checkpoint (or run) directory becomes a model: weights verified against
    meta.json's sha256 and checked against config.json (names and shapes) before any is loaded.

    tokenizer: a tokenizer spec for a checkpoint imported without one (refused when it differs
    from the one the checkpoint carries). A checkpoint that carries none gives `tokenizer=None`,
    or, with `require_tokenizer`, the one-line error naming `flag` (how the user passes one).
    device: where the model goes (default: stays on the CPU)."""
    from moe.data.tokenizer import carried_tokenizer, checkpoint_tokenizer
    from moe.model.transformer import Transformer

    ck = load_checkpoint(resolve_checkpoint(path), verify)
    model = Transformer.from_state(ck.config, ck.state_dict)
    vocab = ck.config.vocab_size
    tok = None
    given = tokenizer not in (None, "")
    if require_tokenizer or given or carried_tokenizer(ck.path, vocab) is not None:
        tok = checkpoint_tokenizer(ck.path, vocab, tokenizer, flag)
    return LoadedModel(model if device is None else model.to(device), ck.meta, tok, ck.path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory holding one at `model/`."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    if is_checkpoint(p / "model"):
        return p / "model"
    if not p.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {p}")
    raise CheckpointError(f"{p} is neither a checkpoint nor a run directory holding model/")


# ---------------------------------------------------------------------------- config vs weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model of `config` holds (built on the meta device: no
    memory is allocated)."""
    import warnings

    from moe.model.transformer import Transformer

    with torch.device("meta"), warnings.catch_warnings():
        # a model whose every head was pruned has zero-element tensors: nothing to warn about
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _dim_fields(name: str, c: ModelConfig) -> tuple[str, ...]:
    """The config field behind each dimension of tensor `name` (a resolved config `c`)."""
    q, kv = "n_heads x head size", "n_kv_heads x head size"
    fe = "moe.expert_ffn_dim" if c.moe.expert_ffn_dim else "ffn_dim"
    leaf = name.split(".", 2)[2] if name.startswith("layers.") else name
    table = {
        "tok_emb.weight": ("vocab_size", "dim"), "lm_head.weight": ("vocab_size", "dim"),
        "norm.weight": ("dim",), "attn_norm.weight": ("dim",), "ffn_norm.weight": ("dim",),
        "attn.wq.weight": (q, "dim"), "attn.wk.weight": (kv, "dim"),
        "attn.wv.weight": (kv, "dim"), "attn.wo.weight": ("dim", q),
        "attn.wq.bias": (q,), "attn.wk.bias": (kv,), "attn.wv.bias": (kv,),
        "ffn.w1.weight": ("ffn_dim", "dim"), "ffn.w3.weight": ("ffn_dim", "dim"),
        "ffn.w2.weight": ("dim", "ffn_dim"),
        "ffn.w1": ("moe.experts", "dim", fe), "ffn.w3": ("moe.experts", "dim", fe),
        "ffn.w2": ("moe.experts", fe, "dim"), "ffn.router.weight": ("moe.experts", "dim"),
        "ffn.score_bias": ("moe.experts",),
        "ffn.shared.w1.weight": ("moe.shared_expert_ffn_dim", "dim"),
        "ffn.shared.w3.weight": ("moe.shared_expert_ffn_dim", "dim"),
        "ffn.shared.w2.weight": ("dim", "moe.shared_expert_ffn_dim"),
    }  # fmt: skip
    return table.get(leaf, ())


def _disagreement(field_: str, got: int, c: ModelConfig) -> str:
    """`FIELD is X but the weights ...` for one dimension that differs."""
    hs = c.head_size()
    size = "head_dim" if c.head_dim is not None else "dim / n_heads"
    says = {
        "dim": (f"dim is {c.dim}", f"are {got} wide"),
        "vocab_size": (f"vocab_size is {c.vocab_size}", f"have {got} token rows"),
        "ffn_dim": (f"ffn_dim is {c.ffn_dim}", f"have {got} FFN neurons"),
        "moe.expert_ffn_dim": (f"moe.expert_ffn_dim is {c.moe.expert_ffn_dim}",
                               f"have {got} neurons per expert"),
        "moe.experts": (f"moe.experts lists {len(c.moe.experts)} experts", f"have {got}"),
        "moe.shared_expert_ffn_dim": (
            f"moe.shared_expert_ffn_dim is {c.moe.shared_expert_ffn_dim}",
            f"have a shared expert of {got} neurons"),
        "n_heads x head size": (
            f"n_heads x head size ({size}) is {c.n_heads} x {hs} = {c.n_heads * hs}",
            f"have {got} query channels"),
        "n_kv_heads x head size": (
            f"n_kv_heads x head size ({size}) is {c.n_kv_heads} x {hs} = {c.n_kv_heads * hs}",
            f"have {got} key/value channels"),
    }  # fmt: skip
    cfg_says, weights = says[field_]
    return f"{cfg_says} but the weights {weights}"


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() else None


def _missing_or_extra(missing: list[str], extra: list[str], layers: set[int],
                      c: ModelConfig) -> str:
    """Why tensors are missing or unexpected (`layers`: the layer indices the weights hold): the
    config field responsible, when one is."""
    if layers != set(range(c.n_layers)) and layers == set(range(len(layers))):
        return f"n_layers is {c.n_layers} but the weights have {len(layers)} layers"
    def has(*suffixes: str) -> str | None:
        """"have" / "have no" when a tensor ending so is unexpected / missing, else None."""
        if any(k.endswith(suffixes) for k in extra):
            return "have"
        return "have no" if any(k.endswith(suffixes) for k in missing) else None

    if has("ffn.w1") and has("ffn.w1.weight"):
        if c.moe.experts:
            return (f"moe.experts lists {len(c.moe.experts)} experts but the weights hold a "
                    "dense FFN (layers.N.ffn.w1.weight)")  # fmt: skip
        return ("moe.experts is empty (a dense model) but the weights hold an MoE FFN "
                "(layers.N.ffn.w1)")  # fmt: skip
    if w := has("lm_head.weight"):
        return f"tie_embeddings is {str(c.tie_embeddings).lower()} but the weights {w} lm_head"
    if w := has("attn.wq.bias", "attn.wk.bias", "attn.wv.bias"):
        return f"qkv_bias is {str(c.qkv_bias).lower()} but the weights {w} q/k/v biases"
    if w := has("ffn.router.weight"):
        return (f"moe.router is {c.moe.router} but the weights have "
                f"{'a' if w == 'have' else 'no'} learned router")  # fmt: skip
    if w := has("shared_gate.weight"):
        return (f"moe.shared_expert_gate is {str(c.moe.shared_expert_gate).lower()} but the "
                f"weights have {'a' if w == 'have' else 'no'} shared expert gate")  # fmt: skip
    if w := has("ffn.score_bias"):
        return (f"moe.bias_update_rate is {c.moe.bias_update_rate} but the weights have "
                f"{'an' if w == 'have' else 'no'} aux-free balancing bias (ffn.score_bias)")
    if w := has("shared.w1.weight", "shared.w2.weight", "shared.w3.weight"):
        return (f"moe.shared_expert_ffn_dim is {c.moe.shared_expert_ffn_dim} but the weights "
                f"have {'a' if w == 'have' else 'no'} shared expert")  # fmt: skip
    parts = []
    if missing:
        parts.append(f"the weights lack {missing[0]}"
                     + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        parts.append(f"the weights hold {extra[0]}"
                     + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                     + " that the config does not make")
    return "; ".join(parts)


def check_weights(
    state_dict: Mapping[str, torch.Tensor | tuple[int, ...]], config: ModelConfig,
    where: str | os.PathLike,
) -> None:
    """Refuse weights whose names or shapes are not those a model of `config` holds, naming the
    config field that disagrees: `where: dim is 64 but the weights are 32 wide (...)`. The values
    are tensors, or their shapes (a file's header, read without loading the tensors)."""
    try:
        c = config.resolved()
        want = expected_shapes(c)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        layers = {i for i in map(_layer, state_dict) if i is not None}
        raise CheckpointError(f"{where}: {_missing_or_extra(missing, extra, layers, c)}")
    for name, shape in want.items():
        v = state_dict[name]
        got = tuple(v.shape if isinstance(v, torch.Tensor) else v)
        if got == shape:
            continue
        detail = f"{name} has shape {_fmt(got)}, config says {_fmt(shape)}"
        fields_ = _dim_fields(name, c)
        if len(got) == len(shape) == len(fields_):
            i = next(i for i in range(len(got)) if got[i] != shape[i])
            raise CheckpointError(f"{where}: {_disagreement(fields_[i], got[i], c)} ({detail})")
        raise CheckpointError(f"{where}: the weights do not match the config ({detail})")


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META).is_file() and (p / WEIGHTS).is_file()
