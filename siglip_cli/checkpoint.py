"""A checkpoint's files: its recipe for pixels, its float32 logit scale and bias, its tower classes, what a first
run downloads, and one readable line when it cannot be loaded. Nothing here loads the weights."""

from __future__ import annotations

import json
import os

from PIL import Image

from .config import ModelConfig
from .decode import ImageSpec
from .errors import RunError, first_line


def stored_scalars(name: str, revision: str | None, keys=("logit_scale", "logit_bias")) -> dict[str, float]:
    """The checkpoint's own float32 values of a few scalars, read from its safetensors files.

    A model loaded in bfloat16 rounds them (logit_scale 4.7244 -> 4.7188, logit_bias -16.7711 -> -16.75), which
    moves a score near a 0.05 threshold by about 5%: scores use these instead. Empty when they cannot be read
    (then the loaded values are used).
    """
    from safetensors import safe_open

    def local(filename: str) -> str | None:
        if os.path.isdir(name):
            path = os.path.join(name, filename)
            return path if os.path.isfile(path) else None
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, filename, revision=revision)
        return found if isinstance(found, str) else None

    files = {k: "model.safetensors" for k in keys}
    index = local("model.safetensors.index.json")
    if index:
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = {k: weight_map[k] for k in keys if k in weight_map}
    out: dict[str, float] = {}
    try:
        for key, filename in files.items():
            if (path := local(filename)) is not None:
                with safe_open(path, "pt") as st:
                    if key in st.keys():
                        out[key] = float(st.get_tensor(key).float().reshape(-1)[0])
    except (OSError, ValueError, RuntimeError):
        return {}
    return out


def image_spec(processor, naflex: bool, max_patches: int | None) -> ImageSpec:
    resample = Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BILINEAR)))
    if naflex:
        return ImageSpec(
            naflex=True,
            resample=resample,
            patch_size=int(processor.patch_size),
            max_patches=int(max_patches or processor.max_num_patches),
        )
    size = processor.size
    return ImageSpec(height=int(size["height"]), width=int(size["width"]), resample=resample)


def load_spec(cfg: ModelConfig) -> ImageSpec:
    """The checkpoint's pixel recipe from its config files alone (no weights): for decoding where the model is not
    loaded (the driver of a Ray run)."""
    from transformers import AutoConfig, AutoImageProcessor

    hf_quiet(False)
    revision = cfg.commit or cfg.revision
    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=revision)
        processor = AutoImageProcessor.from_pretrained(cfg.name, revision=revision)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise RunError(cannot_load(cfg.name, e)) from None
    return image_spec(processor, config.model_type == "siglip2", cfg.max_patches)


def hf_quiet(show_downloads: bool) -> None:
    """Keep stderr for our own messages; the Hub's download bars only for a person watching a terminal."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if show_downloads:
        hf_logging.enable_progress_bar()
        enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        disable_progress_bars()


def download_note(name: str, revision: str | None, cache_dir: str | None = None) -> str | None:
    """What a first run is about to download (the weights are GBs: without a word it looks like a hang), or
    None when the checkpoint is a local folder, already in the Hub cache, or the Hub is switched off."""
    from huggingface_hub import constants, try_to_load_from_cache

    if os.path.isdir(name) or constants.HF_HUB_OFFLINE:
        return None
    for weights in ("model.safetensors", "model.safetensors.index.json"):
        try:
            if isinstance(try_to_load_from_cache(name, weights, cache_dir=cache_dir, revision=revision), str):
                return None
        except ValueError:  # not a valid repo id: loading will say so
            return None
    where = cache_dir or constants.HF_HUB_CACHE
    return f"siglip: downloading {name} from the Hugging Face Hub into {where} (first run only; so400m is about 4.5 GB)"


def towers(config):
    """The (vision, text) tower classes of a SigLIP checkpoint's config, or () for another kind of model."""
    import transformers

    names = {"siglip": ("SiglipVisionModel", "SiglipTextModel"), "siglip2": ("Siglip2VisionModel", "Siglip2TextModel")}
    return tuple(getattr(transformers, n) for n in names.get(config.model_type, ()))


def _unimportable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


def cannot_load(name: str, error: BaseException, what: str = "") -> str:
    """One line: the model, the cause, and the fix."""
    from .weights import missing_folder

    if (folder := missing_folder(name)) is not None:
        return folder
    first = first_line(error)
    text = str(error)
    missing = [
        p
        for p in ("sentencepiece", "protobuf")
        if p in text.lower() and ("install" in text.lower() or isinstance(error, ImportError))
    ]
    if what == "the tokenizer of " and not missing and _unimportable("sentencepiece"):
        missing = ["sentencepiece"]
    if missing:
        return (
            f"cannot load {what}{name!r}: it needs the {' and '.join(missing)} package(s), which are missing "
            f"here; pip install {' '.join(missing)} (or reinstall siglip-cli, which depends on them)"
        )
    return (
        f"cannot load {what}{name!r}: {first} (give a Hub id such as google/siglip2-so400m-patch14-384, or a "
        "folder saved with save_pretrained)"
    )
