"""Checkpoints: what a run saves to continue exactly, what inference loads, and a portable export.

1. The resumable checkpoint (``save_checkpoint``, ``restore``): model, EMA, optimizer, data-iterator
   and RNG state plus the run's configs, so ``train.py --resume`` continues bit-identically. One file
   read with ``weights_only=True``, or under FSDP2 a folder: the tensors in ``torch.distributed.checkpoint``
   (DCP) form, each process writing its own dim-0 shards, and the rest in ``meta.pt`` (``weights_only``).
   DCP records each tensor's global shape, so N processes may save and M resume (M = 1 without FSDP
   included); a one-file checkpoint resumes under FSDP too (each process takes its dim-0 chunk).
2. ``load_for_inference``: the EMA weights in a ``model.Denoiser`` with the layout and tokenizers
   (``Inference``), from a checkpoint, a sharded checkpoint or an export; nothing here needs ``train.py``.
3. The export (``export``): ``model.safetensors`` (the EMA weights by parameter name), a small
   ``config.json`` and the tokenizer files (README, "A trained model in ten lines").

The audio codec and an image autoencoder are named by path and refused unless their sha256 is the one recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import fsq
from bpe import TextTokenizer
from data import DataConfig, Layout, load_image_tokens
from fsq import ImageAutoencoder, PixelTokenizer
from model import Denoiser, ModelConfig

CKPT_FORMAT = "trimodal-mdm/2"
EXPORT_FORMAT = "trimodal-mdm-export/1"
warnings.filterwarnings("ignore", "torch.distributed is disabled")  # DCP on one process, as intended


# --- 1. The resumable checkpoint ------------------------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` held as ``like`` holds it: a full tensor becomes this process's dim-0 chunk of a DTensor (the
    torch.chunk split fully_shard uses, cut locally: every process holds ``t``), a DTensor stays as it is."""
    t = t.to(like.device)
    if hasattr(like, "device_mesh") and not hasattr(t, "device_mesh"):
        t = torch.distributed.tensor.distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)
    return t


def nest(flat: dict, ckpt: dict) -> dict:
    """``ckpt`` with the tensors of ``flat`` (keys ``model/<name>``, ``ema/<name>``, ``optimizer/<name>/<state>``)."""
    ema = {} if any(k.startswith("ema/") for k in flat) else None  # without an EMA, "ema" is None
    ckpt = {**ckpt, "model": {}, "ema": ema, "optimizer": {**ckpt["optimizer"], "state": {}}}
    for key, v in flat.items():
        part, name, *state = key.split("/")
        if state:
            ckpt[part]["state"].setdefault(name, {})[state[0]] = v
        else:
            ckpt[part][name] = v
    return ckpt


def read_shards(ckpt: dict, like=None, parts: tuple[str, ...] = ("model", "ema", "optimizer")) -> dict:
    """``ckpt`` (its ``meta.pt``) with the tensors of its DCP folder. ``like(key, meta)`` gives each tensor to load
    into (a DTensor takes its own shards, however many processes wrote them); by default a full one, read here."""
    import torch.distributed.checkpoint as dcp  # imported where needed: it takes seconds (DTensor, sympy)

    md, no_dist = dcp.FileSystemReader(ckpt["folder"]).read_metadata().state_dict_metadata, like is None
    like = like or (lambda key, m: torch.empty(m.size, dtype=m.properties.dtype))
    flat = {k: like(k, m) for k, m in md.items() if k.split("/")[0] in parts}
    dcp.load(flat, checkpoint_id=ckpt["folder"], no_dist=no_dist or not dist.is_initialized())
    return nest(flat, ckpt)


def save_checkpoint(path: Path, run: dict, data, model: Denoiser, opt, ema, it, rank: int, sharded: bool) -> None:
    """Everything needed to continue exactly, and what inference needs.

    run: the run's record (its TrainConfig as a dict, step, tokens, world size); data: ``data.TriModalData``;
    ema: ``train.EMA``; it: ``data.BatchIterator``. Written to a temporary file or folder, then renamed (a crash
    never leaves a half-written checkpoint): one file by process 0, or under FSDP (``sharded``, called by every
    process) the folder ``path``: the tensors by ``dcp.save``, ``meta.pt`` and the rename by process 0, complete
    on every process's return.
    """
    index = {id(p): name for name, p in model.named_parameters()}
    state = {
        "format": CKPT_FORMAT,
        **run,
        "data_config": asdict(data.config),
        "model_config": asdict(model.cfg),
        "layout": data.layout.to_dict(),
        "text_tokenizer": data.text_tokenizer.to_text(),
        "audio_codec_sha256": fsq.file_sha256(data.config.audio_codec),
        "image_tokenizer_sha256": fsq.file_sha256(data.config.image_tokenizer),
        "data": it.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "sharded": sharded,
        "optimizer": {"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]},
    }
    tensors = {f"model/{k}": v.detach() for k, v in model.state_dict().items()}
    tensors |= {f"ema/{k}": v for k, v in ema.params.items()} if ema.rho else {}
    tensors |= {f"optimizer/{index[id(p)]}/{k}": v for p, st in opt.state.items() for k, v in st.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not sharded:
        torch.save(nest({k: local(v).cpu() for k, v in tensors.items()}, state), tmp)
        return os.replace(tmp, path)
    import torch.distributed.checkpoint as dcp  # as in ``read_shards``

    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crash left
    if dist.is_initialized():
        dist.barrier()
    dcp.save(tensors, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if rank == 0:
        torch.save(state, tmp / "meta.pt")
        shutil.rmtree(old, ignore_errors=True)  # what a crash left
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # the folder is complete before any process goes on (and might read it)


def restore(ckpt: dict, model: Denoiser, opt, ema, it) -> tuple[int, int]:
    """Load model, optimizer, EMA, iterator and RNG state in place; return (step, tokens).

    Whatever number of processes wrote ``ckpt``: a sharded one is read into tensors shaped like this run's own
    (DTensors under FSDP2, which take their shards), a one-file one is cut to them (``fit``)."""
    own, params = model.state_dict(), dict(model.named_parameters())

    def like(key: str, m) -> torch.Tensor:  # the optimizer's step count is a scalar, its moments are like the parameter
        part, name, *_ = key.split("/")
        ref = {"model": own, "ema": ema.params, "optimizer": params}[part][name]
        return torch.zeros_like(ref, dtype=m.properties.dtype) if m.size else torch.zeros((), dtype=m.properties.dtype)

    ckpt = read_shards(ckpt, like, ("model", "optimizer") + ("ema",) * bool(ema.params)) if ckpt["sharded"] else ckpt
    with torch.no_grad():
        if differ := sorted(set(own) ^ set(ckpt["model"])):
            raise ValueError(f"checkpoint and model disagree on parameters: {differ[:5]}")
        for k, v in own.items():
            local(v).copy_(local(fit(ckpt["model"][k], v)))
        for k, e in ema.params.items():
            local(e).copy_(local(fit(ckpt["ema"][k], e)))
    for name, st in ckpt["optimizer"]["state"].items():
        p = params[name]
        opt.state[p] = {k: fit(v, p) if v.dim() else v.to(local(p).device) for k, v in st.items()}
    for g, saved in zip(opt.param_groups, ckpt["optimizer"]["groups"], strict=True):
        g.update(saved)
    it.load_state_dict(ckpt["data"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return int(ckpt["step"]), int(ckpt["tokens"])


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint (a sharded one's ``meta.pt``) with ``weights_only=True`` (tensors and plain containers
    only), with clear errors. A sharded save that stopped between its renames left its complete folder as .tmp."""
    folder = Path(path)
    if not folder.exists() and (folder.with_name(folder.name + ".tmp") / "meta.pt").is_file():
        folder = folder.with_name(folder.name + ".tmp")
    path = folder / "meta.pt" if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file type: all mean "not a checkpoint"
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it may be truncated or corrupt. Nothing was restarted: point --resume at an intact checkpoint."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a trimodal-mdm checkpoint (format {CKPT_FORMAT!r} expected)")
    return {**ckpt, "folder": str(folder)} if ckpt["sharded"] else ckpt


def codec_voucher(path: str, recorded: str, named: bool, what: str = "audio codec") -> str:
    """The tokenizer file's hash to trust: the file's own if the user ``named`` the file for this invocation,
    else the hash ``recorded`` in the checkpoint. A named file must still be the recorded one."""
    sha = fsq.file_sha256(path) if named else recorded
    if recorded and sha != recorded:
        raise ValueError(f"the {what} at {path or '(none)'} is not the one this checkpoint was trained with")
    return sha


def same_image_tokenizer(path: str, ckpt: dict | None) -> None:
    """A resumed run's image autoencoder must be the file it was trained with (by its sha256, wherever it is now)."""
    codec_voucher(path, (ckpt or {}).get("image_tokenizer_sha256", ""), True, "image tokenizer")


# --- 2. A trained model for inference -------------------------------------------------------------
@dataclass
class Inference:
    """What sampling and evaluation need of a trained model."""

    model: Denoiser
    layout: Layout
    text_tokenizer: TextTokenizer
    image_tokenizer: PixelTokenizer | ImageAutoencoder
    audio_codec: fsq.AudioCodec
    data_config: DataConfig  # the run's data, its codec's hash checked: the held-out splits rebuild from it
    step: int


def bundle(record: dict, model_cfg: dict, weights: dict, cfg: DataConfig, tok: TextTokenizer, device: str) -> Inference:
    """The ``Inference`` of a checkpoint or an export (``record``: its layout, step and codec hash)."""
    layout = Layout.from_dict(record["layout"])
    model = Denoiser(ModelConfig(**model_cfg), layout.vocab)
    model.load_state_dict(weights)
    codec = fsq.load_audio_codec(cfg.audio_codec, record["audio_codec_sha256"])
    pixels = load_image_tokens(cfg, record.get("image_tokenizer_sha256", ""))  # absent: gray-level patches
    return Inference(model.to(device).eval(), layout, tok, pixels, codec, cfg, int(record["step"]))


def load_for_inference(path: str | Path, use_ema: bool = True, device: str = "cpu", audio_codec: str = "") -> Inference:
    """The trained denoiser (EMA weights by default) with its layout and tokenizers.

    path: a checkpoint file, a sharded checkpoint folder, or an export folder (``export``); audio_codec: a
    codec file to use instead of the one the checkpoint names (a moved copy; its hash must be the recorded one).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return load_export(path, device)
    ckpt = read_checkpoint(path)
    ckpt = read_shards(ckpt, parts=("model", "ema")) if ckpt["sharded"] else ckpt  # full tensors, one process
    weights = ckpt["ema"] if use_ema and ckpt["ema"] is not None else ckpt["model"]
    cfg = DataConfig.from_dict(ckpt["data_config"])
    cfg = replace(cfg, audio_codec=audio_codec) if audio_codec else cfg
    tok = TextTokenizer.from_text(ckpt["text_tokenizer"], f"{path}:text_tokenizer")
    return bundle(ckpt, ckpt["model_config"], {**ckpt["model"], **weights}, cfg, tok, device)


# --- 3. The portable export: safetensors weights, a JSON config, the tokenizer files --------------
def export(inf: Inference, folder: str | Path) -> Path:
    """Write ``folder``/model.safetensors, config.json, text_bpe.tiktoken, audio_codec.pt (and image_tokenizer.pt,
    if the model has one); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in inf.model.state_dict().items()}
    save_file(weights, folder / "model.safetensors")
    inf.text_tokenizer.save(folder / "text_bpe.tiktoken")
    shutil.copyfile(inf.data_config.audio_codec, folder / "audio_codec.pt")
    files = {"audio_codec": "audio_codec.pt"}
    if inf.data_config.image_tokenizer:
        files["image_tokenizer"] = shutil.copyfile(inf.data_config.image_tokenizer, folder / "image_tokenizer.pt").name
    config = {
        "format": EXPORT_FORMAT,
        "model": asdict(inf.model.cfg),
        "layout": inf.layout.to_dict(),
        "data": asdict(inf.data_config) | files,
        **{f"{k}_sha256": fsq.file_sha256(folder / name) for k, name in files.items()},
        "step": inf.step,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_export(folder: str | Path, device: str = "cpu") -> Inference:
    """An ``export`` folder as an ``Inference`` bundle (weights, layout, tokenizers, the codec it ships)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder}/config.json is not a trimodal-mdm export (format {EXPORT_FORMAT!r} expected)")
    files = {k: str(folder / config["data"][k]) for k in ("audio_codec", "image_tokenizer") if config["data"].get(k)}
    cfg = DataConfig.from_dict(config["data"] | files)
    tok = TextTokenizer.load(folder / "text_bpe.tiktoken")
    return bundle(config, config["model"], load_file(folder / "model.safetensors"), cfg, tok, device)
