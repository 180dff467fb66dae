"""Checkpoints: what a run saves to continue exactly, what inference loads, and a portable export.

1. The resumable checkpoint (``save_checkpoint``, ``restore``): model, EMA, optimizer, data-iterator
   and RNG state plus the run's configs, so ``train.py --resume`` continues bit-identically. One
   file, or one per process under FSDP2 (``<dir>/rank<r>.pt``), read with ``weights_only=True``.
2. ``load_for_inference``: the EMA weights in a ``model.Denoiser`` with the layout and tokenizers
   (``Inference``), from a checkpoint, a sharded checkpoint or an export; nothing here needs ``train.py``.
3. The export (``export``): ``model.safetensors`` (the EMA weights by parameter name), a small
   ``config.json`` and the tokenizer files (README, "A trained model in ten lines").

The audio codec is named by path and refused unless its sha256 is the one the checkpoint recorded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import fsq
from bpe import TextTokenizer
from data import DataConfig, Layout
from fsq import PixelTokenizer
from model import Denoiser, ModelConfig

CKPT_FORMAT = "trimodal-mdm/2"
EXPORT_FORMAT = "trimodal-mdm-export/1"


# --- 1. The resumable checkpoint ------------------------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def save_checkpoint(path: Path, run: dict, data, model: Denoiser, opt, ema, it, rank: int, sharded: bool) -> None:
    """Everything needed to continue exactly, and what inference needs.

    run: the run's record (its TrainConfig as a dict, step, tokens, world size); data: ``data.TriModalData``;
    ema: ``train.EMA``; it: ``data.BatchIterator``. Written to a temporary file, then renamed (a crash never
    leaves a half-written checkpoint): one file by process 0, or under FSDP one per process, ``path/rank<r>.pt``.
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
        "data": it.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "sharded": sharded,
        "model": {k: local(v).detach().cpu() for k, v in model.state_dict().items()},
        "ema": {k: local(v).cpu() for k, v in ema.params.items()} if ema.rho else None,
        "optimizer": {
            "state": {index[id(p)]: {k: local(v).cpu() for k, v in st.items()} for p, st in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        },
    }
    path = path / f"rank{rank}.pt" if sharded else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore(ckpt: dict, model: Denoiser, opt, ema, it) -> tuple[int, int]:
    """Load model, optimizer, EMA, iterator and RNG state in place; return (step, tokens)."""
    with torch.no_grad():
        own = model.state_dict()
        if differ := sorted(set(own) ^ set(ckpt["model"])):
            raise ValueError(f"checkpoint and model disagree on parameters: {differ[:5]}")
        for k, v in own.items():
            local(v).copy_(ckpt["model"][k])
        for k, e in ema.params.items():
            local(e).copy_(ckpt["ema"][k])
    params = dict(model.named_parameters())
    for name, st in ckpt["optimizer"]["state"].items():
        p = params[name]
        st = {k: v.to(local(p).device) for k, v in st.items()}
        if hasattr(p, "device_mesh"):  # FSDP2: the moments are sharded like their parameter, the step count is not
            mesh = p.device_mesh, p.placements
            st = {k: torch.distributed.tensor.DTensor.from_local(v, *mesh) if v.dim() else v for k, v in st.items()}
        opt.state[p] = st
    for g, saved in zip(opt.param_groups, ckpt["optimizer"]["groups"], strict=True):
        g.update(saved)
    it.load_state_dict(ckpt["data"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return int(ckpt["step"]), int(ckpt["tokens"])


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only), with clear errors."""
    path = Path(path)
    path = path / "rank0.pt" if path.is_dir() else path
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
    return ckpt


def own_shard(path: str | Path, first: dict, rank: int, world: int) -> dict:
    """This process's file of a sharded (FSDP2) checkpoint, which only as many processes can resume."""
    if first["world"] != world:
        raise ValueError(f"this sharded checkpoint was written by {first['world']} processes; resume with as many")
    return read_checkpoint(Path(path) / f"rank{rank}.pt")


def data_config(record: dict) -> DataConfig:
    """The DataConfig a checkpoint or export recorded (tuples were stored as lists or tuples)."""
    kinds = {f.name: f.type for f in fields(DataConfig)}
    return DataConfig(**{k: tuple(v) if kinds[k].startswith("tuple") else v for k, v in record.items()})


def codec_voucher(path: str, recorded: str, named: bool) -> str:
    """The audio codec hash to trust: the file's own if the user ``named`` the file for this invocation,
    else the hash ``recorded`` in the checkpoint. A named codec must still be the recorded one."""
    sha = fsq.file_sha256(path) if named else recorded
    if recorded and sha != recorded:
        raise ValueError(f"the audio codec at {path} is not the one this checkpoint was trained with")
    return sha


# --- 2. A trained model for inference -------------------------------------------------------------
def gather_shards(path: str | Path, first: dict) -> dict:
    """Full model and EMA tensors from a sharded (FSDP2) checkpoint folder, for inference on one process.

    fully_shard splits every parameter along dim 0 into one chunk per rank (torch.chunk order), so
    concatenating the ranks' local shards in rank order rebuilds the full tensor.
    """
    shards = [first] + [read_checkpoint(Path(path) / f"rank{r}.pt") for r in range(1, first["world"])]
    parts = [part for part in ("model", "ema") if first[part] is not None]  # without an EMA, "ema" stays None
    full = {p: {k: torch.cat([s[p][k] for s in shards]) if v.dim() else v for k, v in first[p].items()} for p in parts}
    return {**first, **full, "sharded": False}


@dataclass
class Inference:
    """What sampling and evaluation need of a trained model."""

    model: Denoiser
    layout: Layout
    text_tokenizer: TextTokenizer
    image_tokenizer: PixelTokenizer
    audio_codec: fsq.AudioCodec
    data_config: DataConfig  # the run's data, its codec's hash checked: the held-out splits rebuild from it
    step: int


def bundle(record: dict, model_cfg: dict, weights: dict, cfg: DataConfig, tok: TextTokenizer, device: str) -> Inference:
    """The ``Inference`` of a checkpoint or an export (``record``: its layout, step and codec hash)."""
    layout = Layout.from_dict(record["layout"])
    model = Denoiser(ModelConfig(**model_cfg), layout.vocab)
    model.load_state_dict(weights)
    codec = fsq.load_audio_codec(cfg.audio_codec, record["audio_codec_sha256"])
    pixels = PixelTokenizer(cfg.image_levels, cfg.image_patch)
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
    ckpt = gather_shards(path, ckpt) if ckpt["sharded"] else ckpt
    weights = ckpt["ema"] if use_ema and ckpt["ema"] is not None else ckpt["model"]
    cfg = data_config(ckpt["data_config"])
    cfg = replace(cfg, audio_codec=audio_codec) if audio_codec else cfg
    tok = TextTokenizer.from_text(ckpt["text_tokenizer"], f"{path}:text_tokenizer")
    return bundle(ckpt, ckpt["model_config"], {**ckpt["model"], **weights}, cfg, tok, device)


# --- 3. The portable export: safetensors weights, a JSON config, the tokenizer files --------------
def export(inf: Inference, folder: str | Path) -> Path:
    """Write ``folder``/model.safetensors, config.json, text_bpe.tiktoken and audio_codec.pt; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in inf.model.state_dict().items()}
    save_file(weights, folder / "model.safetensors")
    inf.text_tokenizer.save(folder / "text_bpe.tiktoken")
    shutil.copyfile(inf.data_config.audio_codec, folder / "audio_codec.pt")
    config = {
        "format": EXPORT_FORMAT,
        "model": asdict(inf.model.cfg),
        "layout": inf.layout.to_dict(),
        "data": asdict(inf.data_config) | {"audio_codec": "audio_codec.pt"},
        "audio_codec_sha256": fsq.file_sha256(folder / "audio_codec.pt"),
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
    cfg = data_config({**config["data"], "audio_codec": str(folder / config["data"]["audio_codec"])})
    tok = TextTokenizer.load(folder / "text_bpe.tiktoken")
    return bundle(config, config["model"], load_file(folder / "model.safetensors"), cfg, tok, device)
