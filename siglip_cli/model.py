"""Load a SigLIP / SigLIP 2 checkpoint (Hub id or local folder) and encode images and texts with it."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from . import compat
from .config import TEXT_LENGTH, ModelConfig, usable_cpus
from .decode import ImageSpec
from .errors import RunError, first_line
from .loader import Batch
from .text import prepare
from .weights import cached_commit, fingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What the output's metadata records about the model, so that a file explains itself later."""

    name: str
    revision: str | None  # as asked for
    commit: str | None  # as resolved on the Hub (None for a local folder)
    architecture: str
    dim: int
    text_length: int
    preprocessing: str


def resolve_devices(name: str) -> list[torch.device]:
    """The devices a run encodes on, one encoder each.

    'auto': every visible CUDA GPU, else MPS, else the CPU. 'cuda': every visible GPU; 'cuda:N' one of them;
    a comma-separated list names several of one kind ('cuda:0,cuda:2'; 'cpu,cpu' runs two CPU encoders, which
    tests the dispatch but does not speed up a CPU). An explicit device that is absent is an error.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            return [torch.device("mps")]
        return [torch.device("cpu")]
    devices: list[torch.device] = []
    for part in name.split(","):
        device = torch.device(part)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RunError("--device cuda was asked for, but CUDA is not available here; use --device cpu or auto")
            count = torch.cuda.device_count()
            if device.index is None:
                devices += [torch.device("cuda", i) for i in range(count)]
                continue
            if device.index >= count:
                raise RunError(f"--device {part}: this machine has {count} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RunError("--device mps was asked for, but MPS is not available here; use --device cpu or auto")
        devices.append(device)
    if len({d.type for d in devices}) > 1:
        raise RunError(f"--device {name}: give devices of one kind (several GPUs, or the CPU)")
    return devices


def default_batch_size(device: torch.device) -> int:
    """Large enough to keep a GPU busy and within 16 GB for so400m/384; small on a CPU for smooth progress."""
    return {"cuda": 256, "mps": 64}.get(device.type, 16)


def resolve_device(name: str) -> torch.device:
    """The first device of resolve_devices: where bench and text embedding run."""
    return resolve_devices(name)[0]


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether a CUDA device has bfloat16 tensor cores (Ampere, compute capability 8.0, and newer).

    On older cards (T4, V100) bfloat16 is emulated: slow, and SDPA falls back to its math kernel, which
    materializes the whole attention matrix.
    """
    if torch.version.hip:  # ROCm: ask the runtime about that device
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX; Arm BF16), as oneDNN uses it.

    There bfloat16 runs the towers about 3x faster than float32 (min cos 0.99997); elsewhere oneDNN emulates it,
    slower than float32.
    """
    return compat.cpu_bf16_native()


def resolve_dtype(name: str, devices: torch.device | list[torch.device]) -> torch.dtype:
    """'auto': on CUDA, bfloat16 when every device does it natively, float16 otherwise; on a CPU, bfloat16 where
    the CPU does it in hardware; float32 elsewhere (MPS included). One dtype for all devices: a run's rows
    must not depend on which GPU made them."""
    devices = [devices] if isinstance(devices, torch.device) else devices
    if name != "auto":
        return DTYPES[name]
    kind = devices[0].type
    if kind == "cuda":
        return torch.bfloat16 if all(cuda_bf16_native(d) for d in devices) else torch.float16
    if kind == "cpu" and cpu_bf16_native():
        return torch.bfloat16
    return torch.float32


def resolve_backend(cfg: ModelConfig, device: torch.device, naflex: bool) -> str:
    """'torch' or 'openvino' for the image tower. auto: OpenVINO on a CPU when the extra is installed (not with
    --compile, a torch feature); NaFlex checkpoints always run on torch."""
    from .encoders import openvino

    want = cfg.backend
    if want == "auto":
        want = "openvino" if device.type == "cpu" and openvino.available() and not cfg.compile else "torch"
    if want == "openvino":
        if not openvino.available():
            raise RunError("--backend openvino needs the openvino extra: pip install 'siglip-cli[openvino]'")
        if device.type != "cpu":
            raise RunError(f"--backend openvino runs on the CPU, not {device.type}; use --device cpu")
        if naflex:
            if cfg.backend == "openvino" or cfg.quantize != "none":
                print(
                    "siglip: note: NaFlex checkpoints (variable patch grids) run on torch, not OpenVINO",
                    file=sys.stderr,
                )
            want = "torch"
    if cfg.quantize != "none" and want != "openvino":
        raise RunError(
            f"--quantize {cfg.quantize} needs the OpenVINO backend on a CPU "
            "(pip install 'siglip-cli[openvino]', --device cpu) and a fixed-resolution checkpoint"
        )
    return want


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


def _image_spec(processor, naflex: bool, max_patches: int | None) -> ImageSpec:
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

    _hf_quiet(False)
    revision = cfg.commit or cfg.revision
    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=revision)
        processor = AutoImageProcessor.from_pretrained(cfg.name, revision=revision)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise RunError(_cannot_load(cfg.name, e)) from None
    return _image_spec(processor, config.model_type == "siglip2", cfg.max_patches)


def _hf_quiet(show_downloads: bool) -> None:
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


def check_compiler(device: torch.device) -> None:
    """--compile builds C++ (CPU) or a C launcher (CUDA, through Triton): without a compiler, say so in one line."""
    import shutil
    import sys

    if device.type == "cuda":
        found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        need = "a C compiler (gcc or clang, or set CC)"
    else:
        found = shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))
        need = "a C++ compiler (g++, or set CXX)"
    if not found:
        raise RunError(f"--compile needs {need} and none was found; install one, or run without --compile")


def _towers(config):
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


def _cannot_load(name: str, error: BaseException, what: str = "") -> str:
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


class _Features(torch.nn.Module):
    """One tower of a whole SiglipModel / Siglip2Model, called as a tower is (its output has `pooler_output`)."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, **inputs):
        return getattr(self.model, self.method)(**inputs)


class Encoder:
    """A checkpoint on its device: L2-normalized image and text embeddings, and the logit scale and bias."""

    def __init__(
        self,
        model,
        processor,
        tokenizer,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        scalars: dict[str, float] | None = None,
        config=None,
        openvino: dict | None = None,
    ):
        """model: a whole SiglipModel / Siglip2Model, or only its vision tower (then `config` is the checkpoint's
        whole config, `scalars` hold the logit scale and bias, and the text tower and the tokenizer are loaded
        from cfg's checkpoint the first time texts are encoded)."""
        whole = hasattr(model, "get_image_features")  # the public API of a whole model; a tower is called
        self.config = model.config if whole else config
        self.device, self.dtype, self.text_dtype = device, dtype, model.dtype
        model = model.to(device).eval()
        self.vision = _Features(model, "get_image_features") if whole else model
        self._text = _Features(model, "get_text_features") if whole else None
        self._tokenizer, self._source = tokenizer, (cfg.name, cfg.commit or cfg.revision)
        self.text_rules = cfg.text_rules
        self.naflex = self.config.model_type == "siglip2"
        self.spec = _image_spec(processor, self.naflex, cfg.max_patches)
        # --max-patches as an output records it (see weights.patches_setting): None for the checkpoint's own
        self.patches = (
            self.spec.max_patches if self.naflex and self.spec.max_patches != processor.max_num_patches else None
        )
        scale = float(getattr(processor, "rescale_factor", 1 / 255))
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)
        # (x * scale - mean) / std == x * a + b, folded once
        self.pixel_scale, self.pixel_shift = scale / std, -mean / std
        # float32 as stored (see stored_scalars); logit_scale is stored as a log
        scalars = dict(scalars or {})
        if whole:
            scalars.setdefault("logit_scale", model.logit_scale.detach().float().item())
            scalars.setdefault("logit_bias", model.logit_bias.detach().float().item())
        self.logit_scale, self.logit_bias = math.exp(scalars["logit_scale"]), scalars["logit_bias"]
        text_length = int(getattr(self.config.text_config, "max_position_embeddings", TEXT_LENGTH))
        architecture = (getattr(self.config, "architectures", None) or [type(model).__name__])[0]
        self.info = ModelInfo(
            name=cfg.name,
            revision=cfg.revision,
            commit=cfg.commit or cached_commit(cfg.name, cfg.revision),
            architecture=architecture,
            dim=int(self.config.vision_config.hidden_size),
            text_length=text_length,
            preprocessing=(
                f"naflex patch={self.spec.patch_size} max_patches={self.spec.max_patches}"
                if self.naflex
                else f"resize {self.spec.width}x{self.spec.height}"
            )
            + f" resample={self.spec.resample.name.lower()} mean={processor.image_mean} std={processor.image_std}",
        )
        self.fingerprint = fingerprint(cfg.name, self.info.commit)
        self.chunk = 0  # after running out of memory: images per forward pass (0: the whole batch)
        self.pad_to = 0  # with --compile: pad every batch to this size, so one compiled graph serves them all
        self.text_backend, self.text_runner = "torch", None  # what runs the text tower (encoders/ may change it)
        self.text_kind = str(self.text_dtype)  # what decides the text embeddings' numbers (the vocab cache's key)
        self.tower, self.backend, self.quantize = self._image_tower(cfg.compile, openvino)

    def _image_tower(self, compile: bool, openvino: dict | None):
        """What runs the image tower, chosen once: (callable, backend, quantize). OpenVINO where it was asked for
        (dict(dtype, quantize, threads, batch)) and can be had here, else torch (eager, or compiled)."""
        if openvino is not None:
            from .encoders.openvino import image_tower

            self.dtype = openvino["dtype"]
            tower = image_tower(self, **openvino)  # None: it cannot be converted here (said why)
            if tower is not None:
                return tower, "openvino", openvino["quantize"]
            self.vision.to(self.dtype)  # loaded in float32 for the converter
        tower = self._naflex if self.naflex else self._fixed
        return (self._compiled(tower) if compile else tower), "torch", "none"

    @classmethod
    def load(cls, cfg: ModelConfig, show_downloads: bool = False, batch_size: int | None = None) -> "Encoder":
        """The model on the first of cfg's devices (see load_all)."""
        return cls.load_all(cfg, show_downloads, first_only=True, batch_size=batch_size)[0]

    @classmethod
    def load_all(
        cls, cfg: ModelConfig, show_downloads: bool = False, first_only: bool = False, batch_size: int | None = None
    ) -> list["Encoder"]:
        """Load a Hub id or a local folder, once, onto each of cfg's devices; a model that cannot be had is a
        RunError with one readable line. What runs each tower is chosen here, once.

        show_downloads: a person is watching stderr: say what a first run downloads, and show its progress.
        batch_size: the run's (default: the device's); an OpenVINO image graph is built for it.
        """
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        _hf_quiet(show_downloads)
        devices = resolve_devices(cfg.device)
        dtype = resolve_dtype(cfg.dtype, devices)
        devices = devices[:1] if first_only else devices
        if cfg.compile:
            check_compiler(devices[0])
        if devices[0].type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(usable_cpus())  # torch counts the machine's cores, not the container's
        if show_downloads and (note := download_note(cfg.name, cfg.commit or cfg.revision)):
            print(note, file=sys.stderr)
        revision = cfg.commit or cfg.revision  # the commit the run's signature was made with
        try:
            config = AutoConfig.from_pretrained(cfg.name, revision=revision)
            naflex = config.model_type == "siglip2"
            backend = resolve_backend(cfg, devices[0], naflex)
            load = torch.float32 if backend == "openvino" else dtype  # OpenVINO converts float32 weights
            scalars = stored_scalars(cfg.name, revision)
            towers = _towers(config)
            if towers and len(scalars) == 2:  # the image tower alone: the text tower loads when texts are encoded
                model = towers[0].from_pretrained(cfg.name, revision=revision, dtype=load, attn_implementation="sdpa")
            else:  # weights whose scale and bias cannot be read on their own (.bin files): the whole model
                model = AutoModel.from_pretrained(cfg.name, revision=revision, dtype=load, attn_implementation="sdpa")
            processor = AutoImageProcessor.from_pretrained(cfg.name, revision=revision)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise RunError(_cannot_load(cfg.name, e)) from None
        if not towers and (not hasattr(model, "get_image_features") or not hasattr(model, "logit_bias")):
            raise RunError(f"{cfg.name!r} is a {type(model).__name__}, not a SigLIP model")
        on_cpu = devices[0].type == "cpu" and cfg.backend != "torch" and not cfg.compile
        threads = max(1, usable_cpus() // len(devices))  # several CPU encoders share the cores
        batch = batch_size or default_batch_size(devices[0])
        ov = dict(dtype=dtype, quantize=cfg.quantize, threads=threads, batch=batch, bound=cfg.int8_bound)
        encoders = []
        for i, device in enumerate(devices):
            # Each GPU gets its own copy, made on the host before the first one moves; CPU encoders share one.
            own = model if device.type == "cpu" or i == len(devices) - 1 else copy.deepcopy(model)
            encoder = cls(
                own,
                processor,
                None,
                cfg,
                device,
                load,
                scalars,
                config,
                openvino=ov if on_cpu and backend == "openvino" else None,
            )
            if on_cpu:
                from .encoders import openvino, ovtext

                if ovtext.available():  # NaFlex checkpoints' text tower too: it has one fixed shape
                    openvino.attach_text(encoder, dtype, threads)
            encoders.append(encoder)
        return encoders

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded the first time texts are encoded (image runs never need it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            name, revision = self._source
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
            except (OSError, ValueError, KeyError, ImportError, TypeError, AttributeError) as e:
                # without sentencepiece, transformers 5.0 fails on SigLIP 1 tokenizers with an AttributeError
                raise RunError(_cannot_load(name, e, "the tokenizer of ")) from None
        return self._tokenizer

    @property
    def text(self):
        """The text tower on this device, loaded the first time texts are encoded."""
        if self._text is None:
            self._text = self.load_text(self.text_dtype).to(self.device).eval()
        return self._text

    def load_text(self, dtype: torch.dtype):
        """The checkpoint's text tower, read from its weights in dtype (on the CPU)."""
        name, revision = self._source
        try:
            return _towers(self.config)[1].from_pretrained(
                name, revision=revision, dtype=dtype, attn_implementation="sdpa"
            )
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise RunError(_cannot_load(name, e, "the text tower of ")) from None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """SigLIP's text rules: cleaned (text.clean), right-padded to the trained length, truncated, EOS kept;
        input ids."""
        tokens = self.tokenizer(
            prepare(texts, self.text_rules),
            padding="max_length",
            max_length=self.info.text_length,
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        return tokens["input_ids"]

    def _compiled(self, tower):
        from .vocab import cache_dir

        # Keep inductor's artefacts where a nightly run finds them again (its default, in /tmp, is wiped on
        # reboot), unless the user chose a place. torch writes its default into the environment when it first
        # looks, so that value counts as unset.
        default = compat.inductor_default_cache_dir()
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), "inductor")
        return torch.compile(tower, dynamic=False)

    def _fixed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        x = (x * self.pixel_scale[:, None, None] + self.pixel_shift[:, None, None]).to(self.dtype)
        return F.normalize(self.vision(pixel_values=x).pooler_output.float(), dim=-1)

    def _naflex(self, x: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor, full: bool) -> torch.Tensor:
        n, patches, width = x.shape
        x = x.view(n, patches, width // 3, 3).float() * self.pixel_scale + self.pixel_shift
        x = (x.view(n, patches, width) * mask[..., None]).to(self.dtype)  # padding patches are zeros, as in HF
        # The documented inputs only: a 2-D (n, patches) mask, True = a real patch. The host knows whether any image
        # has padding; without padding no mask is passed, so transformers has nothing to ask the device about.
        attend = None if full else mask.bool()
        out = self.vision(pixel_values=x, pixel_attention_mask=attend, spatial_shapes=grids)
        return F.normalize(out.pooler_output.float(), dim=-1)

    def close(self) -> None:
        """The run is over: nothing to release for a local model."""

    def on_device(self):
        """A context in which CUDA work goes to this encoder's GPU: torch's current device is per thread and
        starts as GPU 0, so every CUDA call (allocations, streams, events) is made inside it."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def encode_images(self, batch: Batch) -> torch.Tensor:
        """Embeddings (n, D) float32 on the device for the decoded images of a batch (launched, not awaited).

        After an out-of-memory error (see shrink) the batch goes through in chunks of self.chunk images.
        """
        n = len(batch.ok)
        args = [batch.pixels] if not self.naflex else [batch.pixels, batch.patch_mask, batch.grids]
        step = self.chunk or n
        with self.on_device():
            out = [self._encode([a[i : i + step] for a in args]) for i in range(0, n, step)]
            return out[0] if len(out) == 1 else torch.cat(out)

    def _encode(self, args: list[torch.Tensor]) -> torch.Tensor:
        n = len(args[0])
        pad = max(0, self.pad_to - n)
        if pad:  # only with --compile: a last, smaller batch would otherwise compile a second graph
            args = [torch.cat([a, a[:1].expand(pad, *a.shape[1:])]) for a in args]
        # Host -> device from the batch's pinned buffer on this device's current stream. The loader gives every
        # batch a new buffer, and torch's pinned-memory cache does not hand a buffer out again before the copies
        # recorded on it are done, so the buffer is never overwritten while a copy reads it.
        x = args[0].to(self.device, non_blocking=True)
        if self.naflex:
            mask, grids = args[1], args[2]
            # Whether any image has padding patches is known here, on the host: transformers would otherwise ask
            # the device (mask.all(), twice per batch), a sync that stops the host queueing the next batch.
            full = bool(mask.all())
            args = (x, mask.to(self.device, non_blocking=True), grids, full)
        else:
            args = (x,)
        try:
            return self.tower(*args)[:n]
        except compat.compile_failures() as e:  # --compile only: the first call compiles
            first = first_line(e)
            raise RunError(f"--compile failed: {first}; run without --compile") from None

    def shrink(self, error: BaseException, batch_size: int) -> None:
        """After the device ran out of memory on a batch: halve the chunk size (the caller redoes the batch, and
        later batches go in chunks of that size); at one image, a RunError."""
        chunk = (self.chunk or batch_size) // 2
        if chunk < 1:
            first = first_line(error)
            raise RunError(
                f"one image does not fit in the memory of {self.device}: {first}; try --dtype "
                "bfloat16 or float16, a smaller --max-patches, or another --device"
            ) from None
        self.chunk = chunk
        if self.pad_to:
            self.pad_to = chunk
        if self.device.type == "cuda":
            with self.on_device():
                torch.cuda.empty_cache()  # the failed attempt's blocks, so the smaller chunks fit

    def to_host(self, tensors: dict[str, torch.Tensor]):
        """Start copying device tensors back; returns a function that waits for them and gives numpy arrays.

        On CUDA the copies go into pinned memory on this device's current stream (the stream the batch was
        computed on), behind an event recorded on that same stream, so that the host finishes one batch while the
        device runs the next. The pinned buffers are new for each batch and are read only after the event, so
        no buffer is reused early. Elsewhere they are plain copies.
        """
        if self.device.type != "cuda":
            arrays = {k: v.cpu().numpy() for k, v in tensors.items()}
            return lambda: arrays
        with self.on_device():
            stream = torch.cuda.current_stream(self.device)
            host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in tensors.items()}
            for k, v in tensors.items():
                host[k].copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)

        def wait():
            done.synchronize()  # the host waits for this event only, on this device
            return {k: v.numpy() for k, v in host.items()}

        return wait

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embeddings (n, D) float32 on the device: cleaned, right-padded to the trained length, no mask."""
        with self.on_device():
            out = [self._texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
            return torch.cat(out) if out else torch.empty((0, self.info.dim), device=self.device)

    def _texts(self, texts: list[str]) -> torch.Tensor:
        if self.text_runner is not None:
            return torch.from_numpy(self.text_runner(prepare(texts, self.text_rules))).to(self.device)
        # No attention mask: the text tower was trained without one, and passing it changes the embedding.
        feats = self.text(input_ids=self.tokenize(texts).to(self.device))
        return F.normalize(feats.pooler_output.float(), dim=-1)
